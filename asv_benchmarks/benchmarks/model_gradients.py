"""Conv-basis gradients: the model's own gradient against the exact-formula route and dense.

Target (model-gradient issue): at n = 2^15, d = 64, rank 8, float32, causal, NumPy, on an
exact 8-segment instance (``rotary_conv_instance`` with starts ``n · i // 8``) and a random
``grad_out``, ``attention_gradients(..., method="conv", gradient="model")`` at least 10x faster
than ``gradient="exact-formula"`` on the same inputs.  Before this work the exact-formula route
took 23.5 s there, 0.5x the speed of the dense backward; the model route is also reported
against the dense backward (``convbasis.attention_backward``, blocked, ``O(n · block)`` memory).

Costs: the exact-formula route puts the conv-basis ``f̃`` into the exact formulas, Hadamard
products with ``d_v · d`` columns of FFT products, ``O(k n d² log n)``; the model route is the
exact gradient of conv attention's own forward, ``O(k n d log n)`` (that of the forward).

Accuracy: on an exact instance ``f̃ = f`` up to round-off, so both routes' ``dv = f̃ᵀ G``
match the dense ``dv``, and the exact-formula ``dq, dk`` match the dense ones.  The model's
``dq, dk`` do not (its logits depend on ``K`` only through the keys at the segment starts), so
only its ``dv`` is compared.  Ratios are timed interleaved in one run.

``python -m benchmarks.model_gradients`` (from ``asv_benchmarks/``) prints the target figures.
"""

from __future__ import annotations

import sys

import numpy as np

from convbasis import attention_backward, attention_gradients
from convbasis.testing import rotary_conv_instance

from .common import BACKENDS, best_time, namespace, traced_peak

D = 64
RANK = 8
SEGMENTS = 8
DENSE_BLOCK = 1024
SIZES = [2**12, 2**15]
STRICT_MAX_N = 2**12


def instance(n, dtype="float32", seed=0):
    """NumPy ``q, k, v, g``: an exact 8-segment rotary instance (d = 64) and ``g ~ N(0, 1)``."""
    rng = np.random.default_rng(seed)
    starts = tuple(n * i // SEGMENTS for i in range(SEGMENTS))
    q, k, v, _ = rotary_conv_instance(rng, n, D, starts)
    g = rng.standard_normal((n, D))
    return [a.astype(dtype) for a in (q, k, v, g)]


def model(q, k, v, g):
    return attention_gradients(q, k, v, g, method="conv", gradient="model", causal=True, rank=RANK)


def exact_formula(q, k, v, g):
    return attention_gradients(
        q, k, v, g, method="conv", gradient="exact-formula", causal=True, rank=RANK
    )


def dense(q, k, v, g):
    return attention_backward(q, k, v, g, causal=True, block=DENSE_BLOCK)


def relative_error(a, b):
    """``max|a − b| / max|b|`` in float64."""
    a, b = (np.asarray(x, dtype=np.float64) for x in (a, b))
    return float(np.abs(a - b).max() / np.abs(b).max())


def interleaved_times(funcs, repeats, rounds):
    """Best time of each ``funcs[i]`` (``repeats[i]`` calls per round), the functions taken in
    turn over ``rounds`` rounds so that all see the same machine state."""
    best = [float("inf")] * len(funcs)
    for _ in range(rounds):
        for i, (func, repeat) in enumerate(zip(funcs, repeats, strict=True)):
            best[i] = min(best[i], best_time(func, repeat=repeat))
    return best


class _Setup:
    params = (BACKENDS, SIZES)
    param_names = ["backend", "n"]
    timeout = 1800
    # One call per sample: the exact-formula route takes ~20 s at n = 2^15.
    number = 1
    repeat = (1, 3, 60.0)
    warmup_time = 0.0

    def setup(self, backend, n):
        xp = namespace(backend)
        if backend == "array_api_strict" and n > STRICT_MAX_N:
            raise NotImplementedError("array_api_strict is for correctness, not large n")
        self.args = [xp.asarray(a) for a in instance(n)]


class ModelGradients(_Setup):
    """``gradient="model"``, ``gradient="exact-formula"`` (conv, rank 8) and the dense
    backward on the same exact instance (d = 64, float32, causal)."""

    def _model(self):
        return model(*self.args)

    def _exact_formula(self):
        return exact_formula(*self.args)

    def _dense(self):
        return dense(*self.args)

    def time_model(self, backend, n):
        self._model()

    def peakmem_model(self, backend, n):
        self._model()

    def time_exact_formula(self, backend, n):
        self._exact_formula()

    def time_dense(self, backend, n):
        self._dense()

    def track_speedup_model_over_exact_formula(self, backend, n):
        """Exact-formula time over model time, interleaved in one run."""
        fast, slow = interleaved_times((self._model, self._exact_formula), (3, 1), 2)
        return slow / fast

    track_speedup_model_over_exact_formula.unit = "x"

    def track_speedup_model_over_dense(self, backend, n):
        """Dense-backward time over model time, interleaved in one run."""
        fast, slow = interleaved_times((self._model, self._dense), (3, 1), 2)
        return slow / fast

    track_speedup_model_over_dense.unit = "x"

    def track_max_relative_error_model_dv(self, backend, n):
        """``max|dv − dv_dense| / max|dv_dense|`` of the model route (float32 both)."""
        return relative_error(self._model()[2], self._dense()[2])

    track_max_relative_error_model_dv.unit = "relative"

    def track_max_relative_error_exact_formula(self, backend, n):
        """Largest ``max|x − x_dense| / max|x_dense|`` over ``dq, dk, dv`` of the exact-formula
        route (float32 both)."""
        golden = self._dense()
        return max(relative_error(a, b) for a, b in zip(self._exact_formula(), golden, strict=True))

    track_max_relative_error_exact_formula.unit = "relative"


class ModelGradientsMemory(_Setup):
    """Traced peak of the model gradient (tracemalloc sees NumPy's allocations only)."""

    def setup(self, backend, n):
        if backend != "numpy":
            raise NotImplementedError("tracemalloc traces NumPy allocations only")
        super().setup(backend, n)

    def track_peak(self, backend, n):
        """Peak MiB allocated during one model-gradient call."""
        return traced_peak(lambda: model(*self.args)) / 2**20

    track_peak.unit = "MiB"


def _keep(func, args, store):
    """``func(*args)``, its result kept in ``store[func.__name__]``."""

    def call():
        store[func.__name__] = func(*args)

    return call


def measure(sizes=tuple(SIZES), repeat=3, slow_repeat=1, rounds=2):
    """The target figures (NumPy, float32, causal), printed as they come; returns a dict.

    Per ``n``: the best time of the model route (``repeat`` calls per round), of the
    exact-formula route and of the dense backward (``slow_repeat`` calls per round each: the
    exact formula takes ~20 s at n = 2^15), the three taken in turn over ``rounds`` rounds; the
    two speed-ups; the relative errors against the dense backward (model: ``dv``; exact formula:
    ``dq, dk, dv``) and the traced peak of the model route.
    """
    result = {}
    print(
        f"d = {D}, rank {RANK}, {SEGMENTS} segments, float32, causal, NumPy; dense = "
        f"attention_backward(block={DENSE_BLOCK})"
    )
    print("model dq/dk are not the dense gradient by design: only its dv is compared")
    for n in sizes:
        args = instance(n)
        out = {}
        funcs = [_keep(f, args, out) for f in (model, exact_formula, dense)]
        t_model, t_exact, t_dense = interleaved_times(
            funcs, (repeat, slow_repeat, slow_repeat), rounds
        )
        assert all(a.dtype == np.float32 for route in out.values() for a in route)
        errors = {
            "model_dv": relative_error(out["model"][2], out["dense"][2]),
            **{
                f"exact_formula_{name}": relative_error(a, b)
                for name, a, b in zip(
                    ("dq", "dk", "dv"), out["exact_formula"], out["dense"], strict=True
                )
            },
        }
        peak = traced_peak(lambda a=args: model(*a)) / 2**20
        result[n] = {
            "model_s": t_model,
            "exact_formula_s": t_exact,
            "dense_s": t_dense,
            "speedup_over_exact_formula": t_exact / t_model,
            "speedup_over_dense": t_dense / t_model,
            "errors_vs_dense": errors,
            "model_traced_peak_mib": peak,
        }
        print(
            f"n={n:6d}: model {t_model:8.4f} s  exact-formula {t_exact:8.3f} s  dense "
            f"{t_dense:8.3f} s  model/exact-formula speed-up {t_exact / t_model:6.1f}x  "
            f"model/dense speed-up {t_dense / t_model:6.1f}x",
            flush=True,
        )
        print(
            "    rel. error vs dense: "
            + ", ".join(f"{name} {err:.2e}" for name, err in errors.items())
            + f"; model traced peak {peak:.1f} MiB",
            flush=True,
        )
    return result


if __name__ == "__main__":
    measure(tuple(int(a) for a in sys.argv[1:]) or tuple(SIZES))
