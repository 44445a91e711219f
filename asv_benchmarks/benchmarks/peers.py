"""Every method against the kernel users already run: torch's scaled_dot_product_attention.

The speed peer is ``torch.nn.functional.scaled_dot_product_attention`` on CPU, given 4-D
``(1, 1, n, d)`` float32 tensors so that its fused kernel runs (3-D input falls back to an
``n × n`` kernel).  Both sides get the same inputs in one process, timed interleaved; the
``track_`` benchmarks record ``SDPA time / method time`` (above 1: the method is faster).  The
backward compares ``attention_gradients`` (both meanings of the gradient, docs: "Fast
gradients") with torch autograd through SDPA (forward and backward).

Inputs per method, causal, float32: dense and conv at d = 64 (conv: an exact 16-segment rotary
instance, rank 16), multipole at d = 64 (block 64, basis 4), composite at d = 64 (budget 512;
Gaussian inputs, so its error is large: its accuracy is measured on real heads, docs:
"Composite attention"), polynomial at d = 8 (issue 16's
case: uniform entries with the rows rescaled so that ``R = s max‖q‖ max‖k‖ = 2`` at the
default scale ``1/√8``, where eps 1e-3 needs degree 7, rank 6435).  ``PolynomialPeer`` times
the polynomial method at n = 2^16 and 2^17 (target: at least 2x faster than SDPA at 2^17) and
records the rate of its useful arithmetic.  The suite skips without torch
(``pip install torch`` in the bench environment; on these machines
``pip install torch==2.13.0`` takes the CPU build).

``python -m benchmarks.peers [n ...]`` (from ``asv_benchmarks/``) prints the figures;
``python -m benchmarks.peers polynomial [n ...]`` the polynomial ones (default 2^16, 2^17);
``python -m benchmarks.peers crossover [n ...]`` the conv gradients against SDPA's forward and
backward at d = 16 and 64, with the crossover length of each gradient meaning.
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

import convbasis as cb
from convbasis.testing import rotary_conv_instance

from .common import best_time, interleaved, torch_or_skip

D = 64
LOWRANK_D = 8
LOWRANK_RADIUS = 2.0
SEGMENTS = 16


_torch = torch_or_skip


def inputs(method, n, seed=0, d=D):
    """NumPy float32 ``q, k, v, g`` for ``method`` at length ``n`` (head dimension ``d``,
    except for the polynomial method's fixed case)."""
    rng = np.random.default_rng(seed)
    if method == "conv":
        starts = tuple(n * i // SEGMENTS for i in range(SEGMENTS))
        q, k, v, _ = rotary_conv_instance(rng, n, d, starts)
    elif method == "lowrank":
        q, k, v = rng.uniform(-1, 1, (3, n, LOWRANK_D))
        # max‖q‖ = max‖k‖ = (R √d)^½, so that R = max‖q‖ max‖k‖ / √d is LOWRANK_RADIUS
        size = np.sqrt(LOWRANK_RADIUS * np.sqrt(LOWRANK_D))
        q, k = (a * (size / np.linalg.norm(a, axis=-1).max()) for a in (q, k))
    else:
        q, k, v = rng.standard_normal((3, n, d))
    g = rng.standard_normal(v.shape)
    return tuple(a.astype(np.float32) for a in (q, k, v, g))


OPTIONS = {
    "dense": {},
    "conv": {"rank": SEGMENTS},
    "multipole": {"block": 64, "basis": 4},
    "lowrank": {"eps": 1e-3},
    "composite": {"budget": 512},
}


def forward(method, q, k, v):
    if method == "dense":
        return cb.attention(q, k, v, block=1024)
    return {
        "conv": cb.conv_attention,
        "multipole": cb.multipole_attention,
        "lowrank": cb.lowrank_attention,
        "composite": cb.composite_attention,
    }[method](q, k, v, **OPTIONS[method])


def backward(method, gradient, q, k, v, g):
    if method == "dense":
        return cb.attention_backward(q, k, v, g, block=1024)
    return cb.attention_gradients(q, k, v, g, method=method, gradient=gradient, **OPTIONS[method])


def sdpa(torch, q, k, v, *, scale, grad=None):
    """SDPA forward (and, with ``grad``, the backward by autograd) on 4-D tensors."""
    q4, k4, v4 = (torch.from_numpy(a)[None, None] for a in (q, k, v))
    if grad is None:
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(
                q4, k4, v4, is_causal=True, scale=scale
            )
    q4, k4, v4 = (a.requires_grad_() for a in (q4, k4, v4))
    out = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale)
    out.backward(torch.from_numpy(grad)[None, None])
    return q4.grad, k4.grad, v4.grad


def _scale(method, d=D):
    return 1 / np.sqrt(LOWRANK_D if method == "lowrank" else d)


def lowrank_flops(q, k, v):
    """Useful arithmetic of polynomial attention: the two products with the thin factors,
    ``ψ(K)ᵀ [V, 1]`` and ``φ(Q) S``, ``4 n r (e + 1)`` flops (``r`` as the method picks it)."""
    norms = [float(np.linalg.norm(a.astype(np.float64), axis=-1).max()) for a in (q, k)]
    degree = cb.degree_for(OPTIONS["lowrank"]["eps"], _scale("lowrank") * norms[0] * norms[1])
    return 4 * q.shape[-2] * cb.rank_for(q.shape[-1], degree) * (v.shape[-1] + 1)


class PeerForward:
    """Forward attention of each method against SDPA (ratio ``SDPA / method``)."""

    # composite against SDPA: benchmarks.composite.CompositePeer
    params = (["dense", "conv", "multipole", "lowrank"], [2**12, 2**14])
    param_names = ["method", "n"]
    timeout = 600

    def setup(self, method, n):
        self.torch = _torch()
        self.arrays = inputs(method, n)
        warnings.simplefilter("ignore", cb.ConvBasisWarning)

    def time_method(self, method, n):
        forward(method, *self.arrays[:3])

    def time_sdpa(self, method, n):
        sdpa(self.torch, *self.arrays[:3], scale=_scale(method))

    def track_speedup_over_sdpa(self, method, n):
        ours = best_time(lambda: forward(method, *self.arrays[:3]))
        theirs = best_time(lambda: sdpa(self.torch, *self.arrays[:3], scale=_scale(method)))
        return theirs / ours

    def track_max_error_against_sdpa(self, method, n):
        out = np.asarray(forward(method, *self.arrays[:3]), dtype=np.float64)
        ref = sdpa(self.torch, *self.arrays[:3], scale=_scale(method)).numpy()[0, 0]
        return float(np.abs(out - ref).max() / np.abs(ref).max())


class PolynomialPeer:
    """Polynomial attention (rank 6435) against SDPA at the issue's sizes, interleaved in one
    run (target: ``SDPA / method >= 2`` at n = 2^17)."""

    params = [2**16, 2**17]
    param_names = ["n"]
    timeout = 900
    number = 1
    repeat = (1, 3, 60.0)
    warmup_time = 0.0

    def setup(self, n):
        self.torch = _torch()
        self.arrays = inputs("lowrank", n)[:3]

    def _pair(self):
        return interleaved(
            lambda: forward("lowrank", *self.arrays),
            lambda: sdpa(self.torch, *self.arrays, scale=_scale("lowrank")),
        )

    def time_method(self, n):
        forward("lowrank", *self.arrays)

    def peakmem_method(self, n):
        forward("lowrank", *self.arrays)

    def track_speedup_over_sdpa(self, n):
        """SDPA time over polynomial time, best of two interleaved rounds (target >= 2 at 2^17)."""
        ours, theirs = self._pair()
        return theirs / ours

    track_speedup_over_sdpa.unit = "x"

    def track_gflops(self, n):
        """Useful arithmetic (``4 n r (e + 1)`` flops) per second of the polynomial method."""
        seconds = best_time(lambda: forward("lowrank", *self.arrays), repeat=2)
        return lowrank_flops(*self.arrays) / seconds / 1e9

    track_gflops.unit = "GFLOP/s"


class PeerBackward:
    """Gradients (dq, dk, dv) of each method against SDPA's forward + autograd backward."""

    params = (["conv", "multipole", "lowrank"], ["exact-formula", "model"], [2**12])
    param_names = ["method", "gradient", "n"]
    timeout = 900

    def setup(self, method, gradient, n):
        self.torch = _torch()
        self.arrays = inputs(method, n)
        warnings.simplefilter("ignore", cb.ConvBasisWarning)

    def time_method(self, method, gradient, n):
        backward(method, gradient, *self.arrays)

    def time_sdpa(self, method, gradient, n):
        q, k, v, g = self.arrays
        sdpa(self.torch, q, k, v, scale=_scale(method), grad=g)

    def track_speedup_over_sdpa(self, method, gradient, n):
        q, k, v, g = self.arrays
        ours = best_time(lambda: backward(method, gradient, q, k, v, g))
        theirs = best_time(lambda: sdpa(self.torch, q, k, v, scale=_scale(method), grad=g))
        return theirs / ours


def measure(sizes=(2**12, 2**14), backward_sizes=(2**12,)):
    """Print method and SDPA times and their ratio, forward and backward."""
    torch = _torch()
    warnings.simplefilter("ignore", cb.ConvBasisWarning)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; causal, float32")
    for n in sizes:
        for method in OPTIONS:
            q, k, v, _ = inputs(method, n)
            ours, theirs = interleaved(
                lambda m=method, q=q, k=k, v=v: forward(m, q, k, v),
                lambda m=method, q=q, k=k, v=v: sdpa(torch, q, k, v, scale=_scale(m)),
            )
            print(
                f"forward  {method:>9} n={n:>7} d={q.shape[-1]:>2}: {ours:8.3f} s   "
                f"SDPA {theirs:8.3f} s   SDPA/method {theirs / ours:6.2f}x",
                flush=True,
            )
    for n in backward_sizes:
        for method in ("conv", "multipole", "lowrank"):
            arrays = inputs(method, n)
            for gradient in ("exact-formula", "model"):
                ours, theirs = interleaved(
                    lambda m=method, gr=gradient, a=arrays: backward(m, gr, *a),
                    lambda m=method, a=arrays: sdpa(torch, *a[:3], scale=_scale(m), grad=a[3]),
                )
                print(
                    f"backward {method:>9} {gradient:>13} n={n:>7}: {ours:8.3f} s   SDPA fwd+bwd "
                    f"{theirs:8.3f} s   SDPA/method {theirs / ours:6.2f}x",
                    flush=True,
                )


def measure_polynomial(sizes=(2**16, 2**17), rounds=3):
    """Print polynomial and SDPA times (interleaved, best of ``rounds``), ratio and GFLOP/s."""
    torch = _torch()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; causal, float32")
    for n in sizes:
        q, k, v, _ = inputs("lowrank", n)
        ours, theirs = interleaved(
            lambda q=q, k=k, v=v: forward("lowrank", q, k, v),
            lambda q=q, k=k, v=v: sdpa(torch, q, k, v, scale=_scale("lowrank")),
            rounds=rounds,
        )
        flops = lowrank_flops(q, k, v)
        print(
            f"polynomial n={n:>7} d={LOWRANK_D}: {ours:7.3f} s ({flops / ours / 1e9:5.1f} "
            f"GFLOP/s of {flops / 1e9:.1f} GFLOP)   SDPA {theirs:7.3f} s   "
            f"SDPA/method {theirs / ours:5.2f}x",
            flush=True,
        )


def measure_crossover(dims=(16, 64), sizes=tuple(2**p for p in range(10, 16))):
    """Conv gradients (both meanings) against SDPA forward + backward for each head dimension
    and length, interleaved; prints each ratio and the crossover: the smallest ``n`` of
    ``sizes`` from which the method stays faster."""
    torch = _torch()
    warnings.simplefilter("ignore", cb.ConvBasisWarning)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; causal, float32")
    for d in dims:
        ratios = {"exact-formula": [], "model": []}
        scale = _scale("conv", d)
        for n in sizes:
            arrays = inputs("conv", n, d=d)
            for gradient, found in ratios.items():
                ours, theirs = interleaved(
                    lambda gr=gradient, a=arrays: backward("conv", gr, *a),
                    lambda a=arrays, s=scale: sdpa(torch, *a[:3], scale=s, grad=a[3]),
                )
                found.append(theirs / ours)
                print(
                    f"conv {gradient:>13} d={d:>2} n={n:>6}: {ours:8.3f} s   SDPA fwd+bwd "
                    f"{theirs:8.3f} s   SDPA/method {theirs / ours:7.2f}x",
                    flush=True,
                )
        for gradient, found in ratios.items():
            faster = [i for i in range(len(sizes)) if all(r > 1 for r in found[i:])]
            where = f"n = {sizes[faster[0]]}" if faster else f"none up to n = {sizes[-1]}"
            print(f"crossover conv {gradient} d={d}: {where}", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["polynomial"]:
        measure_polynomial(tuple(int(a) for a in args[1:]) or (2**16, 2**17))
    elif args[:1] == ["crossover"]:
        measure_crossover(
            sizes=tuple(int(a) for a in args[1:]) or tuple(2**p for p in range(10, 16))
        )
    else:
        measure(tuple(int(a) for a in args) or (2**12, 2**14))
