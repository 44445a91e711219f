"""The k-conv basis (docs/math.rst §4) and its exact products, decomposition and dense fit.

A lower-triangular ``H`` has a *k-conv basis* when its columns, shifted to start at the
diagonal ("aligned columns" ``H[j:, j]``), are piecewise constant in ``j``: for
``σ_i <= j < σ_{i+1}``, ``H[j:, j] = c_i[: n - j]``.  Equivalently ``H = Σ_i conv(b_i, m_i)``
with ``m_i = n - σ_i`` and ``c_i = Σ_{l<=i} b_l``.  :class:`ConvBasis` stores the starts
``σ_i`` and the *cumulative* vectors ``c_i`` (the aligned columns themselves), which is what
the segment-form products and the exponential need, and never loses precision to a
difference/cumulative-sum round trip.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from array_api_compat import device

from .._array import (
    as_floating,
    check_integer,
    check_rows,
    fast_length,
    namespace,
)
from .._capabilities import check_eager
from .._validation import broadcast_shapes
from ._fft import (
    Segment,
    segment_cost,
    segment_index,
    segment_matmul,
    segment_plan,
    segment_rmatmul,
    segment_spectra,
    valid_mask,
)
from ._tiled import choose_tiles, tile_spectra, tiled_matmul, tiled_rmatmul

__all__ = ["ConvBasis", "conv_matmul", "conv_rmatmul", "decompose_conv_basis", "fit_conv_basis"]


def _check_starts(starts, n):
    n = check_integer(n, "n")
    try:
        if any(isinstance(s, bool) for s in starts):
            raise TypeError
        starts = tuple(operator.index(s) for s in starts)
    except TypeError:
        raise ValueError(f"starts must be integers, got {starts!r}") from None
    if not starts or starts[0] != 0:
        raise ValueError(f"starts must begin with 0, got {starts}")
    if any(starts[i + 1] <= starts[i] for i in range(len(starts) - 1)) or starts[-1] >= n:
        raise ValueError(f"starts must increase strictly and stay below n = {n}, got {starts}")
    return starts


@dataclass(frozen=True, eq=False)
class ConvBasis:
    """A k-conv basis ``H = Σ_i conv(b_i, m_i)`` of a lower-triangular ``n × n`` matrix.

    Attributes
    ----------
    starts : tuple of int
        Segment starts ``0 = σ_0 < σ_1 < … < σ_{k-1} < n`` (``m_i = n - σ_i``).
    vectors : array ``(..., k, n)``
        The cumulative vectors ``c_i = Σ_{l<=i} b_l`` of docs/math.rst §4, i.e. the aligned columns:
        ``H[j:, j] = c_i[: n - j]`` for ``σ_i <= j < σ_{i+1}``.  Entries ``t >= m_i`` are
        unused (zero in every basis this module builds).  Leading axes are batch axes that
        share the starts.
    n : int
        Matrix size.

    The FFT spectra of the vectors are computed on first use and reused by every later
    product (:meth:`matmul` and :meth:`rmatmul` share them).
    """

    starts: tuple[int, ...]
    vectors: Any
    n: int

    def __post_init__(self):
        object.__setattr__(self, "n", check_integer(self.n, "n"))
        object.__setattr__(self, "starts", _check_starts(self.starts, self.n))
        if self.vectors.ndim < 2 or self.vectors.shape[-2:] != (len(self.starts), self.n):
            raise ValueError(
                f"vectors must have shape (..., k, n) = (..., {len(self.starts)}, {self.n}), "
                f"got {tuple(self.vectors.shape)}"
            )

    @property
    def rank(self):
        """Number of segments ``k``."""
        return len(self.starts)

    @property
    def lengths(self):
        """Sub-convolution sizes ``m_i = n - σ_i``."""
        return tuple(self.n - s for s in self.starts)

    @cached_property
    def _xp(self):
        return namespace(self.vectors)

    @cached_property
    def plan(self):
        """The FFT plan, ``(σ_i, σ_{i+1}, m_i, N, σ_a)`` per segment, with ``N`` the FFT length
        of its group and ``σ_a`` the group's first start (``_fft.segment_plan``)."""
        return segment_plan(self.starts, self.n)

    @cached_property
    def spectra(self):
        """Spectrum of each segment's vector at its group's FFT length (``None`` for short,
        direct segments; ``_fft.segment_spectra``)."""
        return segment_spectra(self._xp, self.vectors, self.plan)

    @cached_property
    def tiles(self):
        """The tiling of the tiled products (``_tiled``), or ``None`` where the segment form
        is cheaper (the route of every product with this basis)."""
        return choose_tiles(self.starts, self.n, segment_cost(self.plan))

    @cached_property
    def tile_spectra(self):
        """The window spectra of the tiled products (``_tiled.tile_spectra``)."""
        return tile_spectra(self._xp, self.vectors, self.tiles)

    def product(self, zt, *, transpose=False):
        """``H Z`` (``Hᵀ Z`` if ``transpose``) in the transposed layout ``(..., p, n)``, ``zt``
        in the vectors' dtype, by the cheaper of the tiled and the segment forms."""
        xp = self._xp
        if self.tiles is not None:
            product = tiled_rmatmul if transpose else tiled_matmul
            z = xp.matrix_transpose(zt)
            return xp.matrix_transpose(product(xp, self.tiles, self.tile_spectra, z))
        product = segment_rmatmul if transpose else segment_matmul
        return product(xp, self.plan, self.spectra, self.vectors, zt, self.n)

    def basis_vectors(self):
        """The vectors ``b_i`` of ``H = Σ conv(b_i, m_i)``: ``b_0 = c_0``, ``b_i = c_i - c_{i-1}``
        on ``[: m_i]`` and zero beyond.  Shape ``(..., k, n)``."""
        xp = self._xp
        c = self.vectors
        keep = valid_mask(xp, self.plan, self.n, device(c))
        prev = xp.concat([xp.zeros_like(c[..., :1, :]), c[..., :-1, :]], axis=-2)
        return xp.where(keep, c - prev, xp.zeros_like(c))

    def to_dense(self):
        """The ``(..., n, n)`` matrix ``H`` (``O(n²)``; for tests)."""
        xp, n = self._xp, self.n
        dev = device(self.vectors)
        seg = segment_index(self.starts, xp.arange(n, dtype=xp.int64, device=dev), xp)
        i = xp.arange(n, device=dev)[:, None]
        j = xp.arange(n, device=dev)[None, :]
        t = i - j
        flat_index = seg[None, :] * n + xp.where(t >= 0, t, xp.zeros_like(t))
        flat = xp.reshape(self.vectors, (*self.vectors.shape[:-2], self.rank * n))
        h = xp.take(flat, xp.reshape(flat_index, (-1,)), axis=flat.ndim - 1)
        h = xp.reshape(h, (*flat.shape[:-1], n, n))
        return xp.where(t >= 0, h, xp.zeros_like(h))

    def matmul(self, z):
        """``H Z`` for ``z (..., n, p)``, by FFT in ``O(k n p log n)``."""
        basis, z = _product_operands(self, z)
        return basis._xp.matrix_transpose(basis.product(basis._xp.matrix_transpose(z)))

    def rmatmul(self, z):
        """``Hᵀ Z`` for ``z (..., n, p)``, by FFT in ``O(k n p log n)``."""
        basis, z = _product_operands(self, z)
        out = basis.product(basis._xp.matrix_transpose(z), transpose=True)
        return basis._xp.matrix_transpose(out)

    def max(self):
        """The largest entry of ``H`` on the lower triangle, per batch element ``(...)``."""
        xp = self._xp
        keep = valid_mask(xp, self.plan, self.n, device(self.vectors))
        return _masked_max(xp, self.vectors, keep)

    def exp(self, shift=None):
        """The basis of ``M ∘ exp(H - shift)`` (same starts; docs/math.rst §4).

        ``shift`` is a scalar or an array broadcasting against the batch axes; default
        :meth:`max`, so no entry exceeds 1 and nothing overflows.  The masked (upper) entries
        of the result are exactly 0; its vectors are ``exp(c_i - shift)`` on ``[: m_i]``.
        """
        xp = self._xp
        c = self.vectors
        if shift is None:
            shift = self.max()
        shift = xp.asarray(shift, dtype=c.dtype, device=device(c))
        keep = valid_mask(xp, self.plan, self.n, device(c))
        minus_inf = xp.asarray(-xp.inf, dtype=c.dtype, device=device(c))
        return ConvBasis(
            self.starts, xp.exp(xp.where(keep, c - shift[..., None, None], minus_inf)), self.n
        )


def _product_operands(basis, z):
    """``basis, z`` for a product of ``basis`` with ``z (..., n, p)``, in one dtype."""
    xp = namespace(basis.vectors, z)
    check_rows(z, "z")
    if z.shape[-2] != basis.n:
        raise ValueError(f"z must have shape (..., n, p) with n = {basis.n}, got {tuple(z.shape)}")
    (z,) = as_floating(xp, (z,), ("z",))
    if z.dtype == basis.vectors.dtype:
        return basis, z
    # A wider z: the vectors' spectra must be taken in the wider dtype too, or the
    # product carries the narrow dtype's FFT round-off.
    dtype = xp.result_type(z, basis.vectors)
    wide = ConvBasis(basis.starts, xp.astype(basis.vectors, dtype), basis.n)
    return wide, xp.astype(z, dtype)


def _masked_max(xp, c, keep):
    minus_inf = xp.asarray(-xp.inf, dtype=c.dtype, device=device(c))
    return xp.max(xp.where(keep, c, minus_inf), axis=(-2, -1))


def _single(a, z, m):
    xp = namespace(a, z)
    if a.ndim < 1:
        raise ValueError(f"a must have shape (..., n), got {tuple(a.shape)}")
    check_rows(z, "z")
    a, z = as_floating(xp, (a, z), ("a", "z"))
    n = a.shape[-1]
    if z.shape[-2] != n:
        raise ValueError(
            f"z must have shape (..., n, p) with n = {n} (len(a)), got {tuple(z.shape)}"
        )
    if n == 0:
        raise ValueError("a must be non-empty (n >= 1)")
    m = n if m is None else m
    m = check_integer(m, "m", high=n, what=f"n = {n}")
    try:
        broadcast_shapes(a.shape[:-1], z.shape[:-2])
    except ValueError:
        raise ValueError(
            f"leading (batch) axes of a {tuple(a.shape)} and z {tuple(z.shape)} must broadcast"
        ) from None
    plan = (Segment(n - m, n, m, fast_length(2 * m - 1), n - m),)
    columns = a[..., None, :]
    return xp, plan, segment_spectra(xp, columns, plan), columns, xp.matrix_transpose(z), n


def conv_matmul(a, z, /, *, m=None):
    """``conv(a, m) Z``: the sub-convolution whose bottom-right ``m × m`` block is
    ``conv(a[:m])`` (docs/math.rst §4), times ``Z``.

    Parameters
    ----------
    a : array ``(..., n)``
    z : array ``(..., n, p)``
    m : int, optional
        Block size, ``1 <= m <= n``; default ``n`` (``conv(a)``).

    Returns
    -------
    array ``(..., n, p)``
        By FFT of length ``>= 2m - 1``: ``O(m p log m)``.
    """
    xp, plan, spectra, columns, zt, n = _single(a, z, m)
    return xp.matrix_transpose(segment_matmul(xp, plan, spectra, columns, zt, n))


def conv_rmatmul(a, z, /, *, m=None):
    """``conv(a, m)ᵀ Z`` (a correlation), with the arguments of :func:`conv_matmul`."""
    xp, plan, spectra, columns, zt, n = _single(a, z, m)
    out = segment_rmatmul(xp, plan, spectra, columns, zt, n)
    s = plan[0].start
    if s:
        out = xp.concat(
            [xp.zeros((*out.shape[:-1], s), dtype=out.dtype, device=device(out)), out], axis=-1
        )
    return xp.matrix_transpose(out)


def _check_square(h):
    xp = namespace(h)
    if h.ndim < 2 or h.shape[-1] != h.shape[-2] or h.shape[-1] == 0:
        raise ValueError(f"h must have shape (..., n, n) with n >= 1, got {tuple(h.shape)}")
    (h,) = as_floating(xp, (h,), ("h",))
    return xp, h


def _aligned(xp, h):
    """Aligned columns ``a[..., j, t] = h[..., j + t, j]`` (zero for ``t >= n - j``).

    The skew trick: row ``j`` of ``hᵀ`` flattened and padded to length ``n (n + 1)``, read
    with stride ``n + 1``, starts at the diagonal entry ``hᵀ[j, j]``.
    """
    n = h.shape[-1]
    ht = xp.reshape(xp.matrix_transpose(h), (*h.shape[:-2], n * n))
    ht = xp.concat([ht, xp.zeros((*h.shape[:-2], n), dtype=h.dtype, device=device(h))], axis=-1)
    a = xp.reshape(ht, (*h.shape[:-2], n, n + 1))[..., :n]
    t = xp.arange(n, device=device(h))
    keep = t[None, :] < (n - t)[:, None]
    return xp.where(keep, a, xp.zeros_like(a))


def decompose_conv_basis(h, /):
    """The exact k-conv basis of a lower-triangular matrix (docs/math.rst §4).

    A new segment starts wherever an aligned column differs (exactly) from the previous one
    on their common length, in any batch element; so ``k <= n`` and
    ``decompose_conv_basis(h).to_dense()`` reproduces ``h`` to round-off.

    Parameters
    ----------
    h : array ``(..., n, n)``, zero above the diagonal

    Returns
    -------
    ConvBasis
        ``O(n²)`` time and memory.

    Raises
    ------
    ValueError
        If ``h`` is not square or has non-zeros above the diagonal.
    """
    check_eager("decompose_conv_basis", h)
    xp, h = _check_square(h)
    n = h.shape[-1]
    i = xp.arange(n, device=device(h))
    upper = (i[None, :] > i[:, None]) & (h != 0)
    if bool(xp.any(upper)):
        raise ValueError(
            "h must be lower-triangular (zero above the diagonal); use fit_conv_basis() to "
            "approximate the lower triangle of a general matrix"
        )
    a = _aligned(xp, h)
    # Column j starts a segment when its aligned column differs from column j-1's (the
    # entry t = n - j of column j-1 is outside column j and is masked to 0 in both).
    prev = xp.concat([a[..., :1, :], a[..., :-1, :]], axis=-2)
    keep = i[None, :] < (n - i)[:, None]
    changed = xp.any((a != prev) & keep, axis=-1)
    if changed.ndim > 1:
        changed = xp.any(xp.reshape(changed, (-1, n)), axis=0)
    flags = [bool(x) for x in changed]
    starts = tuple([0] + [j for j in range(1, n) if flags[j]])
    vectors = xp.take(a, xp.asarray(starts, device=device(h)), axis=a.ndim - 2)
    return ConvBasis(starts, vectors, n)


def fit_conv_basis(h, k, /):
    """A dense best-effort ``k``-segment basis of the lower triangle of any square ``h``.

    The reference for what recovery from ``Q, K`` could achieve (docs/math.rst §4): segments
    start at the ``k - 1`` largest changes ``‖a_j - a_{j-1}‖₂`` between consecutive aligned
    columns (summed over batch axes; ties broken by position), and each segment is
    represented by the mean of its aligned columns, entry by entry over the columns that
    reach it — the least-squares choice for those starts.  Because the starts for ``k`` are
    a superset of those for ``k - 1``, the Frobenius error never increases with ``k``.
    The strictly upper part of ``h`` is ignored (as the causal mask does).

    Parameters
    ----------
    h : array ``(..., n, n)``
    k : int
        Number of segments, ``>= 1`` (capped at ``n``).

    Returns
    -------
    ConvBasis
        ``O(n²)`` time and memory (plus a sort of ``n`` numbers).
    """
    check_eager("fit_conv_basis", h)
    xp, h = _check_square(h)
    k = check_integer(k, "k")
    n = h.shape[-1]
    dev = device(h)
    a = _aligned(xp, h)
    t = xp.arange(n, device=dev)
    keep = t[None, :] < (n - t)[:, None]
    prev = xp.concat([a[..., :1, :], a[..., :-1, :]], axis=-2)
    change = xp.sum(xp.where(keep, (a - prev) ** 2, xp.zeros_like(a)), axis=-1)
    change = xp.reshape(change, (-1, n))
    change = xp.sum(change, axis=0)[1:]
    if n > 1:
        order = xp.argsort(-change, stable=True) + 1
    else:
        order = xp.asarray([], dtype=xp.int64, device=device(change))
    chosen = sorted(int(j) for j in order[: min(k, n) - 1])
    starts = (0, *chosen)
    stops = (*starts[1:], n)
    # Segment means: prefix sums of aligned columns over j, divided by how many columns of
    # the segment reach entry t (column j reaches t iff j < n - t).
    total = xp.cumulative_sum(a, axis=-2, include_initial=True)
    idx_lo = xp.asarray(starts, device=dev)
    idx_hi = xp.asarray(stops, device=dev)
    sums = xp.take(total, idx_hi, axis=a.ndim - 2) - xp.take(total, idx_lo, axis=a.ndim - 2)
    reach = xp.minimum(idx_hi[:, None], (n - t)[None, :]) - idx_lo[:, None]
    reach = xp.astype(xp.maximum(reach, xp.zeros_like(reach)), h.dtype)
    means = sums / xp.maximum(reach, xp.ones_like(reach))
    return ConvBasis(starts, xp.where(reach > 0, means, xp.zeros_like(means)), n)
