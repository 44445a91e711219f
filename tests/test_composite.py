"""Composite attention (docs/math.rst §8) against an independent dense construction.

The oracle :func:`_composite_weights` builds the ``n × n`` weights row by row from the
definition — the exact keys of the row, then one first-order token per FMM interaction-list
box (parent neighbours minus neighbours, written out here from §6, not taken from the fast
path) holding that box's remaining keys — using only the operator's *choice* of exact blocks
and heavy columns, which is piecewise constant and checked separately.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import convbasis as cb
from convbasis import composite_attention, composite_operator
from convbasis.testing import assert_close, to_numpy

N_VALUES = (1, 2, 3, 7, 16, 31, 33, 64)


def _interaction_list(a, boxes, causal):
    """Key boxes of query box ``a``: the parent's neighbours' children that are not ``a``'s
    neighbours (docs/math.rst §6)."""
    parent = a // 2
    children = {c for p in (parent - 1, parent, parent + 1) for c in (2 * p, 2 * p + 1)}
    far = sorted(c for c in children if abs(c - a) > 1 and 0 <= c < boxes)
    return [c for c in far if c < a] if causal else far


def _composite_weights(op, q, k, causal, scale, counts=None):
    """Dense weights of the composite operator of one head ``q, k (n, d)`` (NumPy, float64);
    the number of exact logits of each row is appended to ``counts`` when given."""
    n = q.shape[0]
    b, nb = op.layout.block, op.layout.blocks
    ids, used = to_numpy(op.ids)[0], to_numpy(op.used)[0]
    heavy = set() if op.heavy is None else {int(j) for j in to_numpy(op.heavy)[0]}
    f = np.zeros((n, n))
    for i in range(n):
        block = i // b
        blocks = {int(x) for x, u in zip(ids[block], used[block], strict=True) if u}
        allowed = [j for j in range(n) if j <= i or not causal]
        exact = [j for j in allowed if j // b in blocks or j in heavy]
        logits = [scale * q[i] @ k[j] for j in exact]
        if counts is not None:
            counts.append(len(exact))
        tokens = []
        levels = int(math.log2(nb))
        for level in range(1, levels):
            width = b << (level - 1)
            a = i // width
            rows = [r for r in range(a * width, (a + 1) * width) if r < n]
            if not rows:
                continue
            centre = q[rows].mean(axis=0)
            for box in _interaction_list(a, nb >> (level - 1), causal):
                keys = [
                    j for j in range(box * width, (box + 1) * width) if j < n and j not in exact
                ]
                if not keys:
                    continue
                w = np.array([scale * centre @ k[j] for j in keys])
                alpha = np.exp(w - w.max())
                alpha /= alpha.sum()
                mean_key = alpha @ k[keys]
                lse = w.max() + np.log(np.exp(w - w.max()).sum())
                tokens.append((keys, alpha))
                logits.append(lse + scale * (q[i] - centre) @ mean_key)
        logits = np.array(logits)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        f[i, exact] = p[: len(exact)]
        for (keys, alpha), weight in zip(tokens, p[len(exact) :], strict=True):
            f[i, keys] += weight * alpha
    return f


def _problem(rng, batch, n, d=3, spread=1.0):
    q = spread * rng.standard_normal((*batch, n, d))
    k = rng.standard_normal((*batch, n, d))
    v = rng.standard_normal((*batch, n, 2))
    return q, k, v


def _budget(n, block, causal, extra):
    """A budget covering the band plus ``extra`` keys, within ``[1, n]``."""
    return min(n, (2 if causal else 3) * block + extra)


@given(
    n=st.sampled_from(N_VALUES),
    block=st.sampled_from([1, 2, 3, 4]),
    extra=st.integers(0, 6),
    sinks=st.integers(0, 1),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_weights_match_the_dense_construction(n, block, extra, sinks, causal, seed):
    rng = np.random.default_rng(seed)
    q, k, _ = _problem(rng, (), n)
    block = min(block, n)
    budget = max(_budget(n, block, causal, extra), min(n, (2 + sinks + (not causal)) * block))
    op = composite_operator(q, k, causal=causal, block=block, budget=budget, sinks=sinks)
    counts = []
    want = _composite_weights(op, q, k, causal, 1 / math.sqrt(3), counts)
    f = to_numpy(op.to_dense())
    assert_close(f, want, atol=1e-12)
    # exact_fraction counts each exact logit once (a heavy column in an exact block too)
    assert op.exact_fraction * op.allowed == pytest.approx(sum(counts))
    # Every allowed key is seen exactly once, exactly or inside one token.
    allowed = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
    assert np.all(f[allowed] > 0)
    assert np.all(f[~allowed] == 0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("batch", "n", "block"), [((), 1, 8), ((2,), 7, 2), ((2, 1), 37, 4)])
def test_full_budget_is_exact_attention(xp, rng, causal, batch, n, block):
    q, k, v = (xp.asarray(a) for a in _problem(rng, batch, n))
    out, report = composite_attention(
        q, k, v, causal=causal, block=block, budget=n, samples=n, return_report=True
    )
    assert_close(out, cb.attention(q, k, v, causal=causal), atol=1e-12, xp=xp)
    assert report.exact_fraction == pytest.approx(1.0)
    assert report.work_fraction >= report.exact_fraction
    assert report.error_estimate < 1e-12
    assert report.error_interval[0] <= report.error_estimate <= report.error_interval[1] + 1e-15


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_products_and_attention_agree(xp, rng, causal, dtype):
    q, k, v = (xp.asarray(a.astype(dtype)) for a in _problem(rng, (3,), 64))
    options = dict(causal=causal, block=4, budget=_budget(64, 4, causal, 8))
    op = composite_operator(q, k, **options)
    out = composite_attention(q, k, v, **options)
    assert out.dtype == q.dtype
    f = to_numpy(op.to_dense()).astype(np.float64)
    tol = 2e-6 if dtype == "float32" else 1e-13
    assert_close(out, f @ to_numpy(v).astype(np.float64), atol=tol, xp=xp, dtype=q.dtype)
    assert_close(
        op.rmatmul(v), np.swapaxes(f, -1, -2) @ to_numpy(v), atol=10 * tol, xp=xp, dtype=q.dtype
    )
    np.testing.assert_allclose(f.sum(-1), 1, atol=10 * tol)
    assert 0 < op.exact_fraction < 1
    assert op.exact_fraction < op.work_fraction < 1


def test_batch_elements_choose_their_own_blocks(rng):
    """Each batch element is its own problem: the same as one call per element."""
    q, k, v = _problem(rng, (2, 3), 40, spread=2.0)
    options = dict(block=4, budget=16)
    out = composite_attention(q, k, v, **options)
    for i in range(2):
        for j in range(3):
            alone = composite_attention(q[i, j], k[i, j], v[i, j], **options)
            assert_close(out[i, j], alone, atol=1e-13)
    # k and v broadcast against q's batch
    shared = composite_attention(q, k[0, 0], v[0, 0], **options)
    assert_close(shared[1, 2], composite_attention(q[1, 2], k[0, 0], v[0, 0], **options))


def test_heavy_columns_and_sinks_are_exact(rng):
    n = 64
    q, k, _ = _problem(rng, (), n)
    k[5] *= 6  # a column every query favours
    op = composite_operator(q, k, block=4, budget=24, heavy=4, sinks=1)
    assert 5 in {int(j) for j in to_numpy(op.heavy)[0]}
    f = op.to_dense()
    logits = (q @ k.T) / math.sqrt(3)
    # exact entries have the exact logit ratio to one another within a row
    for i in (40, 63):
        row = f[i]
        assert row[5] / row[0] == pytest.approx(np.exp(logits[i, 5] - logits[i, 0]), rel=1e-12)


def test_large_logits_stay_finite_and_nan_propagates(rng):
    q, k, v = _problem(rng, (), 48)
    out = composite_attention(1e4 * q, k, v, block=4, budget=16)
    assert np.all(np.isfinite(out))
    bad = q.copy()
    bad[20, 1] = np.nan
    out = composite_attention(bad, k, v, block=4, budget=16)
    assert np.all(np.isnan(out[20]))


def test_error_estimate_tracks_the_true_error(rng):
    q, k, v = _problem(rng, (4,), 256, spread=2.5)
    out, report = composite_attention(q, k, v, block=8, budget=32, return_report=True)
    exact = cb.attention(q, k, v)
    true = np.linalg.norm(out - exact, axis=(-2, -1)) / np.linalg.norm(exact, axis=(-2, -1))
    ratio = to_numpy(report.error_estimates) / true
    assert np.all((ratio > 0.5) & (ratio < 2))
    total = np.linalg.norm(out - exact) / np.linalg.norm(exact)
    assert report.error_interval[0] <= report.error_estimate <= report.error_interval[1]
    assert 0.5 < report.error_estimate / total < 2
    assert report.samples == 32 and report.target_met is None


def test_target_error_grows_the_budget_or_warns(rng):
    q, k, v = _problem(rng, (), 256, spread=2.5)
    _, report = composite_attention(
        q, k, v, block=8, budget=32, target_error=0.02, max_fraction=1.0, return_report=True
    )
    assert report.target_met and report.error_estimate <= 0.02 and report.budget > 32
    with pytest.warns(cb.CompositeWarning, match="max_fraction=0.2"):
        _, report = composite_attention(
            q, k, v, block=8, budget=32, target_error=1e-6, max_fraction=0.2, return_report=True
        )
    assert report.target_met is False
    assert report.exact_fraction <= 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        composite_attention(q, k, v, block=8, budget=256, target_error=0.5)


def test_registered_method_runs_everywhere(rng):
    q, k, v = _problem(rng, (), 32)
    op = cb.attention_operator(q, k, method="composite", block=4, budget=12)
    assert isinstance(op, cb.CompositeAttentionOperator)
    grads = cb.attention_gradients(q, k, v, v, method="composite", block=4, budget=12)
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"budget": 0}, "budget"),
        ({"budget": -3}, "budget"),
        ({"budget": 2.5}, "budget"),
        ({"budget": True}, "budget"),
        ({"budget": 7}, "budget must cover the band"),
        ({"block": 0}, "block"),
        ({"sinks": -1}, "sinks"),
        ({"heavy": -1}, "heavy"),
        ({"budget": 20, "heavy": 16}, "heavy"),
        ({"target_error": 0}, "target_error"),
        ({"target_error": 1}, "target_error"),
        ({"target_error": -0.1}, "target_error"),
        ({"max_fraction": 0}, "max_fraction"),
        ({"max_fraction": 1.5}, "max_fraction"),
        ({"samples": 0}, "samples"),
        ({"samples": 65}, "samples"),
    ],
)
def test_bad_options_name_the_parameter(rng, options, match):
    q, k, v = _problem(rng, (), 64)
    with pytest.raises(ValueError, match=match):
        composite_attention(q, k, v, **{"block": 4, **options})


def test_a_budget_above_n_is_exact_attention(rng):
    """One budget serves every sequence length (lengths=): n or more keys is all of them."""
    q, k, v = _problem(rng, (), 64)
    out, report = composite_attention(q, k, v, block=4, budget=65, return_report=True)
    assert report.budget == 64 and report.exact_fraction == 1
    assert_close(out, cb.attention(q, k, v), atol=1e-13, rtol=1e-13)


def _finite_difference(loss, x, h=1e-6):
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        grad[i] = (loss(up) - loss(down)) / (2 * h)
    return grad


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("batch", "n", "options"),
    [
        ((), 40, {"block": 4, "budget": 16}),
        ((2,), 33, {"block": 2, "budget": 10, "sinks": 1}),
        ((), 48, {"block": 4, "budget": 20, "heavy": 0}),
        ((), 9, {"block": 8, "budget": 9}),
    ],
)
def test_model_gradient_matches_finite_differences(xp, rng, causal, batch, n, options):
    """gradient="model": the exact gradient of composite_attention itself (the selection is
    piecewise constant, so central differences see it fixed)."""
    q, k, v = _problem(rng, batch, n, d=2)
    _assert_model_gradient(xp, rng, q, k, v, {**options, "causal": causal})


def _assert_model_gradient(xp, rng, q, k, v, options):
    """``gradient="model"`` of composite attention against central differences (to 1e-7)."""
    g = rng.standard_normal(v.shape)

    def loss(q_=q, k_=k, v_=v):
        return float(np.sum(g * composite_attention(q_, k_, v_, **options)))

    arrays = [xp.asarray(a) for a in (q, k, v, g)]
    dq, dk, dv = cb.attention_gradients(*arrays, method="composite", gradient="model", **options)
    tol = 1e-7
    assert_close(dq, _finite_difference(lambda x: loss(q_=x), q), atol=tol, xp=xp)
    assert_close(dk, _finite_difference(lambda x: loss(k_=x), k), atol=tol, xp=xp)
    assert_close(dv, _finite_difference(lambda x: loss(v_=x), v), atol=tol, xp=xp)


def _buried_far_keys(rng, gap, dtype):
    """A far-field token whose box's largest centre logits are exact keys of the row.

    ``n = 32``, block 2, causal, budget 8 (band, two top blocks, no heavy columns).  Query
    block 15 (rows 30, 31) sees key box 1 (keys 8–15) at level 3 from the centre of rows
    24–31.  Keys 8, 9 point along ``e1``, which rows 24–29 and 31 favour, so the block score
    makes block 4 (keys 8, 9) exact for query block 15 and the centre scores it ``gap`` above
    keys 10–15, which point along ``e2``.  Row 30 points along ``e2``: most of its mass is in
    the token holding keys 10–15 less the second top block.  Computed as the box's sums less
    the exact block's, that token's mass would be rounding alone.
    """
    n, d = 32, 2
    s = 1 / math.sqrt(d)
    q, k = 0.01 * rng.standard_normal((2, n, d))
    v = rng.standard_normal((n, 2))
    t = beta = 2.0
    q[24:30, 0] += (8 * (gap + 1) - 10) / (6 * s * t)
    q[30, 1] += 8 / (s * beta)  # row 30: keys 10–15 score 8
    q[31, 0] += 10 / (s * t)  # row 31: keys 8, 9 score 10
    k[8:10, 0] += t
    k[10:16, 1] += beta
    return tuple(a.astype(dtype) for a in (q, k, v))


_BURIED = dict(causal=True, block=2, budget=8, heavy=0)


@pytest.mark.parametrize(("dtype", "gap"), [("float64", 30), ("float64", 45), ("float32", 15)])
def test_far_keys_far_below_exact_ones_keep_their_mass(xp, rng, dtype, gap):
    """No token loses its keys to rounding when its box's largest centre logits are exact
    keys of the row and the rest lie ``gap`` below them (beyond float32's and float64's
    digits for the old box-minus-dropped-blocks sums): the dense §8 construction holds."""
    q, k, v = _buried_far_keys(rng, gap, dtype)
    qx, kx, vx = (xp.asarray(a) for a in (q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = composite_operator(qx, kx, **_BURIED)
        out = composite_attention(qx, kx, vx, **_BURIED)
    ids, used = to_numpy(op.ids)[0, 15], to_numpy(op.used)[0, 15]
    assert 4 in {int(i) for i, u in zip(ids, used, strict=True) if u}
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    centre = q64[24:32].mean(axis=0) / math.sqrt(2)
    assert (centre @ k64[8:10].T).min() - (centre @ k64[10:16].T).max() > gap - 1
    want = _composite_weights(op, q64, k64, True, 1 / math.sqrt(2))
    exact = {j for i, u in zip(ids, used, strict=True) if u for j in (2 * i, 2 * i + 1)}
    assert want[30, [j for j in range(10, 16) if j not in exact]].sum() > 0.3
    # the tolerances of the dense-construction and the products tests above
    assert_close(op.to_dense(), want, atol=2e-6 if dtype == "float32" else 1e-12, xp=xp)
    tol = 2e-6 if dtype == "float32" else 1e-13
    assert_close(out, want @ v64, atol=tol, xp=xp, dtype=qx.dtype)
    assert_close(op.rmatmul(vx), want.T @ v64, atol=10 * tol, xp=xp, dtype=qx.dtype)


@pytest.mark.parametrize("gap", [30, 45])
def test_model_gradient_with_far_keys_far_below_exact_ones(xp, rng, gap):
    """The model gradient of the same case against central differences: its per-key sums
    are the token sums' adjoint, also free of cancellation."""
    q, k, v = _buried_far_keys(rng, gap, "float64")
    _assert_model_gradient(xp, rng, q, k, v, _BURIED)


def test_cross_attention_and_wider_grad_out(rng):
    q, k, v = _problem(rng, (), 24)
    with pytest.raises(ValueError, match="as many queries as keys"):
        composite_attention(q, k[:16], v[:16], causal=False, block=2, budget=24)
    g = rng.standard_normal((3, 24, 2))
    options = dict(block=2, budget=8)
    got = cb.attention_gradients(q, k, v, g, method="composite", gradient="model", **options)
    want = [
        sum(parts)
        for parts in zip(
            *(
                cb.attention_gradients(
                    q, k, v, g[i], method="composite", gradient="model", **options
                )
                for i in range(3)
            ),
            strict=True,
        )
    ]
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, atol=1e-12)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"target_error": "0.1"}, "target_error"),
        ({"max_fraction": None}, "max_fraction"),
        ({"max_fraction": True}, "max_fraction"),
        ({"sinks": 16, "budget": 33}, "sinks"),
    ],
)
def test_option_types_name_the_parameter(rng, options, match):
    q, k, v = _problem(rng, (), 33)
    with pytest.raises(ValueError, match=match):
        composite_attention(q, k, v, **{"block": 4, **options})
