"""The Array-API layer: namespaces, dtypes, FFT helpers, running sums."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import array_api_strict
import numpy as np
import pytest
from array_api_compat import array_namespace

from convbasis._array import (
    chunk_scan_map,
    exclusive_cumsum,
    fast_length,
    index_add,
    irfft,
    map_chunks,
    namespace,
    resolve_scale,
    rfft,
    stacked_matmul,
    sum_to_shape,
)
from convbasis.testing import assert_close


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fft_round_trip_keeps_dtype(xp, rng, dtype):
    x = xp.asarray(rng.standard_normal((3, 10)).astype(dtype))
    length = fast_length(19)
    spec = rfft(x, length, -1, array_namespace(x))
    back = irfft(spec, length, -1, array_namespace(x))
    assert back.dtype == getattr(xp, dtype)
    assert_close(back[..., :10], np.asarray(x), atol=1e-5 if dtype == "float32" else 1e-12)


def test_fast_length():
    assert fast_length(1) == 1
    assert fast_length(17) == 18
    assert all(fast_length(n) >= n for n in range(1, 200))


@pytest.mark.parametrize("reverse", [False, True])
def test_exclusive_cumsum(xp, rng, reverse):
    x = rng.standard_normal((2, 5, 3, 4))
    out = np.asarray(
        exclusive_cumsum(array_namespace(xp.asarray(x)), xp.asarray(x), axis=1, reverse=reverse)
    )
    csum = np.cumsum(x[:, ::-1] if reverse else x, axis=1)
    expected = np.concatenate([np.zeros_like(x[:, :1]), csum[:, :-1]], axis=1)
    np.testing.assert_allclose(out, expected[:, ::-1] if reverse else expected, atol=1e-13)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ((2, 9, 3, 4), (2, 9, 4, 5)),  # the stack axis split over threads
        ((9, 3, 4), (1, 4, 5)),  # one operand broadcast along it
        ((2, 1, 3, 4), (9, 4, 5)),  # fewer dimensions, broadcast batch
        ((9, 3, 4), (4, 5)),  # a plain matrix on the right
        ((0, 3, 4), (0, 4, 5)),  # an empty stack
    ],
)
def test_stacked_matmul_is_matmul(xp, rng, left, right):
    a, b = rng.standard_normal(left), rng.standard_normal(right)
    out = stacked_matmul(array_namespace(xp.asarray(a)), xp.asarray(a), xp.asarray(b))
    assert tuple(out.shape) == np.matmul(a, b).shape
    assert_close(out, np.matmul(a, b), atol=1e-13)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64"])
@pytest.mark.parametrize("count", [1, 7])
@pytest.mark.parametrize("rows", [0, 1, 40])
def test_index_add_sums_repeated_rows(xp, rng, dtype, count, rows):
    index = rng.integers(0, count, rows)
    values = (10 * rng.standard_normal((rows, 3, 2))).astype(dtype)
    want = np.zeros((count, 3, 2), dtype)
    np.add.at(want, index, values)
    got = index_add(xp, xp.asarray(index), xp.asarray(values), count)
    assert got.dtype == getattr(xp, dtype) and got.shape == (count, 3, 2)
    assert_close(got, want, atol=1e-5)


def test_index_add_propagates_nan_to_its_row_only(xp):
    values = xp.asarray([[1.0], [np.nan], [2.0]])
    got = np.asarray(index_add(xp, xp.asarray([0, 1, 0]), values, 3))
    assert got[0, 0] == 3.0 and np.isnan(got[1, 0]) and got[2, 0] == 0.0


@pytest.mark.parametrize("ranges", [1, 2, 9])
def test_map_chunks_keeps_order_and_propagates_errors(xp, ranges):
    edges = [(i, i + 1) for i in range(ranges)]
    assert map_chunks(xp, lambda lo, hi: (lo, hi), edges) == edges

    def fail(lo, hi):
        if lo == ranges - 1:
            raise ZeroDivisionError("chunk")
        return lo

    with pytest.raises(ZeroDivisionError, match="chunk"):
        map_chunks(xp, fail, edges)


def test_nested_map_chunks_finish():
    # a chunk that maps chunks itself (on the pool's own thread) must not wait on the pool
    edges = [(i, i + 1) for i in range(4)]

    def outer(lo, hi):
        return sum(map_chunks(np, lambda a, b: a * b, edges)) + lo

    with ThreadPoolExecutor(1) as guard:
        done = guard.submit(map_chunks, np, outer, edges)
        assert done.result(timeout=60) == [20 + i for i in range(4)]


def test_sum_to_shape(xp, rng):
    x = rng.standard_normal((2, 3, 4))
    xpn = array_namespace(xp.asarray(x))
    assert_close(sum_to_shape(xpn, xp.asarray(x), (1, 3, 4)), x.sum(0, keepdims=True))
    assert_close(sum_to_shape(xpn, xp.asarray(x), (4,)), x.sum((0, 1)), atol=1e-13)
    assert_close(
        sum_to_shape(xpn, xp.asarray(x), (3, 1)), x.sum(0).sum(-1, keepdims=True), atol=1e-13
    )


def test_namespace_errors():
    with pytest.raises(TypeError, match="one array library"):
        namespace(np.ones(2), array_api_strict.asarray([1.0, 2.0]))
    dev = array_api_strict.Device("device1")
    a = array_api_strict.asarray([1.0])
    b = array_api_strict.asarray([1.0], device=dev)
    with pytest.raises(TypeError, match="one device"):
        namespace(a, b)


def test_resolve_scale():
    assert resolve_scale(None, 4) == 0.5
    assert resolve_scale(2, 4) == 2.0
    with pytest.raises(ValueError, match="scale must be finite"):
        resolve_scale(float("inf"), 4)


def _scan_case(xp, rng, count):
    a = xp.asarray(rng.standard_normal((3, count, 5, 4)))
    b = xp.asarray(rng.standard_normal((count, 5, 6)))
    mT = array_namespace(a).matrix_transpose

    def states(a, b):
        return mT(a) @ b

    def func(a, b, seen):
        return a @ seen + 1.0

    expected = []
    for reverse in (False, True):
        s = np.asarray(mT(a) @ b)
        s = s[:, ::-1] if reverse else s
        seen = np.cumsum(s, axis=1) - s
        expected.append(np.asarray(a) @ (seen[:, ::-1] if reverse else seen) + 1.0)
    return a, b, states, func, expected


@pytest.fixture
def pipeline(monkeypatch):
    """``pipeline(threads)``: NumPy input of any size takes the pipelined path."""
    import convbasis._numpy as numpy_backend

    def configure(threads):
        monkeypatch.setattr(numpy_backend, "_THREADED_MIN_ELEMENTS", 0)
        monkeypatch.setattr(numpy_backend, "_THREADS", threads)
        numpy_backend._thread_pool.cache_clear()

    yield configure
    numpy_backend._thread_pool.cache_clear()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("count", [2, 7, 100])
def test_chunk_scan_map_paths_agree(xp, rng, pipeline, threads, count):
    pipeline(threads)
    a, b, states, func, expected = _scan_case(xp, rng, count)
    for reverse, want in zip((False, True), expected, strict=True):
        out = chunk_scan_map(array_namespace(a), states, func, a, b, reverse=reverse)
        assert out.shape == (3, count, 5, 6)
        assert_close(out, want, atol=1e-12)


def test_chunk_scan_map_error_in_a_block_propagates(rng, pipeline):
    pipeline(2)
    a, b, states, _, _ = _scan_case(np, rng, 16)

    def failing(a, b, seen):
        if float(seen[..., 0, 0, 0].sum()) != 0.0:  # every block but the first
            raise RuntimeError("block failed")
        return a @ seen

    with pytest.raises(RuntimeError, match="block failed"):
        chunk_scan_map(np, states, failing, a, b)


def test_chunk_scan_map_concurrent_and_nested_callers_finish(rng, pipeline):
    """Callers in several threads share the pool, and a call may come from inside a block
    (each block here has enough chunks to be pipelined again): no call may wait on work
    queued behind another.  A deadlock fails the test by timeout."""
    pipeline(3)
    a, b, states, func, expected = _scan_case(np, rng, 64)

    def nested(a, b, seen):
        inner = chunk_scan_map(np, states, func, a, b)  # a scan of this block's chunks alone
        local = np.cumsum(states(a, b), axis=-3) - states(a, b)
        assert_close(inner, func(a, b, local), atol=1e-12)
        return func(a, b, seen)

    callers = ThreadPoolExecutor(6)
    try:
        runs = [callers.submit(chunk_scan_map, np, states, nested, a, b) for _ in range(6)]
        runs += [callers.submit(chunk_scan_map, np, states, func, a, b) for _ in range(6)]
        for run in runs:
            assert_close(run.result(timeout=60), expected[0], atol=1e-12)
    finally:
        callers.shutdown(wait=False, cancel_futures=True)


def test_single_threaded_blas_overlapping_callers_restore_the_setting():
    """Call A enters, call B enters, A leaves, B leaves: BLAS stays at one thread until the
    last one leaves, then ends as it began (the setting is process-wide)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from convbasis._numpy import _single_threaded_blas

    def blas_threads():
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    with threadpool_limits(limits=2, user_api="blas"):
        if blas_threads() != {2}:
            pytest.skip("no BLAS library whose threads threadpoolctl can set")
        call_a, call_b = _single_threaded_blas(), _single_threaded_blas()
        call_a.__enter__()
        call_b.__enter__()
        assert blas_threads() == {1}
        call_a.__exit__(None, None, None)
        assert blas_threads() == {1}  # B is still inside
        call_b.__exit__(None, None, None)
        assert blas_threads() == {2}


def test_an_array_without_a_device_does_not_conflict(monkeypatch):
    """A JAX tracer (under jit, grad, vmap) reports no device; it is no second device."""
    import array_api_compat

    from convbasis._array import namespace

    a, traced = np.ones((3, 2)), np.ones((3, 2))
    real = array_api_compat.device
    monkeypatch.setattr(array_api_compat, "device", lambda x: None if x is traced else real(x))
    assert namespace(a, traced) is namespace(a)
