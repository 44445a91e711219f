"""Whole-model backward (loss + every gradient) of a causal transformer: conv vs dense attention.

Target (transformer issue): 4 layers, 4 heads, d_model 64 (d_head 16), n = 16384, causal,
float32, NumPy: ``loss_and_gradients(attention="conv")`` at least 5x faster than the same call
with dense attention (the blocked reference oracle, ``block=1024``, ``O(n·block)`` memory), with
the per-layer relative gradient error tracked next to the time.
"""

import sys
import time

import numpy as np

from convbasis import transformer as T

from .common import BACKENDS, best_time, namespace, uniform

CONV_RANK = 8
DENSE_BLOCK = 1024


def problem(xp, n, d_model=64, layers=4, heads=4, seed=0):
    """A LayerNorm/GELU model, inputs uniform in [-1, 1], squared-error loss, float32."""
    params = T.init_params(
        d_model, layers=layers, heads=heads, xp=xp, norm="layer", dtype=xp.float32, seed=seed
    )
    x = xp.asarray(uniform((n, d_model), seed=seed + 1))
    loss = T.squared_error_loss(xp.asarray(uniform((n, d_model), seed=seed + 2)))
    return params, x, loss


def dense(params, x, loss):
    return T.loss_and_gradients(params, x, loss, attention="dense", block=DENSE_BLOCK)


def conv(params, x, loss, rank=CONV_RANK):
    return T.loss_and_gradients(params, x, loss, attention="conv", rank=rank)


class TransformerBackward:
    params = (BACKENDS, [2**10, 2**12, 2**14])
    param_names = ["backend", "n"]
    timeout = 3600

    def setup(self, backend, n):
        xp = namespace(backend)
        if backend == "array_api_strict" and n > 2**10:
            raise NotImplementedError("array_api_strict is for correctness, not large n")
        self.args = problem(xp, n)

    def time_conv(self, backend, n):
        conv(*self.args)

    def peakmem_conv(self, backend, n):
        conv(*self.args)

    def time_dense(self, backend, n):
        dense(*self.args)

    def track_speedup_over_dense(self, backend, n):
        slow = best_time(lambda: dense(*self.args), repeat=1)
        return slow / best_time(lambda: conv(*self.args), repeat=2)

    track_speedup_over_dense.unit = "ratio"

    def track_max_layer_gradient_error(self, backend, n):
        errors = T.gradient_errors(conv(*self.args), dense(*self.args))
        return float(np.max(errors["layers"]))

    track_max_layer_gradient_error.unit = "relative"


def _timed(func, repeat):
    """``(best seconds, last result)`` over ``repeat`` calls of ``func()``."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = func()
        best = min(best, time.perf_counter() - start)
    return best, out


def measure(n=2**14, repeat=2, rank=CONV_RANK):
    """The target measurement in one run: times, ratio and per-layer errors (NumPy).

    The dense backward runs once (its result is the reference for the errors); the conv
    backward ``repeat`` times (best time).  Run it with
    ``python -m asv_benchmarks.benchmarks.transformer [n]``.
    """
    args = problem(np, n)
    t_dense, exact = _timed(lambda: dense(*args), 1)
    t_conv, fast = _timed(lambda: conv(*args, rank=rank), repeat)
    errors = T.gradient_errors(fast, exact)
    return {"n": n, "dense_s": t_dense, "conv_s": t_conv, "ratio": t_dense / t_conv, **errors}


if __name__ == "__main__":
    print(measure(*(int(a) for a in sys.argv[1:2])))
