"""Polynomial method: low-rank factors of ``exp(s·Q Kᵀ)`` and almost-linear attention.

Every logit ``x = s⟨q, k⟩`` lies in ``[-R, R]`` with ``R = |s| max‖q‖ max‖k‖``.  A polynomial
``P`` with ``|P(x)/eˣ − 1| ≤ ε`` on ``[-R, R]`` (:mod:`convbasis.exp_approximation`) turns
``exp(S)`` into ``P(S) = U Vᵀ`` with symmetric monomial features of rank ``C(d+g, g)``
(:mod:`convbasis.monomial_features`), and attention into products with thin factors:
``O(n r (d + e))`` instead of ``O(n² (d + e))``.  Every entry of ``Ã = P(S)``, and hence every
normaliser ``D = Ã·1``, stays positive because ``ε < 1``.

The degree is chosen as the smallest one whose relative error, measured on a fine grid of
``[-R, R]``, is at most ``ε``; a closed-form bound is reported next to it.  The rank grows as
``C(d+g, g)``: the method pays off only for small head dimension and bounded entries, and a
rank above ``max_rank`` is refused with a ``ValueError`` rather than allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from array_api_compat import device

from ._array import (
    check_integer,
    namespace,
    resolve_scale,
    validate_attention_inputs,
    validate_qk,
)
from .causal import masked_product
from .exp_approximation import (
    _check_degree,
    _check_eps,
    _check_kind,
    _fine_points,
    _measured_error,
    degree_for,
    exp_coefficients,
)
from .monomial_features import feature_weights, features, rank_for
from .operators import check_operands, hadamard_product

__all__ = [
    "LowRankAttentionOperator",
    "LowRankFactors",
    "lowrank_attention",
    "lowrank_factors",
    "lowrank_operator",
]

_BLOCK_ENTRIES = 2**21  # feature entries per factor per row block (8 MiB in float32)


@dataclass(frozen=True)
class _Polynomial:
    """Degree, coefficients and input scalings shared by factors, attention and operators."""

    degree: int
    coeffs: tuple
    radius: float
    kind: str
    rel_error: float
    rank: int
    q_scale: float
    k_scale: float
    weights: tuple
    norm_max: tuple  # (max‖q_i‖, max‖k_j‖): R = |s| · their product


def _row_norm_max(xp, x):
    if not math.prod(x.shape):  # an empty batch: no logits to bound
        return 0.0
    return float(xp.max(xp.sqrt(xp.sum(x * x, axis=-1))))


def _choose_polynomial(xp, q, k, scale, eps, degree, kind, max_rank):
    """Choose the polynomial for inputs ``q, k`` and check rank and overflow (docs/math.rst §2).

    Costs ``O(n d)`` (row norms); refuses before any ``n × r`` allocation.
    """
    _check_kind(kind)
    if (eps is None) == (degree is None):
        raise ValueError(
            f"give exactly one of eps and degree, got eps={eps!r} and degree={degree!r}"
        )
    max_rank = check_integer(max_rank, "max_rank", optional=True)
    if eps is not None:
        eps = _check_eps(eps)
    else:
        _check_degree(degree, kind)
    d = q.shape[-1]
    q_max, k_max = _row_norm_max(xp, q), _row_norm_max(xp, k)
    # docs/math.rst §2: Cauchy–Schwarz, every logit lies in [-R, R].
    radius = abs(scale) * q_max * k_max
    if not math.isfinite(radius):
        raise ValueError(
            f"q and k must be finite to bound the logits, got max row norms {q_max} and {k_max}"
        )
    if eps is not None:
        degree = degree_for(eps, radius, kind=kind)
    rank = rank_for(d, degree)
    if max_rank is not None and rank > max_rank:
        need = f"eps={eps:g}" if eps is not None else f"degree={degree}"
        raise ValueError(
            f"the polynomial features would need rank {rank} = C(d+g, g) with d={d}, "
            f"g={degree} ({kind}, {need}, R={radius:.4g}), above max_rank={max_rank}"
        )
    coeffs = exp_coefficients(degree, radius, kind=kind)
    # Balance the factors: max‖q̃‖ = max‖k̃‖ = √R, so each feature is at most √(|c_t| R^t).
    root = math.sqrt(abs(scale))
    balance = math.sqrt(k_max / q_max) if q_max > 0 and k_max > 0 else 1.0
    q_scale, k_scale = root * balance, math.copysign(root / balance, scale)
    # Every entry of U Vᵀ, and every row sum of Ã, is at most n Σ_t |c_t| R^t.
    log_terms = [0.0]  # the constant term c_0 ≈ 1
    if radius > 0:
        log_terms = [math.log(abs(c)) + t * math.log(radius) for t, c in enumerate(coeffs) if c]
    top = max(log_terms)
    log_total = (
        top
        + math.log(sum(math.exp(x - top) for x in log_terms))
        + math.log(max(q.shape[-2], k.shape[-2]))
    )
    limit = math.log(float(xp.finfo(q.dtype).max)) - math.log(16.0)
    if log_total > limit:
        raise ValueError(
            f"radius R={radius:.4g} is too large for {q.dtype} features of degree {degree}: "
            f"n·Σ_t |c_t| R^t ≈ e^{log_total:.1f} overflows (limit e^{limit:.1f}); "
            "rescale q and k or use a smaller degree"
        )
    rel_error = _measured_error(coeffs, radius, _fine_points(degree))
    return _Polynomial(
        degree=degree,
        coeffs=coeffs,
        radius=radius,
        kind=kind,
        rel_error=rel_error,
        rank=rank,
        q_scale=q_scale,
        k_scale=k_scale,
        weights=feature_weights(coeffs, d),
        norm_max=(q_max, k_max),
    )


def _weight_arrays(xp, poly, like):
    left, right = poly.weights
    return (
        xp.asarray(left, dtype=like.dtype, device=device(like)),
        xp.asarray(right, dtype=like.dtype, device=device(like)),
    )


def _check_positive(kind, rel_error, degree, radius):
    # A Chebyshev P is positive on [-R, R] only while its relative error there is below 1.
    if kind == "chebyshev" and rel_error >= 1:
        raise ValueError(
            f"degree {degree} gives relative error {rel_error:.3g} >= 1 on [-R, R] "
            f"(R={radius:.4g}): normalisers could vanish; use a larger degree or eps"
        )


@dataclass(frozen=True)
class LowRankFactors:
    """``U Vᵀ ≈ exp(s · Q Kᵀ)`` entrywise with relative error ``rel_error_bound``.

    Attributes
    ----------
    u : array ``(..., n, r)``
        ``φ(Q)``, ``r = C(d + degree, degree)``.
    v : array ``(..., m, r)``
        ``ψ(K)``.
    degree : int
    radius : float
        ``R = |s| max‖q‖ max‖k‖``: every logit lies in ``[-R, R]``.
    rel_error_bound : float
        ``max |P(x)/eˣ − 1|`` over ``[-R, R]`` measured on a fine grid (``<= eps`` when
        ``eps`` was given); float round-off in the factors' dtype comes on top.
    kind : str
        ``"chebyshev"`` or ``"taylor"``.
    """

    u: Any
    v: Any
    degree: int
    radius: float
    rel_error_bound: float
    kind: str

    @property
    def rank(self):
        return self.u.shape[-1]

    def to_dense(self):
        """``U Vᵀ`` as an ``(..., n, m)`` array (``O(n m r)``)."""
        xp = namespace(self.u)
        return self.u @ xp.matrix_transpose(self.v)


def lowrank_factors(q, k, /, *, eps=None, degree=None, kind="chebyshev", scale=None, max_rank=None):
    """Low-rank factors ``U Vᵀ ≈ exp(s · Q Kᵀ)`` with entrywise relative error ``<= eps``.

    Parameters
    ----------
    q : array ``(..., n, d)``
    k : array ``(..., m, d)``
    eps : float in ``(0, 1)``, optional
        Target relative error; the degree is the smallest meeting it on ``[-R, R]``.
    degree : int, optional
        Fixed degree instead (exactly one of ``eps`` and ``degree``; even for Taylor).
    kind : ``"chebyshev"`` or ``"taylor"``
    scale : float, optional
        Logit scale ``s``; default ``1/sqrt(d)``.
    max_rank : int, optional
        Refuse (``ValueError``) a rank ``C(d+g, g)`` above this.

    Returns
    -------
    LowRankFactors
        ``O((n + m) r)`` time and memory, ``r = C(d + g, g)``.

    Raises
    ------
    ValueError
        ``eps`` outside ``(0, 1)``, both or neither of ``eps``/``degree``, a rank above
        ``max_rank``, or a radius so large that the features overflow the dtype (checked
        before any ``n × r`` allocation).
    """
    xp, q, k = validate_qk(q, k, causal=False)
    s = resolve_scale(scale, q.shape[-1])
    poly = _choose_polynomial(xp, q, k, s, eps, degree, kind, max_rank)
    w_left, w_right = _weight_arrays(xp, poly, q)
    return LowRankFactors(
        u=features(xp, q * poly.q_scale, poly.degree, w_left),
        v=features(xp, k * poly.k_scale, poly.degree, w_right),
        degree=poly.degree,
        radius=poly.radius,
        rel_error_bound=poly.rel_error,
        kind=poly.kind,
    )


def _chunk_for(rank):
    """Rows per chunk of the masked product, measured on NumPy (n = 16384, p = 9).

    c = 64 was fastest for r = 165 … 1287, c = 32 for r = 45 (docs/polynomial.rst).  A
    smaller c multiplies the ``(n/c) r p`` chunk states and runs tiny matmuls below BLAS
    speed; a larger one inflates the ``n c r`` diagonal blocks.
    """
    return 32 if rank < 128 else 64


def _block_rows(rank, batch, chunk, n):
    """Rows of features built at a time: ``_BLOCK_ENTRIES`` per factor bounds memory."""
    rows = max(chunk, (_BLOCK_ENTRIES // max(rank * batch, 1)) // chunk * chunk)
    return min(rows, n)


def _batch_size(*shapes):
    """Number of elements of the broadcast batch shape (shapes already checked)."""
    width = max(len(s) for s in shapes)
    padded = [(1,) * (width - len(s)) + tuple(s) for s in shapes]
    return math.prod(max(dims) for dims in zip(*padded, strict=True))


def _slice_rows(x, start, stop):
    return x[..., start:stop, :]


def lowrank_attention(
    q,
    k,
    v,
    /,
    *,
    causal=True,
    eps=None,
    degree=None,
    kind="chebyshev",
    scale=None,
    max_rank=None,
):
    """Softmax attention through the polynomial factors: ``O = D̃⁻¹ Ã V``, ``Ã = φ(Q) ψ(K)ᵀ``.

    Bidirectional: ``[num, den] = φ(Q) (ψ(K)ᵀ [V, 1])`` (two matmuls).  Causal: the chunked
    prefix product ``(M ∘ φ(Q) ψ(K)ᵀ) [V, 1]`` of docs/math.rst §1.  Features are built a block of
    rows at a time, so ``n × r`` factors are never held whole.  If ``|Ã − A| <= εA``
    entrywise then ``‖Õ − O‖_∞ <= 2ε/(1−ε) ‖V‖_∞`` (docs/math.rst §2.4).

    Parameters
    ----------
    q : array ``(..., n, d)``
    k : array ``(..., m, d)`` (``m == n`` when ``causal``)
    v : array ``(..., m, e)``
        Leading batch/head axes broadcast.
    causal : bool
    eps, degree, kind, scale, max_rank
        As in :func:`lowrank_factors`.

    Returns
    -------
    array ``(..., n, e)``
        ``O(n r (e + c))`` time with ``r = C(d+g, g)`` and chunk ``c`` (32 or 64);
        ``O(B r (e + b))`` memory beyond inputs and output, for row blocks of
        ``b ≈ 2^21 / (B r)`` rows (``B`` the batch size).
    """
    xp, q, k, v = validate_attention_inputs(q, k, v, causal=causal)
    s = resolve_scale(scale, q.shape[-1])
    poly = _choose_polynomial(xp, q, k, s, eps, degree, kind, max_rank)
    _check_positive(poly.kind, poly.rel_error, poly.degree, poly.radius)
    w_left, w_right = _weight_arrays(xp, poly, q)
    q, k = q * poly.q_scale, k * poly.k_scale
    # docs/math.rst §2.4: the numerator and D in one product
    ones = xp.ones((*v.shape[:-1], 1), dtype=v.dtype, device=device(v))
    z = xp.concat([v, ones], axis=-1)
    mT = xp.matrix_transpose
    batch = _batch_size(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    chunk = _chunk_for(poly.rank)
    rows = _block_rows(poly.rank, batch, chunk, max(q.shape[-2], k.shape[-2]))

    def phi(start, stop):
        return features(xp, _slice_rows(q, start, stop), poly.degree, w_left)

    def psi(start, stop):
        return features(xp, _slice_rows(k, start, stop), poly.degree, w_right)

    n, m = q.shape[-2], k.shape[-2]
    out, state = [], None
    if causal:
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            u_b, v_b, z_b = phi(start, stop), psi(start, stop), _slice_rows(z, start, stop)
            y = masked_product(
                xp, u_b, v_b, z_b, upper=False, strict=False, chunk=min(chunk, stop - start)
            )
            # docs/math.rst §1: earlier blocks enter through the running state Σ ψ(K_j)ᵀ Z_j.
            if state is not None:
                y = y + u_b @ state
            out.append(y)
            update = mT(v_b) @ z_b
            state = update if state is None else state + update
    else:
        for start in range(0, m, rows):
            stop = min(start + rows, m)
            update = mT(psi(start, stop)) @ _slice_rows(z, start, stop)
            state = update if state is None else state + update
        out = [phi(start, min(start + rows, n)) @ state for start in range(0, n, rows)]
    y = out[0] if len(out) == 1 else xp.concat(out, axis=-2)
    return y[..., :-1] / y[..., -1:]


def _unnormalised_product(xp, u, v, z, *, causal, transpose):
    """``Ã Z`` or ``Ãᵀ Z`` with ``Ã = U Vᵀ``, masked (docs/math.rst §1: prefix or suffix sums)
    if causal."""
    if transpose:
        u, v = v, u
    if causal:
        chunk = min(_chunk_for(u.shape[-1]), u.shape[-2])
        return masked_product(xp, u, v, z, upper=transpose, strict=False, chunk=chunk)
    return u @ (xp.matrix_transpose(v) @ z)


@dataclass(frozen=True)
class LowRankAttentionOperator:
    """``f = D⁻¹ Ã`` with ``Ã = U Vᵀ`` (``M ∘ U Vᵀ`` if causal) and ``D = diag(Ã·1)``.

    The four products of docs/math.rst §3 cost ``O(n r p)`` (bidirectional) or
    ``O(n r (p + c))`` (causal, chunk ``c``) each; the Hadamard ones ``s`` times that for
    ``G, Y`` of width ``s``.  The normaliser is computed once, at construction.

    Attributes
    ----------
    u : array ``(..., n, r)``
    v : array ``(..., m, r)``
    normaliser : array ``(..., n, 1)``
        ``Ã·1``; positive (docs/math.rst §2: ``P >= (1 − ε) eˣ > 0`` on ``[-R, R]``).
    causal : bool
    degree, radius, rel_error_bound, kind
        As in :class:`LowRankFactors`.
    """

    u: Any
    v: Any
    normaliser: Any
    causal: bool
    degree: int
    radius: float
    rel_error_bound: float
    kind: str

    @property
    def shape(self):
        """``(*batch, n, m)``, the shape of :meth:`to_dense`: ``(..., m, p)`` -> ``(..., n, p)``."""
        batch = namespace(self.u).broadcast_shapes(self.u.shape[:-2], self.v.shape[:-2])
        return (*batch, self.u.shape[-2], self.v.shape[-2])

    def _product(self, xp, z, transpose):
        u, v = self.u, self.v
        if z.dtype != u.dtype:
            u, v = xp.astype(u, z.dtype), xp.astype(v, z.dtype)
        return _unnormalised_product(xp, u, v, z, causal=self.causal, transpose=transpose)

    def _normaliser(self, xp, like):
        d = self.normaliser
        return d if d.dtype == like.dtype else xp.astype(d, like.dtype)

    def matmul(self, z, /):
        """``f Z`` for ``z (..., m, p)`` -> ``(..., n, p)``."""
        xp, (z,) = check_operands(
            self.u, {"z": z}, batch=self.shape[:-2], rows={"z": self.shape[-1]}
        )
        return self._product(xp, z, False) / self._normaliser(xp, z)

    def rmatmul(self, z, /):
        """``fᵀ Z = Ãᵀ D⁻¹ Z`` for ``z (..., n, p)`` -> ``(..., m, p)``."""
        xp, (z,) = check_operands(
            self.u, {"z": z}, batch=self.shape[:-2], rows={"z": self.shape[-2]}
        )
        return self._product(xp, z / self._normaliser(xp, z), True)

    def hadamard_matmul(self, g, y, z, /):
        """``(f ∘ G Yᵀ) Z = D⁻¹ Σ_l diag(G_l) Ã diag(Y_l) Z`` (docs/math.rst §3).

        ``g (..., n, s)``, ``y (..., m, s)``, ``z (..., m, p)`` -> ``(..., n, p)``.
        """
        n, m = self.shape[-2:]
        operands = {"g": g, "y": y, "z": z}
        xp, (g, y, z) = check_operands(
            self.u, operands, batch=self.shape[:-2], rows={"g": n, "y": m, "z": m}, hadamard=True
        )
        out = hadamard_product(xp, lambda w: self._product(xp, w, False), g, y, z)
        return out / self._normaliser(xp, z)

    def hadamard_rmatmul(self, g, y, z, /):
        """``(f ∘ G Yᵀ)ᵀ Z = Σ_l diag(Y_l) Ãᵀ diag(G_l) D⁻¹ Z`` (docs/math.rst §3).

        ``g (..., n, s)``, ``y (..., m, s)``, ``z (..., n, p)`` -> ``(..., m, p)``.
        """
        n, m = self.shape[-2:]
        operands = {"g": g, "y": y, "z": z}
        xp, (g, y, z) = check_operands(
            self.u, operands, batch=self.shape[:-2], rows={"g": n, "y": m, "z": n}, hadamard=True
        )
        z = z / self._normaliser(xp, z)
        return hadamard_product(xp, lambda w: self._product(xp, w, True), y, g, z)

    def to_dense(self):
        """``f`` as an ``(..., n, m)`` array (``O(n m r)``; for tests)."""
        xp = namespace(self.u)
        a = self.u @ xp.matrix_transpose(self.v)
        if self.causal:
            n, m = self.shape[-2:]
            keep = xp.arange(n, device=device(a))[:, None] >= xp.arange(m, device=device(a))
            a = xp.where(keep, a, xp.zeros_like(a))
        return a / self.normaliser


def lowrank_operator(
    q, k, /, *, causal=True, eps=None, degree=None, kind="chebyshev", scale=None, max_rank=None
):
    """The normalised low-rank attention operator ``f = D⁻¹ Ã`` for ``q, k``.

    Parameters
    ----------
    q : array ``(..., n, d)``
    k : array ``(..., m, d)`` (``m == n`` when ``causal``)
    causal, eps, degree, kind, scale, max_rank
        As in :func:`lowrank_attention`.

    Returns
    -------
    LowRankAttentionOperator
        Holds the ``n × r`` factors: ``O((n + m) r)`` memory; ``D`` costs one product.
    """
    xp, q, k = validate_qk(q, k, causal=causal)
    factors = lowrank_factors(
        q, k, eps=eps, degree=degree, kind=kind, scale=scale, max_rank=max_rank
    )
    _check_positive(factors.kind, factors.rel_error_bound, factors.degree, factors.radius)
    ones = xp.ones((*factors.v.shape[:-1], 1), dtype=q.dtype, device=device(q))
    return LowRankAttentionOperator(
        u=factors.u,
        v=factors.v,
        normaliser=_unnormalised_product(
            xp, factors.u, factors.v, ones, causal=causal, transpose=False
        ),
        causal=causal,
        degree=factors.degree,
        radius=factors.radius,
        rel_error_bound=factors.rel_error_bound,
        kind=factors.kind,
    )
