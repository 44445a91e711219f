"""Symmetric monomial features ``φ(x) = [w_α x^α]_{|α| <= g}`` and their backward pass.

``⟨q, k⟩^t = Σ_{|α| = t} (t choose α) q^α k^α``, so weighted monomials turn a polynomial of
the logits into a product of two thin factors (docs/math.rst §2).  The features are built
degree by degree — each degree-``t`` monomial is a degree-``(t−1)`` one times one coordinate
— in ``O(n r)``, and :func:`features_backward` walks the same construction backwards.
"""

from __future__ import annotations

import math
from functools import lru_cache

import array_api_extra as xpx
from array_api_compat import device

from ._array import check_integer

__all__ = [
    "feature_weights",
    "features",
    "features_backward",
    "layout",
    "monomial_blocks",
    "rank_for",
]


def rank_for(d, degree, /):
    """Rank ``C(d + g, g)`` of the symmetric monomial features of degree ``<= g`` in ``d``
    variables (docs/math.rst §2)."""
    d, degree = check_integer(d, "d", low=0), check_integer(degree, "degree", low=0)
    return math.comb(d + degree, degree)


@lru_cache(maxsize=256)
def layout(d, degree):
    """Per degree ``t``: prefix lengths and multinomial coefficients of the monomials.

    Degree-``t`` monomials are ordered by their last (largest) index ``j``; those of degree
    ``t - 1`` with last index ``<= j`` form a prefix of length ``C(j + t - 1, t - 1)``, so the
    degree-``t`` block is ``concat_j x_j · prev[:, :prefix_j]``.  Alongside, each monomial
    carries its multinomial coefficient ``(t choose α)``, updated as ``· t / (α_j + 1)``.
    """
    prefixes, multinomials = [()], [(1,)]
    last, run, multi = list(range(d)), [1] * d, [1] * d
    if degree >= 1:
        prefixes.append(())
        multinomials.append(tuple(multi))
    for t in range(2, degree + 1):
        pref = tuple(math.comb(j + t - 1, t - 1) for j in range(d))
        new_last, new_run, new_multi = [], [], []
        for j in range(d):
            for i in range(pref[j]):
                r = run[i] + 1 if last[i] == j else 1
                new_last.append(j)
                new_run.append(r)
                new_multi.append(multi[i] * t // r)
        last, run, multi = new_last, new_run, new_multi
        prefixes.append(pref)
        multinomials.append(tuple(multi))
    return tuple(prefixes), tuple(multinomials)


def feature_weights(coeffs, d):
    """``√|c_t| √(t choose α)`` for ``φ`` and ``sign(c_t)`` times it for ``ψ``, flattened."""
    _, multinomials = layout(d, len(coeffs) - 1)
    left, right = [], []
    for c, multi in zip(coeffs, multinomials, strict=True):
        sign = -1.0 if c < 0 else 1.0
        for m in multi:
            w = math.sqrt(abs(c) * m)
            left.append(w)
            right.append(sign * w)
    return left, right


def _take(x, start, stop, axis):
    return x[..., start:stop] if axis == -1 else x[..., start:stop, :]


def monomial_blocks(xp, x, degree, *, axis=-1):
    """Unweighted monomial blocks ``[x^α]_{|α| = t}`` for ``t = 0 … degree``.

    The ``d`` coordinates lie along ``axis``: ``-1`` for rows ``x (..., n, d)``, giving
    blocks ``(..., n, C(d+t-1, t))``; ``-2`` for the transposed ``x (..., d, n)``, giving
    ``(..., C(d+t-1, t), n)``, whose products run over long contiguous rows.  Block ``t`` is
    ``concat_j x_j · B_{t-1}[:P_j]``, one product per coordinate (:func:`layout`).
    """
    d = x.shape[axis]
    prefixes, _ = layout(d, degree)
    shape = (*x.shape[:-1], 1) if axis == -1 else (*x.shape[:-2], 1, x.shape[-1])
    blocks = [xp.ones(shape, dtype=x.dtype, device=device(x))]
    prev = x
    for t in range(1, degree + 1):
        if t > 1:
            prev = xp.concat(
                [_take(x, j, j + 1, axis) * _take(prev, 0, prefixes[t][j], axis) for j in range(d)],
                axis=axis,
            )
        blocks.append(prev)
    return blocks


def features(xp, x, degree, weights):
    """Weighted monomials ``[w_α x^α]_{|α| <= g}`` of the rows of ``x (..., n, d)``.

    Returns ``(..., n, r)``.

    Built degree by degree (each monomial is a lower-degree one times one coordinate):
    ``O(n r)`` time and memory.
    """
    blocks = monomial_blocks(xp, x, degree)
    feats = blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=-1)
    return feats * weights


def features_backward(xp, x, degree, weights, grad):
    """``J_φ(x)ᵀ grad``: the gradient with respect to ``x (..., n, d)`` of ``⟨grad, φ(x)⟩``.

    ``grad (..., n, r)`` is the gradient with respect to :func:`features`.  Reverse of the
    degree-by-degree construction: block ``t`` is ``concat_j x_j · B_{t−1}[:, :P_j]``, so
    ``∂x_j += Σ ∂B_t^{(j)} ∘ B_{t−1}[:, :P_j]`` and ``∂B_{t−1}[:, :P_j] += x_j ∂B_t^{(j)}``.
    ``O(n r)`` time, ``O(n r)`` memory for the forward blocks.
    """
    d = x.shape[-1]
    prefixes, _ = layout(d, degree)
    blocks = monomial_blocks(xp, x, degree)
    grad = grad * weights
    edges = [0]
    for b in blocks:
        edges.append(edges[-1] + b.shape[-1])
    upstream = [grad[..., edges[t] : edges[t + 1]] for t in range(degree + 1)]
    dx = None
    for t in range(degree, 1, -1):
        width = blocks[t - 1].shape[-1]
        columns, down, start = [], None, 0
        for j in range(d):
            stop = start + prefixes[t][j]
            piece = upstream[t][..., start:stop]
            columns.append(xp.sum(piece * blocks[t - 1][..., : stop - start], axis=-1))
            back = x[..., j : j + 1] * piece
            if stop - start < width:
                back = xpx.pad(
                    back, [(0, 0)] * (back.ndim - 1) + [(0, width - stop + start)], xp=xp
                )
            down = back if down is None else down + back
            start = stop
        step = xp.stack(columns, axis=-1)
        dx = step if dx is None else dx + step
        upstream[t - 1] = upstream[t - 1] + down
    if degree >= 1:
        dx = upstream[1] if dx is None else dx + upstream[1]
    return xp.zeros_like(x) if dx is None else dx
