"""Figures and tables for docs/polynomial.rst, from real runs (NumPy).

Writes into this folder:

* ``polynomial_degrees.csv``: degree and rank that ``lowrank_factors`` chooses against
  ``(d, R, eps)`` for both kinds, with the measured entrywise relative error of ``U Vᵀ``
  against ``exp(s Q Kᵀ)`` on random inputs whose radius is exactly ``R`` (float64).
* ``polynomial_error.png`` / ``polynomial_error.csv``: (a) maximum relative error of the
  approximation of eˣ on ``[-R, R]`` against degree, with the closed-form bounds; (b) the
  attention output error against degree on real inputs, with the docs/math.rst §2.4 bound.
* ``polynomial_target.csv`` (with ``--target``): the issue's benchmark, causal and
  bidirectional, n = 65536, d = 8, float32, against the blocked dense reference.

Run: ``python docs/figures/polynomial_figures.py [--target]`` from the repository root.
"""

from __future__ import annotations

import csv
import math
import pathlib
import sys
import time
import tracemalloc

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import convbasis as poly
from convbasis.reference import attention

HERE = pathlib.Path(__file__).parent
KINDS = ("chebyshev", "taylor")


def inputs_with_radius(rng, n, d, radius, scale):
    """Random rows, rescaled so that ``|s| max‖q‖ max‖k‖`` equals ``radius`` exactly."""
    q, k = rng.standard_normal((2, n, d)) * rng.uniform(0.2, 1.0, (2, n, 1))
    q /= np.linalg.norm(q, axis=1).max()
    k /= np.linalg.norm(k, axis=1).max()
    factor = math.sqrt(radius / scale)
    return q * factor, k * factor


def degree_table(rng):
    rows = [("kind", "d", "R", "eps", "degree", "rank", "measured max rel. error")]
    for kind in KINDS:
        for d in (2, 4, 8):
            for radius in (0.5, 1.0, 2.0, 4.0):
                for eps in (1e-2, 1e-3, 1e-6):
                    g = poly.degree_for(eps, radius, kind=kind)
                    rank = poly.rank_for(d, g)
                    if rank > 20_000:
                        rows.append((kind, d, radius, eps, g, rank, "(not built)"))
                        continue
                    q, k = inputs_with_radius(rng, 200, d, radius, 1.0)
                    f = poly.lowrank_factors(q, k, eps=eps, kind=kind, scale=1.0)
                    exact = np.exp(q @ k.T)
                    err = float(np.max(np.abs(f.to_dense() / exact - 1)))
                    rows.append((kind, d, radius, eps, f.degree, f.rank, f"{err:.2e}"))
    with open(HERE / "polynomial_degrees.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def error_figure(rng):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    rows = [("panel", "kind", "R", "degree", "measured", "bound")]
    colors = dict(zip((0.5, 1.0, 2.0, 4.0), ("C0", "C1", "C2", "C3"), strict=True))
    for radius, color in colors.items():
        for kind, style in (("chebyshev", "-o"), ("taylor", "--s")):
            degrees = list(range(0, 25, 2 if kind == "taylor" else 1))
            reports = [poly.exp_approximation_error(g, radius, kind=kind) for g in degrees]
            left.semilogy(
                degrees,
                [max(r.measured, 1e-17) for r in reports],
                style,
                color=color,
                ms=3,
                label=f"{kind}, R={radius:g}",
            )
            rows += [("exp", kind, radius, r.degree, r.measured, r.bound) for r in reports]
    left.set_xlabel("degree g")
    left.set_ylabel("max |P(x)/exp(x) - 1| on [-R, R]")
    left.set_title("(a) approximation of exp (solid: Chebyshev, dashed: Taylor)")
    left.set_ylim(1e-17, 10)
    left.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.15))

    n, d, scale = 2048, 4, 0.5
    q, k = inputs_with_radius(rng, n, d, 2.0, scale)
    v = rng.standard_normal((n, 8))
    golden = attention(q, k, v, causal=True, scale=scale)
    for kind, style, color in (("chebyshev", "-o", "C0"), ("taylor", "--s", "C3")):
        degrees = list(range(2 if kind == "taylor" else 1, 15, 2 if kind == "taylor" else 1))
        errs, bounds = [], []
        degrees = [
            g for g in degrees if poly.exp_approximation_error(g, 2.0, kind=kind).measured < 1
        ]
        for g in degrees:
            out = poly.lowrank_attention(q, k, v, causal=True, degree=g, kind=kind, scale=scale)
            eps = poly.exp_approximation_error(g, 2.0, kind=kind).measured
            errs.append(float(np.max(np.abs(out - golden))))
            bounds.append(2 * eps / (1 - eps) * np.abs(v).max() if eps < 1 else np.nan)
            rows.append(("attention", kind, 2.0, g, errs[-1], bounds[-1]))
        right.semilogy(degrees, errs, style, color=color, label=f"{kind}: measured")
        right.semilogy(degrees, bounds, ":", color=color, label=f"{kind}: 2ε/(1-ε)‖V‖∞")
    right.set_xlabel("degree g")
    right.set_ylabel("max |Õ - O|")
    right.set_title(f"(b) causal attention, n={n}, d={d}, R=2, float64")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "polynomial_error.png", dpi=120)
    with open(HERE / "polynomial_error.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def best(func, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = func()
        times.append(time.perf_counter() - start)
    return min(times), out


def target_table():
    n, d, eps = 65536, 8, 1e-3
    rng = np.random.default_rng(0)
    q, k, v = (rng.uniform(-1, 1, (n, d)).astype(np.float32) for _ in range(3))
    s = 1.0 / d
    radius = float(s * np.linalg.norm(q, axis=1).max() * np.linalg.norm(k, axis=1).max())
    g = poly.degree_for(eps, radius)
    rows = [
        (
            "causal",
            "n",
            "d",
            "R",
            "degree",
            "rank",
            "lowrank s",
            "dense (block=1024) s",
            "speedup",
            "peak MiB",
            "max error vs dense",
        )
    ]
    for causal in (True, False):

        def fast(causal=causal):
            return poly.lowrank_attention(q, k, v, causal=causal, eps=eps, scale=s)

        t_fast, out = best(fast, 5)
        tracemalloc.start()
        fast()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        t_dense, ref = best(lambda c=causal: attention(q, k, v, causal=c, scale=s, block=1024), 1)
        err = float(np.max(np.abs(out.astype(np.float64) - ref)))
        rows.append(
            (
                causal,
                n,
                d,
                f"{radius:.3f}",
                g,
                poly.rank_for(d, g),
                f"{t_fast:.3f}",
                f"{t_dense:.2f}",
                f"{t_dense / t_fast:.0f}x",
                f"{peak:.0f}",
                f"{err:.1e}",
            )
        )
        print(rows[-1], flush=True)
    with open(HERE / "polynomial_target.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


if __name__ == "__main__":
    rng = np.random.default_rng(2026)
    degree_table(rng)
    error_figure(rng)
    if "--target" in sys.argv:
        target_table()
