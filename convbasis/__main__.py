"""Command line: ``python -m convbasis demo``.

The demo runs every implemented algorithm on a default problem with NumPy and prints, per
row, the maximum error against the explicit (dense, float64) computation relative to the
largest entry of that result, and the wall time of the library call.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import reference
from .causal import masked_hadamard_matmul, masked_lowrank_matmul
from .multipole import multipole_attention
from .polynomial import lowrank_attention


def _timed(func):
    """Result and wall time of ``func()``, timed on a second call (first-call costs excluded)."""
    func()
    start = time.perf_counter()
    out = func()
    return out, time.perf_counter() - start


def _explicit_attention(q, k, v, scale):
    logits = scale * (q @ k.T)
    logits = np.where(np.tril(np.ones(logits.shape, bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (w / w.sum(axis=1, keepdims=True)) @ v, w / w.sum(axis=1, keepdims=True)


def _rel(actual, expected):
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def _rows(n, d, rng):
    """Yield ``(algorithm, n, d, relative max error, seconds)`` rows for the default problem."""
    q, k, v, g = (rng.standard_normal((n, d)).astype(np.float32) for _ in range(4))
    scale = 1 / np.sqrt(d)
    q64, k64, v64, g64 = (a.astype(np.float64) for a in (q, k, v, g))
    golden, f = _explicit_attention(q64, k64, v64, scale)

    out, sec = _timed(lambda: reference.attention(q, k, v, block=256))
    yield "dense attention (causal, block 256)", n, d, _rel(out, golden), sec

    p = f * (g64 @ v64.T)
    p -= np.sum(g64 * golden, axis=1, keepdims=True) * f
    explicit = (scale * p @ k64, scale * p.T @ q64, f.T @ g64)
    grads, sec = _timed(lambda: reference.attention_backward(q, k, v, g, block=256))
    err = max(_rel(a, b) for a, b in zip(grads, explicit, strict=True))
    yield "dense attention backward (dq, dk, dv)", n, d, err, sec

    u, w = q / 4, k / 4
    mask = np.tril(np.ones((n, n)))
    dense = mask * (u.astype(np.float64) @ w.T.astype(np.float64))
    out, sec = _timed(lambda: masked_lowrank_matmul(u, w, v))
    yield "masked low-rank product (M∘UVᵀ)Z", n, d, _rel(out, dense @ v64), sec
    out, sec = _timed(lambda: masked_lowrank_matmul(u, w, v, transpose=True))
    yield "masked low-rank product (M∘UVᵀ)ᵀZ", n, d, _rel(out, dense.T @ v64), sec
    gy = g[:, :4], v[:, :4]
    had = dense * (gy[0].astype(np.float64) @ gy[1].T.astype(np.float64))
    out, sec = _timed(lambda: masked_hadamard_matmul(u, w, *gy, v))
    yield "masked Hadamard product (M∘UVᵀ∘GYᵀ)Z, rank-4 G", n, d, _rel(out, had @ v64), sec

    # Polynomial method: bounded entries (uniform in [-1, 1], d = 8, scale 1/d) as in §2.
    q_p, k_p, v_p = (rng.uniform(-1, 1, (n, 8)).astype(np.float32) for _ in range(3))
    exact = reference.attention(*(a.astype(np.float64) for a in (q_p, k_p, v_p)), scale=1 / 8)
    out, sec = _timed(lambda: lowrank_attention(q_p, k_p, v_p, eps=1e-3, scale=1 / 8))
    yield "polynomial low-rank attention (eps 1e-3)", n, 8, _rel(out, exact), sec

    # FMA on attention with a decaying relative-position bias −(i − j)/8 (one extra
    # coordinate of q and k), where attention is mostly local and FMA is accurate.
    q_b = np.concatenate([q64, np.ones((n, 1))], axis=1)
    k_b = np.concatenate([k64, np.arange(n)[:, None] / 8 / scale], axis=1)
    exact = reference.attention(q_b, k_b, v64, scale=scale, block=512)
    q_b, k_b = q_b.astype(np.float32), k_b.astype(np.float32)
    out, sec = _timed(lambda: multipole_attention(q_b, k_b, v, block=64, basis=4, scale=scale))
    yield "fast multipole attention (decaying bias, block 64)", n, d, _rel(out, exact), sec


def demo(n=2048, d=64, seed=0, file=sys.stdout):
    """Print the demo table (float32 inputs, errors against float64 explicit results)."""
    rng = np.random.default_rng(seed)
    header = f"{'algorithm':<52} {'n':>7} {'d':>4} {'rel. error':>11} {'time [s]':>9}"
    print(header, file=file)
    print("-" * len(header), file=file)
    for name, n_, d_, err, sec in _rows(n, d, rng):
        print(f"{name:<52} {n_:>7} {d_:>4} {err:>11.2e} {sec:>9.4f}", file=file, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m convbasis", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run every algorithm on a default problem")
    p_demo.add_argument("--n", type=int, default=2048, help="sequence length (default 2048)")
    p_demo.add_argument("--d", type=int, default=64, help="head dimension (default 64)")
    p_demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.n, args.d, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
