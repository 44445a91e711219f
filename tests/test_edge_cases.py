"""Edge cases every method handles the same way: empty batches, empty value axes, NaN inputs,
huge logits, and the messages for bad scalars (regression tests for an adversarial sweep)."""

from __future__ import annotations

import importlib
import tracemalloc

import numpy as np
import pytest

import convbasis as cb
from convbasis.testing import assert_close, to_numpy

OPTIONS = {
    "dense": {},
    "lowrank": {"eps": 1e-2},
    "conv": {"rank": 2},
    "multipole": {"block": 4, "basis": 2},
}
FORWARD = {
    "dense": cb.attention,
    "lowrank": cb.lowrank_attention,
    "conv": cb.conv_attention,
    "multipole": cb.multipole_attention,
}


@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
@pytest.mark.parametrize("method", list(OPTIONS))
def test_empty_batch_gives_empty_results(xp, method):
    empty = xp.asarray(np.zeros((0, 16, 4)))
    out = FORWARD[method](empty, empty, empty, **OPTIONS[method])
    assert out.shape == (0, 16, 4)
    op = cb.attention_operator(empty, empty, method=method, **OPTIONS[method])
    assert op.matmul(empty).shape == (0, 16, 4)
    for gradient in ("exact-formula", "model"):
        grads = cb.attention_gradients(
            empty, empty, empty, empty, method=method, gradient=gradient, **OPTIONS[method]
        )
        assert [g.shape for g in grads] == [(0, 16, 4)] * 3


@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
def test_recovery_of_an_empty_batch(xp):
    empty = xp.asarray(np.zeros((2, 0, 9, 3)))
    basis = cb.recover_conv_basis(empty, empty, rank=3)
    assert basis.starts == (0,) and basis.vectors.shape == (2, 0, 1, 9)


@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
@pytest.mark.parametrize("method", list(OPTIONS))
def test_no_value_columns(xp, rng, method):
    q = xp.asarray(rng.standard_normal((16, 4)))
    none = xp.asarray(np.zeros((16, 0)))
    assert FORWARD[method](q, q, none, **OPTIONS[method]).shape == (16, 0)
    grads = cb.attention_gradients(q, q, none, none, method=method, **OPTIONS[method])
    assert [g.shape for g in grads] == [(16, 4), (16, 4), (16, 0)]
    for g in grads:
        assert_close(g, np.zeros(g.shape))


@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
@pytest.mark.parametrize("where", ["q", "k"])
def test_conv_propagates_nan_anywhere_in_q_or_k(xp, rng, where):
    """The basis sees K only at the segment starts: a NaN elsewhere must still show."""
    q, k, v = rng.standard_normal((3, 2, 16, 4))
    (q if where == "q" else k)[1, 5, 2] = np.nan
    q, k, v = (xp.asarray(a) for a in (q, k, v))
    out = to_numpy(cb.conv_attention(q, k, v, rank=4))
    assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1]))
    grads = cb.attention_gradients(q, k, v, v, method="conv", gradient="model", rank=4)
    assert np.all(np.isnan(to_numpy(grads[0])[1]))


@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
def test_conv_with_logits_far_beyond_exp_range(rng):
    """A residual of hundreds (far beyond e^709) warns; it never raises OverflowError."""
    q, k, v = rng.uniform(-30, 30, (3, 64, 4))
    with pytest.warns(cb.ConvBasisWarning, match="off by up to about 2"):
        out = cb.conv_attention(q, k, v, rank=8, tolerance=float("inf"))
    assert np.all(np.isfinite(out))


def test_multipole_with_a_block_larger_than_n_is_exact_and_small(rng):
    q, k, v = rng.standard_normal((3, 64, 8))
    tracemalloc.start()
    out = cb.multipole_attention(q, k, v, block=4096, basis=4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 2**20  # was 840 MB: the padding to block²
    assert_close(out, cb.attention(q, k, v), atol=1e-13)
    op = cb.multipole_operator(q, k, block=4096, basis=64)  # basis > n: still valid
    assert_close(op.matmul(v), cb.attention(q, k, v), atol=1e-13)


def test_messages_for_bad_scalars(rng):
    q = rng.standard_normal((8, 3))
    with pytest.raises(ValueError, match="scale must be a real number or None, got 'x'"):
        cb.attention(q, q, q, scale="x")
    empty_head = np.zeros((8, 0))
    with pytest.raises(ValueError, match="head dimension is d = 0"):
        cb.attention(empty_head, empty_head, q)
    with pytest.raises(ValueError, match="eps is below what float64 evaluation"):
        cb.lowrank_attention(q, q, q, eps=1e-300)
    with pytest.raises(ValueError, match="degree must be a non-negative integer"):
        cb.exp_approximation.coefficient_slopes(-1, 1.0)


HALF_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7}


@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
@pytest.mark.parametrize("name", list(HALF_EPS))
@pytest.mark.parametrize("method", [*OPTIONS, "composite"])
def test_half_precision_comes_back_in_half_precision(backend, xp, rng, method, name):
    """float16 / bfloat16 in, the same dtype out, forward and both gradients, on every library
    that has the dtype.  The conv FFTs run in float32 (torch's CPU FFT has no half kernel,
    scipy.fft none for float16) and cast back; results agree with float64 on the same rounded
    values to about 20 units of the half precision."""
    dtype = getattr(importlib.import_module(backend.module), name, None)
    if dtype is None:
        pytest.skip(f"{backend} has no {name}")
    if method == "composite" and backend.library == "jax":
        pytest.skip("composite on eager JAX compiles each op (minutes); test_jax_interface jits")
    options = {**OPTIONS, "composite": {"block": 4, "budget": 8}}[method]
    forward = {**FORWARD, "composite": cb.composite_attention}[method]
    half = [xp.astype(xp.asarray(a), dtype) for a in rng.uniform(-1, 1, (4, 16, 4))]
    exact = [to_numpy(xp.astype(a, xp.float64)) for a in half]
    out = forward(*half[:3], **options)
    assert out.dtype == dtype
    atol = 20 * HALF_EPS[name]
    assert_close(to_numpy(xp.astype(out, xp.float64)), forward(*exact[:3], **options), atol=atol)
    for gradient in ("exact-formula", "model"):
        grads = cb.attention_gradients(*half, method=method, gradient=gradient, **options)
        assert [a.dtype for a in grads] == [dtype] * 3, gradient
        want = cb.attention_gradients(*exact, method=method, gradient=gradient, **options)
        for got, ref in zip(grads, want, strict=True):
            got = to_numpy(xp.astype(got, xp.float64))
            assert_close(got, ref, atol=atol * max(1.0, float(np.abs(ref).max())))


def test_dense_default_blocks_bound_memory(rng, monkeypatch):
    """block=None never holds the whole n × m weights: rows go in blocks of a fixed size."""
    import convbasis.reference as ref

    monkeypatch.setattr(ref, "_BLOCK_BYTES", 1 << 20)  # 1 MiB of weights per block
    q, k, v = rng.standard_normal((3, 1024, 4))
    g = rng.standard_normal(v.shape)
    for call in (lambda: cb.attention(q, k, v), lambda: cb.attention_backward(q, k, v, g)):
        tracemalloc.start()
        call()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 6 * 2**20  # the full weights would be 8 MiB, times the temporaries
    assert_close(cb.attention(q, k, v), cb.attention(q, k, v, block=1024), atol=1e-13)


def test_dense_operator_refuses_weights_above_the_budget(monkeypatch):
    import convbasis.polynomial as poly

    monkeypatch.setattr(poly, "FEATURE_MEMORY_BUDGET", 2**20)
    q = np.zeros((2, 512, 4))  # 2 · 512 · 512 · 8 bytes = 4 MiB of weights
    with pytest.raises(MemoryError, match="would hold 0.00391 GiB.*blocks of rows"):
        cb.attention_operator(q, q)
