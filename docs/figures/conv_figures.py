"""Figures and tables for docs/conv.rst, from real runs (NumPy).

Writes into this folder:

* ``conv_error_rank.png`` / ``conv_error_rank.csv``: relative error of the causal attention
  output and of the logits' lower triangle against the number of segments ``k``, for the
  binary-search recovery :func:`convbasis.recover_conv_basis` (default ``δ`` and ``δ = 0.1``)
  and the dense best-effort :func:`convbasis.fit_conv_basis`, on four inputs: an exact
  8-segment rotary instance, the same with noise in the keys, rotary positions with smoothly
  varying key content, and Gaussian ``Q, K`` (n = 1024, d = 16, float64).
* ``conv_dynamic_range.csv``: output error against the spread of the logits (1, 10, 30, 100)
  in float32 and float64, with the dynamic-range safeguard at its default tolerance and with
  ``tolerance=math.inf`` (only rows whose normaliser is not resolved at all are recomputed),
  with the number of recomputed rows and the run time.
* ``conv_bidirectional.csv``: causal against bidirectional attention on rotary instances
  with one and with eight key segments.

Errors are against the float64 dense oracle :func:`convbasis.reference.attention`.
Run: ``python docs/figures/conv_figures.py`` from the repository root (about 15 s).
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

import convbasis as cb
from convbasis.reference import attention
from convbasis.testing import alibi_conv_instance, rotary_conv_instance

HERE = pathlib.Path(__file__).parent
N, D = 1024, 16
SCALE = 1.0 / math.sqrt(D)
STARTS = (0, 100, 131, 304, 339, 519, 631, 821)  # 8 true segments
DELTA = 0.1  # the tuned detection threshold of the δ = 0.1 series
MASK = np.tril(np.ones((N, N), dtype=bool))


def rel(approx, exact):
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def rotate(x, positions):
    """RoPE rotation (as in ``convbasis.testing.rotary_conv_instance``)."""
    d = x.shape[-1]
    theta = 10000.0 ** (-np.arange(d // 2) * 2.0 / d)
    angle = positions[:, None] * theta[None, :]
    cos, sin = np.cos(angle), np.sin(angle)
    out = np.empty((len(positions), d))
    out[:, 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    out[:, 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
    return out


# ----------------------------------------------------------------------------------------
# Inputs of the error-against-rank figure
# ----------------------------------------------------------------------------------------


def exact_rotary(rng):
    q, k, v, _ = rotary_conv_instance(rng, N, D, STARTS)
    return q, k, v


def noisy_rotary(rng):
    """The exact instance with Gaussian noise of relative size 1e-3 added to every key."""
    q, k, v, _ = rotary_conv_instance(rng, N, D, STARTS)
    k = k + 1e-3 * np.linalg.norm(k, axis=1, keepdims=True) / math.sqrt(D) * rng.standard_normal(
        k.shape
    )
    return q, k, v


def smooth_rotary(rng):
    """Rotary positions, key content ``κ(j) = cos(πj/n) a + sin(πj/n) b``: aligned columns
    drift smoothly with ``j``, so no few-segment basis is exact."""
    pos = np.arange(N, dtype=np.float64)
    qbar = rng.standard_normal(D)
    a, b = rng.standard_normal((2, D))
    phi = np.pi * pos / N
    kappa = np.cos(phi)[:, None] * a + np.sin(phi)[:, None] * b
    q = rotate(np.broadcast_to(qbar, (N, D)), pos)
    k = rotate(kappa, pos)
    return q, k, rng.standard_normal((N, D))


def gaussian(rng):
    return tuple(rng.standard_normal((N, D)) for _ in range(3))


CASES = (
    ("(a) exact rotary, 8 segments", exact_rotary, [*range(1, 13), 16, 32]),
    ("(b) rotary, 8 segments + 1e-3 key noise", noisy_rotary, [*range(1, 13), 16, 32, 64]),
    ("(c) rotary, smoothly varying key content", smooth_rotary, [2**p for p in range(9)]),
    ("(d) Gaussian Q, K", gaussian, [2**p for p in range(9)]),
)
METHODS = (
    ("recover, default δ", "C0", "o"),
    (f"recover, δ = {DELTA:g}", "C2", "^"),
    ("fit (dense)", "C3", "s"),
)


def dense_masked_attention(logits, v):
    """Causal softmax of given logits times ``v`` (float64, each row its own maximum)."""
    x = np.where(MASK, logits, -np.inf)
    x = x - x.max(axis=1, keepdims=True)
    w = np.exp(x)
    return (w / w.sum(axis=1, keepdims=True)) @ v


def rank_runs(rng):
    rows = [
        (
            "input",
            "method",
            "k",
            "segments",
            "logits rel. error (lower tri.)",
            "output rel. error",
            "logits max abs error eps",
            "output max abs error",
            "2(e^eps - 1)|V|_inf",
        )
    ]
    results = {}
    for title, make, ranks in CASES:
        q, k, v = make(rng)
        logits = SCALE * q @ k.T
        golden = attention(q, k, v, causal=True)
        vmax = float(np.abs(v).max())
        for method, _, _ in METHODS:
            curve = []
            for r in ranks:
                if method.startswith("fit"):
                    basis = cb.fit_conv_basis(logits, r)
                    out = dense_masked_attention(basis.to_dense(), v)
                else:
                    delta = None if "default" in method else DELTA
                    basis = cb.recover_conv_basis(q, k, rank=r, delta=delta)
                    out = cb.conv_attention(q, k, v, rank=r, delta=delta)
                approx = basis.to_dense()
                e_logits = rel(approx[MASK], logits[MASK])
                e_out = rel(out, golden)
                eps = float(np.abs(approx - logits)[MASK].max())
                err = float(np.abs(out - golden).max())
                bound = 2 * math.expm1(eps) * vmax if eps < 700 else math.inf
                curve.append((r, e_logits, e_out))
                rows.append(
                    (
                        title,
                        method,
                        r,
                        basis.rank,
                        f"{e_logits:.3e}",
                        f"{e_out:.3e}",
                        f"{eps:.3e}",
                        f"{err:.3e}",
                        f"{bound:.3e}",
                    )
                )
            results[title, method] = curve
    with open(HERE / "conv_error_rank.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return results


def rank_figure(results):
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, (title, _, ranks) in zip(axes.flat, CASES, strict=True):
        for method, color, marker in METHODS:
            curve = results[title, method]
            ks = [c[0] for c in curve]
            ax.semilogy(
                ks,
                [max(c[2], 1e-17) for c in curve],
                "-",
                marker=marker,
                color=color,
                ms=4,
                label=f"{method}: output",
            )
            ax.semilogy(
                ks,
                [max(c[1], 1e-17) for c in curve],
                ":",
                marker=marker,
                color=color,
                ms=3,
                mfc="none",
                label=f"{method}: logits",
            )
        if ranks[-1] > 64:
            ax.set_xscale("log", base=2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rank k (number of segments allowed)")
        ax.set_ylabel("relative Frobenius error")
        ax.grid(True, which="major", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(
        f"Causal conv-basis attention, n = {N}, d = {D}, float64: solid = output "
        "‖Õ-O‖/‖O‖, dotted = logits ‖H̃-H‖/‖H‖ on the lower triangle",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(HERE / "conv_error_rank.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# Dynamic range
# ----------------------------------------------------------------------------------------


def lower_spread(q, k):
    logits = SCALE * q @ k.T
    return float(logits[MASK].max() - logits[MASK].min())


def dynamic_range_instances(spread):
    """``(name, k, q, k, v)`` whose causal logits have exactly the given spread."""
    base = lower_spread(*rotary_conv_instance(np.random.default_rng(5), N, D, STARTS)[:2])
    q, k, v, _ = rotary_conv_instance(
        np.random.default_rng(5), N, D, STARTS, logit_scale=spread / base
    )
    yield "rotary, 8 segments", 8, q, k, v
    # Logits grow with distance: row r's largest logit is spread·r/(n-1), so early rows lie
    # far below the global maximum (a stress case, not a realistic model).
    q, k, v, _ = alibi_conv_instance(np.random.default_rng(5), N, D, slope=-spread / (N - 1))
    yield "ALiBi, negative slope", 1, q, k, v
    # Two segments, key bias 0.9·spread on the second half, slope 0.1·spread/(n-1).
    q, k, v, _ = alibi_conv_instance(
        np.random.default_rng(5),
        N,
        D,
        slope=0.1 * spread / (N - 1),
        starts=(0, N // 2),
        biases=(0.0, 0.9 * spread),
    )
    yield "ALiBi + segment bias", 2, q, k, v


def best_time(func, repeat=3):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = func()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3, out


def dynamic_range_table():
    rows = [
        (
            "instance",
            "k",
            "logit spread",
            "dtype",
            "dense same dtype: max error",
            "default tolerance: rows recomputed",
            "default tolerance: max error",
            "default tolerance: ms",
            "tolerance=inf: rows recomputed",
            "tolerance=inf: max error",
            "tolerance=inf: ms",
        )
    ]
    for spread in (1, 10, 30, 100):
        for name, rank, q, k, v in dynamic_range_instances(spread):
            measured = lower_spread(q, k)
            for dtype in (np.float32, np.float64):
                qc, kc, vc = (x.astype(dtype) for x in (q, k, v))
                # Oracle on the rounded inputs: the table shows the method's error alone.
                golden = attention(*(x.astype(np.float64) for x in (qc, kc, vc)), causal=True)
                dense = attention(qc, kc, vc, causal=True)
                row = [
                    name,
                    rank,
                    f"{measured:.4g}",
                    np.dtype(dtype).name,
                    # In float64 the dense computation *is* the oracle.
                    f"{np.abs(dense.astype(np.float64) - golden).max():.1e}"
                    if dtype is np.float32
                    else "(oracle)",
                ]
                for tol in (None, math.inf):
                    op = cb.conv_operator(qc, kc, rank=rank, tolerance=tol)
                    ms, out = best_time(
                        lambda qc=qc, kc=kc, vc=vc, tol=tol, rank=rank: cb.conv_attention(
                            qc, kc, vc, rank=rank, tolerance=tol
                        )
                    )
                    assert np.all(np.isfinite(out))
                    err = float(np.abs(out.astype(np.float64) - golden).max())
                    row += [len(op.recomputed_rows), f"{err:.1e}", f"{ms:.1f}"]
                rows.append(tuple(row))
                print(rows[-1], flush=True)
    with open(HERE / "conv_dynamic_range.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


# ----------------------------------------------------------------------------------------
# Causal against bidirectional
# ----------------------------------------------------------------------------------------


def bidirectional_table():
    rows = [
        ("key segments", "causal", "rank", "segments recovered (lower, upper)", "output rel. error")
    ]
    for starts in ((0,), STARTS):
        q, k, v, _ = rotary_conv_instance(np.random.default_rng(11), N, D, starts)
        for causal in (True, False):
            golden = attention(q, k, v, causal=causal)
            for rank in (len(starts), 64):
                out = cb.conv_attention(q, k, v, rank=rank, causal=causal)
                basis = cb.recover_conv_basis(q, k, rank=rank, causal=causal)
                segs = basis.rank if causal else (basis[0].rank, basis[1].rank)
                rows.append((len(starts), causal, rank, segs, f"{rel(out, golden):.1e}"))
    with open(HERE / "conv_bidirectional.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


if __name__ == "__main__":
    start = time.perf_counter()
    rank_figure(rank_runs(np.random.default_rng(2026)))
    dynamic_range_table()
    bidirectional_table()
    print(f"done in {time.perf_counter() - start:.1f} s")
