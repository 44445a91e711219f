"""Grouped-query heads and variable lengths (convbasis.batching), for every attention function.

The oracles are independent of the code under test: GQA against the same call with the key and
value heads repeated (``np.repeat``, SDPA's ``enable_gqa`` meaning), lengths against separate
calls on each sequence truncated to its length.  Padding is filled with NaN and huge values, so
a key beyond a length that leaked into a valid row would show.
"""

from __future__ import annotations

import numpy as np
import pytest

import convbasis as cb
from convbasis.testing import assert_close, to_numpy

pytestmark = pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")

B, HKV, GROUP, N, D, E = 3, 2, 3, 12, 4, 5
LENGTHS = (12, 7, 0)
FORWARD = {
    "dense": (cb.attention, {}),
    "lowrank": (cb.lowrank_attention, {"degree": 6}),
    "conv": (cb.conv_attention, {"rank": 3}),
    "multipole": (cb.multipole_attention, {"block": 2, "basis": 1}),
    "composite": (cb.composite_attention, {"block": 2, "budget": 8}),
}
OPTIONS = {name: options for name, (_, options) in FORWARD.items()}


def _inputs(rng, *, heads=HKV * GROUP, kv_heads=HKV):
    q = 0.4 * rng.standard_normal((B, heads, N, D))
    k = 0.4 * rng.standard_normal((B, kv_heads, N, D))
    v = rng.standard_normal((B, kv_heads, N, E))
    g = rng.standard_normal((B, heads, N, E))
    return q, k, v, g


def _padded(arrays, lengths=LENGTHS):
    """Copies with every row beyond each sequence's length set to NaN or 1e6."""
    out = []
    for i, a in enumerate(arrays):
        a = a.copy()
        for b, size in enumerate(lengths):
            a[b, :, size:, :] = np.nan if i % 2 else 1e6
        out.append(a)
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("method", FORWARD)
def test_grouped_query_heads_equal_repeated_heads(xp, rng, method, causal):
    func, options = FORWARD[method]
    q, k, v, _ = _inputs(rng)
    got = func(*(xp.asarray(a) for a in (q, k, v)), causal=causal, **options)
    rep = [np.repeat(a, GROUP, axis=1) for a in (k, v)]
    want = func(q, *rep, causal=causal, **options)
    assert got.shape == (B, HKV * GROUP, N, E)
    assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("gradient", ["model", "exact-formula"])
@pytest.mark.parametrize("method", FORWARD)
def test_grouped_query_gradients_sum_over_each_group(xp, rng, method, gradient):
    q, k, v, g = _inputs(rng)
    got = cb.attention_gradients(
        *(xp.asarray(a) for a in (q, k, v, g)), method=method, gradient=gradient, **OPTIONS[method]
    )
    rep = [np.repeat(a, GROUP, axis=1) for a in (k, v)]
    want = cb.attention_gradients(q, *rep, g, method=method, gradient=gradient, **OPTIONS[method])
    assert isinstance(got, cb.AttentionGradients)
    assert_close(got.dq, want.dq, atol=1e-12, rtol=1e-12)
    for ours, theirs, like in ((got.dk, want.dk, k), (got.dv, want.dv, v)):
        assert ours.shape == like.shape
        summed = theirs.reshape(B, HKV, GROUP, N, -1).sum(axis=2)
        assert_close(ours, summed, atol=1e-12, rtol=1e-12)


def test_grouped_query_backward_and_multipole_backward(xp, rng):
    q, k, v, g = _inputs(rng)
    rep = [np.repeat(a, GROUP, axis=1) for a in (k, v)]
    arrays = [xp.asarray(a) for a in (q, k, v, g)]
    for func, options in (
        (cb.attention_backward, {}),
        (cb.multipole_attention_backward, {"block": 2, "basis": 1}),
    ):
        got = func(*arrays, **options)
        want = func(q, rep[0], rep[1], g, **options)
        assert_close(got.dq, want.dq, atol=1e-12, rtol=1e-12)
        assert_close(got.dk, want.dk.reshape(B, HKV, GROUP, N, D).sum(2), atol=1e-12, rtol=1e-12)


def test_heads_that_do_not_divide_are_refused(xp, rng):
    q, k, v, _ = _inputs(rng, heads=5, kv_heads=2)
    with pytest.raises(ValueError, match=r"q has 5 heads and k, v have 2.*transpose\(1, 2\)"):
        cb.attention(*(xp.asarray(a) for a in (q, k, v)))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("method", FORWARD)
def test_lengths_equal_each_sequence_alone(xp, rng, method, causal):
    func, options = FORWARD[method]
    q, k, v, _ = _inputs(rng)
    padded = [xp.asarray(a) for a in _padded((q, k, v))]
    got = to_numpy(func(*padded, causal=causal, lengths=np.asarray(LENGTHS), **options))
    assert got.shape == (B, HKV * GROUP, N, E)
    for b, size in enumerate(LENGTHS):
        assert np.all(got[b, :, size:] == 0)
        if size:
            alone = func(q[b, :, :size], k[b, :, :size], v[b, :, :size], causal=causal, **options)
            assert_close(got[b, :, :size], alone, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("gradient", ["model", "exact-formula"])
@pytest.mark.parametrize("method", FORWARD)
def test_lengths_gradients_equal_each_sequence_alone(xp, rng, method, gradient):
    q, k, v, g = _inputs(rng)
    padded = [xp.asarray(a) for a in _padded((q, k, v, g))]
    got = cb.attention_gradients(
        *padded, method=method, gradient=gradient, lengths=LENGTHS, **OPTIONS[method]
    )
    for name, like in zip(("dq", "dk", "dv"), (q, k, v), strict=True):
        ours = to_numpy(getattr(got, name))
        assert ours.shape == like.shape
        for b, size in enumerate(LENGTHS):
            assert np.all(ours[b, :, size:] == 0)
            if size:
                alone = cb.attention_gradients(
                    *(a[b, :, :size] for a in (q, k, v, g)),
                    method=method,
                    gradient=gradient,
                    **OPTIONS[method],
                )
                assert_close(ours[b, :, :size], getattr(alone, name), atol=1e-12, rtol=1e-12)


def test_lengths_with_inputs_shared_by_the_batch(xp, rng):
    """k and v without the batch axis: their gradients are the sums over the sequences."""
    q, _, _, g = _inputs(rng, kv_heads=HKV * GROUP)
    k, v = (rng.standard_normal((HKV * GROUP, N, w)) for w in (D, E))
    got = cb.attention_backward(*(xp.asarray(a) for a in (q, k, v, g)), lengths=LENGTHS)
    dk = np.zeros_like(k)
    for b, size in enumerate(LENGTHS):
        if size:
            alone = cb.attention_backward(q[b, :, :size], k[:, :size], v[:, :size], g[b, :, :size])
            dk[:, :size] += alone.dk
    assert got.dk.shape == k.shape
    assert_close(got.dk, dk, atol=1e-12, rtol=1e-12)


def test_full_lengths_are_the_plain_call(xp, rng):
    q, k, v, _ = _inputs(rng)
    arrays = [xp.asarray(a) for a in (q, k, v)]
    assert_close(cb.attention(*arrays, lengths=[N] * B), cb.attention(*arrays), atol=0, rtol=0)


def test_multipole_lengths_and_supplied_kernels_are_refused(xp, rng):
    q, k, v, _ = _inputs(rng, kv_heads=HKV * GROUP)
    kernels = tuple(xp.asarray(np.ones(c)) for c in cb.multipole.kernel_shapes(N, block=2, basis=1))
    with pytest.raises(ValueError, match="lengths= needs downsample='mean'"):
        cb.multipole_attention(
            *(xp.asarray(a) for a in (q, k, v)),
            block=2,
            basis=1,
            downsample=kernels,
            lengths=LENGTHS,
        )


@pytest.mark.parametrize(
    ("lengths", "error", "match"),
    [
        ((12, 7), ValueError, r"one entry per entry of the first batch axis \(3\)"),
        ((12, 7, 13), ValueError, r"lengths must lie in \[0, n = 12\], got 13"),
        ((12, 7, -1), ValueError, "non-negative integer"),
        ((12, 7, 2.5), ValueError, "non-negative integer"),
        (np.ones((3, 1), dtype=int), TypeError, "1-D integer array"),
        (np.ones(3), TypeError, "1-D integer array"),
        (5, TypeError, "sequence of ints"),
    ],
)
def test_bad_lengths(xp, rng, lengths, error, match):
    q, k, v, _ = _inputs(rng)
    with pytest.raises(error, match=match):
        cb.attention(*(xp.asarray(a) for a in (q, k, v)), lengths=lengths)


def test_lengths_need_self_attention_and_a_batch_axis(xp, rng):
    q, k, v, _ = _inputs(rng)
    short = [xp.asarray(a[..., :5, :]) for a in (k, v)]
    with pytest.raises(ValueError, match="as many queries as keys"):
        cb.attention(xp.asarray(q), *short, causal=False, lengths=LENGTHS)
    with pytest.raises(ValueError, match="needs a batch axis"):
        cb.attention(*(xp.asarray(a[0, 0]) for a in (q, k, v)), lengths=(3,))


def test_sequence_axis_mistaken_for_heads_names_the_layout(xp, rng):
    """(B, n, H, d) input: lengths beyond the heads count point to the layout."""
    q = xp.asarray(rng.standard_normal((B, N, 4, D)))
    with pytest.raises(ValueError, match=r"flash-attn layout\) pass x\.transpose\(1, 2\)"):
        cb.attention(q, q, q, lengths=(12, 12, 12))


def test_composite_lengths_and_its_report_are_refused(xp, rng):
    q, k, v, _ = _inputs(rng, kv_heads=HKV * GROUP)
    arrays = [xp.asarray(a) for a in (q, k, v)]
    for extra in ({"return_report": True}, {"target_error": 0.1}):
        with pytest.raises(ValueError, match="without target_error= and return_report=True"):
            cb.composite_attention(*arrays, lengths=LENGTHS, **extra)


def test_composite_report_with_grouped_heads(xp, rng):
    q, k, v, _ = _inputs(rng)
    out, report = cb.composite_attention(
        *(xp.asarray(a) for a in (q, k, v)), return_report=True, **OPTIONS["composite"]
    )
    assert out.shape == (B, HKV * GROUP, N, E)
    assert tuple(report.error_estimates.shape) == (B, HKV, GROUP)


def test_grouped_heads_with_lengths_need_a_batch_axis(xp, rng):
    q, k, v = (xp.asarray(rng.standard_normal((h, N, D))) for h in (6, 2, 2))
    with pytest.raises(ValueError, match="needs a batch axis before the heads"):
        cb.attention(q, k, v, lengths=[5] * 6)


def test_non_arrays_are_refused_by_type(xp):
    with pytest.raises(TypeError, match="one array library"):
        cb.attention([[1.0, 2.0]], [[1.0, 2.0]], [[1.0, 2.0]])


def test_supplied_kernels_and_lengths_refused_on_every_route(xp, rng):
    q, k, v, g = (xp.asarray(a) for a in _inputs(rng, kv_heads=HKV * GROUP))
    kernels = tuple(xp.asarray(np.ones(c)) for c in cb.multipole.kernel_shapes(N, block=2, basis=1))
    options = {"method": "multipole", "block": 2, "basis": 1, "downsample": kernels}
    with pytest.raises(ValueError, match="lengths= needs downsample='mean'"):
        cb.attention_gradients(q, k, v, g, lengths=LENGTHS, **options)
