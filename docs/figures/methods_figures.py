"""Time against n (log-log) and accuracy of every method beside the dense reference.

Writes docs/figures/methods_timing.png and docs/figures/methods_timing.csv from real runs on
this machine (NumPy, float32, causal, d = 8, entries uniform in [-1, 1], scale 1/d).
Run: python docs/figures/methods_figures.py [max_log2_n]  (default 16: about 1 minute on
2 cores; 17 takes about 4, most of it in the two dense computations per size.)
"""

import csv
import pathlib
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import convbasis as cb

HERE = pathlib.Path(__file__).resolve().parent
D = 8
# The dense reference comes first: the speed-ups are measured against it.
METHODS = {
    "dense (blocked)": lambda q, k, v: cb.attention(q, k, v, scale=1 / D, block=512),
    "lowrank (eps 1e-3)": lambda q, k, v: cb.lowrank_attention(q, k, v, eps=1e-3, scale=1 / D),
    "conv (rank 16)": lambda q, k, v: cb.conv_attention(q, k, v, rank=16, scale=1 / D),
    "multipole (block 64, basis 4)": lambda q, k, v: cb.multipole_attention(
        q, k, v, block=64, basis=4, scale=1 / D
    ),
}


def best(func, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = func()
        times.append(time.perf_counter() - start)
    return out, min(times)


def main(max_log2=16):
    rng = np.random.default_rng(0)
    rows = []
    for log2 in range(10, max_log2 + 1):
        n = 2**log2
        q, k, v = (rng.uniform(-1, 1, (n, D)).astype(np.float32) for _ in range(3))
        exact = cb.attention(*(a.astype(np.float64) for a in (q, k, v)), scale=1 / D, block=512)
        for name, run in METHODS.items():
            out, sec = best(
                lambda run=run, q=q, k=k, v=v: run(q, k, v), 1 if "dense" in name else 3
            )
            if "dense" in name:
                dense = sec
            err = float(np.abs(out - exact).max())
            rel = float(np.linalg.norm(out - exact) / np.linalg.norm(exact))
            rows.append(
                {
                    "method": name,
                    "n": n,
                    "seconds": sec,
                    "speedup_vs_dense": dense / sec,
                    "max_error": err,
                    "relative_frobenius_error": rel,
                }
            )
            print(
                f"{name:<32} n={n:>6} {sec:9.4f} s  x{dense / sec:7.1f}  "
                f"max error {err:.2e}  relative {rel:.2e}",
                flush=True,
            )
    with open(HERE / "methods_timing.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(12, 4.6))
    for name in METHODS:
        mine = [r for r in rows if r["method"] == name]
        ns = np.array([r["n"] for r in mine], dtype=float)
        secs = np.array([r["seconds"] for r in mine])
        # log-log slope over the upper half of the sizes (small n is dominated by overheads)
        half = len(ns) // 2
        slope = np.polyfit(np.log(ns[half:]), np.log(secs[half:]), 1)[0]
        print(f"{name:<32} log-log slope for n >= {int(ns[half])}: {slope:.2f}")
        style = "k--o" if "dense" in name else "-o"
        ax_t.loglog(ns, secs, style, label=f"{name}: slope {slope:.2f}")
        ax_e.semilogx(ns, [r["max_error"] for r in mine], style, label=name)
    ax_t.set(
        xlabel="n",
        ylabel="time [s] (best of 3; dense: 1 run)",
        title=f"causal attention, NumPy float32, d = {D}",
    )
    ax_e.set(
        xlabel="n",
        ylabel="max |error| vs float64 dense",
        yscale="log",
        title="accuracy, uniform [-1, 1] inputs, scale 1/d",
    )
    # the error panel's legend sits in the empty band between float32 round-off and 1e-5
    for ax, where in ((ax_t, {"loc": "upper left"}), (ax_e, {"loc": (0.35, 0.2)})):
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, **where)
    fig.tight_layout()
    fig.savefig(HERE / "methods_timing.png", dpi=110)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16)
