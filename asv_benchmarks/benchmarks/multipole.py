"""Fast Multipole Attention against blocked dense attention on the same inputs (docs/math.rst §6).

Target (issue): causal, n = 131072, d = 64, block 64, basis 4, float32, NumPy: FMA at least
20x faster than ``convbasis.reference.attention(..., block=DENSE_BLOCK)``; time growth
``n^1.2`` or better from 2^12 to 2^17; peak memory ``O(n d)``.

Dense attention at n = 131072 takes about a minute here, so the ratio times dense at
``min(n, DENSE_MAX_N)`` and scales by ``(n / n_dense)^2`` (said in the track's name).
Run ``python -m benchmarks.multipole`` from ``asv_benchmarks/`` for the standalone table.
"""

from __future__ import annotations

import math

import numpy as np

from convbasis.multipole import multipole_attention
from convbasis.reference import attention

from .common import BACKENDS, best_time, exact_last_rows, namespace, traced_peak, uniform

D = 64
BLOCK = 64
BASIS = 4
DENSE_BLOCK = 512
DENSE_MAX_N = 32768
STRICT_MAX_N = 2**14


def _inputs(xp, n, dtype="float32"):
    return [xp.asarray(uniform((n, D), dtype=dtype, seed=s)) for s in range(3)]


def _fast(q, k, v, causal=True):
    return multipole_attention(q, k, v, block=BLOCK, basis=BASIS, causal=causal)


def _dense(q, k, v, causal=True):
    return attention(q, k, v, causal=causal, block=DENSE_BLOCK)


class MultipoleAttention:
    """Causal FMA (block 64, basis 4, d = 64, float32) against blocked dense attention."""

    params = (BACKENDS, [2**12, 2**14, 2**17])
    param_names = ["backend", "n"]
    timeout = 900

    def setup(self, backend, n):
        self.xp = namespace(backend)
        if backend == "array_api_strict" and n > STRICT_MAX_N:
            raise NotImplementedError("array_api_strict is for correctness, not large n")
        self.q, self.k, self.v = _inputs(self.xp, n)

    def time_multipole(self, backend, n):
        _fast(self.q, self.k, self.v)

    def peakmem_multipole(self, backend, n):
        _fast(self.q, self.k, self.v)

    def track_traced_peak_mib(self, backend, n):
        """Peak bytes allocated during FMA (inputs excluded), MiB."""
        return traced_peak(lambda: _fast(self.q, self.k, self.v)) / 2**20

    track_traced_peak_mib.unit = "MiB"

    def track_traced_peak_over_nd(self, backend, n):
        """Peak allocation during FMA over the size of one (n, d) float32 array."""
        return traced_peak(lambda: _fast(self.q, self.k, self.v)) / (4 * n * D)

    track_traced_peak_over_nd.unit = "x n d float32"

    def track_speedup_vs_dense_scaled(self, backend, n):
        """Dense time (measured at min(n, 32768), scaled by n^2) over FMA time, one run."""
        fast = best_time(lambda: _fast(self.q, self.k, self.v), repeat=3)
        m = min(n, DENSE_MAX_N)
        q, k, v = (a[:m, :] for a in (self.q, self.k, self.v))
        dense = best_time(lambda: _dense(q, k, v), repeat=1) * (n / m) ** 2
        return dense / fast

    track_speedup_vs_dense_scaled.unit = "x"

    def track_max_error_vs_exact(self, backend, n):
        """Max |FMA − exact| over the last 64 query rows (the ones with the most far field)."""
        out = np.asarray(_fast(self.q, self.k, self.v))[-64:]
        exact = exact_last_rows(*(np.asarray(a) for a in (self.q, self.k, self.v)))
        return float(np.max(np.abs(out - exact)))

    track_max_error_vs_exact.unit = "abs"


class DenseReference:
    """The blocked dense reference on the same inputs (skipped above 32768: ~1 min)."""

    params = (BACKENDS, [2**12, 2**14, 2**15])
    param_names = ["backend", "n"]
    timeout = 900

    def setup(self, backend, n):
        self.xp = namespace(backend)
        if backend == "array_api_strict" and n > 2**12:
            raise NotImplementedError("array_api_strict is for correctness, not large n")
        self.q, self.k, self.v = _inputs(self.xp, n)

    def time_dense(self, backend, n):
        _dense(self.q, self.k, self.v)


def main(sizes=(2**12, 2**13, 2**14, 2**15, 2**16, 2**17), dense_full=False):
    """Standalone measurement of the issue's target (NumPy, float32, causal)."""
    rows = []
    for n in sizes:
        q, k, v = _inputs(np, n)
        fast = best_time(lambda q=q, k=k, v=v: _fast(q, k, v), repeat=3)
        peak = traced_peak(lambda q=q, k=k, v=v: _fast(q, k, v))
        rows.append((n, fast, peak))
        print(
            f"n={n:7d}  fma {fast:8.4f} s  traced peak {peak / 2**20:8.1f} MiB "
            f"({peak / (4 * n * D):.1f} x n d float32)",
            flush=True,
        )
    (n0, t0, _), (n1, t1, _) = rows[0], rows[-1]
    print(f"growth exponent {math.log(t1 / t0) / math.log(n1 / n0):.3f} from n={n0} to n={n1}")
    n = sizes[-1]
    q, k, v = _inputs(np, n)
    m = n if dense_full else min(n, DENSE_MAX_N)
    dense = best_time(lambda: _dense(q[:m], k[:m], v[:m]), repeat=1)
    scaled = dense * (n / m) ** 2
    note = "measured" if m == n else f"measured at n={m}, scaled by (n/{m})^2"
    print(f"dense (block={DENSE_BLOCK}) {dense:.2f} s at n={m}; at n={n}: {scaled:.1f} s ({note})")
    print(f"speedup at n={n}: {scaled / rows[-1][1]:.1f}x")
    err = np.max(np.abs(np.asarray(_fast(q, k, v))[-64:] - exact_last_rows(q, k, v)))
    print(f"max |FMA - exact| over the last 64 rows at n={n}: {err:.3e}")


if __name__ == "__main__":
    import sys

    main(dense_full="--dense-full" in sys.argv)
