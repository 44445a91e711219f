"""The attention-operator protocol: every registered structure against its own dense matrix."""

from __future__ import annotations

import numpy as np
import pytest

from convbasis.operators import (
    METHODS,
    AttentionOperator,
    attention_operator,
    hadamard_product,
)
from convbasis.testing import assert_close, to_numpy

# Options that make each method valid on small random inputs.  The conv basis gets one segment
# per column (exact on any logits, so no ConvBasisWarning); the others are approximations,
# which is irrelevant here: each operator is checked against its own ``to_dense()``.
OPTIONS = {
    "dense": {},
    "lowrank": {"eps": 1e-2},
    "conv": {"rank": 64},
    "multipole": {"block": 4, "basis": 2},
    "composite": {"block": 2},
}


def _skip_composite_on_jax(xp, method):
    # JAX compiles each eager operation for each new shape; composite's many small ones take
    # minutes here.  It is checked on JAX under jit in test_jax_interface.
    if method == "composite" and "jax" in xp.__name__:
        pytest.skip("composite on eager JAX: covered under jit by test_jax_interface")


def _options(method, n):
    """``OPTIONS[method]``; composite's budget must lie in ``[1, n]``: 7 keys of ``n``."""
    if method == "composite":
        return {**OPTIONS[method], "budget": min(n, 7)}
    return OPTIONS[method]


def test_every_structure_is_registered():
    assert set(METHODS) == {"dense", "lowrank", "conv", "multipole", "composite"}


def _problem(rng, batch, n, d=3, s=2, p=3):
    q, k = (rng.uniform(-1, 1, (*batch, n, d)) for _ in range(2))
    g, y = (rng.standard_normal((*batch, n, s)) for _ in range(2))
    z = rng.standard_normal((*batch, n, p))
    return q, k, g, y, z


@pytest.mark.parametrize("method", list(OPTIONS))
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("batch", "n"), [((), 1), ((), 2), ((2,), 13), ((2, 1), 17)])
def test_four_products_match_the_dense_matrix(xp, rng, method, causal, dtype, batch, n):
    _skip_composite_on_jax(xp, method)
    q, k, g, y, z = (xp.asarray(a.astype(dtype)) for a in _problem(rng, batch, n))
    op = attention_operator(q, k, method=method, causal=causal, **_options(method, n))
    assert isinstance(op, AttentionOperator)
    f = to_numpy(op.to_dense()).astype(np.float64)
    assert tuple(op.shape) == f.shape == (*batch, n, n)
    if causal:
        assert np.all(np.triu(f, 1) == 0)
    gn, yn, zn = (to_numpy(a).astype(np.float64) for a in (g, y, z))
    h = f * (gn @ np.swapaxes(yn, -1, -2))
    tol = 2e-5 if dtype == "float32" else 1e-12
    expected = {
        "matmul": (op.matmul(z), f @ zn),
        "rmatmul": (op.rmatmul(z), np.swapaxes(f, -1, -2) @ zn),
        "hadamard_matmul": (op.hadamard_matmul(g, y, z), h @ zn),
        "hadamard_rmatmul": (op.hadamard_rmatmul(g, y, z), np.swapaxes(h, -1, -2) @ zn),
    }
    for name, (got, want) in expected.items():
        assert_close(
            got, want, atol=tol * max(np.abs(want).max(), 1.0), xp=xp, dtype=q.dtype, err_msg=name
        )


@pytest.mark.parametrize("method", list(OPTIONS))
def test_products_reject_operands_of_the_wrong_length(xp, rng, method):
    _skip_composite_on_jax(xp, method)
    q, k, g, y, z = (xp.asarray(a) for a in _problem(rng, (), 8))
    op = attention_operator(q, k, method=method, **_options(method, 8))
    short = xp.asarray(rng.standard_normal((7, 3)))
    for call in (
        lambda: op.matmul(short),
        lambda: op.rmatmul(short),
        lambda: op.hadamard_matmul(g, y, short),
        lambda: op.hadamard_rmatmul(short, y, z),
    ):
        with pytest.raises(ValueError, match="7"):
            call()


def test_hadamard_product_groups_columns(monkeypatch, rng):
    """Grouped stacking (many products, each on a few columns) gives the one-group result."""
    import convbasis.operators as operators

    f = rng.standard_normal((9, 9))
    g, y = rng.standard_normal((2, 9, 5))
    z = rng.standard_normal((9, 4))
    calls = []

    def product(w):
        calls.append(w.shape[-1])
        return f @ w

    expected = (f * (g @ y.T)) @ z
    assert_close(hadamard_product(np, product, g, y, z), expected, atol=1e-12)
    assert calls == [20]
    calls.clear()
    monkeypatch.setattr(operators, "_HADAMARD_BLOCK", 9 * 4 * 2)
    assert_close(hadamard_product(np, product, g, y, z), expected, atol=1e-12)
    assert calls == [8, 8, 4]


def test_unknown_method_lists_the_registered_ones(rng):
    q = rng.standard_normal((5, 2))
    valid = r"valid methods: \['composite', 'conv', 'dense', 'lowrank', 'multipole'\]"
    with pytest.raises(ValueError, match=valid):
        attention_operator(q, q, method="sparse")
    with pytest.raises(ValueError, match="unknown attention method"):
        attention_operator(q, q, method=["dense"])


def _kernels(xp, rng, n, block, basis, dtype):
    """Supplied pooling kernels: the multipole weights are then not row-stochastic."""
    from convbasis.multipole import kernel_shapes

    shapes = kernel_shapes(n, block=block, basis=basis)
    return tuple(xp.asarray(rng.uniform(0.2, 1.5, s).astype(dtype)) for s in shapes)


def _structured_cases(xp, rng, dtype):
    """Operators whose products take the paths random small inputs miss: FFT segments, exact
    rows, non-stochastic multipole weights."""
    from convbasis.testing import rotary_conv_instance

    cases = []
    for causal in (True, False):
        q, k, _, _ = rotary_conv_instance(rng, 48, 4, (0, 13, 30), logit_scale=2.0)
        cases.append(("conv, long segments", causal, q, k, {"rank": 3}))
        q, k, _, _ = rotary_conv_instance(rng, 40, 4, (0, 11, 25), logit_scale=60.0)
        cases.append(("conv, recomputed rows", causal, q, k, {"rank": 3}))
        q, k = rng.standard_normal((2, 40, 3))
        kernels = _kernels(xp, rng, 40, 4, 2, dtype)
        cases.append(
            ("multipole, kernels", causal, q, k, {"block": 4, "basis": 2, "downsample": kernels})
        )
    return [
        (name, c, xp.asarray(q.astype(dtype)), xp.asarray(k.astype(dtype)), o)
        for name, c, q, k, o in cases
    ]


@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_products_on_structured_operators(xp, rng, dtype, conv_route):
    for name, causal, q, k, options in _structured_cases(xp, rng, dtype):
        method = name.split(",")[0]
        op = attention_operator(q, k, method=method, causal=causal, **options)
        if name == "conv, recomputed rows" and causal:
            assert op.recomputed_rows, name
        if name == "conv, long segments":
            stops = (*op.lower.starts[1:], op.n)
            assert max(b - a for a, b in zip(op.lower.starts, stops, strict=True)) > 8
        f = to_numpy(op.to_dense()).astype(np.float64)
        n = f.shape[-1]
        g, y, z = (rng.standard_normal((n, w)) for w in (2, 2, 3))
        h = f * (g @ y.T)
        got = (
            op.hadamard_matmul(*(xp.asarray(a.astype(dtype)) for a in (g, y, z))),
            op.hadamard_rmatmul(*(xp.asarray(a.astype(dtype)) for a in (g, y, z))),
            op.rmatmul(xp.asarray(z.astype(dtype))),
        )
        tol = 5e-5 if dtype == "float32" else 1e-11
        bounds = _fft_bounds(op, g, y, z) if name == "conv, recomputed rows" else (0, 0, 0)
        for a, b, bound in zip(got, (h @ z, h.T @ z, f.T @ z), bounds, strict=True):
            atol = tol * max(np.abs(b).max(), 1.0) + bound
            assert np.all(np.abs(to_numpy(a) - b) <= atol), (name, causal)


def _fft_bounds(op, g, y, z):
    """Per-row error bounds of ``hadamard_matmul``, ``hadamard_rmatmul`` and ``rmatmul`` on a
    conv operator whose logits span a wide range (docs/conv.rst): a row ``r`` kept on the FFT
    path has ``|Δ(f w)_r| <= 2 noise / D_r ‖w‖_∞``; recomputed rows are exact.  Through
    ``f ∘ G Yᵀ = Σ_l diag(g_l) f diag(y_l)`` and ``fᵀ w = Cᵀ (D⁻¹ w)`` (the transpose sees the
    kept rows' ``w_r / D_r``).  Columns ``(n, 1)``, broadcasting over the output's columns."""
    d = to_numpy(op.normaliser).astype(np.float64)
    kept = np.ones(op.n, dtype=bool)
    kept[list(op.recomputed_rows)] = False
    noise = 2 * float(to_numpy(op.noise))
    rel = np.where(kept, noise / d, 0.0)[:, None]
    matmul = sum(np.abs(g[:, [l]]) * rel * np.abs(y[:, [l]] * z).max() for l in range(g.shape[1]))

    def transposed(w):
        return noise * np.max(np.abs(w[kept]) / d[kept, None])

    rmatmul = sum(np.abs(y[:, [l]]) * transposed(g[:, [l]] * z) for l in range(g.shape[1]))
    return matmul, rmatmul, transposed(z)


@pytest.mark.parametrize("method", list(OPTIONS))
def test_operands_broadcast_against_the_operator_batch(xp, rng, method):
    _skip_composite_on_jax(xp, method)
    q, k = (xp.asarray(rng.uniform(-1, 1, (2, 1, 9, 3))) for _ in range(2))
    op = attention_operator(q, k, method=method, **_options(method, 9))
    g, y, z = (rng.standard_normal((1, 3, 9, 2)) for _ in range(3))
    f = to_numpy(op.to_dense()).astype(np.float64)
    h = f * (g @ np.swapaxes(y, -1, -2))
    got = op.hadamard_matmul(xp.asarray(g), xp.asarray(y), xp.asarray(z))
    assert got.shape == (2, 3, 9, 2)
    assert_close(got, h @ z, atol=1e-11 * np.abs(h @ z).max())
    with pytest.raises(ValueError, match="must broadcast against the operator"):
        op.matmul(xp.asarray(rng.standard_normal((3, 1, 9, 2))))


@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
@pytest.mark.parametrize("causal", [True, False])
def test_exact_formula_is_the_formula_on_each_operator(xp, rng, causal):
    """``gradient="exact-formula"``: dq = s P K, dk = s Pᵀ Q, dv = fᵀ G with the method's own
    f̃ (docs/math.rst §3), also where f̃ is not row-stochastic."""
    from convbasis.gradients import attention_gradients

    cases = [(m, _options(m, 13)) for m in OPTIONS]
    cases.append(("multipole", {"block": 4, "basis": 2, "downsample": "kernels"}))
    for method, options in cases:
        if method == "composite" and "jax" in xp.__name__:
            continue  # as _skip_composite_on_jax
        q, k, v, g = (rng.standard_normal((13, 3)) for _ in range(4))
        q, k = q / 2, k / 2
        if options.get("downsample") == "kernels":
            options = {**options, "downsample": _kernels(xp, rng, 13, 4, 2, "float64")}
        arrays = [xp.asarray(a) for a in (q, k, v, g)]
        op = attention_operator(arrays[0], arrays[1], method=method, causal=causal, **options)
        f = to_numpy(op.to_dense())
        s = 1 / np.sqrt(3)
        delta = np.sum(g * (f @ v), axis=-1, keepdims=True)
        p = f * (g @ v.T) - delta * f
        want = (s * p @ k, s * p.T @ q, f.T @ g)
        got = attention_gradients(*arrays, method=method, causal=causal, **options)
        for name, a, b in zip(("dq", "dk", "dv"), got, want, strict=True):
            assert_close(a, b, atol=1e-12 * max(np.abs(b).max(), 1.0), err_msg=f"{method} {name}")


def test_options_are_checked_against_the_constructor(rng):
    from convbasis.gradients import attention_gradients

    q = rng.standard_normal((5, 2))
    with pytest.raises(TypeError, match=r"the lowrank method takes the options \['degree', 'eps'"):
        attention_operator(q, q, method="lowrank", foo=1)
    with pytest.raises(TypeError, match=r"the conv method takes the options .*got \['ranks'\]"):
        attention_gradients(q, q, q, q, method="conv", gradient="model", ranks=2)
