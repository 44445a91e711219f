"""Array-API plumbing: namespace and device resolution, input validation, FFT helpers.

This is the one module allowed to special-case a backend: each dispatcher below checks
``array_api_compat.is_numpy_namespace(xp)`` and hands NumPy input to the speed paths of
:mod:`convbasis._numpy` (``scipy.fft`` with ``workers``, threaded chunk pipeline, ...);
every other backend runs the generic Array-API code here.  Every algorithm module receives
``xp`` from :func:`namespace` at its public boundary and passes it to private helpers.
"""

from __future__ import annotations

import contextlib
import math
import sys

import array_api_compat
import scipy.fft

from . import _numpy
from ._validation import broadcast_shapes, check_integer, user_stacklevel

__all__ = [
    "as_dtype",
    "as_floating",
    "check_batch",
    "check_integer",
    "check_last_dim",
    "check_rows",
    "chunk_scan_map",
    "contiguous",
    "exclusive_cumsum",
    "fast_length",
    "index_add",
    "irfft",
    "map_chunks",
    "namespace",
    "resolve_scale",
    "rfft",
    "scan_blocks",
    "single_threaded_blas",
    "stacked_matmul",
    "sum_to_shape",
    "upcast_half",
    "user_stacklevel",
    "validate_attention_inputs",
    "validate_qk",
]


def namespace(*arrays):
    """Return the array namespace shared by ``arrays`` (``None`` entries are skipped).

    Raises
    ------
    TypeError
        If the arrays come from different libraries or live on different devices, or if
        any is a Dask array: the algorithms call ``float()``/``bool()`` on reductions and
        loop over Python-level blocks, which Dask would compute eagerly, piece by piece;
        :mod:`convbasis.dask` runs them chunk by chunk instead.  Also if any is a torch
        tensor with ``requires_grad=True`` while torch's grad mode is on: autograd would
        record the library's internal operations, to which every value read back into a
        Python number (a polynomial's radius, a recovered basis) is a constant, so
        ``backward()`` could silently give wrong gradients; :mod:`convbasis.torch` wraps the
        library's own gradients instead.
    """
    present = [a for a in arrays if a is not None]
    if any(array_api_compat.is_dask_array(a) for a in present):
        raise TypeError(
            "convbasis functions do not take dask arrays: use convbasis.dask.attention or "
            "convbasis.dask.attention_gradients (every method, one call per batch/head chunk)"
        )
    _refuse_torch_autograd(present)
    try:
        xp = array_api_compat.array_namespace(*present)
    except TypeError as exc:
        raise TypeError(f"all arrays must come from one array library: {exc}") from None
    # A JAX tracer (under jit, grad or vmap) has no device: it cannot disagree with the others.
    devices = {str(d) for d in map(array_api_compat.device, present) if d is not None}
    if len(devices) > 1:
        raise TypeError(f"all arrays must live on one device, got {sorted(devices)}")
    return xp


def _refuse_torch_autograd(arrays):
    """``TypeError`` for a torch tensor that autograd would track through the library.

    Every function refuses, the dense oracles too (autograd through them would be right):
    one rule is simpler to follow than a list of exceptions.  torch is only looked up, never
    imported: a tensor exists only once torch is.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.is_grad_enabled():
        return
    if any(
        array_api_compat.is_torch_array(a) and getattr(a, "requires_grad", False) for a in arrays
    ):
        raise TypeError(
            "convbasis functions do not support torch autograd: a tensor has requires_grad=True "
            "and backward() through the library's internal operations can give wrong "
            "gradients. For gradients use convbasis.torch.attention(q, k, v, method=...), "
            "whose backward is the library's own gradient; for values only pass "
            "tensor.detach() or call under torch.no_grad(). Every convbasis function, the "
            "dense reference included, refuses such tensors."
        )


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


def as_dtype(xp, x, dtype):
    """``x`` in ``dtype``, without a copy when it already is."""
    return x if x.dtype == dtype else xp.astype(x, dtype)


def upcast_half(xp, *arrays):
    """``arrays`` with float16/bfloat16 ones in float32 (float32 and float64 pass through).

    For the FFT paths: torch's CPU FFT has no half-precision kernel, and a conv basis's
    normaliser (a sum of up to ``n`` weights) overflows float16 from ``n = 2^16``.
    """
    return tuple(
        a if a.dtype in (xp.float32, xp.float64) else xp.astype(a, xp.float32) for a in arrays
    )


def check_rows(x, name, *, min_ndim=2):
    """Require ``x.ndim >= min_ndim`` and a non-empty sequence axis ``x.shape[-2]``."""
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions (..., n, d), "
            f"got shape {tuple(x.shape)}"
        )
    if x.shape[-2] == 0:
        raise ValueError(f"{name} must have a non-empty sequence axis (n >= 1), got {x.shape}")


def check_last_dim(x, name, expected, what):
    """Require ``x.shape[-1] == expected``; the message says what the axis must match."""
    if x.shape[-1] != expected:
        raise ValueError(
            f"{name} must have last dimension {expected} ({what}), got shape {tuple(x.shape)}"
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
        raise ValueError(
            f"v must have as many rows as k ({k.shape[-2]}), got shape {tuple(v.shape)}"
        )
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            "causal attention needs as many queries as keys, got "
            f"q shape {tuple(q.shape)} and k shape {tuple(k.shape)}"
        )
    check_batch(xp, arrays, names)
    return (xp, *as_floating(xp, arrays, names))


def check_batch(xp, arrays, names):
    """Require the leading (batch/head) axes of ``(..., n, ·)`` arrays to broadcast."""
    try:
        broadcast_shapes(*(tuple(a.shape[:-2]) for a in arrays))
    except ValueError:
        raise ValueError(
            "leading (batch/head) axes must broadcast, got shapes "
            + ", ".join(f"{n} {tuple(a.shape)}" for a, n in zip(arrays, names, strict=True))
        ) from None


def validate_qk(q, k, *, causal, same_length=None):
    """Validate queries ``q (..., n, d)`` and keys ``k (..., m, d)``; return ``(xp, q, k)``.

    ``causal`` needs ``n == m``; so does ``same_length``, a phrase naming the method that
    needs it in both directions (``"the k-conv basis"``).
    """
    xp, q, k, _ = validate_attention_inputs(q, k, k, causal=causal and same_length is None)
    if same_length is not None and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"{same_length} needs as many queries as keys, got "
            f"q shape {tuple(q.shape)} and k shape {tuple(k.shape)}"
        )
    return xp, q, k


def resolve_scale(scale, d):
    """The logit scale: ``1/sqrt(d)`` by default (PyTorch SDPA); the papers use ``1/d``."""
    if scale is None:
        if d == 0:
            raise ValueError(
                "the head dimension is d = 0, so the default scale 1/sqrt(d) is undefined: "
                "pass scale= or inputs with d >= 1"
            )
        return 1.0 / math.sqrt(d)
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a real number or None, got {scale!r}") from None
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
        return _numpy.rfft(x, n, axis)
    return xp.fft.rfft(x, n=n, axis=axis)


def irfft(x, n, axis, xp):
    """Inverse of :func:`rfft`: real signal of length ``n`` along ``axis``."""
    if array_api_compat.is_numpy_namespace(xp):
        return _numpy.irfft(x, n, axis)
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
    float32: 50 ms against 3 ms), so NumPy input takes the slice loop
    (:func:`convbasis._numpy.exclusive_cumsum`); every other backend uses
    ``xp.cumulative_sum``.
    """
    axis = axis % x.ndim
    if reverse:
        x = xp.flip(x, axis=axis)
    if array_api_compat.is_numpy_namespace(xp):
        out = _numpy.exclusive_cumsum(x, axis=axis)
    else:
        head = [slice(None)] * x.ndim
        head[axis] = slice(0, x.shape[axis] - 1)
        out = xp.cumulative_sum(x[tuple(head)], axis=axis, include_initial=True)
    return xp.flip(out, axis=axis) if reverse else out


def contiguous(xp, x):
    """``x`` in C order (a copy of a transposed NumPy view); other backends: ``x`` itself.

    NumPy's stacked small matmul runs 1.8x slower with a transposed second operand than
    with a contiguous copy of it (measured in :func:`convbasis._numpy.contiguous`).
    """
    if array_api_compat.is_numpy_namespace(xp):
        return _numpy.contiguous(x)
    return x


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
    block (:func:`convbasis._numpy.chunk_scan_map`; small inputs, and those with fewer than
    two chunks per thread, take the one-call path).
    """
    if array_api_compat.is_numpy_namespace(xp) and _numpy.pipelined(arrays):
        return _numpy.chunk_scan_map(states, func, *arrays, reverse=reverse)
    s = states(*arrays)
    return func(*arrays, exclusive_cumsum(xp, s, axis=-3, reverse=reverse))


def scan_blocks(xp, count, state, finish):
    """``[finish(i, seen_i) for i in range(count)]`` and ``Σ_i state(i)``.

    ``seen_i = Σ_{j<i} state(j)`` is ``None`` while no state has been added; ``state`` may
    return ``None`` (no contribution), and either function may be ``None`` (no states: a map
    over blocks; no outputs: a sum).  Other backends run the blocks in order; NumPy input
    pipelines them over threads with BLAS held to one thread
    (:func:`convbasis._numpy.scan_blocks`).
    """
    if array_api_compat.is_numpy_namespace(xp) and count > 1:
        return _numpy.scan_blocks(count, state, finish)
    seen, out = None, []
    for i in range(count):
        s = None if state is None else state(i)
        out.append(None if finish is None else finish(i, seen))
        seen = seen if s is None else s if seen is None else seen + s
    return out, seen


# Entries of the one-hot mask times the values per chunk of the generic index_add.
_ONE_HOT_CHUNK = 1 << 22


def index_add(xp, index, values, count):
    """``out (count, ...)`` with ``out[index[i]] += values[i]``: a scatter-add along axis 0.

    The Array API has no scatter, so each library's own is used (NumPy: a sparse 0/1 matrix
    product, :func:`convbasis._numpy.index_add`; torch ``index_add``; JAX ``.at[].add``; CuPy
    ``scatter_add``); any other library gets chunked sums over a one-hot mask, exact but
    ``O(count · len(index))`` (a mask, not a product, so a NaN reaches its own row only).

    Parameters
    ----------
    index : int array ``(P,)`` with entries in ``[0, count)``
    values : array ``(P, ...)``
    count : int
    """
    shape = (count, *values.shape[1:])
    if array_api_compat.is_numpy_namespace(xp):
        return _numpy.index_add(index, values, count)
    if array_api_compat.is_torch_namespace(xp):
        out = xp.zeros(shape, dtype=values.dtype, device=array_api_compat.device(values))
        return out.index_add(0, index, values)
    if array_api_compat.is_jax_namespace(xp):
        out = xp.zeros(shape, dtype=values.dtype, device=array_api_compat.device(values))
        return out.at[index].add(values)
    if array_api_compat.is_cupy_namespace(xp):
        import cupyx  # present wherever CuPy is

        out = xp.zeros(shape, dtype=values.dtype, device=array_api_compat.device(values))
        cupyx.scatter_add(out, index, values)
        return out
    dev = array_api_compat.device(values)
    flat = xp.reshape(values, (values.shape[0], math.prod(values.shape[1:])))
    out = xp.zeros((count, flat.shape[1]), dtype=values.dtype, device=dev)
    rows = xp.arange(count, device=dev)[:, None]
    zero = xp.zeros((), dtype=values.dtype, device=dev)
    step = max(1, _ONE_HOT_CHUNK // max(count * flat.shape[1], 1))
    for lo in range(0, flat.shape[0], step):
        hi = min(lo + step, flat.shape[0])
        hit = (rows == index[None, lo:hi])[..., None]  # (count, chunk, 1)
        out = out + xp.sum(xp.where(hit, flat[None, lo:hi, :], zero), axis=1)
    return xp.reshape(out, shape)


def map_chunks(xp, func, ranges):
    """``[func(lo, hi) for lo, hi in ranges]``; for NumPy the ranges run on a thread pool with
    BLAS held to one thread (:func:`convbasis._numpy.map_chunks`), where many small stacked
    products gain from threads over chunks and lose from BLAS's own."""
    ranges = list(ranges)
    if array_api_compat.is_numpy_namespace(xp):
        return _numpy.map_chunks(func, ranges)
    return [func(lo, hi) for lo, hi in ranges]


def stacked_matmul(xp, a, b):
    """``a @ b`` for stacks of small matrices, ``(..., G, r, c) @ (..., G, c, t)``.

    NumPy splits the stack axis over threads with BLAS held to one thread
    (:func:`convbasis._numpy.stacked_matmul`): BLAS's own threads on each small product only
    contend on a busy machine.  Other libraries: ``a @ b``.
    """
    if array_api_compat.is_numpy_namespace(xp) and max(a.ndim, b.ndim) >= 3:
        return _numpy.stacked_matmul(a, b)
    return a @ b


def single_threaded_blas(xp):
    """A context holding NumPy's BLAS to one thread (a no-op for other libraries): for code of
    many small stacked products, which BLAS's threads slow down."""
    if array_api_compat.is_numpy_namespace(xp):
        return _numpy._single_threaded_blas()
    return contextlib.nullcontext()
