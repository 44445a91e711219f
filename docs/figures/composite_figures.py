"""Tables for docs/composite.rst, from real runs (NumPy, float32).

Part ``accuracy`` (about 2 minutes): :func:`convbasis.composite_attention` on the 72 MiniLM
heads of docs/accuracy.rst (``n = 512``, ``d = 32``), causal and bidirectional, for a sweep of
budgets and for variants at budget 104 (no heavy columns, other block sizes, a sink block).
Writes ``composite_accuracy.csv`` and ``composite_variants.csv``: median / p90 / max error over
the heads against float64 dense attention, the report's ``exact_fraction`` and
``work_fraction``, the flops-based work of docs/accuracy.rst, and the share of heads whose
sampled error estimate is within a factor 2 of the true error.

Part ``speed`` (about 5 minutes): Gaussian ``q, k, v``, d = 64, causal, ``budget=512``, against
torch's ``scaled_dot_product_attention`` on 4-D tensors, interleaved in one process; peak
traced memory.  Writes ``composite_speed.csv``.

Run: ``python docs/figures/composite_figures.py [accuracy|speed]`` from the repository root.
"""

from __future__ import annotations

import csv
import math
import pathlib
import sys
import time
import tracemalloc

import numpy as np

import convbasis as cb

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE))
from accuracy_figures import head_errors, load_heads, work_composite, work_dense  # noqa: E402

BUDGETS = (24, 40, 64, 104, 160, 256)
VARIANTS = {
    "default (block 8, heavy = half the rest)": {},
    "no heavy columns": {"heavy": 0},
    "block 4": {"block": 4},
    "block 16": {"block": 16},
    "one sink block": {"sinks": 1},
}
SPEED_SIZES = (2**12, 2**13, 2**14, 2**15, 2**16, 2**17)
SDPA_UP_TO = 2**16


def run(h, exact, causal, budget, **options):
    out, report = cb.composite_attention(
        h.q, h.k, h.v, causal=causal, budget=budget, return_report=True, **options
    )
    errors = head_errors(np.asarray(out, dtype=np.float64), exact).ravel()
    op = cb.composite_operator(h.q, h.k, causal=causal, budget=budget, **options)
    ratio = np.asarray(report.error_estimates).ravel() / errors
    d = h.d_head
    work = work_composite(op, d, d) / work_dense(h.n, d, d, causal)
    return {
        "exact fraction": f"{report.exact_fraction:.3f}",
        "work fraction": f"{report.work_fraction:.3f}",
        "work (flops)": f"{work:.3f}",
        "median": f"{np.median(errors):.3f}",
        "p90": f"{np.percentile(errors, 90):.3f}",
        "max": f"{errors.max():.3f}",
        "estimate within 2x": f"{np.mean((ratio >= 0.5) & (ratio <= 2)):.0%}",
    }


def accuracy_part():
    h = load_heads()
    q64, k64, v64 = (a.astype(np.float64) for a in (h.q, h.k, h.v))
    sweep, variants = [], []
    for mode, causal in (("causal", True), ("bidirectional", False)):
        exact = np.asarray(cb.attention(q64, k64, v64, causal=causal))
        for budget in BUDGETS:
            row = {"mode": mode, "budget": budget} | run(h, exact, causal, budget)
            sweep.append(row)
            print(row, flush=True)
        for name, options in VARIANTS.items():
            row = {"mode": mode, "variant": name} | run(h, exact, causal, 104, **options)
            variants.append(row)
            print(row, flush=True)
    write_csv(sweep, HERE / "composite_accuracy.csv")
    write_csv(variants, HERE / "composite_variants.csv")


def speed_part():
    import torch

    rows = []
    times = {}
    for n in SPEED_SIZES:
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((n, 64)).astype(np.float32) for _ in range(3))
        q4, k4, v4 = (torch.from_numpy(a)[None, None] for a in (q, k, v))
        ours = theirs = math.inf
        for _ in range(2):
            start = time.perf_counter()
            cb.composite_attention(q, k, v, budget=512)
            ours = min(ours, time.perf_counter() - start)
            if n <= SDPA_UP_TO:
                start = time.perf_counter()
                with torch.no_grad():
                    torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=True)
                theirs = min(theirs, time.perf_counter() - start)
        tracemalloc.start()
        cb.composite_attention(q, k, v, budget=512)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        times[n] = ours
        row = {
            "n": n,
            "composite (s)": f"{ours:.3f}",
            "SDPA (s)": f"{theirs:.3f}" if n <= SDPA_UP_TO else "—",
            "SDPA / composite": f"{theirs / ours:.2f}" if n <= SDPA_UP_TO else "—",
            "peak memory / (q, k, v, output)": f"{peak / (4 * q.nbytes):.1f}",
        }
        rows.append(row)
        print(row, flush=True)
    exponent = math.log(times[SPEED_SIZES[-1]] / times[SPEED_SIZES[0]]) / math.log(
        SPEED_SIZES[-1] / SPEED_SIZES[0]
    )
    print(f"growth exponent 2^12 .. 2^17: {exponent:.2f}")
    rows.append({"n": "growth exponent", "composite (s)": f"{exponent:.2f}"})
    write_csv(rows, HERE / "composite_speed.csv")


def write_csv(rows, path):
    names = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    parts = sys.argv[1:] or ("accuracy", "speed")
    if "accuracy" in parts:
        accuracy_part()
    if "speed" in parts:
        speed_part()
