"""Polynomial method: low-rank factors of ``exp(s·Q Kᵀ)`` and almost-linear attention (MATH.md §2).

Every logit ``x = s⟨q, k⟩`` lies in ``[-R, R]`` with ``R = |s| max‖q‖ max‖k‖``.  A polynomial
``P`` with ``|P(x)/eˣ − 1| ≤ ε`` on ``[-R, R]`` turns ``exp(S)`` into ``P(S) = U Vᵀ`` with
symmetric monomial features of rank ``C(d+g, g)``, and attention into products with thin
factors: ``O(n r (d + e))`` instead of ``O(n² (d + e))``.

Two approximations of ``eˣ`` are offered, both as monomial coefficients:

* ``"taylor"``: ``c_t = 1/t!`` with an **even** degree ``g``; the even Taylor polynomial of
  ``eˣ`` is positive on all of ℝ.
* ``"chebyshev"``: the interpolant of ``eˣ`` at the ``g + 1`` Chebyshev points of ``[-R, R]``
  (near-minimax, so a smaller ``g`` for the same ``ε``).  It may be negative somewhere outside
  ``[-R, R]``, but every logit lies inside, where ``P(x) ≥ (1 − ε) eˣ > 0`` because ``ε < 1``:
  so every entry of ``Ã = P(S)``, and hence every normaliser ``D = Ã·1``, stays positive.

The degree is chosen as the smallest one whose relative error, measured on a fine grid of
``[-R, R]``, is at most ``ε``; a closed-form bound is reported next to it.  The rank grows as
``C(d+g, g)``: the method pays off only for small head dimension and bounded entries, and a
rank above ``max_rank`` is refused with a ``ValueError`` rather than allocated.
"""

from __future__ import annotations

import decimal
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from array_api_compat import device

from ._array import (
    as_floating,
    check_last_dim,
    check_rows,
    namespace,
    resolve_scale,
    validate_attention_inputs,
)
from .causal import masked_product

__all__ = [
    "ExpApproximationError",
    "LowRankAttentionOperator",
    "LowRankFactors",
    "chebyshev_coefficients",
    "degree_for",
    "exp_approximation_error",
    "exp_coefficients",
    "lowrank_attention",
    "lowrank_factors",
    "lowrank_operator",
    "rank_for",
    "taylor_coefficients",
]

KINDS = ("chebyshev", "taylor")
MAX_DEGREE = 64  # cap of the degree search: the monomial form is ill-conditioned far beyond
_GRID = 4096  # fine-grid intervals for the measured error (plus 200 per degree)
_COARSE = 256  # coarse pre-check: a grid maximum is a lower bound of the true maximum
_BLOCK_ENTRIES = 2**21  # feature entries per factor per row block (8 MiB in float32)


# --------------------------------------------------------------------------------------
# Approximations of exp on [-R, R] (scalar math, plain Python floats)
# --------------------------------------------------------------------------------------


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _check_degree(degree, kind):
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree must be a non-negative integer, got {degree!r}")
    if degree > MAX_DEGREE:
        raise ValueError(f"degree must be at most {MAX_DEGREE}, got {degree}")
    if kind == "taylor" and degree % 2:
        raise ValueError(
            f"degree must be even for kind='taylor' (odd Taylor polynomials of exp have a "
            f"real root, so normalisers could vanish), got {degree}"
        )


def _check_radius(radius):
    radius = float(radius)
    if not (math.isfinite(radius) and radius >= 0):
        raise ValueError(f"radius must be finite and non-negative, got {radius}")
    return radius


def _check_eps(eps):
    eps = float(eps)
    if not 0 < eps < 1:
        raise ValueError(f"eps must lie in the open interval (0, 1), got {eps}")
    return eps


def taylor_coefficients(degree, /):
    """Monomial coefficients ``c_t = 1/t!``, ``t = 0 … degree``, of the Taylor polynomial of eˣ.

    ``degree`` must be even: the even-degree Taylor polynomial of eˣ is positive on all of ℝ.
    """
    _check_degree(degree, "taylor")
    return tuple(1.0 / math.factorial(t) for t in range(degree + 1))


@lru_cache(maxsize=64)
def _chebyshev_t(k):
    """Integer monomial coefficients of the Chebyshev polynomial ``T_k``."""
    if k == 0:
        return (1,)
    prev, cur = [1], [0, 1]
    for _ in range(k - 1):
        nxt = [0] + [2 * c for c in cur]
        for j, c in enumerate(prev):
            nxt[j] -= c
        prev, cur = cur, nxt
    return tuple(cur)


_DIGITS = 60  # decimal digits for the Chebyshev-to-monomial conversion


@lru_cache(maxsize=8192)
def _scaled_bessel(p, radius):
    """``I_p(R) / R^p`` in :class:`decimal.Decimal` by its power series (positive terms)."""
    with decimal.localcontext(prec=_DIGITS):
        quarter = decimal.Decimal(radius) ** 2 / 4
        term = 1 / (decimal.Decimal(2) ** p * math.factorial(p))
        total, m = term, 0
        while True:
            m += 1
            term = term * quarter / (m * (m + p))
            total += term
            if term <= total.scaleb(-_DIGITS):
                return total


@lru_cache(maxsize=1024)
def _chebyshev_cached(degree, radius):
    n_nodes = degree + 1
    # MATH §2.2: eˣ = Σ_p a_p T_p(x/R) with a_0 = I_0(R), a_p = 2 I_p(R); at the roots of
    # T_{g+1}, T_{2m(g+1) ± k} = (-1)^m T_k, so the interpolant is the aliased sum below.
    # The monomial conversion cancels heavily (|T_k| coefficients grow like 2^k): carried
    # out in 60-digit decimals, scaled by R^-p, so each c_t is correctly rounded and R → 0
    # gives the Taylor coefficients exactly.
    with decimal.localcontext(prec=_DIGITS):
        big_r = decimal.Decimal(radius)
        coeffs = [decimal.Decimal(0)] * n_nodes
        a_0 = _scaled_bessel(0, radius)
        p = 0
        while True:
            weight = (1 if p == 0 else 2) * _scaled_bessel(p, radius)  # a_p / R^p
            if p >= n_nodes and (radius == 0 or weight * big_r**p <= a_0.scaleb(-_DIGITS)):
                break  # a_p decreases in p: the rest is negligible
            if p < n_nodes:
                k, sign = p, 1
            else:
                m, rem = divmod(p, 2 * n_nodes)
                k, sign = (rem, (-1) ** m) if rem <= n_nodes else (2 * n_nodes - rem, -((-1) ** m))
            if k < n_nodes:  # T_{g+1} vanishes at its own roots
                # a_p T_k(x/R) gives a_p T_k[j] R^-j x^j = (a_p R^-p) R^(p-j) T_k[j] x^j.
                for j, t_kj in enumerate(_chebyshev_t(k)):
                    if t_kj:
                        power = big_r ** (p - j) if p > j else 1  # Decimal 0**0 is undefined
                        coeffs[j] += sign * t_kj * weight * power
            p += 1
        return tuple(float(c) for c in coeffs)


def chebyshev_coefficients(degree, radius, /):
    """Monomial coefficients of the Chebyshev interpolant of eˣ on ``[-radius, radius]``.

    ``radius`` must be at most 700 (``e^radius`` must be a finite float).

    The interpolant at the ``degree + 1`` roots of ``T_{degree+1}`` is formed from the
    Chebyshev series of eˣ (modified Bessel coefficients, aliased onto the nodes) and
    expanded in monomials of ``x``; as ``radius → 0`` it tends to the Taylor polynomial.

    Returns
    -------
    tuple of ``degree + 1`` floats
        ``c_t`` with ``P(x) = Σ_t c_t x^t``.
    """
    _check_degree(degree, "chebyshev")
    radius = _check_radius(radius)
    if radius > 700:
        raise ValueError(f"radius must be at most 700 (e^radius overflows), got {radius}")
    return _chebyshev_cached(degree, radius)


def exp_coefficients(degree, radius, /, *, kind="chebyshev"):
    """Monomial coefficients of the ``kind`` approximation of eˣ on ``[-radius, radius]``."""
    _check_kind(kind)
    if kind == "taylor":
        _check_radius(radius)
        return taylor_coefficients(degree)
    return chebyshev_coefficients(degree, radius)


def _horner(coeffs, x):
    acc = 0.0
    for c in reversed(coeffs):
        acc = acc * x + c
    return acc


@lru_cache(maxsize=1024)
def _measured_error(coeffs, radius, points):
    """``max |P(x) e^-x − 1|`` over ``points + 1`` equispaced points of ``[-R, R]``."""
    if radius == 0:
        return abs(coeffs[0] - 1.0)
    worst = 0.0
    for i in range(points + 1):
        x = radius * (2.0 * i / points - 1.0)
        worst = max(worst, abs(_horner(coeffs, x) * math.exp(-x) - 1.0))
    return worst


def _fine_points(degree):
    return _GRID + 200 * degree


def _closed_form_bound(degree, radius, kind):
    n_nodes = degree + 1
    if radius == 0:
        return 0.0
    log_fact = math.lgamma(n_nodes + 1)
    if kind == "taylor":
        # Lagrange remainder, worst at x = -R where the relative error picks up e^R.
        log_bound = n_nodes * math.log(radius) + radius - log_fact
    else:
        # Interpolation at Chebyshev points: |eˣ − P| ≤ 2 (R/2)^{g+1} e^R / (g+1)!, over e^-R.
        log_bound = math.log(2.0) + n_nodes * math.log(radius / 2.0) + 2 * radius - log_fact
    return math.exp(min(log_bound, 700.0))


@dataclass(frozen=True)
class ExpApproximationError:
    """Relative error of a polynomial approximation of eˣ on ``[-radius, radius]``.

    Attributes
    ----------
    degree, radius, kind
        The approximation.
    measured : float
        ``max |P(x)/eˣ − 1|`` on a fine grid (``4096 + 200·degree`` intervals).
    bound : float
        Closed-form bound: Taylor ``R^{g+1} e^R / (g+1)!``; Chebyshev
        ``2 (R/2)^{g+1} e^{2R} / (g+1)!``.
    """

    degree: int
    radius: float
    kind: str
    measured: float
    bound: float


def exp_approximation_error(degree, radius, /, *, kind="chebyshev"):
    """Measured maximum relative error and closed-form bound for ``(degree, radius, kind)``.

    Returns
    -------
    ExpApproximationError
        ``O((4096 + 200 g) g)`` scalar operations.
    """
    coeffs = exp_coefficients(degree, radius, kind=kind)
    radius = float(radius)
    return ExpApproximationError(
        degree=degree,
        radius=radius,
        kind=kind,
        measured=_measured_error(coeffs, radius, _fine_points(degree)),
        bound=_closed_form_bound(degree, radius, kind),
    )


@lru_cache(maxsize=1024)
def _degree_for_cached(eps, radius, kind):
    step = 2 if kind == "taylor" else 1
    for degree in range(0, MAX_DEGREE + 1, step):
        coeffs = exp_coefficients(degree, radius, kind=kind)
        if _measured_error(coeffs, radius, _COARSE) > eps:
            continue  # already fails on the coarse grid
        if _measured_error(coeffs, radius, _fine_points(degree)) <= eps:
            return degree
    raise ValueError(
        f"no {kind} polynomial of degree <= {MAX_DEGREE} approximates exp within "
        f"eps={eps:g} on [-R, R] with R={radius:g}: the logits are too large for the "
        "polynomial method (MATH.md §2.5)"
    )


def degree_for(eps, radius, /, *, kind="chebyshev"):
    """Smallest degree whose maximum relative error on ``[-radius, radius]`` is ``<= eps``.

    Verified on a fine grid (``4096 + 200·g`` intervals) in float64.  For ``kind="taylor"``
    only even degrees are considered.

    Raises
    ------
    ValueError
        If ``eps`` is not in ``(0, 1)``, ``radius`` is negative or not finite, or no degree
        up to ``MAX_DEGREE`` (64) suffices.
    """
    _check_kind(kind)
    return _degree_for_cached(_check_eps(eps), _check_radius(radius), kind)


def rank_for(d, degree, /):
    """Rank ``C(d + g, g)`` of the symmetric monomial features of degree ``<= g`` in ``d``
    variables (MATH.md §2.3)."""
    for name, value in (("d", d), ("degree", degree)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return math.comb(d + degree, degree)


# --------------------------------------------------------------------------------------
# Symmetric monomial features (MATH.md §2.3)
# --------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def _layout(d, degree):
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


def _feature_weights(coeffs, d):
    """``√|c_t| √(t choose α)`` for ``φ`` and ``sign(c_t)`` times it for ``ψ``, flattened."""
    _, multinomials = _layout(d, len(coeffs) - 1)
    left, right = [], []
    for c, multi in zip(coeffs, multinomials, strict=True):
        sign = -1.0 if c < 0 else 1.0
        for m in multi:
            w = math.sqrt(abs(c) * m)
            left.append(w)
            right.append(sign * w)
    return left, right


def _features(xp, x, degree, weights):
    """Weighted monomials ``[w_α x^α]_{|α| <= g}`` of the rows of ``x (..., n, d)``.

    Returns ``(..., n, r)``.

    Built degree by degree (each monomial is a lower-degree one times one coordinate):
    ``O(n r)`` time and memory.
    """
    d = x.shape[-1]
    prefixes, _ = _layout(d, degree)
    blocks = [xp.ones((*x.shape[:-1], 1), dtype=x.dtype, device=device(x))]
    prev = x
    for t in range(1, degree + 1):
        if t > 1:
            prev = xp.concat(
                [x[..., j : j + 1] * prev[..., : prefixes[t][j]] for j in range(d)], axis=-1
            )
        blocks.append(prev)
    feats = blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=-1)
    return feats * weights


@dataclass(frozen=True)
class _Plan:
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


def _row_norm_max(xp, x):
    return float(xp.max(xp.sqrt(xp.sum(x * x, axis=-1))))


def _plan(xp, q, k, scale, eps, degree, kind, max_rank):
    """Choose the polynomial for inputs ``q, k`` and check rank and overflow (MATH §2.1–2.5).

    Costs ``O(n d)`` (row norms); refuses before any ``n × r`` allocation.
    """
    _check_kind(kind)
    if (eps is None) == (degree is None):
        raise ValueError(
            f"give exactly one of eps and degree, got eps={eps!r} and degree={degree!r}"
        )
    if max_rank is not None and (
        isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1
    ):
        raise ValueError(f"max_rank must be a positive integer or None, got {max_rank!r}")
    if eps is not None:
        eps = _check_eps(eps)
    else:
        _check_degree(degree, kind)
    d = q.shape[-1]
    q_max, k_max = _row_norm_max(xp, q), _row_norm_max(xp, k)
    # MATH §2.1: Cauchy–Schwarz, every logit lies in [-R, R].
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
    return _Plan(
        degree=degree,
        coeffs=coeffs,
        radius=radius,
        kind=kind,
        rel_error=rel_error,
        rank=rank,
        q_scale=q_scale,
        k_scale=k_scale,
        weights=_feature_weights(coeffs, d),
    )


def _weight_arrays(xp, plan, like):
    left, right = plan.weights
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


def _validate_qk(q, k):
    xp = namespace(q, k)
    check_rows(q, "q")
    check_rows(k, "k")
    check_last_dim(k, "k", q.shape[-1], "the head dimension of q")
    q, k = as_floating(xp, (q, k), ("q", "k"))
    return xp, q, k


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
    xp, q, k = _validate_qk(q, k)
    s = resolve_scale(scale, q.shape[-1])
    plan = _plan(xp, q, k, s, eps, degree, kind, max_rank)
    w_left, w_right = _weight_arrays(xp, plan, q)
    return LowRankFactors(
        u=_features(xp, q * plan.q_scale, plan.degree, w_left),
        v=_features(xp, k * plan.k_scale, plan.degree, w_right),
        degree=plan.degree,
        radius=plan.radius,
        rel_error_bound=plan.rel_error,
        kind=plan.kind,
    )


# --------------------------------------------------------------------------------------
# Attention with the factors (MATH.md §2.4 with the prefix products of §1)
# --------------------------------------------------------------------------------------


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
    prefix product ``(M ∘ φ(Q) ψ(K)ᵀ) [V, 1]`` of MATH.md §1.  Features are built a block of
    rows at a time, so ``n × r`` factors are never held whole.  If ``|Ã − A| <= εA``
    entrywise then ``‖Õ − O‖_∞ <= 2ε/(1−ε) ‖V‖_∞`` (MATH.md §2.4).

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
    plan = _plan(xp, q, k, s, eps, degree, kind, max_rank)
    _check_positive(plan.kind, plan.rel_error, plan.degree, plan.radius)
    w_left, w_right = _weight_arrays(xp, plan, q)
    q, k = q * plan.q_scale, k * plan.k_scale
    z = xp.concat([v, xp.ones_like(v[..., :1])], axis=-1)  # MATH §2.4: numerator and D at once
    mT = xp.matrix_transpose
    batch = _batch_size(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    chunk = _chunk_for(plan.rank)
    rows = _block_rows(plan.rank, batch, chunk, max(q.shape[-2], k.shape[-2]))

    def phi(start, stop):
        return _features(xp, _slice_rows(q, start, stop), plan.degree, w_left)

    def psi(start, stop):
        return _features(xp, _slice_rows(k, start, stop), plan.degree, w_right)

    n, m = q.shape[-2], k.shape[-2]
    out, state = [], None
    if causal:
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            u_b, v_b, z_b = phi(start, stop), psi(start, stop), _slice_rows(z, start, stop)
            y = masked_product(
                xp, u_b, v_b, z_b, upper=False, strict=False, chunk=min(chunk, stop - start)
            )
            # MATH §1: earlier blocks enter through the running state Σ ψ(K_j)ᵀ Z_j.
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


# --------------------------------------------------------------------------------------
# The normalised low-rank attention operator f = D⁻¹ Ã (MATH.md §3 products)
# --------------------------------------------------------------------------------------


def _unnormalised_product(xp, u, v, z, *, causal, transpose):
    """``Ã Z`` or ``Ãᵀ Z`` with ``Ã = U Vᵀ``, masked (MATH §1 prefix/suffix sums) if causal."""
    if transpose:
        u, v = v, u
    if causal:
        chunk = min(_chunk_for(u.shape[-1]), u.shape[-2])
        return masked_product(xp, u, v, z, upper=transpose, strict=False, chunk=chunk)
    return u @ (xp.matrix_transpose(v) @ z)


@dataclass(frozen=True)
class LowRankAttentionOperator:
    """``f = D⁻¹ Ã`` with ``Ã = U Vᵀ`` (``M ∘ U Vᵀ`` if causal) and ``D = diag(Ã·1)``.

    The four products of MATH.md §3 cost ``O(n r p)`` (bidirectional) or
    ``O(n r (p + c))`` (causal, chunk ``c``) each; the Hadamard ones ``s`` times that for
    ``G, Y`` of width ``s``.  The normaliser is computed once, at construction.

    Attributes
    ----------
    u : array ``(..., n, r)``
    v : array ``(..., m, r)``
    normaliser : array ``(..., n, 1)``
        ``Ã·1``; positive (MATH §2: ``P >= (1 − ε) eˣ > 0`` on ``[-R, R]``).
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
        """``(n, m)``: the operator maps ``(..., m, p)`` to ``(..., n, p)``."""
        return (self.u.shape[-2], self.v.shape[-2])

    def _xp(self, arrays, names, rows):
        xp = namespace(self.u, *arrays)
        for a, name, n in zip(arrays, names, rows, strict=True):
            check_rows(a, name)
            if a.shape[-2] != n:
                raise ValueError(f"{name} must have {n} rows, got shape {a.shape}")
        arrays = as_floating(xp, arrays, names)
        dtype = xp.result_type(self.u, *arrays)
        return xp, tuple(a if a.dtype == dtype else xp.astype(a, dtype) for a in arrays)

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
        xp, (z,) = self._xp((z,), ("z",), (self.shape[1],))
        return self._product(xp, z, False) / self._normaliser(xp, z)

    def rmatmul(self, z, /):
        """``fᵀ Z = Ãᵀ D⁻¹ Z`` for ``z (..., n, p)`` -> ``(..., m, p)``."""
        xp, (z,) = self._xp((z,), ("z",), (self.shape[0],))
        return self._product(xp, z / self._normaliser(xp, z), True)

    def hadamard_matmul(self, g, y, z, /):
        """``(f ∘ G Yᵀ) Z = Σ_l diag(G_l) f diag(Y_l) Z`` (MATH §3).

        ``g (..., n, s)``, ``y (..., m, s)``, ``z (..., m, p)`` -> ``(..., n, p)``.
        """
        xp, (g, y, z) = self._xp((g, y, z), ("g", "y", "z"), (*self.shape, self.shape[1]))
        check_last_dim(y, "y", g.shape[-1], "the width of g")
        out = None
        for col in range(g.shape[-1]):
            term = g[..., col : col + 1] * self._product(xp, y[..., col : col + 1] * z, False)
            out = term if out is None else out + term
        return out / self._normaliser(xp, z)

    def hadamard_rmatmul(self, g, y, z, /):
        """``(f ∘ G Yᵀ)ᵀ Z = Σ_l diag(Y_l) Ãᵀ diag(G_l) D⁻¹ Z`` (MATH §3).

        ``g (..., n, s)``, ``y (..., m, s)``, ``z (..., n, p)`` -> ``(..., m, p)``.
        """
        xp, (g, y, z) = self._xp((g, y, z), ("g", "y", "z"), (*self.shape, self.shape[0]))
        check_last_dim(y, "y", g.shape[-1], "the width of g")
        z = z / self._normaliser(xp, z)
        out = None
        for col in range(g.shape[-1]):
            term = y[..., col : col + 1] * self._product(xp, g[..., col : col + 1] * z, True)
            out = term if out is None else out + term
        return out

    def to_dense(self):
        """``f`` as an ``(..., n, m)`` array (``O(n m r)``; for tests)."""
        xp = namespace(self.u)
        a = self.u @ xp.matrix_transpose(self.v)
        if self.causal:
            n, m = self.shape
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
    xp, q, k = _validate_qk(q, k)
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            "causal attention needs as many queries as keys, got "
            f"q shape {q.shape} and k shape {k.shape}"
        )
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
