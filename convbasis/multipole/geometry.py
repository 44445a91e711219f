"""The static geometry of Fast Multipole Attention: padding, levels, box and token sizes.

Shared by the fast path (:mod:`~convbasis.multipole.levels`,
:mod:`~convbasis.multipole.attention`) and the dense oracle in :mod:`convbasis.reference`, so
both validate and pad the inputs the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from array_api_compat import device

from .._array import (
    as_floating,
    check_batch,
    check_integer,
    check_last_dim,
    check_rows,
    namespace,
)

__all__ = [
    "PARAMS_DOC",
    "Geometry",
    "broadcast_and_pad",
    "document_params",
    "geometry",
    "kernel_shapes",
    "prepare",
]


@dataclass(frozen=True)
class Geometry:
    """True length ``n``, padded length ``N``, block ``m``, basis ``p`` and causality."""

    n: int
    padded: int
    block: int
    basis: int
    causal: bool

    @property
    def levels(self):
        # docs/math.rst §6: L = log2(N/m) − 1 far-field levels (none when N/m <= 2)
        return max((self.padded // self.block).bit_length() - 2, 0)

    def box(self, level):
        return self.block << (level - 1)

    def chunk(self, level):
        return self.box(level) // self.basis


def geometry(n, block, basis, causal):
    """Validate ``block`` and ``basis`` and pad ``n`` to ``N = block · 2^⌈log2⌈n/block⌉⌉``."""
    block = check_integer(block, "block")
    if block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    basis = check_integer(basis, "basis")
    if block % basis:
        raise ValueError(
            f"basis must divide the box size block={block} (every box is a multiple of "
            f"block), got basis={basis}"
        )
    if n < block:
        # One block, so exact attention, whatever its size: the smallest power of two that
        # holds n gives the same result without the block² work and memory of the padding.
        # (At least basis, so that the smaller block still validates when it is stored.)
        block = max(1 << (n - 1).bit_length(), basis)
    blocks = -(-n // block)
    return Geometry(n, block << (blocks - 1).bit_length(), block, basis, bool(causal))


def kernel_shapes(n, /, *, block=64, basis=4):
    """Shapes of the ``downsample`` kernels for length ``n``: ``((c_1,), …, (c_L,))``.

    ``c_ℓ = block · 2^{ℓ−1} / basis`` for the ``L = log2(N/block) − 1`` far-field levels of
    the padded length ``N``.
    """
    geo = geometry(check_integer(n, "n"), block, basis, True)
    return tuple((geo.chunk(level),) for level in range(1, geo.levels + 1))


def _check_kernels(xp, geo, kernels):
    expected = [(geo.chunk(level),) for level in range(1, geo.levels + 1)]
    if len(kernels) != geo.levels:
        raise ValueError(
            f"downsample must hold one kernel per far-field level: {geo.levels} arrays "
            f"of shapes {expected} for n={geo.n} (padded to {geo.padded}), got {len(kernels)}"
        )
    for i, (w, shape) in enumerate(zip(kernels, expected, strict=True)):
        if not xp.isdtype(w.dtype, "real floating"):
            raise TypeError(f"downsample[{i}] must have a real floating dtype, got {w.dtype}")
        if tuple(w.shape) != shape:
            raise ValueError(
                f"downsample[{i}] (level {i + 1}) must have shape {shape} (box size "
                f"{geo.box(i + 1)} / basis {geo.basis}), got {tuple(w.shape)}"
            )


def prepare(arrays, names, *, block, basis, causal, downsample):
    """Validate; return ``(xp, geometry, arrays, kernels)`` in one floating dtype.

    ``kernels`` is ``None`` for ``"mean"`` or a tuple of ``(c_ℓ,)`` arrays.
    """
    supplied = not isinstance(downsample, str)
    if isinstance(downsample, str) and downsample != "mean":
        raise ValueError(
            f"downsample must be 'mean' or a tuple of 1-D kernels (one per level), "
            f"got {downsample!r}"
        )
    if supplied and not isinstance(downsample, (tuple, list)):
        raise ValueError(
            "downsample must be 'mean' or a tuple of 1-D kernels (one per level), "
            f"got {type(downsample).__name__}"
        )
    kernels = tuple(downsample) if supplied else ()
    xp = namespace(*arrays, *kernels)
    for a, name in zip(arrays, names, strict=True):
        check_rows(a, name)
    n, d = arrays[0].shape[-2:]
    for a, name in zip(arrays[1:], names[1:], strict=True):
        if a.shape[-2] != n:
            raise ValueError(
                f"{name} must have as many rows as q ({n}); multipole attention needs queries "
                f"and keys on one grid, got shape {tuple(a.shape)}"
            )
    check_last_dim(arrays[1], names[1], d, "the head dimension of q")
    if len(arrays) == 4:
        check_last_dim(arrays[3], names[3], arrays[2].shape[-1], "the value dimension of v")
    check_batch(xp, arrays, names)
    geo = geometry(n, block, basis, causal)
    if supplied:
        _check_kernels(xp, geo, kernels)
    names_all = (*names, *(f"downsample[{i}]" for i in range(len(kernels))))
    converted = as_floating(xp, (*arrays, *kernels), names_all)
    return xp, geo, converted[: len(arrays)], (converted[len(arrays) :] if supplied else None)


def broadcast_and_pad(xp, geo, arrays):
    """Broadcast leading axes to one batch shape and zero-pad the sequence axis to ``N``."""
    batch = xp.broadcast_shapes(*(a.shape[:-2] for a in arrays))
    out = []
    for a in arrays:
        a = xp.broadcast_to(a, (*batch, *a.shape[-2:]))
        if geo.padded > geo.n:
            pad = xp.zeros(
                (*batch, geo.padded - geo.n, a.shape[-1]), dtype=a.dtype, device=device(a)
            )
            a = xp.concat([a, pad], axis=-2)
        out.append(a)
    return out


PARAMS_DOC = """
    block : int
        Block size ``m`` (a power of two): near-field boxes and the finest far-field box.
    basis : int
        Tokens ``p`` per far-field box; must divide ``block``.
    causal : bool
        Keep only keys ``j <= i`` (near field: block ``i-1`` and the causal part of ``i``;
        far field: interaction boxes before the query's box).
    downsample : ``"mean"`` or tuple of arrays
        ``"mean"``: average pooling.  Otherwise one kernel per far-field level
        ``l = 1 ... L``, array ``l-1`` of shape ``(c_l,) = (block * 2**(l-1) // basis,)``: the
        weights of a strided filter with kernel = stride = ``c_l``, shared by keys and values (see
        :func:`~convbasis.multipole.kernel_shapes`).  ``L`` depends on the padded length.
    scale : float, optional
        Logit scale ``s``; default ``1/sqrt(d)``."""


def document_params(func):
    """Put :data:`PARAMS_DOC` where ``func``'s docstring says ``{params}``."""
    if func.__doc__:  # None under python -OO
        func.__doc__ = func.__doc__.replace("{params}", PARAMS_DOC.strip("\n").lstrip())
    return func
