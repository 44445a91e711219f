"""Polynomial method (docs/math.rst §2): exp approximations, factors, attention, operator."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.polynomial import chebyshev as npcheb

from convbasis import polynomial as poly
from convbasis.exp_approximation import (
    chebyshev_coefficients,
    degree_for,
    exp_approximation_error,
    exp_coefficients,
    taylor_coefficients,
)
from convbasis.monomial_features import rank_for
from convbasis.polynomial import lowrank_attention, lowrank_factors, lowrank_operator
from convbasis.reference import attention, attention_weights
from convbasis.testing import assert_close, assert_within_reference_error, to_numpy

KINDS = ("chebyshev", "taylor")
DTYPES = ("float32", "float64")


def _rel_error_on(coeffs, radius, points=200_001):
    x = np.linspace(-radius, radius, points)
    return float(np.max(np.abs(np.polyval(coeffs[::-1], x) * np.exp(-x) - 1.0)))


def _inputs(rng, shape, radius_target, scale):
    """Rows with random directions and norms, rescaled so that ``s max‖q‖ max‖k‖ = R``."""
    q = rng.standard_normal(shape) * rng.uniform(0.2, 1.0, (*shape[:-1], 1))
    k = rng.standard_normal(shape) * rng.uniform(0.2, 1.0, (*shape[:-1], 1))
    q /= np.max(np.linalg.norm(q, axis=-1))
    k /= np.max(np.linalg.norm(k, axis=-1))
    factor = math.sqrt(radius_target / abs(scale))
    return q * factor, k * factor


def _roundoff(factors, dtype):
    """Rigorous-style bound on the float round-off in ``U Vᵀ`` relative to ``exp(x)``.

    Each feature carries ``<= (g + 2) u`` relative error, the length-``r`` dot product
    ``γ_r``; both scale ``|U||V|ᵀ <= Σ_t |c_t| R^t``, divided by ``exp(x) >= e^{-R}``.
    """
    u = float(np.finfo(dtype).eps)
    coeffs = exp_coefficients(factors.degree, factors.radius, kind=factors.kind)
    total = sum(abs(c) * factors.radius**t for t, c in enumerate(coeffs))
    rank = factors.u.shape[-1]
    return (rank + 2 * factors.degree + 4) * u * total * math.exp(factors.radius)


# --------------------------------------------------------------------------------------
# Scalar approximations
# --------------------------------------------------------------------------------------


def test_taylor_coefficients():
    assert taylor_coefficients(4) == (1.0, 1.0, 0.5, 1 / 6, 1 / 24)
    assert exp_coefficients(2, 5.0, kind="taylor") == (1.0, 1.0, 0.5)


@pytest.mark.parametrize(("degree", "radius"), [(0, 1.0), (3, 0.5), (6, 1.0), (9, 3.0), (14, 4.0)])
def test_chebyshev_matches_numpy_interpolant(degree, radius):
    interp = npcheb.Chebyshev.interpolate(np.exp, degree, domain=[-radius, radius])
    window = [-radius, radius]
    expected = interp.convert(kind=np.polynomial.Polynomial, domain=window, window=window).coef
    got = np.array(chebyshev_coefficients(degree, radius))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-13)


def test_chebyshev_tends_to_taylor():
    taylor = np.array(taylor_coefficients(8))
    np.testing.assert_allclose(chebyshev_coefficients(8, 0.0), taylor, rtol=1e-14)
    np.testing.assert_allclose(chebyshev_coefficients(8, 1e-4), taylor, rtol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("radius", [0.0, 0.3, 1.0, 2.5, 6.0])
@pytest.mark.parametrize("eps", [1e-1, 1e-3, 1e-6])
def test_degree_for_is_smallest_and_verified(kind, radius, eps):
    g = degree_for(eps, radius, kind=kind)
    assert kind != "taylor" or g % 2 == 0
    coeffs = exp_coefficients(g, radius, kind=kind)
    # the fine grid of degree_for resolves the maximum to 0.1%: check on a 50x finer one
    assert _rel_error_on(coeffs, radius) <= eps * (1 + 1e-3)
    step = 2 if kind == "taylor" else 1
    if g >= step:
        lower = exp_coefficients(g - step, radius, kind=kind)
        assert _rel_error_on(lower, radius) > eps


@pytest.mark.parametrize("radius", [0.1, 0.5, 1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("eps", [1e-2, 1e-3, 1e-5, 1e-8])
def test_chebyshev_degree_never_exceeds_taylor(radius, eps):
    assert degree_for(eps, radius, kind="chebyshev") <= degree_for(eps, radius, kind="taylor")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("degree", "radius"), [(2, 0.5), (4, 1.0), (8, 2.0), (12, 5.0)])
def test_approximation_error_report(kind, degree, radius):
    report = exp_approximation_error(degree, radius, kind=kind)
    measured = _rel_error_on(exp_coefficients(degree, radius, kind=kind), radius)
    assert report.measured == pytest.approx(measured, rel=1e-3)
    assert report.measured <= report.bound
    n = degree + 1
    if kind == "taylor":
        expected = radius**n * math.exp(radius) / math.factorial(n)
    else:
        expected = 2 * (radius / 2) ** n * math.exp(2 * radius) / math.factorial(n)
    assert report.bound == pytest.approx(expected, rel=1e-12)


def test_polynomials_stay_positive():
    # even Taylor: positive on all of R; Chebyshev with error < 1: positive on [-R, R]
    x = np.linspace(-40, 40, 100_001)
    for g in (2, 4, 6, 10):
        assert np.all(np.polyval(taylor_coefficients(g)[::-1], x) > 0)
    for radius in (0.5, 2.0, 6.0):
        g = degree_for(0.9, radius)
        grid = np.linspace(-radius, radius, 100_001)
        assert np.all(np.polyval(chebyshev_coefficients(g, radius)[::-1], grid) > 0)


def test_rank_for():
    assert rank_for(64, 2) == 2145
    assert rank_for(8, 6) == 3003
    assert rank_for(3, 0) == 1


def test_scalar_bad_input():
    with pytest.raises(ValueError, match=r"eps must lie in the open interval \(0, 1\)"):
        degree_for(0.0, 1.0)
    with pytest.raises(ValueError, match="eps must lie"):
        degree_for(1.0, 1.0)
    with pytest.raises(ValueError, match="radius must be finite and non-negative"):
        degree_for(1e-3, -1.0)
    with pytest.raises(ValueError, match="radius must be finite"):
        degree_for(1e-3, math.inf)
    with pytest.raises(ValueError, match="kind must be one of"):
        degree_for(1e-3, 1.0, kind="remez")
    with pytest.raises(ValueError, match="no chebyshev polynomial of degree <= 64"):
        degree_for(1e-6, 200.0)
    with pytest.raises(ValueError, match="degree must be even for kind='taylor'"):
        taylor_coefficients(3)
    with pytest.raises(ValueError, match="degree must be a non-negative integer"):
        chebyshev_coefficients(-1, 1.0)
    with pytest.raises(ValueError, match="d must be a non-negative integer"):
        rank_for(-2, 3)


# --------------------------------------------------------------------------------------
# Low-rank factors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("d", "radius", "eps"), [(1, 3.0, 1e-6), (2, 1.0, 1e-3), (3, 2.0, 1e-4), (4, 0.7, 1e-2)]
)
def test_factors_relative_error(xp, rng, kind, dtype, d, radius, eps):
    scale = 0.5
    q, k = _inputs(rng, (2, 37, d), radius, scale)
    if dtype == "float32" and eps < 1e-5:
        eps = 1e-3  # float32 features cannot resolve 1e-6
    q, k = q.astype(dtype), k.astype(dtype)
    f = lowrank_factors(xp.asarray(q), xp.asarray(k), eps=eps, kind=kind, scale=scale)
    g = f.degree
    assert g == degree_for(eps, f.radius, kind=kind)
    assert f.u.shape == (2, 37, math.comb(d + g, g)) == f.v.shape
    assert f.u.dtype == xp.asarray(q).dtype
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    radius64 = scale * np.linalg.norm(q64, axis=-1).max() * np.linalg.norm(k64, axis=-1).max()
    assert f.radius == pytest.approx(radius64, rel=1e-5)
    exact = np.exp(scale * q64 @ np.swapaxes(k64, -1, -2))
    err = np.max(np.abs(to_numpy(f.to_dense()).astype(np.float64) / exact - 1))
    assert f.rel_error_bound <= eps
    assert err <= f.rel_error_bound * (1 + 1e-3) + _roundoff(f, dtype)


def test_factors_rank_and_monomials(xp):
    # d = 2, g = 2: φ(q) = [1, a q0, a q1, b q0², c q0 q1, b q1²] with multinomial weights
    q = np.array([[0.3, -0.2]])
    k = np.array([[0.5, 0.4]])
    f = lowrank_factors(xp.asarray(q), xp.asarray(k), degree=2, kind="taylor", scale=1.0)
    u = to_numpy(f.u)[0]
    monomials = np.array([1, 0.3, -0.2, 0.09, -0.06, 0.04])
    weights = np.sqrt([1, 1, 1, 0.5, 1.0, 0.5])  # √(c_t (t choose α))
    ratio = to_numpy(f.v)[0, 0] / u[0]  # balancing multiplies q by λ^t and k by λ^-t
    assert ratio > 0
    lam = math.sqrt(math.sqrt(0.41 / 0.13))
    expected = monomials * weights * np.array([1, lam, lam, lam**2, lam**2, lam**2])
    np.testing.assert_allclose(u, expected, rtol=1e-12)
    assert to_numpy(f.to_dense())[0, 0] == pytest.approx(1 + 0.07 + 0.07**2 / 2, rel=1e-14)
    assert f.rank == rank_for(2, 2)


def test_factors_negative_scale_and_zero_inputs(xp, rng):
    q, k = rng.uniform(-1, 1, (2, 9, 3))
    f = lowrank_factors(xp.asarray(q), xp.asarray(k), eps=1e-6, scale=-0.4)
    np.testing.assert_allclose(to_numpy(f.to_dense()), np.exp(-0.4 * q @ k.T), rtol=2e-6)
    zero = lowrank_factors(xp.asarray(q * 0), xp.asarray(k), eps=1e-3)
    assert zero.degree == 0
    assert zero.radius == 0.0
    np.testing.assert_array_equal(to_numpy(zero.to_dense()), np.ones((9, 9)))


# --------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------


def _check_attention(xp, q, k, v, *, causal, eps, kind, scale, dtype):
    """Error against the float64 oracle within the docs/math.rst §2.4 bound plus round-off."""
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    out = lowrank_attention(
        xp.asarray(q),
        xp.asarray(k),
        xp.asarray(v),
        causal=causal,
        eps=eps,
        kind=kind,
        scale=scale,
    )
    assert_close(out, out, xp=xp, dtype=xp.asarray(q).dtype)
    golden = attention(*(a.astype(np.float64) for a in (q, k, v)), causal=causal, scale=scale)
    baseline = attention(q, k, v, causal=causal, scale=scale)
    f = lowrank_factors(q, k, eps=eps, kind=kind, scale=scale)
    total = f.rel_error_bound + _roundoff(f, dtype)
    approx = 2 * total / (1 - total) * float(np.max(np.abs(v)))
    base_err = float(np.max(np.abs(baseline.astype(np.float64) - golden)))
    u = float(np.finfo(dtype).eps)
    bound = approx + 3 * base_err + 8 * u * float(np.max(np.abs(golden)))
    err = float(np.max(np.abs(to_numpy(out).astype(np.float64) - golden)))
    assert out.shape == golden.shape
    assert err <= bound, f"error {err:.3e} above bound {bound:.3e} (degree {f.degree})"
    return err, bound


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("d", "radius", "eps"), [(2, 2.0, 1e-3), (4, 1.0, 1e-2), (3, 0.5, 1e-4)])
def test_attention_within_bound(xp, rng, causal, kind, dtype, d, radius, eps):
    q, k = _inputs(rng, (2, 150, d), radius, 0.5)
    v = rng.standard_normal((2, 150, 5))
    _check_attention(xp, q, k, v, causal=causal, eps=eps, kind=kind, scale=0.5, dtype=dtype)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_many_blocks_and_broadcast(xp, rng, monkeypatch, causal):
    # a tiny block budget forces the streaming path over many row blocks and chunks
    monkeypatch.setattr(poly, "_BLOCK_ENTRIES", 2000)
    monkeypatch.setattr(poly, "_DIAGONAL_ROWS", 7)
    n, d = 300, 2
    q = rng.uniform(-1, 1, (2, 1, n, d))
    k = rng.uniform(-1, 1, (1, 3, n, d))
    v = rng.standard_normal((2, 3, n, 4))
    err, _ = _check_attention(
        xp, q, k, v, causal=causal, eps=1e-6, kind="chebyshev", scale=0.7, dtype="float64"
    )
    assert err <= 1e-5


def _attention_from_factors(q, k, v, *, causal, **options):
    """``D̃⁻¹ Ã V`` written out from :func:`lowrank_factors` in float64: the same polynomial
    as :func:`lowrank_attention`, without its blocks, groups and diagonal logits."""
    f = lowrank_factors(q, k, **options)
    a = f.u @ np.swapaxes(f.v, -1, -2)
    if causal:
        a = np.tril(a)
    return (a @ v) / a.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("degree", "kind"),
    [(0, "taylor"), (1, "chebyshev"), (2, "taylor"), (3, "chebyshev"), (5, "chebyshev")],
)
@pytest.mark.parametrize("threads", [2, 3])
def test_streamed_attention_matches_factors(xp, rng, monkeypatch, causal, degree, kind, threads):
    """Every degree path (no top groups below degree 2), many blocks (NumPy: pipelined over
    ``threads``), diagonal blocks split, broadcast batch axes, a short last block."""
    import convbasis._numpy as numpy_backend

    monkeypatch.setattr(numpy_backend, "_THREADS", threads)
    numpy_backend._thread_pool.cache_clear()
    monkeypatch.setattr(poly, "_MAX_BLOCK_ROWS", 24)
    monkeypatch.setattr(poly, "_DIAGONAL_ROWS", 10)
    n, d = 101, 3
    q = rng.uniform(-1, 1, (2, 1, n, d))
    k = rng.uniform(-1, 1, (1, 3, n, d))
    v = rng.standard_normal((3, n, 2))
    options = {"degree": degree, "kind": kind, "scale": 0.3}
    try:
        out = lowrank_attention(*(xp.asarray(a) for a in (q, k, v)), causal=causal, **options)
    finally:
        numpy_backend._thread_pool.cache_clear()
    expected = _attention_from_factors(q, k, v, causal=causal, **options)
    assert out.shape == expected.shape
    np.testing.assert_allclose(to_numpy(out), expected, rtol=1e-11, atol=1e-13)


def test_attention_rectangular_bidirectional(xp, rng):
    q, k = rng.uniform(-1, 1, (17, 3)), rng.uniform(-1, 1, (40, 3))
    v = rng.standard_normal((40, 2))
    _check_attention(xp, q, k, v, causal=False, eps=1e-4, kind="taylor", scale=1.0, dtype="float64")


@given(
    n=st.sampled_from([1, 2, 3, 31, 33, 63, 65, 97, 127, 129]),
    d=st.integers(1, 3),
    e=st.integers(1, 3),
    causal=st.booleans(),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**16),
)
def test_attention_awkward_shapes(n, d, e, causal, kind, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.uniform(-1, 1, (2, n, d))
    v = rng.standard_normal((n, e))
    _check_attention(np, q, k, v, causal=causal, eps=1e-3, kind=kind, scale=0.8, dtype="float64")


# --------------------------------------------------------------------------------------
# The operator f = D⁻¹ Ã
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_operator_products(xp, rng, causal, dtype):
    n, d, s = 90, 3, 2
    q, k = (a.astype(dtype) for a in _inputs(rng, (2, n, d), 1.5, 0.5))
    op = lowrank_operator(xp.asarray(q), xp.asarray(k), causal=causal, eps=1e-4, scale=0.5)
    # golden in extended precision from the operator's own factors; baseline: dense in dtype
    wide = np.longdouble
    u_w, v_w = (to_numpy(a).astype(wide) for a in (op.u, op.v))
    a = u_w @ np.swapaxes(v_w, -1, -2)
    if causal:
        a = np.tril(a)
    f = a / a.sum(axis=-1, keepdims=True)
    f_low = f.astype(dtype)
    g, y, z, w = (rng.standard_normal(shape).astype(dtype) for shape in [(2, n, s)] * 4)
    gy = g @ np.swapaxes(y, -1, -2)
    gy_w = g.astype(wide) @ np.swapaxes(y.astype(wide), -1, -2)
    mT = np.matrix_transpose
    a = np.abs
    cases = [
        (op.matmul(xp.asarray(z)), f @ z, f_low @ z, a(f) @ a(z)),
        (op.rmatmul(xp.asarray(z)), mT(f) @ z, mT(f_low) @ z, mT(a(f)) @ a(z)),
        (
            op.hadamard_matmul(xp.asarray(g), xp.asarray(y), xp.asarray(z)),
            (f * gy_w) @ z,
            (f_low * gy) @ z,
            a(f * gy_w) @ a(z),
        ),
        (
            op.hadamard_rmatmul(xp.asarray(g), xp.asarray(y), xp.asarray(w)),
            mT(f * gy_w) @ w,
            mT(f_low * gy) @ w,
            mT(a(f * gy_w)) @ a(w),
        ),
    ]
    for actual, golden, baseline, terms in cases:
        assert_close(actual, actual, xp=xp, dtype=xp.asarray(z).dtype)
        assert_within_reference_error(actual, golden, baseline, magnitude=np.max(terms))
    assert_within_reference_error(op.to_dense(), f, f_low)
    # the operator approximates the true attention weights within the docs/math.rst §2.4 ratio bound
    exact = attention_weights(q.astype(np.float64), k.astype(np.float64), causal=causal, scale=0.5)
    total = op.rel_error_bound + _roundoff(lowrank_factors(q, k, eps=1e-4, scale=0.5), dtype)
    dense = to_numpy(op.to_dense()).astype(np.float64)
    assert np.all(np.abs(dense - exact) <= 2 * total / (1 - total) * exact + 1e-300)
    assert np.all(to_numpy(op.normaliser) > 0)


def test_operator_rectangular(xp, rng):
    q, k = rng.uniform(-1, 1, (7, 2)), rng.uniform(-1, 1, (11, 2))
    op = lowrank_operator(xp.asarray(q), xp.asarray(k), causal=False, degree=6, scale=1.0)
    assert op.shape == (7, 11)
    f = to_numpy(op.to_dense())
    z11, z7 = rng.standard_normal((11, 3)), rng.standard_normal((7, 3))
    g, y = rng.standard_normal((7, 2)), rng.standard_normal((11, 2))
    np.testing.assert_allclose(
        to_numpy(op.matmul(xp.asarray(z11))), f @ z11, rtol=1e-12, atol=1e-14
    )
    np.testing.assert_allclose(
        to_numpy(op.rmatmul(xp.asarray(z7))), f.T @ z7, rtol=1e-12, atol=1e-14
    )
    got = op.hadamard_rmatmul(xp.asarray(g), xp.asarray(y), xp.asarray(z7))
    np.testing.assert_allclose(to_numpy(got), (f * (g @ y.T)).T @ z7, rtol=1e-11, atol=1e-14)
    with pytest.raises(ValueError, match="z must have 11 rows"):
        op.matmul(xp.asarray(z7))
    with pytest.raises(ValueError, match="y must have last dimension 2"):
        op.hadamard_matmul(xp.asarray(g), xp.asarray(y[:, :1]), xp.asarray(z11))


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------


def test_bad_input(xp, rng):
    q = xp.asarray(rng.uniform(-1, 1, (16, 8)))
    v = xp.asarray(rng.uniform(-1, 1, (16, 2)))
    for eps in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(ValueError, match=r"eps must lie in the open interval \(0, 1\)"):
            lowrank_attention(q, q, v, eps=eps)
    with pytest.raises(ValueError, match="give exactly one of eps and degree"):
        lowrank_factors(q, q)
    with pytest.raises(ValueError, match="give exactly one of eps and degree"):
        lowrank_factors(q, q, eps=1e-3, degree=2)
    with pytest.raises(ValueError, match=r"would need rank 495 = C\(d\+g, g\).*max_rank=100"):
        lowrank_attention(q, q, v, degree=4, max_rank=100)
    with pytest.raises(ValueError, match="max_rank must be a positive integer"):
        lowrank_factors(q, q, degree=2, max_rank=0)
    with pytest.raises(ValueError, match="kind must be one of"):
        lowrank_operator(q, q, degree=2, kind="fourier")
    with pytest.raises(ValueError, match="degree must be even for kind='taylor'"):
        lowrank_attention(q, q, v, degree=3, kind="taylor")
    with pytest.raises(ValueError, match="k must have last dimension 8"):
        lowrank_factors(q, q[:, :3], degree=2)
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys"):
        lowrank_operator(q, q[:5, :], degree=2)
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys"):
        lowrank_attention(q, q[:5, :], v[:5, :], degree=2)
    with pytest.raises(TypeError, match="q must have a real floating dtype"):
        lowrank_factors(xp.asarray(np.ones((4, 2), dtype=np.int64)), q[:4, :2], degree=2)
    with pytest.raises(ValueError, match="normalisers could vanish"):
        lowrank_attention(q * 3, q * 3, v, degree=0, scale=1.0)
    nan = xp.asarray(np.full((4, 2), np.nan))
    with pytest.raises(ValueError, match="q and k must be finite"):
        lowrank_attention(nan, nan, nan, eps=1e-3)


def test_overflow_refused_before_allocation(xp):
    # float32, R ≈ 2.8e6, degree 20: n Σ R^t / t! ≈ e^256 overflows; U would need 13 GB
    big = np.full((2**15, 8), 1e3, dtype=np.float32)
    q = xp.asarray(big)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"radius R=2\.8\d*e\+06 is too large for"):
            lowrank_factors(q, q, degree=20, kind="taylor")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * big.nbytes  # row norms only, never an n × r factor


def test_default_rank_cap_refuses_before_allocation(xp, rng):
    """Gaussian (64, 64) q, k at eps = 1e-3 need rank 3.2e23 (an earlier default allocated
    until the process was killed at 19.4 GB): the default cap refuses on the numbers alone."""
    q, k = (xp.asarray(rng.standard_normal((64, 64))) for _ in range(2))
    v = xp.asarray(rng.standard_normal((64, 4)))
    calls = [
        lambda: lowrank_attention(q, k, v, eps=1e-3),
        lambda: lowrank_attention(q, k, v, eps=1e-3, causal=False),
        lambda: lowrank_factors(q, k, eps=1e-3),
        lambda: lowrank_operator(q, k, eps=1e-3),
    ]
    for call in calls:
        tracemalloc.start()
        try:
            with pytest.raises(
                ValueError,
                match=r"would need rank \d{20,} = C\(d\+g, g\).*"
                r"bytes for batch 1 \* 64 rows.*default max_rank=",
            ):
                call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2**20


def test_default_rank_cap_follows_the_budget(xp, rng, monkeypatch):
    # rank C(3 + 4, 4) = 35: 2·100·35·8 bytes of features for a batch of 2 and n = 100
    q, k = (rng.uniform(-1, 1, (2, 100, 3)) for _ in range(2))
    v = rng.standard_normal((2, 100, 2))
    args = [xp.asarray(a) for a in (q, k, v)]
    allowed = lowrank_attention(*args, degree=4)
    monkeypatch.setattr(poly, "FEATURE_MEMORY_BUDGET", 2 * 100 * 34 * 8)
    with pytest.raises(ValueError, match=r"need rank 35 .*above the default max_rank=34 "):
        lowrank_attention(*args, degree=4)
    with pytest.raises(ValueError, match=r"above the default max_rank=34 "):
        lowrank_factors(*args[:2], degree=4)
    # an explicit cap overrides the budget
    assert_close(lowrank_attention(*args, degree=4, max_rank=35), to_numpy(allowed), xp=xp)


def test_state_weights_that_would_overflow_are_refused(xp):
    # float32, Taylor degree 40, d = 2, R = 90: n Σ R^t / t! ≈ 1e31 passes the feature check,
    # but a state weight (t choose α) R^t / t! reaches 2.6e41
    q = np.zeros((4, 2), dtype=np.float32)
    q[:, 0] = math.sqrt(90.0)
    with pytest.raises(ValueError, match=r"too large for \S*float32 states of degree 40"):
        lowrank_attention(
            xp.asarray(q), xp.asarray(q), xp.asarray(q), degree=40, kind="taylor", scale=1.0
        )
