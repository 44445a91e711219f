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
}


def test_every_structure_is_registered():
    assert set(METHODS) == {"dense", "lowrank", "conv", "multipole"}


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
    q, k, g, y, z = (xp.asarray(a.astype(dtype)) for a in _problem(rng, batch, n))
    op = attention_operator(q, k, method=method, causal=causal, **OPTIONS[method])
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
    q, k, g, y, z = (xp.asarray(a) for a in _problem(rng, (), 8))
    op = attention_operator(q, k, method=method, **OPTIONS[method])
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
    valid = r"valid methods: \['conv', 'dense', 'lowrank', 'multipole'\]"
    with pytest.raises(ValueError, match=valid):
        attention_operator(q, q, method="sparse")
    with pytest.raises(ValueError, match="unknown attention method"):
        attention_operator(q, q, method=["dense"])
