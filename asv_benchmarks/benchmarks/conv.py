"""The k-conv basis (docs/math.rst §4) against the blocked dense reference on the same inputs.

Target (conv-basis issue): causal ``conv_attention`` at n = 131072, d = 64, rank 16, float32,
NumPy, on an exact instance (``rotary_conv_instance`` with 16 equal segments):

* at least 50x faster than ``reference.attention(q, k, v, causal=True, block=DENSE_BLOCK)``;
* time growth ``n^1.2`` or better from 2^12 to 2^17;
* at most 25% of the time outside the FFTs (``rfft``/``irfft`` of ``convbasis._array``);
* peak memory at most 30x the bytes of ``q, k, v``.

Three groups, each compared with a dense computation on the same inputs: the FFT products
``H Z`` / ``Hᵀ Z`` (against a blocked dense product with rows of ``H`` gathered from the
basis), the recovery from ``Q, K`` (against ``decompose_conv_basis`` of the dense logits), and
causal attention (against the blocked dense reference).  Dense work above ``DENSE_MAX_N`` is
timed on the leading ``DENSE_MAX_N`` rows and scaled by ``(n / DENSE_MAX_N)^2`` (said in the
track's name).  ``python -m benchmarks.conv`` from ``asv_benchmarks/`` runs :func:`measure`.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from unittest import mock

import numpy as np
from array_api_compat import array_namespace as namespace_of

from convbasis.conv import _fft as conv_fft
from convbasis.conv import conv_attention, decompose_conv_basis, recover_conv_basis
from convbasis.reference import attention
from convbasis.testing import rotary_conv_instance

from .common import BACKENDS, best_time, exact_last_rows, namespace, traced_peak, uniform

D = 64
RANK = 16
SEGMENTS = 16
DENSE_BLOCK = 1024
DENSE_MAX_N = 32768
DECOMPOSE_MAX_N = 4096
STRICT_MAX_N = 2**12
SIZES = [2**12, 2**14, 2**17]


def instance(xp, n, dtype="float32", seed=0):
    """Exact 16-segment rotary instance (docs/math.rst §4): ``q, k, v`` in ``xp`` and the starts."""
    starts = tuple(n * i // SEGMENTS for i in range(SEGMENTS))
    q, k, v, starts = rotary_conv_instance(np.random.default_rng(seed), n, D, starts, dtype=dtype)
    return xp.asarray(q), xp.asarray(k), xp.asarray(v), starts


def fast_attention(q, k, v):
    return conv_attention(q, k, v, rank=RANK, causal=True)


def dense_attention(q, k, v):
    return attention(q, k, v, causal=True, block=DENSE_BLOCK)


def input_bytes(*arrays):
    """Bytes of floating ``arrays`` in any namespace."""
    return sum(math.prod(a.shape) * namespace_of(a).finfo(a.dtype).bits // 8 for a in arrays)


def time_in_ffts(func):
    """``(total, fft)`` seconds of one ``func()`` call; ``fft`` is the time spent inside the
    FFT helpers ``convbasis._array.rfft`` / ``irfft`` as called from ``convbasis.conv._fft``
    (padding and the transforms themselves; everything else is glue)."""
    spent = [0.0]

    def timed(f):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    with (
        mock.patch.object(conv_fft, "rfft", timed(conv_fft.rfft)),
        mock.patch.object(conv_fft, "irfft", timed(conv_fft.irfft)),
    ):
        start = time.perf_counter()
        func()
        total = time.perf_counter() - start
    return total, spent[0]


def outside_fft_fraction(func, repeat=5):
    """Fraction of ``func``'s time outside the FFTs over ``repeat`` runs.

    Each part is taken at its fastest run (the least disturbed by other processes on a
    shared machine): ``glue / (glue + fft)`` with ``glue = min(total - fft)``, ``fft = min(fft)``.
    """
    runs = [time_in_ffts(func) for _ in range(repeat)]
    glue = min(total - fft for total, fft in runs)
    return glue / (glue + min(fft for _, fft in runs))


# ----------------------------------------------------------------------------------------
# FFT products with a basis
# ----------------------------------------------------------------------------------------


def _segment_of_columns(xp, starts, n):
    j = xp.arange(n)
    return xp.sum(xp.astype(j[:, None] >= xp.asarray(starts)[None, :], xp.int64), axis=1) - 1


def _dense_block(xp, basis, seg, rows, cols):
    """``H[rows[0]:rows[1], cols[0]:cols[1]]`` gathered from the cumulative vectors."""
    n = basis.n
    r = xp.arange(*rows)[:, None]
    j = xp.arange(*cols)[None, :]
    t = r - j
    zero = xp.zeros_like(t)
    index = xp.take(seg, j[0, :])[None, :] * n + xp.where(t >= 0, t, zero)
    flat = xp.reshape(basis.vectors, (-1,))
    h = xp.reshape(xp.take(flat, xp.reshape(index, (-1,))), t.shape)
    return xp.where(t >= 0, h, xp.zeros_like(h))


def dense_matmul(xp, basis, seg, z, block=DENSE_BLOCK):
    """Blocked dense ``H Z``: row block ``[lo, hi)`` needs columns ``[0, hi)`` only."""
    n = basis.n
    pieces = []
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        pieces.append(_dense_block(xp, basis, seg, (lo, hi), (0, hi)) @ z[:hi, :])
    return xp.concat(pieces, axis=0)


def dense_rmatmul(xp, basis, seg, z, block=DENSE_BLOCK):
    """Blocked dense ``Hᵀ Z``: column block ``[lo, hi)`` of ``H`` needs rows ``[lo, n)``."""
    n = basis.n
    pieces = []
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        h = _dense_block(xp, basis, seg, (lo, n), (lo, hi))
        pieces.append(xp.matrix_transpose(h) @ z[lo:, :])
    return xp.concat(pieces, axis=0)


def _max_abs_diff(a, b):
    a, b = (np.asarray(x, dtype=np.float64) for x in (a, b))
    return float(np.max(np.abs(a - b)))


class ConvProducts:
    """``H Z`` and ``Hᵀ Z`` by FFT, ``H`` the exponentiated 16-segment logit basis of the
    instance (entries in (0, 1]), ``Z (n, 65)``; spectra computed in ``setup`` (they are
    cached per basis).  The dense product runs on the leading ``min(n, DENSE_MAX_N)`` rows."""

    params = (BACKENDS, SIZES)
    param_names = ["backend", "n"]
    timeout = 900

    def setup(self, backend, n):
        self.xp = xp = namespace(backend)
        if backend == "array_api_strict" and n > STRICT_MAX_N:
            raise NotImplementedError("array_api_strict is for correctness, not large n")
        q, k, _, _ = instance(xp, n)
        self.basis = recover_conv_basis(q, k, rank=RANK).exp()
        self.basis.spectra  # noqa: B018 -- warm the per-basis spectrum cache
        self.z = xp.asarray(uniform((n, D + 1), seed=4))
        m = min(n, DENSE_MAX_N)
        self.small = recover_conv_basis(q[:m, :], k[:m, :], rank=RANK).exp()
        self.small.spectra  # noqa: B018
        self.seg = _segment_of_columns(xp, self.small.starts, m)

    def time_matmul(self, backend, n):
        self.basis.matmul(self.z)

    def time_rmatmul(self, backend, n):
        self.basis.rmatmul(self.z)

    def peakmem_matmul(self, backend, n):
        self.basis.matmul(self.z)

    def track_matmul_max_error_vs_dense(self, backend, n):
        """Max |FFT − dense| of ``H Z`` on the leading min(n, 32768) rows (float32 both)."""
        z = self.z[: self.small.n, :]
        return _max_abs_diff(self.small.matmul(z), dense_matmul(self.xp, self.small, self.seg, z))

    track_matmul_max_error_vs_dense.unit = "absolute error"

    def track_rmatmul_max_error_vs_dense(self, backend, n):
        """Max |FFT − dense| of ``Hᵀ Z`` on the leading min(n, 32768) rows (float32 both)."""
        z = self.z[: self.small.n, :]
        out = self.small.rmatmul(z)
        return _max_abs_diff(out, dense_rmatmul(self.xp, self.small, self.seg, z))

    track_rmatmul_max_error_vs_dense.unit = "absolute error"

    def track_matmul_speedup_vs_dense_scaled(self, backend, n):
        """Dense ``H Z`` time (at min(n, 32768), scaled by n^2) over FFT time, one run."""
        fast = best_time(lambda: self.basis.matmul(self.z), repeat=3)
        z = self.z[: self.small.n, :]
        dense = best_time(lambda: dense_matmul(self.xp, self.small, self.seg, z), repeat=1)
        return dense * (n / self.small.n) ** 2 / fast

    track_matmul_speedup_vs_dense_scaled.unit = "x"

    def track_rmatmul_speedup_vs_dense_scaled(self, backend, n):
        """Dense ``Hᵀ Z`` time (at min(n, 32768), scaled by n^2) over FFT time, one run."""
        fast = best_time(lambda: self.basis.rmatmul(self.z), repeat=3)
        z = self.z[: self.small.n, :]
        dense = best_time(lambda: dense_rmatmul(self.xp, self.small, self.seg, z), repeat=1)
        return dense * (n / self.small.n) ** 2 / fast

    track_rmatmul_speedup_vs_dense_scaled.unit = "x"


# ----------------------------------------------------------------------------------------
# Recovery from Q, K
# ----------------------------------------------------------------------------------------


class RecoverConvBasis:
    """``recover_conv_basis(q, k, rank=16)`` (binary search, docs/math.rst §4) against
    ``decompose_conv_basis`` of the dense causal logits (``O(n²)``, only up to
    ``DECOMPOSE_MAX_N``)."""

    params = (BACKENDS, SIZES)
    param_names = ["backend", "n"]
    timeout = 900

    def setup(self, backend, n):
        self.xp = xp = namespace(backend)
        if backend == "array_api_strict" and n > STRICT_MAX_N:
            raise NotImplementedError("array_api_strict is for correctness, not large n")
        self.q, self.k, _, self.starts = instance(xp, n)

    def _recover(self):
        return recover_conv_basis(self.q, self.k, rank=RANK)

    def _decompose(self, m):
        xp = self.xp
        q, k = self.q[:m, :], self.k[:m, :]
        i = xp.arange(m)
        logits = (q @ xp.matrix_transpose(k)) / math.sqrt(D)
        lower = xp.where(i[:, None] >= i[None, :], logits, xp.zeros_like(logits))
        return decompose_conv_basis(lower)

    def time_recover(self, backend, n):
        self._recover()

    def peakmem_recover(self, backend, n):
        self._recover()

    def track_starts_exact(self, backend, n):
        """1 if the recovered starts are the instance's 16 segment starts, else 0."""
        return float(self._recover().starts == tuple(self.starts))

    track_starts_exact.unit = "bool"

    def track_max_error_vs_float64(self, backend, n):
        """Max |c_i − s Q[σ_i:] K[σ_i]ᵀ| against the float64 logit columns at the starts."""
        basis = self._recover()
        q, k = (np.asarray(a, dtype=np.float64) for a in (self.q, self.k))
        vectors = np.asarray(basis.vectors, dtype=np.float64)
        err = 0.0
        for i, s in enumerate(basis.starts):
            column = q[s:] @ k[s] / math.sqrt(D)
            err = max(err, float(np.max(np.abs(vectors[i, : n - s] - column))))
        return err

    track_max_error_vs_float64.unit = "absolute error"

    def track_speedup_vs_decompose_scaled(self, backend, n):
        """``decompose_conv_basis`` of the dense logits (at min(n, 4096), scaled by n^2) over
        recovery."""
        fast = best_time(self._recover, repeat=3)
        m = min(n, DECOMPOSE_MAX_N)
        dense = best_time(lambda: self._decompose(m), repeat=1)
        return dense * (n / m) ** 2 / fast

    track_speedup_vs_decompose_scaled.unit = "x"


# ----------------------------------------------------------------------------------------
# Causal attention
# ----------------------------------------------------------------------------------------


class CausalConvAttention:
    """Causal ``conv_attention`` (rank 16, d = 64, float32) on the exact rotary instance."""

    params = (BACKENDS, SIZES)
    param_names = ["backend", "n"]
    timeout = 900

    def setup(self, backend, n):
        self.xp = namespace(backend)
        if backend == "array_api_strict" and n > STRICT_MAX_N:
            raise NotImplementedError("array_api_strict is for correctness, not large n")
        self.q, self.k, self.v, _ = instance(self.xp, n)

    def _fast(self):
        return fast_attention(self.q, self.k, self.v)

    def time_conv_attention(self, backend, n):
        self._fast()

    def peakmem_conv_attention(self, backend, n):
        self._fast()

    def track_traced_peak_over_inputs(self, backend, n):
        """Peak bytes allocated during one call (tracemalloc) over the bytes of q, k, v."""
        return traced_peak(self._fast) / input_bytes(self.q, self.k, self.v)

    track_traced_peak_over_inputs.unit = "x inputs"

    def track_fraction_outside_ffts(self, backend, n):
        """Share of the time spent outside ``rfft``/``irfft`` (5 runs, see the helper)."""
        return outside_fft_fraction(self._fast)

    track_fraction_outside_ffts.unit = "fraction"

    def track_max_error_last_rows(self, backend, n):
        """Max |conv − exact| over the last 256 rows, exact in float64."""
        out = np.asarray(self._fast())[-256:]
        return _max_abs_diff(out, exact_last_rows(self.q, self.k, self.v, rows=256))

    track_max_error_last_rows.unit = "absolute error"

    def track_speedup_vs_dense_scaled(self, backend, n):
        """Dense time (at min(n, 32768), scaled by n^2) over conv time, one run."""
        fast = best_time(self._fast, repeat=3)
        m = min(n, DENSE_MAX_N)
        q, k, v = (a[:m, :] for a in (self.q, self.k, self.v))
        dense = best_time(lambda: dense_attention(q, k, v), repeat=1) * (n / m) ** 2
        return dense / fast

    track_speedup_vs_dense_scaled.unit = "x"


class CausalConvAttentionVsDense:
    """Both paths in full on the same inputs, up to n = 32768 (dense ~10 s there)."""

    params = (BACKENDS, [2**12, 2**15])
    param_names = ["backend", "n"]
    timeout = 900

    def setup(self, backend, n):
        self.xp = namespace(backend)
        if backend == "array_api_strict" and n > STRICT_MAX_N:
            raise NotImplementedError("array_api_strict is for correctness, not large n")
        self.q, self.k, self.v, _ = instance(self.xp, n)

    def time_dense_reference(self, backend, n):
        dense_attention(self.q, self.k, self.v)

    def track_max_error_vs_dense(self, backend, n):
        """Max |conv − dense reference| over all rows (float32 both)."""
        args = (self.q, self.k, self.v)
        return _max_abs_diff(fast_attention(*args), dense_attention(*args))

    track_max_error_vs_dense.unit = "absolute error"

    def track_dense_reference_error_vs_float64(self, backend, n):
        """The dense reference's own error on the last 256 rows (float64 golden), for scale."""
        out = np.asarray(dense_attention(self.q, self.k, self.v))[-256:]
        return _max_abs_diff(out, exact_last_rows(self.q, self.k, self.v, rows=256))

    track_dense_reference_error_vs_float64.unit = "absolute error"

    def track_speedup_vs_dense(self, backend, n):
        """Dense time over conv time, both measured in full in one run."""
        args = (self.q, self.k, self.v)
        fast = best_time(lambda: fast_attention(*args), repeat=3)
        return best_time(lambda: dense_attention(*args), repeat=1) / fast

    track_speedup_vs_dense.unit = "x"


# ----------------------------------------------------------------------------------------
# The target, measured in one run
# ----------------------------------------------------------------------------------------

_PEAK_SCRIPT = """
import sys
import numpy as np
from convbasis.conv import conv_attention

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

q, k, v = (np.load(path) for path in sys.argv[1:4])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark VmHWM to the current resident set
before = status("VmRSS:")
conv_attention(q, k, v, rank=int(sys.argv[4]), causal=True)
print(before, status("VmHWM:"))
"""


def fresh_process_peak(q, k, v):
    """Growth of the peak resident set (bytes) while a fresh process runs one call (Linux).

    The inputs are loaded from ``.npy`` files and the high-water mark is reset first, so the
    growth is what the call itself adds on top of the inputs and the imported libraries.
    """
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for name, a in zip("qkv", (q, k, v), strict=True):
            paths.append(os.path.join(folder, f"{name}.npy"))
            np.save(paths[-1], np.asarray(a))
        result = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, *paths, str(RANK)],
            capture_output=True,
            text=True,
            check=True,
        )
    before, after = (int(x) for x in result.stdout.split())
    return after - before


def measure(sizes=(2**12, 2**13, 2**14, 2**15, 2**16, 2**17), repeat=3, dense_full=True):
    """The target measurement (NumPy, float32, causal), printed as it goes; returns a dict.

    For each ``n``: best-of-``repeat`` conv time, the fraction outside the FFTs (fastest of
    ``repeat`` timed runs), the tracemalloc peak and the fresh-process peak-RSS growth over
    the input bytes.  At the largest ``n``: the dense reference timed once on the same inputs
    (at ``DENSE_MAX_N`` and scaled by ``n^2`` unless ``dense_full``), the speed-up, and the
    max error against the dense reference and against float64 on the last 256 rows.
    """
    rows = []
    for n in sizes:
        q, k, v, _ = instance(np, n)
        fast = best_time(lambda q=q, k=k, v=v: fast_attention(q, k, v), repeat=repeat)
        outside = outside_fft_fraction(lambda q=q, k=k, v=v: fast_attention(q, k, v))
        traced = traced_peak(lambda q=q, k=k, v=v: fast_attention(q, k, v))
        rss = fresh_process_peak(q, k, v)
        size = input_bytes(q, k, v)
        rows.append(
            {
                "n": n,
                "conv_s": fast,
                "outside_fft": outside,
                "traced_peak_over_inputs": traced / size,
                "rss_growth_over_inputs": rss / size,
            }
        )
        print(
            f"n={n:7d}  conv {fast:8.4f} s  outside FFTs {outside:6.1%}  "
            f"traced peak {traced / size:5.2f}x inputs  fresh-process RSS growth "
            f"{rss / 2**20:7.1f} MiB = {rss / size:5.2f}x inputs ({size / 2**20:.1f} MiB)",
            flush=True,
        )
    logs = np.log([r["n"] for r in rows]), np.log([r["conv_s"] for r in rows])
    slope = float(np.polyfit(*logs, 1)[0])
    endpoints = float((logs[1][-1] - logs[1][0]) / (logs[0][-1] - logs[0][0]))
    print(f"log-log slope {slope:.3f} (least squares), {endpoints:.3f} (end points)")
    n = sizes[-1]
    q, k, v, _ = instance(np, n)
    m = n if dense_full else min(n, DENSE_MAX_N)
    out = fast_attention(q, k, v)
    start = time.perf_counter()
    dense_out = dense_attention(q[:m], k[:m], v[:m])
    dense = (time.perf_counter() - start) * (n / m) ** 2
    note = "measured in full" if m == n else f"measured at n={m}, scaled by (n/{m})^2"
    fast = best_time(lambda: fast_attention(q, k, v), repeat=repeat)
    error = _max_abs_diff(out[:m], dense_out)
    golden = exact_last_rows(q, k, v, rows=256)
    conv_error = _max_abs_diff(out[-256:], golden)
    dense_error = _max_abs_diff(dense_out[-256:], golden) if m == n else float("nan")
    print(f"dense (block={DENSE_BLOCK}) at n={n}: {dense:.1f} s ({note}); conv {fast:.3f} s")
    print(f"speed-up at n={n}: {dense / fast:.1f}x")
    print(f"max |conv - dense| over rows :{m}: {error:.3e}")
    print(
        f"max error vs float64 over the last 256 rows: conv {conv_error:.3e}, "
        f"dense {dense_error:.3e}"
    )
    return {
        "sizes": rows,
        "slope": slope,
        "slope_end_points": endpoints,
        "dense_s": dense,
        "dense_note": note,
        "conv_s": fast,
        "speedup": dense / fast,
        "max_error_vs_dense": error,
        "max_error_vs_float64_last_rows": conv_error,
        "dense_error_vs_float64_last_rows": dense_error,
    }


if __name__ == "__main__":
    measure(dense_full="--dense-scaled" not in sys.argv)
