"""Fast Multipole Attention ``O = f V``, its backward, and ``f`` as an operator."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from array_api_compat import device

from .._array import resolve_scale, stacked_matmul, sum_to_shape
from ..batching import batched_call, check_lengths_options
from ..operators import SquareProducts, check_operands
from ..results import AttentionGradients
from .geometry import broadcast_and_pad, document_params, geometry, prepare
from .levels import forward, iter_levels

__all__ = [
    "MultipoleAttentionOperator",
    "MultipoleGradients",
    "multipole_attention",
    "multipole_attention_backward",
    "multipole_operator",
]


@document_params
def multipole_attention(
    q, k, v, /, *, block=64, basis=4, causal=True, downsample="mean", scale=None, lengths=None
):
    """Fast Multipole Attention ``O = f V`` (docs/math.rst §6).

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    v : array ``(..., n, e)``
        Leading (batch/head) axes broadcast.  Any ``n >= 1``: padded as described in the
        module docstring, padded keys get zero weight and padded query rows are dropped.
    {params}
    lengths : int array ``(batch,)``, optional
        As in :func:`convbasis.attention` (``downsample="mean"`` only: supplied kernels are
        tied to the padded length).

    Returns
    -------
    array ``(..., n, e)``
        ``O(n (m + p log(n/m)) (d + e))`` time, ``O(n (m + d + e))`` memory.  ``k`` and ``v``
        may have fewer heads than ``q`` (grouped-query attention).
    """
    options = {"block": block, "basis": basis, "causal": causal, "downsample": downsample}
    check_lengths_options("multipole", lengths, {"downsample": downsample})
    call = functools.partial(_attention, scale=scale, **options)
    return batched_call(call, q, k, v, lengths=lengths)


def _attention(q, k, v, *, block, basis, causal, downsample, scale):
    xp, geo, (q, k, v), kernels = prepare(
        (q, k, v),
        ("q", "k", "v"),
        block=block,
        basis=basis,
        causal=causal,
        downsample=downsample,
    )
    scale = resolve_scale(scale, q.shape[-1])
    qp, kp, vp = broadcast_and_pad(xp, geo, (q, k, v))
    out, _ = forward(xp, geo, kernels, qp, kp, vp, scale)
    return out[..., : geo.n, :]


MultipoleGradients = AttentionGradients
"""The name of :class:`convbasis.AttentionGradients` in convbasis 0.1, kept for scripts."""


@document_params
def multipole_attention_backward(
    q,
    k,
    v,
    grad_out,
    /,
    *,
    block=64,
    basis=4,
    causal=True,
    downsample="mean",
    scale=None,
    lengths=None,
):
    """Gradients of FMA with respect to ``q``, ``k``, ``v`` and the downsampling kernels.

    With ``P`` the normalised weights of every (query, token) pair of every level,
    ``δ = rowsum(G ∘ O)``: ``dS = P ∘ (G uᵀ − δ)``, ``dq = s dS κ``, token gradients
    ``dκ = s dSᵀ Q``, ``du = Pᵀ G`` (docs/math.rst §3 applied to the token list), mapped back to
    keys and values through the adjoint of the pooling and interaction-list gather.

    Parameters
    ----------
    q, k, v : arrays ``(..., n, d)``, ``(..., n, d)``, ``(..., n, e)``
    grad_out : array ``(..., n, e)``
        ``∂L/∂O``.
    {params}
    lengths : int array ``(batch,)``, optional
        As in :func:`multipole_attention`.

    Returns
    -------
    AttentionGradients
        With ``ddownsample``, the kernels' gradients (``None`` for ``"mean"``).  Same cost as
        :func:`multipole_attention` (about three times the work); no ``n × n`` array.
    """
    options = {"block": block, "basis": basis, "causal": causal, "downsample": downsample}
    check_lengths_options("multipole", lengths, {"downsample": downsample})
    call = functools.partial(_attention_backward, scale=scale, **options)
    return batched_call(call, q, k, v, grad_out, lengths=lengths)


def _attention_backward(q, k, v, grad_out, *, block, basis, causal, downsample, scale):
    xp, geo, (q, k, v, g), kernels = prepare(
        (q, k, v, grad_out),
        ("q", "k", "v", "grad_out"),
        block=block,
        basis=basis,
        causal=causal,
        downsample=downsample,
    )
    scale = resolve_scale(scale, q.shape[-1])
    qp, kp, vp, gp = broadcast_and_pad(xp, geo, (q, k, v, g))
    out, lse = forward(xp, geo, kernels, qp, kp, vp, scale)
    delta = xp.sum(gp * out, axis=-1)  # docs/math.rst §3: δ = rowsum(G ∘ O)
    dq = xp.zeros_like(qp)
    dk = xp.zeros_like(kp)
    dv = xp.zeros_like(vp)
    dkernels = []
    for lev in iter_levels(xp, geo, kernels, qp.dtype, device(qp)):
        keys, values = lev.gather(kp), lev.gather(vp)
        w = lev.weights(lev.logits(qp, keys, scale), lse)
        g3 = lev.split(gp)
        dp = xp.reshape(stacked_matmul(xp, g3, xp.matrix_transpose(values)), w.shape)
        ds = lev.flat(w * (dp - xp.reshape(delta, (*w.shape[:-1], 1))))
        dq = dq + scale * xp.reshape(stacked_matmul(xp, ds, keys), qp.shape)
        dkeys = scale * stacked_matmul(xp, xp.matrix_transpose(ds), lev.split(qp))
        dvalues = stacked_matmul(xp, xp.matrix_transpose(lev.flat(w)), g3)
        dk = dk + lev.scatter(dkeys)
        dv = dv + lev.scatter(dvalues)
        if lev.level and kernels is not None:
            dkernels.append(lev.kernel_grad(dkeys, kp) + lev.kernel_grad(dvalues, vp))
    n = geo.n
    return AttentionGradients(
        dq=sum_to_shape(xp, dq[..., :n, :], q.shape),
        dk=sum_to_shape(xp, dk[..., :n, :], k.shape),
        dv=sum_to_shape(xp, dv[..., :n, :], v.shape),
        ddownsample=None if kernels is None else tuple(dkernels),
    )


@dataclass(frozen=True)
class MultipoleAttentionOperator(SquareProducts):
    """The normalised FMA weight matrix ``f`` (``(..., n, n)``) as an operator.

    Build with :func:`multipole_operator`.  ``matmul(z) = f z`` and ``rmatmul(z) = fᵀ z`` cost
    ``O(n (m + p log(n/m)) e)`` for ``z (..., n, e)``, the Hadamard products with a rank-``s``
    ``G Yᵀ`` ``s`` times that; ``to_dense()`` is ``O(n²)``, for tests.

    Attributes
    ----------
    q, k : arrays ``(..., N, d)``
        Broadcast and zero-padded to the padded length ``N``.
    lse : array ``(..., N)``
        Log of each row's normaliser (``+inf`` on padding rows that see no key).
    n, block, basis, causal, scale, downsample
        The problem (``downsample`` is ``None`` for ``"mean"``).
    """

    q: Any
    k: Any
    lse: Any
    n: int
    block: int
    basis: int
    causal: bool
    scale: float
    downsample: tuple[Any, ...] | None

    @property
    def shape(self):
        """``(*batch, n, n)``, the shape of ``to_dense()``."""
        return (*self.q.shape[:-2], self.n, self.n)

    def _setup(self, z, name):
        xp, (z,) = check_operands(self.q, {name: z}, rows={name: self.n}, batch=self.shape[:-2])
        geo = geometry(self.n, self.block, self.basis, self.causal)
        (zp,) = broadcast_and_pad(xp, geo, (z,))
        q, k, lse = self.q, self.k, self.lse
        if q.dtype != zp.dtype:
            dtype = xp.result_type(q, zp)
            q, k, lse, zp = (xp.astype(a, dtype) for a in (q, k, lse, zp))
        return xp, geo, q, k, lse, zp

    def _terms(self, xp, geo, q, k, lse):
        for lev in iter_levels(xp, geo, self.downsample, q.dtype, device(q)):
            yield lev, lev.weights(lev.logits(q, lev.gather(k), self.scale), lse)

    def matmul(self, z, /):
        """``f z`` for ``z (..., n, e)``."""
        xp, geo, q, k, lse, zp = self._setup(z, "z")
        out = 0
        for lev, w in self._terms(xp, geo, q, k, lse):
            o = stacked_matmul(xp, lev.flat(w), lev.gather(zp))
            out = out + xp.reshape(o, (*o.shape[:-3], geo.padded, zp.shape[-1]))
        return out[..., : self.n, :]

    def rmatmul(self, z, /):
        """``fᵀ z`` for ``z (..., n, e)``."""
        xp, geo, q, k, lse, zp = self._setup(z, "z")
        out = 0
        for lev, w in self._terms(xp, geo, q, k, lse):
            out = out + lev.scatter(
                stacked_matmul(xp, xp.matrix_transpose(lev.flat(w)), lev.split(zp))
            )
        return out[..., : self.n, :]

    @property
    def _like(self):
        return self.q


@document_params
def multipole_operator(q, k, /, *, block=64, basis=4, causal=True, downsample="mean", scale=None):
    """Build the FMA weight operator ``f`` for queries ``q`` and keys ``k`` ``(..., n, d)``.

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    {params}

    Returns
    -------
    MultipoleAttentionOperator
        Construction computes the row normalisers: ``O(n (m + p log(n/m)) d)``.
    """
    xp, geo, (q, k), kernels = prepare(
        (q, k), ("q", "k"), block=block, basis=basis, causal=causal, downsample=downsample
    )
    scale = resolve_scale(scale, q.shape[-1])
    qp, kp = broadcast_and_pad(xp, geo, (q, k))
    _, lse = forward(xp, geo, kernels, qp, kp, None, scale, with_output=False)
    return MultipoleAttentionOperator(
        q=qp,
        k=kp,
        lse=lse,
        n=geo.n,
        block=geo.block,
        basis=geo.basis,
        causal=geo.causal,
        scale=scale,
        downsample=kernels,
    )
