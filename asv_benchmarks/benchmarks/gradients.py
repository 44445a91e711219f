"""All gradient outputs of one causal layer: fast methods against the dense backward.

Target (issue 5): n = 32768, d = 16, causal, float32, NumPy: conv method (rank 8) at least 10x
faster than the dense reference backward on the same inputs; low-rank method (d = 4,
eps = 1e-3) at least 5x faster.  The dense baseline is the blocked reference backward of
``(q, k, v)`` plus the exact chain rule to ``x`` and the weights (``O(n·block)`` memory).
"""

import numpy as np

from convbasis import reference
from convbasis.gradients import self_attention_gradients

from .common import BACKENDS, best_time, namespace, uniform

OPTIONS = {"conv": {"rank": 8}, "lowrank": {"eps": 1e-3}}


def dense_backward(x, w_q, w_k, w_v, g, scale):
    """Every gradient output through the blocked dense oracle and the chain rule."""
    dq, dk, dv = reference.attention_backward(
        x @ w_q, x @ w_k, x @ w_v, g, causal=True, scale=scale, block=1024
    )
    return dq @ w_q.T + dk @ w_k.T + dv @ w_v.T, x.T @ dq, x.T @ dk, x.T @ dv


def layer(xp, n, d, seed=0):
    """Bounded inputs: x uniform in [-1, 1], weights scaled so logits stay O(1)."""
    x = uniform((n, d), seed=seed)
    w_q, w_k, w_v = (uniform((d, d), seed=seed + s) / np.sqrt(d) for s in (1, 2, 3))
    g = uniform((n, d), seed=seed + 4)
    return [xp.asarray(a) for a in (x, w_q, w_k, w_v, g)]


class Gradients:
    params = (BACKENDS, ["conv", "lowrank"], [2**11, 2**13, 2**15])
    param_names = ["backend", "method", "n"]
    timeout = 3600

    def setup(self, backend, method, n):
        xp = namespace(backend)
        if backend == "array_api_strict" and n > 2**11:
            raise NotImplementedError("array_api_strict is for correctness, not large n")
        self.d = 4 if method == "lowrank" else 16
        self.scale = 1 / self.d
        self.args = layer(xp, n, self.d)

    def _fast(self, method):
        return self_attention_gradients(
            *self.args, method=method, scale=self.scale, **OPTIONS[method]
        )

    def time_fast(self, backend, method, n):
        self._fast(method)

    def peakmem_fast(self, backend, method, n):
        self._fast(method)

    def time_dense(self, backend, method, n):
        dense_backward(*self.args, self.scale)

    def track_speedup_over_dense(self, backend, method, n):
        dense = best_time(lambda: dense_backward(*self.args, self.scale), repeat=1)
        return dense / best_time(lambda: self._fast(method), repeat=3)

    track_speedup_over_dense.unit = "ratio"

    def track_dx_relative_error(self, backend, method, n):
        fast = self._fast(method).dx
        dense = dense_backward(*self.args, self.scale)[0]
        return float(np.abs(np.asarray(fast) - np.asarray(dense)).max()
                     / np.abs(np.asarray(dense)).max())

    track_dx_relative_error.unit = "relative"
