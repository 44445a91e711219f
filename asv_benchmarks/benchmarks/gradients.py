"""All gradient outputs of one causal layer: fast methods against the dense backward.

Target (issue 5): every output of :func:`convbasis.gradients.self_attention_gradients` (the
five terms, ``dx``, ``dw``, ``dw_q``, ``dw_k``, ``dw_v``) at n = 32768, d = 16, causal,
float32, NumPy: the conv method (rank 8, exact 8-segment instance) at least 10x faster than
the dense reference backward on the same inputs; the low-rank method (d = 4, eps = 1e-3,
bounded entries) at least 5x faster; plus the log-log slope of time against n.

The dense baseline is :func:`dense_gradients`: the reference computation
(:func:`convbasis.reference.self_attention_gradients`, the same formulas and outputs) in
blocks of query rows, so it runs at n = 32768 in ``O(n · block)`` memory where the reference
needs several ``n × n`` arrays (~20 GB in float32).  :func:`measure` checks that the two agree
and times both where the reference fits.

``python -m benchmarks.gradients`` (from ``asv_benchmarks/``) prints the target figures.
"""

from __future__ import annotations

import sys

import numpy as np

from convbasis import reference
from convbasis.gradients import self_attention_gradients
from convbasis.testing import rotary_conv_instance

from .common import BACKENDS, best_time, namespace, traced_peak, uniform

D = 16  # conv: d_model = d_head = d_v = 16
SEGMENTS = 8
CONV_RANK = 8
LOWRANK_D = 4  # low-rank: d_model = d_head = d_v = 4 (the rank grows as C(d + g, g))
LOWRANK_EPS = 1e-3
OPTIONS = {"conv": {"rank": CONV_RANK}, "lowrank": {"eps": LOWRANK_EPS}}
FIELDS = ("dx", "dw", "dw_q", "dw_k", "dw_v")
OUTPUT_NAMES = ("T1", "T2", "T3", "T4", "T5", *FIELDS)
DENSE_BLOCK = 1024
REFERENCE_MAX_N = 2**13  # the unblocked reference above this needs > 6 GB


def conv_layer(n, dtype="float32", seed=0):
    """A layer whose logits ``s X W_Q (X W_K)ᵀ`` have an exact 8-segment k-conv basis.

    ``X = [q, k]`` from an 8-dimensional rotary instance (docs/math.rst §4) at the scale
    ``1/sqrt(16)`` of 16-wide heads; ``W_Q``, ``W_K`` (16 × 16) select ``q`` and ``k`` into the
    first 8 head coordinates, so ``X W_Q = [q, 0]`` and ``X W_K = [k, 0]`` exactly.  ``W_V``
    and ``G = ∂L/∂O`` are random.  Returns NumPy arrays ``x, w_q, w_k, w_v, g``.
    """
    rng = np.random.default_rng(seed)
    half = D // 2
    starts = tuple(n * i // SEGMENTS for i in range(SEGMENTS))
    q, k, _, _ = rotary_conv_instance(rng, n, half, starts, scale=1 / np.sqrt(D))
    x = np.concatenate([q, k], axis=1)
    w_q = np.zeros((D, D))
    w_k = np.zeros((D, D))
    w_q[:half, :half] = np.eye(half)
    w_k[half:, :half] = np.eye(half)
    w_v = rng.standard_normal((D, D)) / np.sqrt(D)
    g = rng.standard_normal((n, D))
    return [a.astype(dtype) for a in (x, w_q, w_k, w_v, g)]


def lowrank_layer(n, dtype="float32", seed=0):
    """Bounded entries: ``x`` uniform in [-1, 1], weights uniform / sqrt(d), so logits are O(1)."""
    d = LOWRANK_D
    x = uniform((n, d), seed=seed, dtype=dtype)
    # astype: a NumPy float64 scalar (np.sqrt) would promote float32 weights to float64
    w_q, w_k, w_v = (
        (uniform((d, d), seed=seed + s, dtype=dtype) / np.sqrt(d)).astype(dtype) for s in (1, 2, 3)
    )
    g = uniform((n, d), seed=seed + 4, dtype=dtype)
    return [x, w_q, w_k, w_v, g]


def layer(method, n, dtype="float32"):
    return conv_layer(n, dtype) if method == "conv" else lowrank_layer(n, dtype)


def scale_of(method):
    """The default scale ``1/sqrt(d_head)`` (also what :func:`conv_layer` is built for)."""
    return 1 / np.sqrt(D if method == "conv" else LOWRANK_D)


def fast_gradients(method, x, w_q, w_k, w_v, g):
    return self_attention_gradients(
        x, w_q, w_k, w_v, g, method=method, causal=True, **OPTIONS[method]
    )


def dense_gradients(x, w_q, w_k, w_v, g, *, scale=None, block=DENSE_BLOCK):
    """:func:`convbasis.reference.self_attention_gradients` (causal) by blocks of query rows.

    The same dense ``O(n² d)`` formulas, each block of rows seeing its causal prefix of keys;
    the column-side terms (T3, T4, T5) accumulate over blocks.  NumPy only.
    """
    n, d_head = x.shape[0], w_q.shape[1]
    s = 1 / np.sqrt(d_head) if scale is None else scale
    q, k, y = x @ w_q, x @ w_k, x @ w_v
    w = w_q @ w_k.T
    x_wt, x_w = x @ w.T, x @ w
    t1, t2 = np.empty_like(x_wt), np.empty_like(x_wt)
    t3, t4 = np.zeros_like(x_w), np.zeros_like(x_w)
    fg = np.zeros((n, g.shape[1]), dtype=x.dtype)  # fᵀ G
    dw = np.zeros_like(w)
    for a in range(0, n, block):
        b = min(a + block, n)
        logits = (s * q[a:b]) @ k[:b].T
        logits[:, a:b][np.triu_indices(b - a, 1)] = -np.inf  # causal: only the last columns
        logits -= logits.max(axis=1, keepdims=True)
        f = np.exp(logits, out=logits)
        f /= f.sum(axis=1, keepdims=True)
        delta = np.sum(g[a:b] * (f @ y[:b]), axis=1, keepdims=True)
        f_gy = f * (g[a:b] @ y[:b].T)
        t1[a:b] = s * (f_gy @ x_wt[:b])
        t2[a:b] = -s * ((delta * f) @ x_wt[:b])
        t3[:b] += s * (f_gy.T @ x_w[a:b])
        t4[:b] -= s * (f.T @ (delta * x_w[a:b]))
        fg[:b] += f.T @ g[a:b]
        dw += s * (x[a:b].T @ ((f_gy - delta * f) @ x[:b]))
    t5 = fg @ w_v.T
    return reference.SelfAttentionGradients(
        terms=(t1, t2, t3, t4, t5),
        dx=t1 + t2 + t3 + t4 + t5,
        dw=dw,
        dw_q=dw @ w_k,
        dw_k=dw.T @ w_q,
        dw_v=x.T @ fg,
    )


def outputs(res):
    return [*res.terms, *(getattr(res, name) for name in FIELDS)]


def relative_errors(fast, golden):
    """``max|fast - golden| / max|golden|`` for every output, in :data:`OUTPUT_NAMES` order."""
    out = []
    for a, b in zip(outputs(fast), outputs(golden), strict=True):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        out.append(float(np.abs(a - b).max() / np.abs(b).max()))
    return out


class Gradients:
    """Fast methods and the dense backward on the same inputs (all outputs, causal)."""

    params = (BACKENDS, ["conv", "lowrank"], [2**11, 2**13, 2**15])
    param_names = ["backend", "method", "n"]
    timeout = 3600

    def setup(self, backend, method, n):
        xp = namespace(backend)
        if backend == "array_api_strict" and n > 2**11:
            raise NotImplementedError("array_api_strict is for correctness, not large n")
        self.numpy_args = layer(method, n)
        self.args = [xp.asarray(a) for a in self.numpy_args]

    def _fast(self, method):
        return fast_gradients(method, *self.args)

    def _dense(self):
        return dense_gradients(*self.numpy_args)

    def time_fast(self, backend, method, n):
        self._fast(method)

    def peakmem_fast(self, backend, method, n):
        self._fast(method)

    def time_dense(self, backend, method, n):
        self._dense()

    def peakmem_dense(self, backend, method, n):
        self._dense()

    def track_speedup_over_dense(self, backend, method, n):
        dense = best_time(self._dense, repeat=1)
        return dense / best_time(lambda: self._fast(method), repeat=3)

    track_speedup_over_dense.unit = "ratio"

    def track_max_relative_error(self, backend, method, n):
        """Largest ``max|fast − dense| / max|dense|`` over the ten outputs (float32 dense)."""
        return max(relative_errors(self._fast(method), self._dense()))

    track_max_relative_error.unit = "relative"

    def track_traced_peak_mib(self, backend, method, n):
        return traced_peak(lambda: self._fast(method)) / 2**20

    track_traced_peak_mib.unit = "MiB"


def _slope(sizes, times):
    return float(np.polyfit(np.log(sizes), np.log(times), 1)[0])


def measure(
    n=2**15,
    sizes=(2**11, 2**12, 2**13, 2**14, 2**15, 2**16),
    repeat=3,
    dense_repeat=2,
    golden=True,
    methods=("conv", "lowrank"),
    dense_slope=True,
):
    """The target figures (NumPy, float32, causal), printed as they come; returns a dict.

    At ``n``: best-of-``repeat`` time of each fast method and best-of-``dense_repeat`` of
    :func:`dense_gradients`, speed-ups, and each output's relative error against the dense
    float32 result and (``golden``) against :func:`dense_gradients` in float64, next to the
    dense float32 error.
    Then the log-log slope of time against ``n`` over ``sizes`` for both fast methods and for
    the dense backward up to ``n``; the unblocked reference up to :data:`REFERENCE_MAX_N`.
    """
    result = {}
    print(f"target n = {n}, float32, causal; dense = blocked reference (block {DENSE_BLOCK})")
    for method in methods:
        args = layer(method, n)
        assert all(a.dtype == np.float32 for a in args)
        fast_s = best_time(lambda a=args, m=method: fast_gradients(m, *a), repeat=repeat)
        fast = fast_gradients(method, *args)
        assert all(a.dtype == np.float32 for a in outputs(fast))
        dense_s = best_time(lambda a=args: dense_gradients(*a), repeat=dense_repeat)
        dense = dense_gradients(*args)
        errors = relative_errors(fast, dense)
        row = {
            "fast_s": fast_s,
            "dense_s": dense_s,
            "speedup": dense_s / fast_s,
            "error_vs_dense32": dict(zip(OUTPUT_NAMES, errors, strict=True)),
        }
        print(
            f"{method:8s} d={args[1].shape[1]:2d}: fast {fast_s:7.3f} s  dense {dense_s:7.2f} s"
            f"  speed-up {dense_s / fast_s:6.1f}x  max rel. error vs dense float32 "
            f"{max(errors):.2e}",
            flush=True,
        )
        if golden:
            gold = dense_gradients(*(a.astype(np.float64) for a in args))
            fast_err = relative_errors(fast, gold)
            dense_err = relative_errors(dense, gold)
            row["error_vs_float64"] = dict(zip(OUTPUT_NAMES, fast_err, strict=True))
            row["dense32_error_vs_float64"] = dict(zip(OUTPUT_NAMES, dense_err, strict=True))
            print(
                "    rel. error vs float64 (fast / dense float32): "
                + ", ".join(
                    f"{name} {a:.1e}/{b:.1e}"
                    for name, a, b in zip(OUTPUT_NAMES, fast_err, dense_err, strict=True)
                ),
                flush=True,
            )
        result[method] = row
    for method in methods:
        times = []
        for m in sizes:
            args = layer(method, m)
            times.append(best_time(lambda a=args, me=method: fast_gradients(me, *a), repeat=repeat))
            print(f"{method:8s} n={m:6d}: {times[-1]:.4f} s", flush=True)
        result[method]["sizes"] = list(sizes)
        result[method]["times"] = times
        result[method]["slope"] = _slope(sizes, times)
        print(f"{method:8s} log-log slope {result[method]['slope']:.3f}", flush=True)
    if not dense_slope:
        return result
    dense_sizes = [m for m in sizes if m <= n]
    dense_times, ref_sizes, ref_times = [], [], []
    for m in dense_sizes:
        args = conv_layer(m)
        dense_times.append(best_time(lambda a=args: dense_gradients(*a), repeat=1))
        line = f"dense    n={m:6d}: blocked {dense_times[-1]:.4f} s"
        if m <= REFERENCE_MAX_N:
            ref_sizes.append(m)
            ref_times.append(
                best_time(lambda a=args: reference.self_attention_gradients(*a), repeat=1)
            )
            agree = max(
                relative_errors(dense_gradients(*args), reference.self_attention_gradients(*args))
            )
            line += f"  unblocked reference {ref_times[-1]:.4f} s (agree to {agree:.1e})"
        print(line, flush=True)
    result["dense"] = {
        "sizes": dense_sizes,
        "times": dense_times,
        "slope": _slope(dense_sizes, dense_times),
        "reference_sizes": ref_sizes,
        "reference_times": ref_times,
        "reference_slope": _slope(ref_sizes, ref_times),
    }
    print(
        f"dense    log-log slope {result['dense']['slope']:.3f} (blocked), "
        f"{result['dense']['reference_slope']:.3f} (unblocked reference, n <= "
        f"{REFERENCE_MAX_N})",
        flush=True,
    )
    return result


if __name__ == "__main__":
    measure(*(int(a) for a in sys.argv[1:2]))
