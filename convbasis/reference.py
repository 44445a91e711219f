"""Dense O(n²) oracles: softmax attention, its backward, the five gradient terms, and the
``n × n`` weights of Fast Multipole Attention.

Every fast path in the library is tested against these functions (docs/math.rst §0, §3, §6).
They are written for clarity and numerical robustness, not speed: each row subtracts its own maximum
before ``exp``, so logits of magnitude ``1e4`` give finite, correct results in float32.
A ``block`` option processes queries ``block`` rows at a time, keeping memory at
``O(n · block)`` instead of ``O(n²)``.
"""

from __future__ import annotations

import functools
import math

import array_api_extra as xpx
from array_api_compat import device

from ._array import (
    as_floating,
    check_integer,
    check_last_dim,
    check_rows,
    namespace,
    resolve_scale,
    sum_to_shape,
    validate_attention_inputs,
)
from ._validation import broadcast_shapes
from .batching import batched_call
from .multipole.geometry import PARAMS_DOC, broadcast_and_pad, geometry, prepare
from .results import AttentionGradients, SelfAttentionGradients

__all__ = [
    "SelfAttentionGradients",
    "attention",
    "attention_backward",
    "attention_weights",
    "multipole_masks",
    "multipole_reference",
    "multipole_weights",
    "self_attention_gradients",
]


# The default block keeps one block's weights under 256 MiB: all rows at once would hold the
# whole n × m matrix (64 GiB at n = m = 2^17 in float32).
_BLOCK_BYTES = 1 << 28


def _check_block(xp, block, q, k, *others):
    """``block`` validated, or the default: the most query rows whose weights, over the whole
    broadcast batch, fit in :data:`_BLOCK_BYTES`."""
    n = q.shape[-2]
    if block is None:
        batch = math.prod(broadcast_shapes(*(tuple(a.shape[:-2]) for a in (q, k, *others))))
        per_row = k.shape[-2] * batch * (xp.finfo(q.dtype).bits // 8)
        return max(1, min(n, _BLOCK_BYTES // max(per_row, 1)))
    return min(check_integer(block, "block"), n)


def _weights(xp, q, k, scale, causal, row_offset):
    """Softmax rows ``row_offset … row_offset + len(q)`` of ``s·Q Kᵀ`` (masked if causal).

    Under the causal mask only the first ``row_offset + len(q)`` keys can be seen; the caller
    passes exactly those, so every row keeps its diagonal and its maximum is finite.
    """
    logits = scale * (q @ xp.matrix_transpose(k))
    if causal:
        rows = xp.arange(q.shape[-2], device=device(logits))[:, None] + row_offset
        cols = xp.arange(k.shape[-2], device=device(logits))[None, :]
        minus_inf = xp.asarray(-xp.inf, dtype=logits.dtype, device=device(logits))
        logits = xp.where(rows >= cols, logits, minus_inf)
    logits = logits - xp.max(logits, axis=-1, keepdims=True)
    weights = xp.exp(logits)
    return weights / xp.sum(weights, axis=-1, keepdims=True)


def _blocks(n, causal, block):
    """Query row ranges and the number of keys each can see."""
    for start in range(0, n, block):
        stop = min(start + block, n)
        yield start, stop, (stop if causal else None)


def attention_weights(q, k, /, *, causal=True, scale=None):
    """The row-stochastic attention matrix ``f = D⁻¹ A``.

    Parameters
    ----------
    q : array ``(..., n, d)``
    k : array ``(..., m, d)`` (``m == n`` when ``causal``)
    causal : bool
        Apply the mask ``M[i, j] = 1`` iff ``i >= j`` after the exponential.
    scale : float, optional
        Logit scale ``s``; default ``1/sqrt(d)``.

    Returns
    -------
    array ``(..., n, m)``
        ``O(n m d)`` time and ``O(n m)`` memory.
    """
    xp, q, k, _ = validate_attention_inputs(q, k, k, causal=causal)
    return _weights(xp, q, k, resolve_scale(scale, q.shape[-1]), causal, 0)


def attention(q, k, v, /, *, causal=True, scale=None, block=None, lengths=None):
    """Exact softmax attention ``O = softmax(s · Q Kᵀ) V`` (masked if ``causal``).

    Parameters
    ----------
    q : array ``(..., n, d)``
    k : array ``(..., m, d)`` (``m == n`` when ``causal``)
    v : array ``(..., m, e)``
        Leading axes broadcast (batch, heads).
    causal : bool
        Mask ``M[i, j] = 1`` iff ``i >= j``, applied after the exponential.
    scale : float, optional
        Logit scale ``s``; default ``1/sqrt(d)``.
    block : int, optional
        Process this many query rows at a time (memory ``O(block · m)``); default: as many
        as keep one block's weights, over the batch, under 256 MiB.
    lengths : int array ``(batch,)``, optional
        Valid length of each sequence along the first batch axis (``n == m``): the result is
        that of each sequence alone, truncated, with zero rows beyond its length
        (docs: "Conventions").

    Returns
    -------
    array ``(..., n, e)``
        In the common floating dtype of the inputs.  ``O(n m (d + e))`` time.  ``k`` and
        ``v`` may have fewer heads (axis ``-3``) than ``q``: grouped-query attention.
    """
    return batched_call(
        functools.partial(_attention, causal=causal, scale=scale, block=block),
        q,
        k,
        v,
        lengths=lengths,
    )


def _attention(q, k, v, *, causal, scale, block):
    xp, q, k, v = validate_attention_inputs(q, k, v, causal=causal)
    scale = resolve_scale(scale, q.shape[-1])
    block = _check_block(xp, block, q, k, v)
    out = [
        _weights(xp, q[..., start:stop, :], k[..., :keys, :], scale, causal, start)
        @ v[..., :keys, :]
        for start, stop, keys in _blocks(q.shape[-2], causal, block)
    ]
    return out[0] if len(out) == 1 else xp.concat(out, axis=-2)


def attention_backward(q, k, v, grad_out, /, *, causal=True, scale=None, block=None, lengths=None):
    """Gradients of ``L(O)`` for ``O = attention(q, k, v)`` given ``grad_out = ∂L/∂O``.

    With ``f`` the attention weights, ``δ = rowsum(G ∘ O) = rowsum(f ∘ G Vᵀ)`` and
    ``P = f ∘ (G Vᵀ) − diag(δ) f``
    (docs/math.rst §3): ``dq = s P K``, ``dk = s Pᵀ Q``, ``dv = fᵀ G``.

    Parameters
    ----------
    q, k, v : arrays ``(..., n, d)``, ``(..., m, d)``, ``(..., m, e)``
    grad_out : array ``(..., n, e)``
    causal, scale, block, lengths
        As in :func:`attention`.

    Returns
    -------
    AttentionGradients
        ``dq, dk, dv`` shaped like ``q``, ``k``, ``v`` (summed over broadcast axes).
        ``O(n m (d + e))`` time, ``O(block · m)`` memory beyond inputs and outputs.
    """
    return batched_call(
        functools.partial(_attention_backward, causal=causal, scale=scale, block=block),
        q,
        k,
        v,
        grad_out,
        lengths=lengths,
    )


def _attention_backward(q, k, v, grad_out, *, causal, scale, block):
    xp, q, k, v, grad_out = validate_attention_inputs(
        q, k, v, causal=causal, extra=(grad_out,), extra_names=("grad_out",)
    )
    check_last_dim(grad_out, "grad_out", v.shape[-1], "the value dimension of v")
    if grad_out.shape[-2] != q.shape[-2]:
        raise ValueError(
            f"grad_out must have as many rows as q ({q.shape[-2]}), "
            f"got shape {tuple(grad_out.shape)}"
        )
    scale = resolve_scale(scale, q.shape[-1])
    block = _check_block(xp, block, q, k, v, grad_out)
    batch = xp.broadcast_shapes(*(a.shape[:-2] for a in (q, k, v, grad_out)))
    dk = xp.zeros((*batch, *k.shape[-2:]), dtype=q.dtype, device=device(q))
    dv = xp.zeros((*batch, *v.shape[-2:]), dtype=q.dtype, device=device(q))
    dq = []
    for start, stop, keys in _blocks(q.shape[-2], causal, block):
        q_b, g_b = q[..., start:stop, :], grad_out[..., start:stop, :]
        k_b, v_b = k[..., :keys, :], v[..., :keys, :]
        f = _weights(xp, q_b, k_b, scale, causal, start)
        gv = g_b @ xp.matrix_transpose(v_b)
        # δ as rowsum(f ∘ G Vᵀ), equal to rowsum(G ∘ O): a row with one-hot weights (causal
        # row 0, n = 1) then gets P = 0 exactly, as in exact arithmetic, not a rounding residue.
        delta = xp.sum(f * gv, axis=-1, keepdims=True)
        p = f * (gv - delta)
        dq.append(scale * (p @ k_b))
        dk = xpx.at(dk)[..., :keys, :].add(scale * (xp.matrix_transpose(p) @ q_b))
        dv = xpx.at(dv)[..., :keys, :].add(xp.matrix_transpose(f) @ g_b)
    dq = dq[0] if len(dq) == 1 else xp.concat(dq, axis=-2)
    return AttentionGradients(
        dq=sum_to_shape(xp, dq, q.shape),
        dk=sum_to_shape(xp, dk, k.shape),
        dv=sum_to_shape(xp, dv, v.shape),
    )


def _validate_self_attention(x, w_q, w_k, w_v, grad_out):
    arrays = (x, w_q, w_k, w_v, grad_out)
    names = ("x", "w_q", "w_k", "w_v", "grad_out")
    xp = namespace(*arrays)
    check_rows(x, "x")
    for w, name in zip(arrays[1:4], names[1:4], strict=True):
        if w.ndim < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions (..., d_model, d_head), "
                f"got shape {tuple(w.shape)}"
            )
        if w.shape[-2] != x.shape[-1]:
            raise ValueError(
                f"{name} must have {x.shape[-1]} rows (d_model of x), got shape {tuple(w.shape)}"
            )
    check_last_dim(w_k, "w_k", w_q.shape[-1], "the head dimension of w_q")
    check_rows(grad_out, "grad_out")
    check_last_dim(grad_out, "grad_out", w_v.shape[-1], "the value dimension of w_v")
    if grad_out.shape[-2] != x.shape[-2]:
        raise ValueError(
            f"grad_out must have as many rows as x ({x.shape[-2]}), "
            f"got shape {tuple(grad_out.shape)}"
        )
    return (xp, *as_floating(xp, arrays, names))


def self_attention_gradients(x, w_q, w_k, w_v, grad_out, /, *, causal=True, scale=None):
    """All gradients of one self-attention layer, with the five ``∂L/∂X`` terms separate.

    Forward: ``O = f · X W_V`` with ``f = softmax(s · X W Xᵀ)``, ``W = W_Q W_Kᵀ``.  The terms
    are evaluated literally as printed in docs/math.rst §3 from the dense ``n × n`` matrix ``f``.

    Parameters
    ----------
    x : array ``(..., n, d_model)``
    w_q, w_k : arrays ``(..., d_model, d_head)``
    w_v : array ``(..., d_model, d_v)``
        Rectangular weights are allowed; leading axes broadcast against ``x`` (heads).
    grad_out : array ``(..., n, d_v)``
        ``∂L/∂O`` from any loss.
    causal : bool
    scale : float, optional
        Default ``1/sqrt(d_head)``.

    Returns
    -------
    SelfAttentionGradients
        ``O(n² (d_model + d_v))`` time, ``O(n²)`` memory.
    """
    xp, x, w_q, w_k, w_v, g = _validate_self_attention(x, w_q, w_k, w_v, grad_out)
    s = resolve_scale(scale, w_q.shape[-1])
    mT = xp.matrix_transpose
    y = x @ w_v
    f = _weights(xp, x @ w_q, x @ w_k, s, causal, 0)
    delta = xp.sum(g * (f @ y), axis=-1, keepdims=True)  # docs/math.rst §3: q = rowsum(G ∘ O)
    f_gy = f * (g @ mT(y))
    w = w_q @ mT(w_k)
    x_wt, x_w = x @ mT(w), x @ w
    terms = (
        s * (f_gy @ x_wt),
        -s * ((delta * f) @ x_wt),
        s * (mT(f_gy) @ x_w),
        -s * (mT(f) @ (delta * x_w)),
        mT(f) @ g @ mT(w_v),
    )
    dx = terms[0] + terms[1] + terms[2] + terms[3] + terms[4]
    dw = s * (mT(x) @ (f_gy - delta * f) @ x)
    return SelfAttentionGradients(
        terms=tuple(sum_to_shape(xp, t, x.shape) for t in terms),
        dx=sum_to_shape(xp, dx, x.shape),
        dw=sum_to_shape(xp, dw, w.shape),
        dw_q=sum_to_shape(xp, dw @ w_k, w_q.shape),
        dw_k=sum_to_shape(xp, mT(dw) @ w_q, w_k.shape),
        dw_v=sum_to_shape(xp, mT(x) @ mT(f) @ g, w_v.shape),
    )


def _level_masks(xp, plan, dev):
    """Boolean ``(N, N)`` masks of levels ``0 … L`` from the FMM definition (docs/math.rst §6).

    Level 0: ``|b_i − b_j| <= 1`` for blocks of ``m``.  Level ``ℓ``: boxes of ``w_ℓ``; the key's
    box is a child of a neighbour of the query box's parent, but not a neighbour of the query
    box itself.  Causal: only ``j <= i`` (near) or boxes before the query's box (far).
    """
    i = xp.arange(plan.padded, device=dev)[:, None]
    j = xp.arange(plan.padded, device=dev)[None, :]
    bi, bj = i // plan.block, j // plan.block
    near = xp.abs(bi - bj) <= 1
    masks = [near & (j <= i) if plan.causal else near]
    for level in range(1, plan.levels + 1):
        w = plan.box(level)
        box_i, box_j = i // w, j // w
        listed = (xp.abs(box_i // 2 - box_j // 2) <= 1) & (xp.abs(box_i - box_j) > 1)
        masks.append(listed & (box_j < box_i) if plan.causal else listed)
    return masks


def multipole_masks(n, /, *, xp, block=64, basis=4, causal=True, device=None):
    """Which level covers each (query, key) pair: a tuple of ``L + 1`` boolean ``(n, n)`` masks.

    Mask 0 is the near field, mask ``ℓ`` the far-field level ``ℓ``.  Every pair ``(i, j)``
    (``j <= i`` when ``causal``) is covered by exactly one level; the others by none.

    Parameters
    ----------
    n : int
        Sequence length (the levels are those of the padded length).
    xp : array namespace
        Namespace of the result.
    block, basis, causal
        As in :func:`multipole_attention` (``basis`` is only validated).
    device : optional
        Device of the result.
    """
    plan = geometry(check_integer(n, "n"), block, basis, causal)
    return tuple(mask[:n, :n] for mask in _level_masks(xp, plan, device))


def multipole_weights(q, k, /, *, block=64, basis=4, causal=True, downsample="mean", scale=None):
    """The dense ``(..., n, n)`` FMA weight matrix ``f`` (the oracle; ``O(n² L d)``).

    Built per key from :func:`multipole_masks` and the pooled tokens: entry ``(i, j)`` at the
    level that covers it, as defined in the module docstring, with one maximum subtracted per
    row over all levels.

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    {params}
    """
    xp, plan, (q, k), kernels = prepare(
        (q, k), ("q", "k"), block=block, basis=basis, causal=causal, downsample=downsample
    )
    s = resolve_scale(scale, q.shape[-1])
    qp, kp = broadcast_and_pad(xp, plan, (q, k))
    dev = device(qp)
    big, n = plan.padded, plan.n
    masks = _level_masks(xp, plan, dev)
    real = xp.arange(big, device=dev)[None, :] < n
    minus_inf = xp.asarray(-xp.inf, dtype=qp.dtype, device=dev)
    logits = xp.where(masks[0] & real, s * (qp @ xp.matrix_transpose(kp)), minus_inf)
    factor = xp.ones((big,), dtype=qp.dtype, device=dev)
    factors = [factor]
    for level in range(1, plan.levels + 1):
        c = plan.chunk(level)
        kr = xp.reshape(kp, (*kp.shape[:-2], big // c, c, kp.shape[-1]))
        count = xp.astype(xp.clip(n - xp.arange(big // c, device=dev) * c, 0, c), qp.dtype)
        count = xp.maximum(count, xp.ones_like(count))
        if kernels is None:
            pooled = xp.sum(kr, axis=-2) / count[:, None]
            factors.append(factor)
        else:
            w = kernels[level - 1]
            pooled = xp.sum(kr * w[:, None], axis=-2) * (c / count)[:, None]
            # ρ_j = c_ℓ κ_t for key j = r c_ℓ + t
            factors.append(c * xp.reshape(xp.broadcast_to(w, (big // c, c)), (big,)))
        per_key = xp.reshape(
            xp.broadcast_to(pooled[..., None, :], (*pooled.shape[:-1], c, pooled.shape[-1])),
            kp.shape,
        )
        level_logits = s * (qp @ xp.matrix_transpose(per_key))
        logits = xp.where(masks[level] & real, level_logits, logits)
    row_max = xp.max(logits, axis=-1, keepdims=True)
    row_max = xp.where(xp.isfinite(row_max), row_max, xp.zeros_like(row_max))
    e = xp.exp(logits - row_max)
    total = xp.sum(e, axis=-1, keepdims=True)
    rho = factors[0]
    for level in range(1, plan.levels + 1):
        rho = xp.where(masks[level], factors[level][None, :], rho)
    f = e * rho / xp.where(total > 0, total, xp.ones_like(total))
    return f[..., :n, :n]


def multipole_reference(
    q, k, v, /, *, block=64, basis=4, causal=True, downsample="mean", scale=None
):
    """``multipole_weights(q, k, ...) @ v``: the dense oracle of
    :func:`convbasis.multipole.multipole_attention`.

    ``O(n² (L d + e))`` time and ``O(n²)`` memory; for tests on small ``n``.
    """
    geometry = {"block": block, "basis": basis, "causal": causal}
    _, _, (q, k, v), kernels = prepare(
        (q, k, v), ("q", "k", "v"), downsample=downsample, **geometry
    )
    down = "mean" if kernels is None else kernels
    f = multipole_weights(q, k, downsample=down, scale=scale, **geometry)
    return f @ v


if multipole_weights.__doc__:  # None under python -OO
    multipole_weights.__doc__ = multipole_weights.__doc__.replace(
        "{params}", PARAMS_DOC.strip("\n").lstrip()
    )
