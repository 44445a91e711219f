"""The exact gradient of polynomial (low-rank) attention's own forward (docs/math.rst §7).

The model is ``O = D⁻¹ A V`` with ``A = M ∘ U₁U₂ᵀ`` (``M`` only when causal),
``U₁ = φ(Q̃)``, ``U₂ = ψ(K̃)`` the monomial features of the scaled inputs and ``D = A 1``.
Every product is a prefix product (docs/math.rst §1), so the gradient costs what the forward
does; no ``n × n`` array.
"""

from __future__ import annotations

import math

from array_api_compat import device

from ._array import sum_to_shape
from .exp_approximation import coefficient_slopes
from .monomial_features import features, features_backward
from .polynomial import (
    _check_positive,
    _choose_polynomial,
    _unnormalised_product,
    _weight_arrays,
)

__all__ = ["model_gradients"]


def model_gradients(
    xp, q, k, v, g, *, causal, scale, eps=None, degree=None, kind="chebyshev", max_rank=None
):
    """``(dq, dk, dv)``: the exact gradient of :func:`lowrank_attention`'s own output.

    docs/math.rst §7: with ``A = M ∘ U₁U₂ᵀ``, ``U₁ = φ(Q̃)``, ``U₂ = ψ(K̃)``, ``O = D⁻¹ A V``,
    ``G̃ = D⁻¹G`` and ``δ̃ = D⁻¹ rowsum(G ∘ O)``: ``∂L/∂A = M ∘ [G̃, −δ̃][V, 1]ᵀ``, so
    ``dU₁ = (∂L/∂A) U₂`` and ``dU₂ = (∂L/∂A)ᵀ U₁`` are prefix products of rank ``e + 1`` with
    ``r`` columns, ``dV = Ãᵀ G̃``, then the feature Jacobians.  The radius
    ``R = |s| max‖q‖ max‖k‖`` moves the Chebyshev nodes: ``∂L/∂c_t = ⟨dU₁, U₁⟩_t / c_t``
    (degree-``t`` block) enters through ``dc_t/dR`` at the two rows of largest norm.  The
    degree is piecewise constant in ``R`` (no gradient).  Arrays already validated.

    ``O(n r (e + c))`` time, ``O(n r)`` memory for the two factors.
    """
    poly = _choose_polynomial(xp, q, k, scale, eps, degree, kind, max_rank)
    _check_positive(poly.kind, poly.rel_error, poly.degree, poly.radius)
    w_left, w_right = _weight_arrays(xp, poly, q)
    qs, ks = q * poly.q_scale, k * poly.k_scale
    u1 = features(xp, qs, poly.degree, w_left)
    u2 = features(xp, ks, poly.degree, w_right)

    def product(a, b, z, transpose=False):
        return _unnormalised_product(xp, a, b, z, causal=causal, transpose=transpose)

    ones = xp.ones((*v.shape[:-1], 1), dtype=v.dtype, device=device(v))
    right = xp.concat([v, ones], axis=-1)
    num = product(u1, u2, right)
    d = num[..., -1:]
    delta = xp.sum(g * (num[..., :-1] / d), axis=-1, keepdims=True)
    g_norm = g / d
    batch = xp.broadcast_shapes(g_norm.shape[:-2], delta.shape[:-2])
    left = xp.concat(
        [xp.broadcast_to(a, (*batch, *a.shape[-2:])) for a in (g_norm, -delta / d)], axis=-1
    )
    du1 = product(left, right, u2)
    du2 = product(left, right, u1, transpose=True)
    dv = product(u1, u2, g_norm, transpose=True)
    dq = poly.q_scale * features_backward(xp, qs, poly.degree, w_left, du1)
    dk = poly.k_scale * features_backward(xp, ks, poly.degree, w_right, du2)
    dq, dk = sum_to_shape(xp, dq, q.shape), sum_to_shape(xp, dk, k.shape)
    if poly.kind == "chebyshev" and poly.radius > 0:
        slopes = coefficient_slopes(poly.degree, poly.radius, kind=poly.kind)
        # ∂L/∂c_t = ⟨dU₁, U₁⟩ over the degree-t block / c_t (U₁ U₂ᵀ has c_t X^t there); a
        # zero c_t leaves its block zero, and exp's interpolants have none.
        inner, start = [], 0
        for t in range(poly.degree + 1):
            stop = start + math.comb(q.shape[-1] + t - 1, t)
            inner.append(xp.sum(du1[..., start:stop] * u1[..., start:stop]))
            start = stop
        inner = [float(x) for x in xp.stack(inner)]  # one read-back
        d_radius = sum(
            x / c * slope for x, c, slope in zip(inner, poly.coeffs, slopes, strict=True) if c
        )
        q_max, k_max = poly.norm_max
        dq = dq + (d_radius * abs(scale) * k_max) * _norm_max_gradient(xp, q)
        dk = dk + (d_radius * abs(scale) * q_max) * _norm_max_gradient(xp, k)
    return dq, dk, sum_to_shape(xp, dv, v.shape)


def _norm_max_gradient(xp, x):
    """Gradient of ``max_i ‖x_i‖`` (over every row of every batch element): ``x_a / ‖x_a‖`` on
    the first row ``a`` of largest norm, zero elsewhere."""
    norms = xp.sqrt(xp.sum(x * x, axis=-1))
    flat = xp.reshape(norms, (-1,))
    first = xp.argmax(flat)
    hit = xp.arange(flat.shape[0], device=device(x)) == first
    hit = xp.reshape(xp.astype(hit, x.dtype), norms.shape)[..., None]
    return hit * x / xp.max(flat)
