"""Attention gradients through any attention operator (MATH.md §3).

Every gradient is a product of ``f`` or ``fᵀ`` — optionally Hadamard-multiplied by the rank-``e``
matrix ``G Yᵀ`` — with a tall matrix, so the code below is written once against the four
products of :mod:`convbasis.operators` and never branches on the method.  Costs are those of
the operator: ``O(n² d)`` dense, ``O(n r d²)`` low-rank, ``O(k n d² log n)`` conv basis, with
no ``n × n`` array on a fast path.
"""

from __future__ import annotations

from ._array import check_last_dim, resolve_scale, sum_to_shape, validate_attention_inputs
from .operators import attention_operator
from .reference import SelfAttentionGradients, _validate_self_attention

__all__ = ["attention_gradients", "self_attention_gradients"]


def _delta(xp, op, y, g):
    """Forward output ``O = f Y`` and ``δ = rowsum(G ∘ O)`` as a column ``(..., n, 1)``."""
    return xp.sum(g * op.matmul(y), axis=-1, keepdims=True)


def attention_gradients(
    q, k, v, grad_out, /, *, method="dense", causal=True, scale=None, **method_options
):
    """``(dq, dk, dv)`` of ``L(O)``, ``O = softmax(s Q Kᵀ) V``, through a structured ``f``.

    With ``δ = rowsum(G ∘ O)`` and ``P = f ∘ G Vᵀ − diag(δ) f``: ``dq = s P K``,
    ``dk = s Pᵀ Q``, ``dv = fᵀ G``, each evaluated as operator products.

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    v : array ``(..., n, e)``
    grad_out : array ``(..., n, e)``
        ``∂L/∂O``.  Leading (batch, head) axes broadcast.
    method : {"dense", "lowrank", "conv"}
        Structure of ``f``; ``method_options`` go to its constructor (see
        :func:`convbasis.operators.attention_operator`).
    causal : bool
    scale : float, optional
        Default ``1/sqrt(d)``.

    Returns
    -------
    (dq, dk, dv)
        Shaped like ``q``, ``k``, ``v``.

    Notes
    -----
    Error of ``method="lowrank"``: if ``|Ã − A| <= ε A`` entrywise (``ε`` the operator's
    ``rel_error_bound``), then with ``η = 2ε/(1−ε)`` one has ``|f̃ − f| <= η f`` and, entrywise,
    ``|P̃ − P| <= η (3 + η) ‖V‖_max diag(‖G_i‖₁) f``, hence ``|Δdq| <= s |ΔP| |K|``,
    ``|Δdk| <= s |ΔP|ᵀ |Q|`` and ``|Δdv| <= η fᵀ |G|`` (tested).  Conv-basis gradients are exact
    up to FFT round-off when the logits have an exact k-conv basis of the requested rank.
    """
    xp, q, k, v, g = validate_attention_inputs(
        q, k, v, causal=causal, extra=(grad_out,), extra_names=("grad_out",)
    )
    check_last_dim(g, "grad_out", v.shape[-1], "the value dimension of v")
    s = resolve_scale(scale, q.shape[-1])
    op = attention_operator(q, k, method=method, causal=causal, scale=s, **method_options)
    delta = _delta(xp, op, v, g)
    # P has zero row sums (f 1 = 1, (f ∘ G Vᵀ) 1 = δ): P K = P (K − 1 μᵀ), and the centred keys
    # avoid cancellation between the two products when K has a large common component.
    kc = k - xp.mean(k, axis=-2, keepdims=True)
    dq = s * (op.hadamard_matmul(g, v, kc) - delta * op.matmul(kc))
    dk = s * (op.hadamard_rmatmul(g, v, q) - op.rmatmul(delta * q))
    dv = op.rmatmul(g)
    return (
        sum_to_shape(xp, dq, q.shape),
        sum_to_shape(xp, dk, k.shape),
        sum_to_shape(xp, dv, v.shape),
    )


def self_attention_gradients(
    x, w_q, w_k, w_v, grad_out, /, *, method="dense", causal=True, scale=None, **method_options
):
    """The five ``∂L/∂X`` terms and all weight gradients of one self-attention layer.

    Same result type and conventions as :func:`convbasis.reference.self_attention_gradients`,
    but ``f`` is reached only through operator products (MATH.md §3):

    ``T1 = s (f∘GYᵀ) X Wᵀ``, ``T2 = −s diag(δ) f X Wᵀ``, ``T3 = s (f∘GYᵀ)ᵀ X W``,
    ``T4 = −s fᵀ diag(δ) X W``, ``T5 = fᵀ G W_Vᵀ``, ``∂W = s Xᵀ (f∘GYᵀ − diag(δ) f) X``.

    Parameters
    ----------
    x : array ``(..., n, d_model)``
    w_q, w_k : arrays ``(..., d_model, d_head)``
    w_v : array ``(..., d_model, d_v)``
        Leading axes broadcast (heads as an axis).
    grad_out : array ``(..., n, d_v)``
    method, causal, scale, method_options
        As in :func:`attention_gradients`.

    Returns
    -------
    SelfAttentionGradients
        Five operator products with ``d_model`` columns (two of them Hadamard with rank
        ``d_v``), plus ``O(n d_model (d_model + d_head))`` dense work.
    """
    xp, x, w_q, w_k, w_v, g = _validate_self_attention(x, w_q, w_k, w_v, grad_out)
    s = resolve_scale(scale, w_q.shape[-1])
    mT = xp.matrix_transpose
    q, k, y = x @ w_q, x @ w_k, x @ w_v
    op = attention_operator(q, k, method=method, causal=causal, scale=s, **method_options)
    delta = _delta(xp, op, y, g)
    batch = xp.broadcast_shapes(q.shape[:-2], y.shape[:-2], g.shape[:-2])
    xb = xp.broadcast_to(x, (*batch, *x.shape[-2:]))
    w = w_q @ mT(w_k)
    # P = f ∘ G Yᵀ − diag(δ) f has zero row sums (f 1 = 1, (f ∘ G Yᵀ) 1 = δ), so P X = P X_c
    # with X_c = X − 1 μᵀ: the products on the centred X_c avoid the cancellation a large
    # common component of X causes in (f ∘ G Yᵀ) X − δ f X; (f ∘ G Yᵀ) X = (f ∘ G Yᵀ) X_c + δ μᵀ
    # and f X = f X_c + 1 μᵀ recover T1 and T2 at no extra product.
    mu = xp.mean(xb, axis=-2, keepdims=True)
    xc = xb - mu
    fgy_xc = op.hadamard_matmul(g, y, xc)  # (f ∘ G Yᵀ) X_c
    f_xc = op.matmul(xc)  # f X_c
    f_v = op.rmatmul(g)  # fᵀ G
    terms = (
        s * ((fgy_xc + delta * mu) @ mT(w)),
        -s * ((delta * (f_xc + mu)) @ mT(w)),
        s * (op.hadamard_rmatmul(g, y, xb) @ w),
        -s * (op.rmatmul(delta * xb) @ w),
        f_v @ mT(w_v),
    )
    dx = terms[0] + terms[1] + terms[2] + terms[3] + terms[4]
    dw = s * (mT(xb) @ (fgy_xc - delta * f_xc))
    return SelfAttentionGradients(
        terms=tuple(sum_to_shape(xp, t, x.shape) for t in terms),
        dx=sum_to_shape(xp, dx, x.shape),
        dw=sum_to_shape(xp, dw, w.shape),
        dw_q=sum_to_shape(xp, dw @ w_k, w_q.shape),
        dw_k=sum_to_shape(xp, mT(dw) @ w_q, w_k.shape),
        dw_v=sum_to_shape(xp, mT(xb) @ f_v, w_v.shape),
    )
