"""Figures and tables for docs/multipole.rst, from real runs (NumPy).

Writes into this folder:

* ``multipole_error.png`` / ``multipole_errors.csv``: relative error of FMA against exact
  softmax attention for every (block, basis), on (a) random inputs and (b) causal attention
  with a decaying (ALiBi-style) relative-position bias ``−α (i − j)``; rows with basis 0 are
  the near field alone (local attention over blocks i−1, i, i+1), for comparison.
* ``multipole_timing.png`` / ``multipole_timing.csv``: FMA against blocked dense attention.

Run: ``python docs/figures/multipole_figures.py`` from the repository root.
"""

from __future__ import annotations

import csv
import math
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from convbasis import attention
from convbasis.multipole import multipole_attention

HERE = pathlib.Path(__file__).parent
N, D = 4096, 64
BLOCKS = (16, 32, 64, 128, 256)
BASES = (1, 2, 4, 8, 16)
SLOPES = (1 / 8, 1 / 64)


def relative_error(approx, exact):
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def problems(rng):
    """(label, causal, q, k, v, scale) for each experiment, float64."""
    q, k, v = (rng.standard_normal((N, D)) for _ in range(3))
    s = 1 / math.sqrt(D)
    out = [
        ("random, causal", True, q, k, v, s),
        ("random, bidirectional", False, q, k, v, s),
    ]
    j = np.arange(N, dtype=np.float64)[:, None]
    for alpha in SLOPES:
        # s·q'·k' = s·q·k + α j; the row constant −α i cancels: logits s·q·k − α (i − j)
        qa = np.concatenate([q, np.ones((N, 1))], axis=1)
        ka = np.concatenate([k, alpha * j / s], axis=1)
        out.append((f"bias slope {alpha:g}, causal", True, qa, ka, v, s))
    return out


def near_field_only(q, k, v, causal, scale, block):
    """Local attention over the near field alone (blocks i−1, i, i+1): the far field's baseline."""
    i, j = np.indices((q.shape[0], q.shape[0]))
    mask = np.abs(i // block - j // block) <= 1
    if causal:
        mask &= j <= i
    logits = np.where(mask, scale * (q @ k.T), -np.inf)
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (w / w.sum(axis=1, keepdims=True)) @ v


def error_table(rng):
    rows = []
    for label, causal, q, k, v, s in problems(rng):
        exact = attention(q, k, v, causal=causal, scale=s, block=512)
        for block in BLOCKS:
            local = near_field_only(q, k, v, causal, s, block)
            rows.append(
                {
                    "problem": label,
                    "block": block,
                    "basis": 0,
                    "relative_error": relative_error(local, exact),
                    "max_abs_error": float(np.max(np.abs(local - exact))),
                }
            )
        for block in BLOCKS:
            for basis in BASES:
                if basis > block:
                    continue
                fma = multipole_attention(q, k, v, block=block, basis=basis, causal=causal, scale=s)
                rows.append(
                    {
                        "problem": label,
                        "block": block,
                        "basis": basis,
                        "relative_error": relative_error(fma, exact),
                        "max_abs_error": float(np.max(np.abs(fma - exact))),
                    }
                )
        print(label, "done", flush=True)
    return rows


def timing_table():
    rows = []
    for e in range(12, 18):
        n = 2**e
        q, k, v = (
            np.random.default_rng(s).uniform(-1, 1, (n, D)).astype(np.float32) for s in range(3)
        )
        fast = min(
            _timed(lambda q=q, k=k, v=v: multipole_attention(q, k, v, block=64, basis=4))
            for _ in range(3)
        )
        dense = (
            _timed(lambda q=q, k=k, v=v: attention(q, k, v, block=512))
            if n <= 2**15
            else float("nan")
        )
        rows.append({"n": n, "fma_seconds": fast, "dense_seconds": dense})
        print(f"n={n} fma {fast:.4f} s dense {dense:.3f} s", flush=True)
    return rows


def _timed(func):
    start = time.perf_counter()
    func()
    return time.perf_counter() - start


def write_csv(rows, path):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.3e}" if isinstance(v, float) else v for k, v in row.items()})


def write_summary(rows, path):
    """Pivot: one line per (problem, block), relative errors for a few bases."""
    keys = list(dict.fromkeys((r["problem"], r["block"]) for r in rows))
    errors = {(r["problem"], r["block"], r["basis"]): r["relative_error"] for r in rows}
    bases = (0, 1, 4, 16)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["problem", "block", "near field only", "basis 1", "basis 4", "basis 16"])
        for problem, block in keys:
            writer.writerow(
                [problem, block]
                + [
                    f"{errors[(problem, block, b)]:.2e}" if (problem, block, b) in errors else "—"
                    for b in bases
                ]
            )


def plot_errors(rows, path):
    labels = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(2, 2, figsize=(9, 7))
    axes = axes.ravel()
    for ax, label in zip(axes, labels, strict=True):
        for basis in BASES:
            pts = [
                (r["block"], r["relative_error"])
                for r in rows
                if r["problem"] == label and r["basis"] == basis
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=f"basis {basis}")
        pts = [
            (r["block"], r["relative_error"])
            for r in rows
            if r["problem"] == label and r["basis"] == 0
        ]
        ax.plot(*zip(*pts, strict=True), "k--", label="near field only")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("block")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[::2]:
        ax.set_ylabel(r"$\|O_{FMA} - O\|_F / \|O\|_F$")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"FMA against exact softmax attention, n = {N}, d = {D}, float64", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timing(rows, path):
    n = np.array([r["n"] for r in rows], dtype=float)
    fast = np.array([r["fma_seconds"] for r in rows])
    dense = np.array([r["dense_seconds"] for r in rows])
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.loglog(n, fast, "o-", label="FMA (block 64, basis 4)", base=2)
    ok = np.isfinite(dense)
    ax.loglog(n[ok], dense[ok], "s-", label="dense, blocked (block 512)", base=2)
    ax.loglog(
        n, dense[ok][-1] * (n / n[ok][-1]) ** 2, ":", color="gray", label="dense ∝ n²", base=2
    )
    ax.set_xlabel("n")
    ax.set_ylabel("seconds")
    ax.set_title("causal, d = 64, float32, NumPy (2 cores)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    rows = error_table(np.random.default_rng(0))
    write_csv(rows, HERE / "multipole_errors.csv")
    write_summary(rows, HERE / "multipole_error_summary.csv")
    plot_errors(rows, HERE / "multipole_error.png")
    timing = timing_table()
    write_csv(timing, HERE / "multipole_timing.csv")
    plot_timing(timing, HERE / "multipole_timing.png")


if __name__ == "__main__":
    main()
