"""Polynomial low-rank attention against the blocked dense reference (docs/math.rst §2).

Inputs as in the issue's target: entries of Q, K, V uniform in [-1, 1], scale 1/d, so every
logit lies in [-R, R] with R <= 1.  Each class times the fast path and the dense reference
on the same inputs; ``track_speedup`` takes the ratio in one run.
"""

from __future__ import annotations

import numpy as np

from convbasis import degree_for, lowrank_attention, rank_for
from convbasis.reference import attention

from .common import BACKENDS, best_time, namespace, traced_peak, uniform

DENSE_BLOCK = 1024


class _PolynomialAttention:
    causal = True
    params = (BACKENDS, [4096, 65536], [8], [1e-3])
    param_names = ["backend", "n", "d", "eps"]
    timeout = 600

    def setup(self, backend, n, d, eps):
        self.xp = namespace(backend)
        if backend == "array_api_strict" and n > 4096:
            raise NotImplementedError("array_api_strict is for correctness, not large n")
        self.q, self.k, self.v = (self.xp.asarray(uniform((n, d), seed=seed)) for seed in (1, 2, 3))
        self.scale = 1.0 / d

    def _fast(self, eps):
        return lowrank_attention(
            self.q, self.k, self.v, causal=self.causal, eps=eps, scale=self.scale
        )

    def _dense(self):
        return attention(
            self.q, self.k, self.v, causal=self.causal, scale=self.scale, block=DENSE_BLOCK
        )

    def time_lowrank(self, backend, n, d, eps):
        self._fast(eps)

    def time_dense_reference(self, backend, n, d, eps):
        self._dense()

    def peakmem_lowrank(self, backend, n, d, eps):
        self._fast(eps)

    def track_max_error(self, backend, n, d, eps):
        """Max absolute error against the float32 blocked dense reference."""
        out, ref = (np.asarray(x, dtype=np.float64) for x in (self._fast(eps), self._dense()))
        return float(np.max(np.abs(out - ref)))

    track_max_error.unit = "absolute error"

    def track_speedup(self, backend, n, d, eps):
        """Dense reference time over low-rank time, measured in one run (best of 3 / 1)."""
        fast = best_time(lambda: self._fast(eps), repeat=3)
        dense = best_time(self._dense, repeat=1)
        return dense / fast

    track_speedup.unit = "x"

    def track_traced_peak_mib(self, backend, n, d, eps):
        """Peak bytes traced by tracemalloc during one low-rank call (MiB)."""
        return traced_peak(lambda: self._fast(eps)) / 2**20

    track_traced_peak_mib.unit = "MiB"

    def track_rank(self, backend, n, d, eps):
        """Rank C(d+g, g) that eps needs on these inputs (R from the row norms)."""
        q, k = (np.asarray(x, dtype=np.float64) for x in (self.q, self.k))
        radius = self.scale * np.linalg.norm(q, axis=1).max() * np.linalg.norm(k, axis=1).max()
        return rank_for(d, degree_for(eps, float(radius)))

    track_rank.unit = "rank"


class CausalPolynomialAttention(_PolynomialAttention):
    causal = True


class BidirectionalPolynomialAttention(_PolynomialAttention):
    causal = False
