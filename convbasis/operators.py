"""The attention-operator protocol and the registry of structured implementations.

Normalised attention ``f = D⁻¹ A`` enters forward attention and all five gradient terms only
through four products (docs/math.rst §3):

* ``matmul(z)`` — ``f Z``
* ``rmatmul(z)`` — ``fᵀ Z``
* ``hadamard_matmul(g, y, z)`` — ``(f ∘ G Yᵀ) Z``
* ``hadamard_rmatmul(g, y, z)`` — ``(f ∘ G Yᵀ)ᵀ Z``

and every operator has ``shape == to_dense().shape == (*batch, n, m)``.  Gradients are written
once against this protocol.  Implementations: dense (this module, from the reference oracle),
low-rank (:mod:`convbasis.polynomial`), k-conv basis (``convbasis.conv``), Fast Multipole
Attention (``convbasis.multipole``) and composite attention
(``convbasis.composite``).  A new structure plugs in by implementing ``matmul`` and
``rmatmul`` (the Hadamard products follow from them through :func:`hadamard_product`) and
registering a constructor in :data:`METHODS`.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from array_api_compat import device

from ._array import (
    as_floating,
    check_last_dim,
    check_rows,
    namespace,
    resolve_scale,
    validate_qk,
)
from ._capabilities import check_eager
from ._validation import broadcast_shapes

__all__ = [
    "METHODS",
    "AttentionOperator",
    "DenseAttentionOperator",
    "SquareProducts",
    "attention_operator",
    "check_operands",
    "dense_operator",
    "hadamard_product",
]

# Entries of the stacked ``(..., m, w·p)`` operand of one product in :func:`hadamard_product`:
# few large products (one FFT or prefix-product pass over many columns) without holding all
# ``s·p`` columns at once (n = 2^15, s = p = 64 would be 512 MiB in float32).
_HADAMARD_BLOCK = 1 << 23


@runtime_checkable
class AttentionOperator(Protocol):
    """Normalised attention ``f (..., n, m)`` known through its products with ``(..., ·, p)``."""

    @property
    def shape(self): ...

    def matmul(self, z): ...

    def rmatmul(self, z): ...

    def hadamard_matmul(self, g, y, z): ...

    def hadamard_rmatmul(self, g, y, z): ...

    def to_dense(self): ...


def check_operands(owner, operands, *, rows, batch, hadamard=False):
    """Validate the operands of an operator product; promote them to ``owner``'s dtype.

    ``operands`` maps names to arrays that must be ``(..., rows[name], ·)``, floating, from
    ``owner``'s library and device, with leading axes that broadcast against the operator's
    ``batch``.  ``hadamard``: ``y`` must be as wide as ``g``.  Returns ``(xp, arrays)`` with
    every array in the common dtype of ``owner`` and the operands.
    """
    names, arrays = tuple(operands), tuple(operands.values())
    xp = namespace(owner, *arrays)
    for a, name in zip(arrays, names, strict=True):
        check_rows(a, name)
        if a.shape[-2] != rows[name]:
            raise ValueError(
                f"{name} must have {rows[name]} rows (..., {rows[name]}, p) like the operator, "
                f"got shape {tuple(a.shape)}"
            )
    if hadamard:
        check_last_dim(operands["y"], "y", operands["g"].shape[-1], "the width of g")
    try:
        broadcast_shapes(tuple(batch), *(a.shape[:-2] for a in arrays))
    except ValueError:
        raise ValueError(
            f"leading (batch/head) axes of {', '.join(names)} must broadcast against the "
            f"operator's {tuple(batch)}, got "
            + ", ".join(f"{name} {tuple(a.shape)}" for name, a in zip(names, arrays, strict=True))
        ) from None
    arrays = as_floating(xp, arrays, names)
    dtype = xp.result_type(owner, *arrays)
    return xp, tuple(a if a.dtype == dtype else xp.astype(a, dtype) for a in arrays)


def hadamard_product(xp, product, g, y, z):
    """``Σ_l diag(G_l) F diag(Y_l) Z`` for the linear map ``F`` applied by ``product``.

    ``F ∘ G Yᵀ`` never exists: its product with ``Z`` is that of ``F`` with the ``(..., m, s·p)``
    matrix ``[Y_l ∘ Z]_l``, weighted by ``G_l`` and summed (docs/math.rst §1, §3).  The ``s``
    columns go in groups whose stacked operand holds about ``2^23`` entries, so a structured
    ``F`` runs few large products.  The transposed product ``(F ∘ G Yᵀ)ᵀ Z`` is
    ``hadamard_product(xp, F_transpose, y, g, z)``.

    Parameters
    ----------
    xp : array namespace
    product : callable
        ``(..., m, w) -> (..., n, w)``; applied to blocks of the stacked operand.
    g : array ``(..., n, s)``
    y : array ``(..., m, s)``
    z : array ``(..., m, p)``

    Returns
    -------
    array ``(..., n, p)``
        ``⌈s p m B / 2^23⌉`` calls of ``product`` on ``s p`` columns in all (``B`` the batch
        size), plus ``O((n + m) s p)`` elementwise work.
    """
    s, p, m = g.shape[-1], z.shape[-1], z.shape[-2]
    if s == 0:  # G Yᵀ = 0
        shape = xp.broadcast_shapes(g.shape[:-2], y.shape[:-2], z.shape[:-2])
        return xp.zeros((*shape, g.shape[-2], p), dtype=z.dtype, device=device(z))
    batch = math.prod(xp.broadcast_shapes(y.shape[:-2], z.shape[:-2]))
    group = max(1, _HADAMARD_BLOCK // max(m * p * batch, 1))
    out = None
    for lo in range(0, s, group):
        hi = min(lo + group, s)
        stacked = y[..., :, lo:hi, None] * z[..., :, None, :]  # (..., m, w, p)
        flat = xp.reshape(stacked, (*stacked.shape[:-2], (hi - lo) * p))
        res = product(flat)
        res = xp.reshape(res, (*res.shape[:-1], hi - lo, p))
        term = xp.sum(g[..., :, lo:hi, None] * res, axis=-2)
        out = term if out is None else out + term
    return out


class SquareProducts:
    """The Hadamard products and ``to_dense`` of a square ``(..., n, n)`` operator from its
    ``matmul`` and ``rmatmul`` (:func:`hadamard_product`; docs/math.rst §3).

    A subclass has ``shape`` and ``_like``, an array of its library, device and dtype.
    """

    def _hadamard_operands(self, g, y, z):
        rows = dict.fromkeys("gyz", self.shape[-1])
        xp, arrays = check_operands(
            self._like, {"g": g, "y": y, "z": z}, rows=rows, batch=self.shape[:-2], hadamard=True
        )
        return (xp, *arrays)

    def hadamard_matmul(self, g, y, z, /):
        """``(f ∘ G Yᵀ) z = Σ_l diag(G_l) f diag(Y_l) z`` for ``g, y (..., n, s)``,
        ``z (..., n, e)``: products of ``f`` with ``s e`` columns in all."""
        xp, g, y, z = self._hadamard_operands(g, y, z)
        return hadamard_product(xp, self.matmul, g, y, z)

    def hadamard_rmatmul(self, g, y, z, /):
        """``(f ∘ G Yᵀ)ᵀ z = Σ_l diag(Y_l) fᵀ diag(G_l) z`` (as :meth:`hadamard_matmul`)."""
        xp, g, y, z = self._hadamard_operands(g, y, z)
        return hadamard_product(xp, self.rmatmul, y, g, z)

    def to_dense(self):
        """The ``(..., n, n)`` matrix ``f`` (``matmul`` of the identity; ``O(n²)``)."""
        like = self._like
        eye = namespace(like).eye(self.shape[-1], dtype=like.dtype, device=device(like))
        return self.matmul(eye)


@dataclass(frozen=True)
class DenseAttentionOperator:
    """``f`` held as an explicit ``(..., n, m)`` array: the ``O(n m)`` oracle of the protocol.

    Every product costs ``O(n m p)`` (Hadamard products ``O(n m (s + p))``).
    """

    weights: Any

    @property
    def shape(self):
        """``(*batch, n, m)``, the shape of :meth:`to_dense`."""
        return tuple(self.weights.shape)

    def _operands(self, transpose, **operands):
        n, m = self.shape[-2:]
        rows = {"g": n, "y": m, "z": n if transpose else m}
        xp, arrays = check_operands(
            self.weights, operands, rows=rows, batch=self.shape[:-2], hadamard="g" in operands
        )
        f = (
            self.weights
            if arrays[0].dtype == self.weights.dtype
            else xp.astype(self.weights, arrays[0].dtype)
        )
        return xp, (xp.matrix_transpose(f) if transpose else f), arrays

    def matmul(self, z, /):
        _, f, (z,) = self._operands(False, z=z)
        return f @ z

    def rmatmul(self, z, /):
        _, ft, (z,) = self._operands(True, z=z)
        return ft @ z

    def hadamard_matmul(self, g, y, z, /):
        xp, f, (g, y, z) = self._operands(False, g=g, y=y, z=z)
        return (f * (g @ xp.matrix_transpose(y))) @ z

    def hadamard_rmatmul(self, g, y, z, /):
        xp, ft, (g, y, z) = self._operands(True, g=g, y=y, z=z)
        return (ft * (y @ xp.matrix_transpose(g))) @ z

    def to_dense(self):
        """The ``(..., n, m)`` weights themselves."""
        return self.weights


def dense_operator(q, k, /, *, causal=True, scale=None):
    """The dense attention operator of ``softmax(s · Q Kᵀ)`` (masked if ``causal``).

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    causal : bool
    scale : float, optional
        Default ``1/sqrt(d)``.

    Returns
    -------
    DenseAttentionOperator
        ``O(n² d)`` time, ``O(n²)`` memory.

    Raises
    ------
    MemoryError
        Before allocating, when the ``(..., n, m)`` weights would exceed
        :data:`convbasis.polynomial.FEATURE_MEMORY_BUDGET` (a quarter of physical memory):
        :func:`convbasis.attention` computes exact attention in blocks instead.
    """
    # imported here: reference and polynomial import modules that import this one
    from .polynomial import FEATURE_MEMORY_BUDGET
    from .reference import _weights

    xp, q, k = validate_qk(q, k, causal=causal)
    batch = math.prod(broadcast_shapes(tuple(q.shape[:-2]), tuple(k.shape[:-2])))
    size = batch * q.shape[-2] * k.shape[-2] * (xp.finfo(q.dtype).bits // 8)
    if size > FEATURE_MEMORY_BUDGET:
        raise MemoryError(
            f"the dense attention operator would hold {size / 2**30:.3g} GiB of weights "
            f"(batch {batch}, n = {q.shape[-2]}, m = {k.shape[-2]}), above the budget of "
            f"{FEATURE_MEMORY_BUDGET / 2**30:.3g} GiB (convbasis.polynomial."
            "FEATURE_MEMORY_BUDGET); convbasis.attention and attention_backward compute exact "
            "attention in blocks of rows, or pick a sub-quadratic method"
        )
    return DenseAttentionOperator(_weights(xp, q, k, resolve_scale(scale, q.shape[-1]), causal, 0))


class _Lazy:
    """A constructor imported on first use (the method modules import this one)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    @property
    def constructor(self):
        return getattr(importlib.import_module(self.module, __package__), self.name)

    def __call__(self, q, k, /, **options):
        return self.constructor(q, k, **options)

    def __repr__(self):
        return f"<{self.module.lstrip('.')}.{self.name}>"


_lowrank = _Lazy(".polynomial", "lowrank_operator")
_conv = _Lazy(".conv", "conv_operator")
_multipole = _Lazy(".multipole", "multipole_operator")
_composite = _Lazy(".composite", "composite_operator")


METHODS = {
    "dense": dense_operator,
    "lowrank": _lowrank,
    "conv": _conv,
    "multipole": _multipole,
    "composite": _composite,
}
"""Operator constructors by method name; each takes ``(q, k, /, *, causal, scale, ...)``."""


def check_method(method):
    """``method`` if registered in :data:`METHODS`, else a ``ValueError`` listing the valid ones."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown attention method {method!r}; valid methods: {sorted(METHODS)}")
    return method


def check_options(method, options):
    """Refuse options that ``method``'s constructor does not take, naming the ones it does.

    Read from the constructor's signature (the keyword-only parameters besides ``causal`` and
    ``scale``), so a method registered in :data:`METHODS` needs no list of its own.
    """
    build = METHODS[check_method(method)]
    build = getattr(build, "constructor", build)
    accepted = {
        name
        for name, param in inspect.signature(build).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("causal", "scale")
    }
    unknown = sorted(set(options) - accepted)
    if unknown:
        takes = f"the options {sorted(accepted)}" if accepted else "no options"
        raise TypeError(f"the {method} method takes {takes}, got {unknown}")


def attention_operator(q, k, /, *, method="dense", causal=True, scale=None, **options):
    """Build the attention operator of ``softmax(s · Q Kᵀ)`` with the chosen structure.

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    method : {"dense", "lowrank", "conv", "multipole", "composite"}
        ``"lowrank"`` takes the options of :func:`convbasis.polynomial.lowrank_operator`
        (``eps`` or ``degree``, ``kind``, ``max_rank``); ``"conv"`` those of
        :func:`convbasis.conv.conv_operator` (``rank``, ``probe``, ``delta``, ``tolerance``);
        ``"multipole"`` those of :func:`convbasis.multipole.multipole_operator` (``block``,
        ``basis``, ``downsample``); ``"composite"`` those of
        :func:`convbasis.composite.composite_operator` (``budget``, ``block``, ``sinks``,
        ``heavy``).
    causal : bool
    scale : float, optional

    Returns
    -------
    AttentionOperator
    """
    check_options(method, options)
    check_eager("attention_operator", q, k, method=method)
    return METHODS[method](q, k, causal=causal, scale=scale, **options)
