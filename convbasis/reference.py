"""Dense O(n²) oracles: softmax attention, its backward, and the five gradient terms.

Every fast path in the library is tested against these functions (MATH.md §0, §3).  They are
written for clarity and numerical robustness, not speed: each row subtracts its own maximum
before ``exp``, so logits of magnitude ``1e4`` give finite, correct results in float32.
A ``block`` option processes queries ``block`` rows at a time, keeping memory at
``O(n · block)`` instead of ``O(n²)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import array_api_extra as xpx
from array_api_compat import device

from ._array import (
    as_floating,
    check_last_dim,
    check_rows,
    namespace,
    resolve_scale,
    sum_to_shape,
    validate_attention_inputs,
)

__all__ = [
    "SelfAttentionGradients",
    "attention",
    "attention_backward",
    "attention_weights",
    "self_attention_gradients",
]


@dataclass(frozen=True)
class SelfAttentionGradients:
    """Gradients of ``L(O)`` for ``O = softmax(s · X W_Q W_Kᵀ Xᵀ) X W_V`` (MATH.md §3).

    Attributes
    ----------
    terms : tuple of 5 arrays, each ``(..., n, d_model)``
        ``T1 … T5`` of MATH.md §3; they sum to ``dx``.
    dx : array ``(..., n, d_model)``
        ``∂L/∂X``.
    dw : array ``(..., d_model, d_model)``
        ``∂L/∂W`` for the product ``W = W_Q W_Kᵀ``.
    dw_q, dw_k, dw_v : arrays shaped like ``w_q``, ``w_k``, ``w_v``
        Weight gradients (summed over any axis the weight was broadcast along).
    """

    terms: tuple[Any, Any, Any, Any, Any]
    dx: Any
    dw: Any
    dw_q: Any
    dw_k: Any
    dw_v: Any


def _check_block(block, n):
    if block is None:
        return n
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer or None, got {block!r}")
    return min(block, n)


def _weights(xp, q, k, scale, causal, row_offset):
    """Softmax rows ``row_offset … row_offset + len(q)`` of ``s·Q Kᵀ`` (masked if causal).

    Under the causal mask only the first ``row_offset + len(q)`` keys can be seen; the caller
    passes exactly those, so every row keeps its diagonal and its maximum is finite.
    """
    logits = scale * (q @ xp.matrix_transpose(k))
    if causal:
        rows = xp.arange(q.shape[-2])[:, None] + row_offset
        cols = xp.arange(k.shape[-2])[None, :]
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


def attention(q, k, v, /, *, causal=True, scale=None, block=None):
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
        Process this many query rows at a time (memory ``O(block · m)``); default all.

    Returns
    -------
    array ``(..., n, e)``
        In the common floating dtype of the inputs.  ``O(n m (d + e))`` time.
    """
    xp, q, k, v = validate_attention_inputs(q, k, v, causal=causal)
    scale = resolve_scale(scale, q.shape[-1])
    block = _check_block(block, q.shape[-2])
    out = [
        _weights(xp, q[..., start:stop, :], k[..., :keys, :], scale, causal, start)
        @ v[..., :keys, :]
        for start, stop, keys in _blocks(q.shape[-2], causal, block)
    ]
    return out[0] if len(out) == 1 else xp.concat(out, axis=-2)


def attention_backward(q, k, v, grad_out, /, *, causal=True, scale=None, block=None):
    """Gradients of ``L(O)`` for ``O = attention(q, k, v)`` given ``grad_out = ∂L/∂O``.

    With ``f`` the attention weights, ``δ = rowsum(G ∘ O)`` and ``P = f ∘ (G Vᵀ) − diag(δ) f``
    (MATH.md §3): ``dq = s P K``, ``dk = s Pᵀ Q``, ``dv = fᵀ G``.

    Parameters
    ----------
    q, k, v : arrays ``(..., n, d)``, ``(..., m, d)``, ``(..., m, e)``
    grad_out : array ``(..., n, e)``
    causal, scale, block
        As in :func:`attention`.

    Returns
    -------
    (dq, dk, dv)
        Shaped like ``q``, ``k``, ``v`` (summed over broadcast axes).  ``O(n m (d + e))``
        time, ``O(block · m)`` memory beyond inputs and outputs.
    """
    xp, q, k, v, grad_out = validate_attention_inputs(
        q, k, v, causal=causal, extra=(grad_out,), extra_names=("grad_out",)
    )
    check_last_dim(grad_out, "grad_out", v.shape[-1], "the value dimension of v")
    if grad_out.shape[-2] != q.shape[-2]:
        raise ValueError(
            f"grad_out must have as many rows as q ({q.shape[-2]}), got shape {grad_out.shape}"
        )
    scale = resolve_scale(scale, q.shape[-1])
    block = _check_block(block, q.shape[-2])
    batch = xp.broadcast_shapes(*(a.shape[:-2] for a in (q, k, v, grad_out)))
    dk = xp.zeros((*batch, *k.shape[-2:]), dtype=q.dtype, device=device(q))
    dv = xp.zeros((*batch, *v.shape[-2:]), dtype=q.dtype, device=device(q))
    dq = []
    for start, stop, keys in _blocks(q.shape[-2], causal, block):
        q_b, g_b = q[..., start:stop, :], grad_out[..., start:stop, :]
        k_b, v_b = k[..., :keys, :], v[..., :keys, :]
        f = _weights(xp, q_b, k_b, scale, causal, start)
        delta = xp.sum(g_b * (f @ v_b), axis=-1, keepdims=True)
        p = f * (g_b @ xp.matrix_transpose(v_b) - delta)
        dq.append(scale * (p @ k_b))
        dk = xpx.at(dk)[..., :keys, :].add(scale * (xp.matrix_transpose(p) @ q_b))
        dv = xpx.at(dv)[..., :keys, :].add(xp.matrix_transpose(f) @ g_b)
    dq = dq[0] if len(dq) == 1 else xp.concat(dq, axis=-2)
    return (
        sum_to_shape(xp, dq, q.shape),
        sum_to_shape(xp, dk, k.shape),
        sum_to_shape(xp, dv, v.shape),
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
                f"got shape {w.shape}"
            )
        if w.shape[-2] != x.shape[-1]:
            raise ValueError(
                f"{name} must have {x.shape[-1]} rows (d_model of x), got shape {w.shape}"
            )
    check_last_dim(w_k, "w_k", w_q.shape[-1], "the head dimension of w_q")
    check_rows(grad_out, "grad_out")
    check_last_dim(grad_out, "grad_out", w_v.shape[-1], "the value dimension of w_v")
    if grad_out.shape[-2] != x.shape[-2]:
        raise ValueError(
            f"grad_out must have as many rows as x ({x.shape[-2]}), got shape {grad_out.shape}"
        )
    return (xp, *as_floating(xp, arrays, names))


def self_attention_gradients(x, w_q, w_k, w_v, grad_out, /, *, causal=True, scale=None):
    """All gradients of one self-attention layer, with the five ``∂L/∂X`` terms separate.

    Forward: ``O = f · X W_V`` with ``f = softmax(s · X W Xᵀ)``, ``W = W_Q W_Kᵀ``.  The terms
    are evaluated literally as printed in MATH.md §3 from the dense ``n × n`` matrix ``f``.

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
    delta = xp.sum(g * (f @ y), axis=-1, keepdims=True)  # MATH §3: q = rowsum(G ∘ O)
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
