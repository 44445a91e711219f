"""Attention gradients through any attention operator (docs/math.rst §3, §7).

The exact-formula gradients are products of ``f`` or ``fᵀ`` — optionally Hadamard-multiplied by
the rank-``e`` matrix ``G Yᵀ`` — with tall matrices, so that route is written once against the
four products of :mod:`convbasis.operators` and never branches on the method.  Costs are those
of the operator: ``O(n² d)`` dense, ``O(n r d²)`` low-rank, ``O(k n d² log n)`` conv basis,
``O(n (m + p log n) d²)`` multipole, with no ``n × n`` array on a fast path.  The model's own
gradient (``gradient="model"``) is method-specific and lives beside each method
(:mod:`convbasis.polynomial_gradient`, :mod:`convbasis.conv.gradient`,
:func:`convbasis.multipole.multipole_attention_backward`).
"""

from __future__ import annotations

import functools
import itertools

from array_api_compat import device

from ._array import as_dtype, check_last_dim, resolve_scale, sum_to_shape, validate_attention_inputs
from ._capabilities import check_eager
from .batching import batched_call, check_lengths_options
from .operators import attention_operator, check_options
from .reference import _validate_self_attention
from .results import AttentionGradients, SelfAttentionGradients

__all__ = [
    "GRADIENTS",
    "attention_gradients",
    "check_grad_out",
    "check_gradient",
    "self_attention_gradients",
]


GRADIENTS = ("exact-formula", "model")
"""The two meanings of a fast method's gradient (docs/math.rst §7)."""


def check_grad_out(q, v, grad_out):
    """``grad_out`` must be shaped like the output: ``(..., n, e)`` for ``q (..., n, d)``,
    ``v (..., m, e)``."""
    check_last_dim(grad_out, "grad_out", v.shape[-1], "the value dimension of v")
    if grad_out.shape[-2] != q.shape[-2]:
        raise ValueError(
            f"grad_out must have as many rows as q ({q.shape[-2]}), "
            f"got shape {tuple(grad_out.shape)}"
        )


def check_gradient(gradient):
    """``gradient`` if it names one of :data:`GRADIENTS`, else a ``ValueError`` listing them."""
    if not isinstance(gradient, str) or gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    return gradient


def _one_product(xp, product, *parts):
    """``product`` of each of ``parts`` (``(..., m, w_i)``) from one call on their
    concatenation: a structured product pays its per-call work (multipole's level weights, the
    conv safeguard's exact rows) once."""
    batch = xp.broadcast_shapes(*(a.shape[:-2] for a in parts))
    parts = [xp.broadcast_to(a, (*batch, *a.shape[-2:])) for a in parts]
    out = product(xp.concat(parts, axis=-1))
    edges = list(itertools.accumulate((a.shape[-1] for a in parts), initial=0))
    return [out[..., lo:hi] for lo, hi in itertools.pairwise(edges)]


def _forward_products(xp, op, y, g, z):
    """``δ = rowsum(G ∘ f Y)``, ``f 1`` and ``f Z`` from one product.

    ``f 1 = 1`` for a normalised ``f``; Fast Multipole Attention with supplied downsampling
    kernels is not row-stochastic, and the centring below must know it.
    """
    ones = xp.ones((*y.shape[:-1], 1), dtype=y.dtype, device=device(y))
    fy, f1, fz = _one_product(xp, op.matmul, y, ones, z)
    return xp.sum(g * fy, axis=-1, keepdims=True), f1, fz


def _exact_formula(xp, q, k, v, g, *, method, causal, scale, **options):
    op = attention_operator(q, k, method=method, causal=causal, scale=scale, **options)
    mu = xp.mean(k, axis=-2, keepdims=True)
    kc = k - mu
    delta, f1, f_kc = _forward_products(xp, op, v, g, kc)
    # P = f ∘ G Vᵀ − diag(δ) f has row sums P 1 = δ (1 − f 1) ((f ∘ G Vᵀ) 1 = δ), so
    # P K = P K_c + δ (1 − f 1) μᵀ with K_c = K − 1 μᵀ: the centred keys avoid cancellation
    # between the two products when K has a large common component (docs: "Fast gradients").
    dq = scale * (op.hadamard_matmul(g, v, kc) - delta * f_kc + delta * (1 - f1) * mu)
    f_dq, dv = _one_product(xp, op.rmatmul, delta * q, g)
    dk = scale * (op.hadamard_rmatmul(g, v, q) - f_dq)
    return dq, dk, dv


# Each model gradient receives the inputs validated and promoted to one dtype, and ``given``:
# q and k as the caller passed them, for a forward that does not promote them with v.


def _lowrank_model(xp, q, k, v, g, *, given, **options):
    from .polynomial_gradient import model_gradients

    return model_gradients(xp, q, k, v, g, **options)


def _conv_model(xp, q, k, v, g, *, given, **options):
    from .conv.gradient import model_gradients

    # conv_attention recovers the basis in the precision of q and k (a wider v does not
    # change the segment starts), so the model is built from them as given.
    return model_gradients(xp, q, k, v, g, given=given, **options)


def _multipole_model(xp, q, k, v, g, *, given, **options):
    from .multipole import multipole_attention_backward

    # The gradients of supplied downsampling kernels: multipole_attention_backward itself.
    return multipole_attention_backward(q, k, v, g, **options)


def _composite_model(xp, q, k, v, g, *, given, **options):
    from .composite.gradient import model_gradients

    return model_gradients(xp, q, k, v, g, **options)


def _dense_model(xp, q, k, v, g, *, given, **options):
    return _exact_formula(xp, q, k, v, g, method="dense", **options)


_MODEL_GRADIENTS = {
    "composite": _composite_model,
    "conv": _conv_model,
    "dense": _dense_model,
    "lowrank": _lowrank_model,
    "multipole": _multipole_model,
}


def attention_gradients(
    q,
    k,
    v,
    grad_out,
    /,
    *,
    method="dense",
    gradient="exact-formula",
    causal=True,
    scale=None,
    lengths=None,
    **method_options,
):
    """``dq, dk, dv`` of ``L(O)`` for attention ``O`` with a structured ``f``.

    Two meanings (docs/math.rst §7), never mixed:

    * ``gradient="exact-formula"`` (default): the gradient of *exact* attention with the
      method's ``f̃`` put into the exact formulas.  With ``δ = rowsum(G ∘ O)`` and
      ``P = f ∘ G Vᵀ − diag(δ) f``: ``dq = s P K``, ``dk = s Pᵀ Q``, ``dv = fᵀ G``, each
      evaluated as operator products (the papers' route).
    * ``gradient="model"``: the exact gradient of the method's *own* forward (what training
      the approximated model needs; loss and gradient belong to one function).  Low-rank:
      prefix products and the feature Jacobians, ``O(n r (e + c))``; conv basis: through the
      recovered basis, ``O(k n (d + e) log n)``, the cost of the forward; multipole:
      :func:`convbasis.multipole.multipole_attention_backward`; dense: both meanings agree.

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    v : array ``(..., n, e)``
    grad_out : array ``(..., n, e)``
        ``∂L/∂O``.  Leading (batch, head) axes broadcast.
    method : {"dense", "lowrank", "conv", "multipole", "composite"}
        Structure of ``f``; ``method_options`` go to its constructor (see
        :func:`convbasis.operators.attention_operator`).
    gradient : {"exact-formula", "model"}
    causal : bool
    scale : float, optional
        Default ``1/sqrt(d)``.
    lengths : int array ``(batch,)``, optional
        Valid length of each sequence (first batch axis), as in :func:`convbasis.attention`:
        the gradients of each sequence alone, truncated, zero beyond its length.  ``k`` and
        ``v`` may have fewer heads than ``q`` (grouped-query attention).

    Returns
    -------
    AttentionGradients
        ``dq, dk, dv`` shaped like ``q``, ``k``, ``v``.  Exact-formula cost: that of the
        operator's products (``O(n² d)`` dense, ``O(n r d²)`` low-rank, ``O(k n d² log n)``
        conv basis, ``O(n (m + p log n) d²)`` multipole); model cost: that of the method's
        forward.

    Notes
    -----
    Error of ``method="lowrank"``, exact-formula: if ``|Ã − A| <= ε A`` entrywise (``ε`` the
    operator's ``rel_error_bound``), then with ``η = 2ε/(1−ε)`` one has ``|f̃ − f| <= η f`` and,
    entrywise, ``|P̃ − P| <= η (3 + η) ‖V‖_max diag(‖G_i‖₁) f``, hence ``|Δdq| <= s |ΔP| |K|``,
    ``|Δdk| <= s |ΔP|ᵀ |Q|`` and ``|Δdv| <= η fᵀ |G|`` (tested).  Conv-basis exact-formula
    gradients are exact up to FFT round-off when the logits have an exact k-conv basis of the
    requested rank.  The model gradient of the conv basis differs from the exact gradient even
    then: the model's logits depend on ``K`` only through the keys at the segment starts.
    """
    check_eager("attention_gradients", q, k, v, grad_out, method=method)
    check_options(method, method_options)
    check_gradient(gradient)
    check_lengths_options(method, lengths, method_options)
    call = functools.partial(
        _gradients, method=method, gradient=gradient, causal=causal, scale=scale, **method_options
    )
    return batched_call(call, q, k, v, grad_out, lengths=lengths)


def _gradients(q, k, v, grad_out, *, method, gradient, causal, scale, **method_options):
    given = (q, k)
    xp, q, k, v, g = validate_attention_inputs(
        q, k, v, causal=causal, extra=(grad_out,), extra_names=("grad_out",)
    )
    check_grad_out(q, v, g)
    s = resolve_scale(scale, q.shape[-1])
    if gradient == "model":
        model = _MODEL_GRADIENTS[method]
        grads = model(xp, q, k, v, g, given=given, causal=causal, scale=s, **method_options)
    else:
        grads = _exact_formula(
            xp, q, k, v, g, method=method, causal=causal, scale=s, **method_options
        )
    # A method that computes half precision in float32 (conv) returns it in the inputs' dtype.
    dq, dk, dv = (
        as_dtype(xp, sum_to_shape(xp, x, a.shape), q.dtype)
        for x, a in zip(grads, (q, k, v), strict=True)
    )
    # multipole's model gradient carries the supplied kernels' gradients
    ddownsample = getattr(grads, "ddownsample", None)
    return AttentionGradients(dq=dq, dk=dk, dv=dv, ddownsample=ddownsample)


def self_attention_gradients(
    x, w_q, w_k, w_v, grad_out, /, *, method="dense", causal=True, scale=None, **method_options
):
    """The five ``∂L/∂X`` terms and all weight gradients of one self-attention layer.

    Same result type and conventions as :func:`convbasis.reference.self_attention_gradients`,
    but ``f`` is reached only through operator products (docs/math.rst §3):

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
        Four operator calls (two of them Hadamard products with rank ``d_v``) on about
        ``d_model`` columns each, plus ``O(n d_model (d_model + d_head))`` dense work.
    """
    if "gradient" in method_options:
        raise TypeError(
            "self_attention_gradients evaluates the five terms of the exact formulas (the "
            "exact-formula gradient); for the model's own gradient use "
            "attention_gradients(q, k, v, grad_out, gradient='model') and the chain rule"
        )
    check_eager("self_attention_gradients", x, w_q, w_k, w_v, grad_out, method=method)
    xp, x, w_q, w_k, w_v, g = _validate_self_attention(x, w_q, w_k, w_v, grad_out)
    s = resolve_scale(scale, w_q.shape[-1])
    mT = xp.matrix_transpose
    q, k, y = x @ w_q, x @ w_k, x @ w_v
    op = attention_operator(q, k, method=method, causal=causal, scale=s, **method_options)
    batch = xp.broadcast_shapes(q.shape[:-2], y.shape[:-2], g.shape[:-2])
    xb = xp.broadcast_to(x, (*batch, *x.shape[-2:]))
    w = w_q @ mT(w_k)
    # P = f ∘ G Yᵀ − diag(δ) f has row sums δ (1 − f 1) ((f ∘ G Yᵀ) 1 = δ), so
    # P X = P X_c + δ (1 − f 1) μᵀ with X_c = X − 1 μᵀ: the products on the centred X_c avoid
    # the cancellation a large common component of X causes in (f ∘ G Yᵀ) X − δ f X;
    # (f ∘ G Yᵀ) X = (f ∘ G Yᵀ) X_c + δ μᵀ and f X = f X_c + (f 1) μᵀ recover T1 and T2 at no
    # extra product.
    mu = xp.mean(xb, axis=-2, keepdims=True)
    xc = xb - mu
    delta, f1, f_xc = _forward_products(xp, op, y, g, xc)  # δ, f 1, f X_c
    fgy_xc = op.hadamard_matmul(g, y, xc)  # (f ∘ G Yᵀ) X_c
    ft_dx, f_v = _one_product(xp, op.rmatmul, delta * xb, g)  # fᵀ (δ ∘ X), fᵀ G
    terms = (
        s * ((fgy_xc + delta * mu) @ mT(w)),
        -s * ((delta * (f_xc + f1 * mu)) @ mT(w)),
        s * (op.hadamard_rmatmul(g, y, xb) @ w),
        -s * (ft_dx @ w),
        f_v @ mT(w_v),
    )
    dx = terms[0] + terms[1] + terms[2] + terms[3] + terms[4]
    dw = s * (mT(xb) @ (fgy_xc - delta * f_xc + delta * (1 - f1) * mu))
    return SelfAttentionGradients(
        terms=tuple(sum_to_shape(xp, t, x.shape) for t in terms),
        dx=sum_to_shape(xp, dx, x.shape),
        dw=sum_to_shape(xp, dw, w.shape),
        dw_q=sum_to_shape(xp, dw @ w_k, w_q.shape),
        dw_k=sum_to_shape(xp, mT(dw) @ w_q, w_k.shape),
        dw_v=sum_to_shape(xp, mT(xb) @ f_v, w_v.shape),
    )
