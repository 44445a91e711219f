"""Array-API plumbing: namespace and device resolution, input validation, FFT helpers.

This is the one module allowed to special-case a backend (``scipy.fft`` with ``workers``
for NumPy input).  Every algorithm module receives ``xp`` from :func:`namespace` at its
public boundary and passes it to private helpers.
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

import array_api_compat
import scipy.fft
from threadpoolctl import ThreadpoolController

__all__ = [
    "as_floating",
    "check_last_dim",
    "check_rows",
    "chunk_scan_map",
    "contiguous",
    "exclusive_cumsum",
    "fast_length",
    "irfft",
    "namespace",
    "resolve_scale",
    "rfft",
    "sum_to_shape",
    "validate_attention_inputs",
]

_FFT_WORKERS = int(os.environ.get("CONVBASIS_FFT_WORKERS", "-1"))
# Below this many input elements thread dispatch (~0.5 ms) costs more than it saves.
_THREADED_MIN_ELEMENTS = 1 << 18
_THREADS = int(os.environ.get("CONVBASIS_NUM_THREADS", "0")) or len(os.sched_getaffinity(0))


def namespace(*arrays):
    """Return the array namespace shared by ``arrays`` (``None`` entries are skipped).

    Raises
    ------
    TypeError
        If the arrays come from different libraries or live on different devices.
    """
    present = [a for a in arrays if a is not None]
    try:
        xp = array_api_compat.array_namespace(*present)
    except TypeError as exc:
        raise TypeError(f"all arrays must come from one array library: {exc}") from None
    devices = {str(array_api_compat.device(a)) for a in present}
    if len(devices) > 1:
        raise TypeError(f"all arrays must live on one device, got {sorted(devices)}")
    return xp


def as_floating(xp, arrays, names):
    """Check that every array has a real floating dtype and promote them to a common one.

    Integer and boolean inputs raise ``TypeError`` naming the argument, rather than being
    silently cast: a caller passing token ids where embeddings are expected has a bug.
    """
    for a, name in zip(arrays, names, strict=True):
        if not xp.isdtype(a.dtype, "real floating"):
            raise TypeError(f"{name} must have a real floating dtype, got {a.dtype}")
    dtype = xp.result_type(*arrays)
    return tuple(a if a.dtype == dtype else xp.astype(a, dtype) for a in arrays)


def check_rows(x, name, *, min_ndim=2):
    """Require ``x.ndim >= min_ndim`` and a non-empty sequence axis ``x.shape[-2]``."""
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions (..., n, d), got shape {x.shape}"
        )
    if x.shape[-2] == 0:
        raise ValueError(f"{name} must have a non-empty sequence axis (n >= 1), got {x.shape}")


def check_last_dim(x, name, expected, what):
    """Require ``x.shape[-1] == expected``; the message says what the axis must match."""
    if x.shape[-1] != expected:
        raise ValueError(
            f"{name} must have last dimension {expected} ({what}), got shape {x.shape}"
        )


def validate_attention_inputs(q, k, v, *, causal, extra=(), extra_names=()):
    """Validate ``q (..., n, d)``, ``k (..., m, d)``, ``v (..., m, e)`` (plus ``extra``).

    Returns ``(xp, q, k, v, *extra)`` with a common floating dtype.  Causal attention needs
    ``n == m``; leading axes must broadcast against each other.
    """
    arrays = (q, k, v, *extra)
    names = ("q", "k", "v", *extra_names)
    xp = namespace(*arrays)
    for a, name in zip(arrays, names, strict=True):
        check_rows(a, name)
    check_last_dim(k, "k", q.shape[-1], "the head dimension of q")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v must have as many rows as k ({k.shape[-2]}), got shape {v.shape}")
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            "causal attention needs as many queries as keys, got "
            f"q shape {q.shape} and k shape {k.shape}"
        )
    try:
        xp.broadcast_shapes(*(a.shape[:-2] for a in arrays))
    except ValueError:
        raise ValueError(
            "leading (batch/head) axes must broadcast, got shapes "
            + ", ".join(f"{n} {a.shape}" for a, n in zip(arrays, names, strict=True))
        ) from None
    return (xp, *as_floating(xp, arrays, names))


def resolve_scale(scale, d):
    """The logit scale: ``1/sqrt(d)`` by default (PyTorch SDPA); the papers use ``1/d``."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def fast_length(n):
    """Smallest length ``>= n`` whose real FFT is fast (5-smooth), via ``scipy.fft``."""
    return scipy.fft.next_fast_len(int(n), real=True)


def rfft(x, n, axis, xp):
    """Real FFT of ``x`` zero-padded to length ``n`` along ``axis``.

    NumPy input goes through ``scipy.fft`` (multi-threaded, keeps float32 as complex64);
    every other backend uses its own ``xp.fft``.
    """
    if array_api_compat.is_numpy_namespace(xp):
        return scipy.fft.rfft(x, n=n, axis=axis, workers=_FFT_WORKERS)
    return xp.fft.rfft(x, n=n, axis=axis)


def irfft(x, n, axis, xp):
    """Inverse of :func:`rfft`: real signal of length ``n`` along ``axis``."""
    if array_api_compat.is_numpy_namespace(xp):
        return scipy.fft.irfft(x, n=n, axis=axis, workers=_FFT_WORKERS)
    return xp.fft.irfft(x, n=n, axis=axis)


def sum_to_shape(xp, x, shape):
    """Sum ``x`` over the axes that broadcasting added to an array of ``shape``.

    Gradients of broadcast inputs (a weight shared by every batch element, say) are the sum
    of the per-element gradients.
    """
    extra = x.ndim - len(shape)
    if extra > 0:
        x = xp.sum(x, axis=tuple(range(extra)))
    pairs = enumerate(zip(x.shape, shape, strict=True))
    axes = tuple(i for i, (a, b) in pairs if b == 1 and a != 1)
    if axes:
        x = xp.sum(x, axis=axes, keepdims=True)
    return x


def exclusive_cumsum(xp, x, *, axis, reverse=False):
    """Exclusive running sum along ``axis`` (suffix sum when ``reverse``).

    ``out[t] = Σ_{s<t} x[s]`` (or ``Σ_{s>t} x[s]``).  NumPy's ``cumsum`` along a non-last
    axis runs ~15x slower than a running sum over slices (measured on (1024, 64, 64)
    float32: 50 ms against 3 ms), so NumPy input takes the slice loop; every other backend
    uses ``xp.cumulative_sum``.
    """
    axis = axis % x.ndim
    if reverse:
        x = xp.flip(x, axis=axis)
    if array_api_compat.is_numpy_namespace(xp):
        # One ufunc call per step, written straight into the output (a copy plus an add per
        # step measured 1.4x slower at (1024, 64, 64) float32).
        out = xp.empty_like(x)
        head = (slice(None),) * axis
        out[(*head, 0)] = 0
        for t in range(1, x.shape[axis]):
            xp.add(out[(*head, t - 1)], x[(*head, t - 1)], out=out[(*head, t)])
    else:
        head = [slice(None)] * x.ndim
        head[axis] = slice(0, x.shape[axis] - 1)
        out = xp.cumulative_sum(x[tuple(head)], axis=axis, include_initial=True)
    return xp.flip(out, axis=axis) if reverse else out


@functools.cache
def _thread_pool():
    return ThreadPoolExecutor(max(_THREADS - 1, 1), thread_name_prefix="convbasis")


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


def contiguous(xp, x):
    """``x`` in C order (a copy of a transposed NumPy view); other backends: ``x`` itself.

    NumPy's stacked small matmul runs 1.8x slower with a transposed second operand than
    with a contiguous copy of it (measured: ``(8, 64, 64) @ (8, 64, 64)ᵀ`` float32, one
    core), and the copy costs less than the difference.
    """
    if array_api_compat.is_numpy_namespace(xp):
        return xp.ascontiguousarray(x)
    return x


def _block_edges(count):
    """Chunk boundaries of the pipeline's blocks: about 32 chunks each (measured on 2 cores
    for ``r = p = 64``, chunk 64: 1.7-1.8x the unmasked product, against 1.9-2.0x with 16 and
    1.8x with 64 chunks per block), and at least two blocks per thread when there are enough
    chunks, so that every thread has work."""
    blocks = max(math.ceil(count / 32), min(count, 2 * _THREADS))
    return [count * i // blocks for i in range(blocks + 1)]


def chunk_scan_map(xp, states, func, *arrays, reverse=False):
    """``func(*arrays, seen)`` where ``seen`` is the exclusive running sum of chunk states.

    Every array has shape ``(..., count, chunk, w)``.  ``states(*arrays)`` returns one
    ``r × p`` state per chunk, ``(..., count, r, p)``; ``seen`` has that shape and holds for
    each chunk the sum of the states of the chunks before it (after it, when ``reverse``).
    Both functions act on each chunk independently.

    Other backends make one call of each function on all chunks.  NumPy runs stacked small
    matrix products on one core (each is too small for BLAS's own threads) and would stream
    every state through memory, so for NumPy input the chunks go in blocks, pipelined over
    ``CONVBASIS_NUM_THREADS`` threads (default: the usable cores; the calling thread is one
    of them; BLAS held to one thread per call meanwhile, process-wide): each block is
    finished while its data are in cache, and only the running sum passes from block to
    block.
    """
    count = arrays[0].shape[-3]
    small = sum(math.prod(a.shape) for a in arrays) < _THREADED_MIN_ELEMENTS
    if not array_api_compat.is_numpy_namespace(xp) or count < 2 * _THREADS or small:
        s = states(*arrays)
        return func(*arrays, exclusive_cumsum(xp, s, axis=-3, reverse=reverse))

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
        seen = xp.empty_like(s)
        ready[i].wait()
        if failed.is_set():
            return
        prev = None
        for t in range(hi - lo - 1, -1, -1) if reverse else range(hi - lo):
            if prev is not None:
                xp.add(seen[..., prev, :, :], s[..., prev, :, :], out=seen[..., t, :, :])
            else:
                seen[..., t, :, :] = 0 if carries[i] is None else carries[i]
            prev = t
        carries[i + 1] = seen[..., prev, :, :] + s[..., prev, :, :]
        ready[i + 1].set()
        result = func(*part, seen)
        with lock:
            if out is None:
                out = xp.empty((*result.shape[:-3], count, *result.shape[-2:]), dtype=result.dtype)
        out[..., lo:hi, :, :] = result

    def worker():
        try:
            while not failed.is_set():
                with lock:
                    i = next(taken)
                if i >= blocks:
                    return
                run_block(i)
        except BaseException:
            failed.set()  # release the threads waiting for a running sum this one owed
            for event in ready:
                event.set()
            raise

    with _single_threaded_blas():
        helpers = [_thread_pool().submit(worker) for _ in range(_THREADS - 1)]
        try:
            worker()
        finally:
            # A helper still queued (the pool busy with other calls) is not needed any more:
            # waiting for it could deadlock a call made from inside the pool.
            started = [helper for helper in helpers if not helper.cancel()]
            concurrent.futures.wait(started)
        for helper in started:
            helper.result()  # re-raise a helper's error
    return out
