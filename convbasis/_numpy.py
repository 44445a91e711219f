"""NumPy backend: the speed paths that only NumPy input takes.

:mod:`convbasis._array` holds the generic Array-API code and dispatches here when
``array_api_compat.is_numpy_namespace(xp)``; this module imports no other convbasis module.
Each path exists for a measured reason, given where it is defined:

* FFTs through ``scipy.fft`` with ``workers=`` (multi-threaded, keeps float32 as complex64),
  ``CONVBASIS_FFT_WORKERS`` threads (default: all);
* the exclusive running sum as a loop over slices: NumPy's ``cumsum`` along a non-last axis
  runs ~15x slower;
* C-order copies of transposed operands: NumPy's stacked small matmul runs 1.8x slower with
  a transposed second operand;
* the chunk scan in blocks pipelined over ``CONVBASIS_NUM_THREADS`` threads (default: the
  usable cores), BLAS held to one thread meanwhile: NumPy runs stacked small matrix products
  on one core and would stream every chunk state through memory;
* the block scan (:func:`scan_blocks`) pipelined the same way: multi-threaded BLAS on
  mid-sized products of a shared machine's cores ran far below one thread's speed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.fft
from threadpoolctl import ThreadpoolController

_FFT_WORKERS = int(os.environ.get("CONVBASIS_FFT_WORKERS", "-1"))
# Below this many input elements thread dispatch (~0.5 ms) costs more than it saves.
_THREADED_MIN_ELEMENTS = 1 << 18
_THREADS = int(os.environ.get("CONVBASIS_NUM_THREADS", "0")) or len(os.sched_getaffinity(0))


def rfft(x, n, axis):
    """Real FFT of ``x`` zero-padded to length ``n`` along ``axis``, via ``scipy.fft``
    (multi-threaded, keeps float32 as complex64)."""
    return scipy.fft.rfft(x, n=n, axis=axis, workers=_FFT_WORKERS)


def irfft(x, n, axis):
    """Inverse of :func:`rfft`: real signal of length ``n`` along ``axis``."""
    return scipy.fft.irfft(x, n=n, axis=axis, workers=_FFT_WORKERS)


def exclusive_cumsum(x, *, axis):
    """Exclusive running sum along ``axis`` (``axis`` non-negative): ``out[t] = Σ_{s<t} x[s]``.

    NumPy's ``cumsum`` along a non-last axis runs ~15x slower than a running sum over slices
    (measured on (1024, 64, 64) float32: 50 ms against 3 ms), so this is the slice loop.
    """
    # One ufunc call per step, written straight into the output (a copy plus an add per
    # step measured 1.4x slower at (1024, 64, 64) float32).
    out = np.empty_like(x)
    head = (slice(None),) * axis
    out[(*head, 0)] = 0
    for t in range(1, x.shape[axis]):
        np.add(out[(*head, t - 1)], x[(*head, t - 1)], out=out[(*head, t)])
    return out


def contiguous(x):
    """``x`` in C order (a copy of a transposed view).

    NumPy's stacked small matmul runs 1.8x slower with a transposed second operand than
    with a contiguous copy of it (measured: ``(8, 64, 64) @ (8, 64, 64)ᵀ`` float32, one
    core), and the copy costs less than the difference.
    """
    return np.ascontiguousarray(x)


_POOL_PREFIX = "convbasis-map"


@functools.cache
def _thread_pool():
    return ThreadPoolExecutor(max(_THREADS - 1, 1), thread_name_prefix=_POOL_PREFIX)


@functools.cache
def _blas_controller():
    return ThreadpoolController()


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter = None


@contextlib.contextmanager
def _single_threaded_blas():
    """BLAS held to one thread while any caller is inside (the setting is process-wide, so
    overlapping callers share one limit, taken by the first and released by the last).

    With OpenBLAS (pthreads) a limit set from a thread other than the main one may not take
    effect (threadpoolctl supports the main thread only); the pipeline's per-chunk products
    are small enough that OpenBLAS runs them on one thread anyway (measured: the same time
    for the ``n = 65536, r = p = 64`` masked product called from a worker thread).
    """
    global _blas_users, _blas_limiter
    with _blas_lock:
        if _blas_users == 0:
            _blas_limiter = _blas_controller().limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


def _block_edges(count):
    """Chunk boundaries of the pipeline's blocks: about 32 chunks each (measured on 2 cores
    for ``r = p = 64``, chunk 64: 1.7-1.8x the unmasked product, against 1.9-2.0x with 16 and
    1.8x with 64 chunks per block), and at least two blocks per thread when there are enough
    chunks, so that every thread has work."""
    blocks = max(math.ceil(count / 32), min(count, 2 * _THREADS))
    return [count * i // blocks for i in range(blocks + 1)]


def pipelined(arrays):
    """Whether :func:`chunk_scan_map` pays off for ``arrays`` (each ``(..., count, chunk, w)``):
    at least two chunks per thread, and at least ``_THREADED_MIN_ELEMENTS`` input elements."""
    count = arrays[0].shape[-3]
    small = sum(math.prod(a.shape) for a in arrays) < _THREADED_MIN_ELEMENTS
    return not (count < 2 * _THREADS or small)


def chunk_scan_map(states, func, *arrays, reverse=False):
    """``func(*arrays, seen)`` where ``seen`` is the exclusive running sum of chunk states,
    for NumPy input (see ``convbasis._array.chunk_scan_map`` for the shapes).

    NumPy runs stacked small matrix products on one core (each is too small for BLAS's own
    threads) and would stream every state through memory, so the chunks go in blocks,
    pipelined over ``CONVBASIS_NUM_THREADS`` threads (default: the usable cores; the calling
    thread is one of them; BLAS held to one thread per call meanwhile, process-wide): each
    block is finished while its data are in cache, and only the running sum passes from
    block to block.  Worth it only where :func:`pipelined` says so.
    """
    count = arrays[0].shape[-3]
    edges = _block_edges(count)
    blocks = len(edges) - 1
    order = range(blocks - 1, -1, -1) if reverse else range(blocks)
    carries = [None] * (blocks + 1)  # carries[i]: the states of blocks order[:i], summed
    ready = [threading.Event() for _ in range(blocks + 1)]
    ready[0].set()
    failed = threading.Event()
    lock = threading.Lock()
    taken = itertools.count()  # blocks are handed out in order, so a block's predecessor
    out = None  # is always with a running thread: no deadlock however busy the pool is

    def run_block(i):
        nonlocal out
        lo, hi = edges[order[i]], edges[order[i] + 1]
        part = tuple(a[..., lo:hi, :, :] for a in arrays)
        s = states(*part)
        seen = np.empty_like(s)
        ready[i].wait()
        if failed.is_set():
            return
        prev = None
        for t in range(hi - lo - 1, -1, -1) if reverse else range(hi - lo):
            if prev is not None:
                np.add(seen[..., prev, :, :], s[..., prev, :, :], out=seen[..., t, :, :])
            else:
                seen[..., t, :, :] = 0 if carries[i] is None else carries[i]
            prev = t
        carries[i + 1] = seen[..., prev, :, :] + s[..., prev, :, :]
        ready[i + 1].set()
        result = func(*part, seen)
        with lock:
            if out is None:
                out = np.empty((*result.shape[:-3], count, *result.shape[-2:]), dtype=result.dtype)
        out[..., lo:hi, :, :] = result

    def worker():
        while not failed.is_set():
            with lock:
                i = next(taken)
            if i >= blocks:
                return
            run_block(i)

    _run_workers(worker, failed, ready)
    return out


def _run_workers(worker, failed, ready):
    """Run ``worker`` on the calling thread and ``_THREADS - 1`` pool threads, BLAS held to
    one thread; an error in any sets ``failed`` and every ``ready`` event (releasing the
    threads that wait for a running sum the failed one owed) and is re-raised here."""

    def guarded():
        try:
            worker()
        except BaseException:
            failed.set()
            for event in ready:
                event.set()
            raise

    with _single_threaded_blas():
        helpers = [_thread_pool().submit(guarded) for _ in range(_THREADS - 1)]
        try:
            guarded()
        finally:
            # A helper still queued (the pool busy with other calls) is not needed any more:
            # waiting for it could deadlock a call made from inside the pool.
            started = [helper for helper in helpers if not helper.cancel()]
            concurrent.futures.wait(started)
        for helper in started:
            helper.result()  # re-raise a helper's error


def scan_blocks(count, state, finish):
    """``convbasis._array.scan_blocks`` for NumPy input: blocks pipelined over threads.

    Each of ``CONVBASIS_NUM_THREADS`` threads (the calling one included; BLAS held to one
    thread meanwhile) takes the next block, computes its state, waits for the running sum of
    the blocks before it, passes on the sum with its own state added, then finishes the block.
    Only the running sum is sequential; a block's state and its finishing overlap other
    blocks'.  Multi-threaded BLAS on the blocks' products ran 7-50x slower than one thread
    on this shared 2-core machine (``(128, 6435) @ (6435, 9)`` float32: 1.2 against
    25 GFLOP/s), and NumPy's own operations run on one core.
    """
    seen = [None] * (count + 1)  # seen[i]: the states of blocks 0 … i-1, summed
    ready = [threading.Event() for _ in range(count + 1)]
    ready[0].set()
    out = [None] * count
    failed = threading.Event()
    lock = threading.Lock()
    taken = itertools.count()  # blocks are handed out in order (no deadlock, as above)

    def worker():
        while not failed.is_set():
            with lock:
                i = next(taken)
            if i >= count:
                return
            s = None if state is None else state(i)
            ready[i].wait()
            if failed.is_set():
                return
            before, seen[i] = seen[i], None  # only ~one running sum per thread stays alive
            seen[i + 1] = before if s is None else s if before is None else before + s
            ready[i + 1].set()
            if finish is not None:
                out[i] = finish(i, before)

    _run_workers(worker, failed, ready)
    return out, seen[count]


def index_add(index, values, count):
    """``out[index[i]] += values[i]`` into ``count`` zero rows.

    float32/float64: one sparse ``(count, P)`` 0/1 matrix times the ``(P, ·)`` values, which
    streams the rows; ``np.add.reduceat`` along axis 0 of rows with many columns, and
    ``np.add.at``, run 15-20 times slower (measured: 256 rows of ``256 × 130`` float32 into
    128, 5 ms against 91 ms).  Other dtypes: sorted, then one reduceat.
    """
    out = np.zeros((count, *values.shape[1:]), dtype=values.dtype)
    if index.shape[0] == 0:
        return out
    if values.dtype in (np.float32, np.float64):
        import scipy.sparse  # here: it takes a tenth of a second to import

        rows = index.shape[0]
        ones = np.ones(rows, dtype=values.dtype)
        select = scipy.sparse.csr_array((ones, (index, np.arange(rows))), shape=(count, rows))
        return np.reshape(select @ np.reshape(values, (rows, -1)), out.shape)
    order = np.argsort(index, kind="stable")
    index = index[order]
    starts = np.flatnonzero(np.concatenate(([True], index[1:] != index[:-1])))
    out[index[starts]] = np.add.reduceat(values[order], starts, axis=0)
    return out


def map_chunks(func, ranges):
    """``[func(lo, hi) for lo, hi in ranges]``, the ranges spread over ``CONVBASIS_NUM_THREADS``
    threads (the calling thread is one), BLAS held to one thread meanwhile: the stacked small
    products of each range are too small for BLAS's own threads, which only contend (measured
    on 2 busy cores: ``(4096, 16, 64) @ (4096, 64, 512)`` float32 0.5 s on one BLAS thread,
    11-28 s on two)."""
    with _single_threaded_blas():
        # from a pool thread (a nested call) the pool may be busy waiting on this very thread
        nested = threading.current_thread().name.startswith(_POOL_PREFIX)
        if _THREADS < 2 or len(ranges) < 2 or nested:
            return [func(lo, hi) for lo, hi in ranges]
        # Every thread, the caller included, takes the next range when it is free: a fixed
        # split would leave the caller idle while the pool works through the rest.
        results = [None] * len(ranges)
        lock, taken = threading.Lock(), itertools.count()

        def work():
            while True:
                with lock:
                    i = next(taken)
                if i >= len(ranges):
                    return
                results[i] = func(*ranges[i])

        helpers = [_thread_pool().submit(work) for _ in range(min(_THREADS, len(ranges)) - 1)]
        try:
            work()
        finally:
            for helper in helpers:
                helper.result()
        return results


def stacked_matmul(a, b):
    """``a @ b`` for stacks ``(..., G, r, c) @ (..., G, c, t)``, the ``G`` axis split over
    threads with BLAS on one thread, each thread writing its part of one output array.

    Each product is small (a multipole block against its tokens), so BLAS's own threads only
    contend: on two busy cores, Fast Multipole Attention at ``n = 2^17`` took 30 s with them
    and about 1 s on one BLAS thread per range.
    """
    shape = (*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
    if math.prod(shape) + a.size + b.size < _THREADED_MIN_ELEMENTS:
        return a @ b  # a thread hand-off costs more than the product
    out = np.empty(shape, dtype=np.result_type(a, b))
    count = shape[-3]
    pieces = max(1, min(count, 2 * _THREADS))
    edges = [count * i // pieces for i in range(pieces + 1)]

    def part(lo, hi):
        np.matmul(_rows(a, lo, hi), _rows(b, lo, hi), out=out[..., lo:hi, :, :])

    map_chunks(part, list(itertools.pairwise(edges)))
    return out


def _rows(x, lo, hi):
    """Entries ``lo:hi`` of the stack axis ``-3`` (all of it where ``x`` broadcasts there)."""
    return x if x.ndim < 3 or x.shape[-3] == 1 else x[..., lo:hi, :, :]
