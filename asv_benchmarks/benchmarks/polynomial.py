"""Polynomial low-rank attention against the blocked dense reference (docs/math.rst §2).

Two input families, causal and bidirectional, float32:

* ``bounded``: entries of Q, K, V uniform in [-1, 1], scale 1/d, so every logit lies in
  [-R, R] with R <= 1 (R = 0.81 at n = 65536: eps 1e-3 needs degree 4, rank 495);
* ``radius2``: the same entries with the rows of Q and K rescaled so that R = 2 exactly at
  the default scale 1/√d (issue 16's case: degree 7, rank 6435).

Each class times the fast path and the dense reference on the same inputs; ``track_speedup``
takes the ratio in one run.  Targets (issue 16): peak traced memory at most 2x the bytes of
the inputs and the output (``track_peak_ratio_to_inputs_and_output``); against torch SDPA
see ``peers.PolynomialPeer`` (at least 2x faster at n = 2^17).
"""

from __future__ import annotations

import numpy as np

from convbasis import degree_for, lowrank_attention, rank_for
from convbasis.reference import attention

from .common import BACKENDS, best_time, namespace, traced_peak, uniform

DENSE_BLOCK = 1024
RADIUS = 2.0


class _PolynomialAttention:
    causal = True
    params = (BACKENDS, [4096, 65536], [8], [1e-3], ["bounded", "radius2"])
    param_names = ["backend", "n", "d", "eps", "inputs"]
    timeout = 600

    def setup(self, backend, n, d, eps, inputs):
        self.xp = namespace(backend)
        if backend == "array_api_strict" and n > 4096:
            raise NotImplementedError("array_api_strict is for correctness, not large n")
        q, k, v = (uniform((n, d), seed=seed) for seed in (1, 2, 3))
        self.scale = 1.0 / d
        if inputs == "radius2":
            self.scale = 1.0 / np.sqrt(d)
            size = np.sqrt(RADIUS / self.scale)  # max‖q‖ = max‖k‖, R = s max‖q‖ max‖k‖
            q, k = (a * (size / np.linalg.norm(a, axis=-1).max()) for a in (q, k))
        self.arrays = (q, k, v)
        self.q, self.k, self.v = (self.xp.asarray(a) for a in (q, k, v))

    def _fast(self, eps):
        return lowrank_attention(
            self.q, self.k, self.v, causal=self.causal, eps=eps, scale=self.scale
        )

    def _dense(self):
        return attention(
            self.q, self.k, self.v, causal=self.causal, scale=self.scale, block=DENSE_BLOCK
        )

    def _rank(self, d, eps):
        q, k = (a.astype(np.float64) for a in self.arrays[:2])
        radius = self.scale * np.linalg.norm(q, axis=1).max() * np.linalg.norm(k, axis=1).max()
        return rank_for(d, degree_for(eps, float(radius)))

    def time_lowrank(self, backend, n, d, eps, inputs):
        self._fast(eps)

    def time_dense_reference(self, backend, n, d, eps, inputs):
        self._dense()

    def peakmem_lowrank(self, backend, n, d, eps, inputs):
        self._fast(eps)

    def track_max_error(self, backend, n, d, eps, inputs):
        """Max absolute error against the float32 blocked dense reference."""
        out, ref = (np.asarray(x, dtype=np.float64) for x in (self._fast(eps), self._dense()))
        return float(np.max(np.abs(out - ref)))

    track_max_error.unit = "absolute error"

    def track_speedup(self, backend, n, d, eps, inputs):
        """Dense reference time over low-rank time, measured in one run (best of 3 / 1)."""
        fast = best_time(lambda: self._fast(eps), repeat=3)
        dense = best_time(self._dense, repeat=1)
        return dense / fast

    track_speedup.unit = "x"

    def track_gflops(self, backend, n, d, eps, inputs):
        """Useful arithmetic per second: the two products with the thin factors,
        ``4 n r (e + 1)`` flops (best of 3)."""
        seconds = best_time(lambda: self._fast(eps), repeat=3)
        return 4 * n * self._rank(d, eps) * (self.arrays[2].shape[-1] + 1) / seconds / 1e9

    track_gflops.unit = "GFLOP/s"

    def track_traced_peak_mib(self, backend, n, d, eps, inputs):
        """Peak bytes traced by tracemalloc during one low-rank call (MiB)."""
        return traced_peak(lambda: self._fast(eps)) / 2**20

    track_traced_peak_mib.unit = "MiB"

    def track_peak_ratio_to_inputs_and_output(self, backend, n, d, eps, inputs):
        """Peak traced bytes of one call over the bytes of q, k, v and the output (target
        <= 2; NumPy: tracemalloc sees NumPy's allocations, not other libraries')."""
        data = sum(a.nbytes for a in self.arrays) + self.arrays[2].nbytes
        return traced_peak(lambda: self._fast(eps)) / data

    track_peak_ratio_to_inputs_and_output.unit = "ratio"

    def track_rank(self, backend, n, d, eps, inputs):
        """Rank C(d+g, g) that eps needs on these inputs (R from the row norms)."""
        return self._rank(d, eps)

    track_rank.unit = "rank"


class CausalPolynomialAttention(_PolynomialAttention):
    causal = True


class BidirectionalPolynomialAttention(_PolynomialAttention):
    causal = False
