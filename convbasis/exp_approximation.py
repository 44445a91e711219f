"""Polynomial approximations of ``eˣ`` on ``[-R, R]`` with a guaranteed relative error.

Plain-Python scalar mathematics behind the polynomial method (docs/math.rst §2): Taylor and
Chebyshev coefficients in the monomial basis, the measured relative error on a fine grid with a
closed-form bound beside it, and the smallest degree meeting a target ``ε``.  No arrays here.

* ``"taylor"``: ``c_t = 1/t!`` with an **even** degree ``g``; the even Taylor polynomial of
  ``eˣ`` is positive on all of ℝ.
* ``"chebyshev"``: the interpolant of ``eˣ`` at the ``g + 1`` Chebyshev points of ``[-R, R]``
  (near-minimax, so a smaller ``g`` for the same ``ε``).  It may be negative somewhere outside
  ``[-R, R]``, but every logit lies inside, where ``P(x) ≥ (1 − ε) eˣ > 0`` because ``ε < 1``.
"""

from __future__ import annotations

import decimal
import math
from dataclasses import dataclass
from functools import lru_cache

from ._validation import check_integer

__all__ = [
    "KINDS",
    "MAX_DEGREE",
    "ExpApproximationError",
    "chebyshev_coefficients",
    "coefficient_slopes",
    "degree_for",
    "exp_approximation_error",
    "exp_coefficients",
    "taylor_coefficients",
]

KINDS = ("chebyshev", "taylor")
MAX_DEGREE = 64  # cap of the degree search: the monomial form is ill-conditioned far beyond
_GRID = 4096  # fine-grid intervals for the measured error (plus 200 per degree)
_COARSE = 256  # coarse pre-check: a grid maximum is a lower bound of the true maximum
# Relative errors below this are lost in the float64 round-off of evaluating P(x) e^-x.
_RESOLVABLE = 1e-14
_MAX_RADIUS = 700  # e^700 is near the largest float64 (e^709.8)


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _check_degree(degree, kind):
    degree = check_integer(degree, "degree", low=0)
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
    """``I_p(R) / R^p`` for a :class:`decimal.Decimal` ``R``, by its power series (positive
    terms)."""
    with decimal.localcontext(prec=_DIGITS):
        quarter = radius**2 / 4
        term = 1 / (decimal.Decimal(2) ** p * math.factorial(p))
        total, m = term, 0
        while True:
            m += 1
            term = term * quarter / (m * (m + p))
            total += term
            if term <= total.scaleb(-_DIGITS):
                return total


def _chebyshev_decimal(degree, radius):
    """The interpolant's monomial coefficients as 60-digit decimals (``radius`` exact)."""
    n_nodes = degree + 1
    # docs/math.rst §2: eˣ = Σ_p a_p T_p(x/R) with a_0 = I_0(R), a_p = 2 I_p(R); at the roots
    # of T_{g+1}, T_{2m(g+1) ± k} = (-1)^m T_k, so the interpolant is the aliased sum below.
    # The monomial conversion cancels heavily (|T_k| coefficients grow like 2^k): carried
    # out in 60-digit decimals, scaled by R^-p, so each c_t is correctly rounded and R → 0
    # gives the Taylor coefficients exactly.
    with decimal.localcontext(prec=_DIGITS):
        big_r = decimal.Decimal(radius)
        coeffs = [decimal.Decimal(0)] * n_nodes
        a_0 = _scaled_bessel(0, big_r)
        p = 0
        while True:
            weight = (1 if p == 0 else 2) * _scaled_bessel(p, big_r)  # a_p / R^p
            if p >= n_nodes and (big_r == 0 or weight * big_r**p <= a_0.scaleb(-_DIGITS)):
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
        return tuple(coeffs)


@lru_cache(maxsize=1024)
def _chebyshev_cached(degree, radius):
    return tuple(float(c) for c in _chebyshev_decimal(degree, radius))


@lru_cache(maxsize=1024)
def _chebyshev_slopes(degree, radius):
    """``dc_t/dR`` of the interpolant's coefficients: a central difference of the decimal
    coefficients with ``h = 10^-20 R`` (truncation ``O(h²)``, round-off ``10^-60 / h``: both far
    below float64)."""
    with decimal.localcontext(prec=_DIGITS):
        big_r = decimal.Decimal(radius)
        h = big_r.scaleb(-20)
        up = _chebyshev_decimal(degree, big_r + h)
        down = _chebyshev_decimal(degree, big_r - h)
        return tuple(float((a - b) / (2 * h)) for a, b in zip(up, down, strict=True))


def coefficient_slopes(degree, radius, /, *, kind="chebyshev"):
    """``d c_t / d radius`` for the coefficients of :func:`exp_coefficients`.

    Zero for ``"taylor"`` (``c_t = 1/t!``); for ``"chebyshev"`` the interpolation nodes move
    with the radius.  Needed by the exact gradient of the polynomial model, whose radius
    ``R = |s| max‖q‖ max‖k‖`` depends on the inputs.  ``radius`` must be positive.
    """
    _check_kind(kind)
    _check_degree(degree, kind)
    radius = _check_radius(radius)
    if kind == "taylor":
        return (0.0,) * (degree + 1)
    if not radius > 0:
        raise ValueError(f"radius must be positive for the slopes, got {radius}")
    return _chebyshev_slopes(degree, radius)


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
    if radius > _MAX_RADIUS:
        raise ValueError(f"radius must be at most {_MAX_RADIUS} (e^radius overflows), got {radius}")
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
    # Beyond _MAX_RADIUS e^R overflows float64: no degree can qualify (and Chebyshev refuses).
    degrees = range(0, MAX_DEGREE + 1, step) if radius <= _MAX_RADIUS else ()
    for degree in degrees:
        coeffs = exp_coefficients(degree, radius, kind=kind)
        if _measured_error(coeffs, radius, _COARSE) > eps:
            continue  # already fails on the coarse grid
        if _measured_error(coeffs, radius, _fine_points(degree)) <= eps:
            return degree
    raise ValueError(
        f"no {kind} polynomial of degree <= {MAX_DEGREE} approximates exp within "
        f"eps={eps:g} on [-R, R] with R={radius:g}: "
        + (
            f"eps is below what float64 evaluation of a polynomial resolves (about {_RESOLVABLE:g})"
            if eps < _RESOLVABLE
            else "the logits are too large for the polynomial method (docs/math.rst §2)"
        )
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
