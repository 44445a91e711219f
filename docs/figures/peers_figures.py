"""Every method against torch's scaled_dot_product_attention (SDPA) on this machine.

Writes docs/figures/peers_forward.csv (forward attention of each method and of SDPA, timed
interleaved in one process, and their ratio) and docs/figures/peers_crossover.csv (conv
gradients, both meanings, against SDPA's forward and autograd backward, at d = 16 and 64, with
the crossover length).  Inputs and options are the asv peer benchmarks'
(asv_benchmarks/benchmarks/peers.py).  Needs torch (the CPU build).
Run: python docs/figures/peers_figures.py [max_log2_n]  (default 16; about 12 minutes on two
cores, most of it in SDPA and the dense reference at the largest n).
"""

import csv
import pathlib
import sys
import warnings

import numpy as np

import convbasis as cb

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "asv_benchmarks"))

from benchmarks.common import interleaved  # noqa: E402
from benchmarks.peers import _scale, backward, forward, inputs, sdpa  # noqa: E402

FORWARD_METHODS = ("dense", "lowrank", "conv", "multipole", "composite")
CROSSOVER_DIMS = (16, 64)


def forward_rows(torch, sizes):
    for n in sizes:
        for method in FORWARD_METHODS:
            q, k, v, _ = inputs(method, n)
            scale = _scale(method)
            ours, theirs = interleaved(
                lambda m=method, q=q, k=k, v=v: forward(m, q, k, v),
                lambda q=q, k=k, v=v, s=scale: sdpa(torch, q, k, v, scale=s),
            )
            out = np.asarray(forward(method, q, k, v), dtype=np.float64)
            ref = sdpa(torch, q, k, v, scale=scale).numpy()[0, 0].astype(np.float64)
            row = {
                "method": method,
                "n": n,
                "d": q.shape[-1],
                "method_s": f"{ours:.4g}",
                "sdpa_s": f"{theirs:.4g}",
                "sdpa_over_method": f"{theirs / ours:.3g}",
                "rel_error_vs_sdpa": f"{np.linalg.norm(out - ref) / np.linalg.norm(ref):.2g}",
            }
            print(row, flush=True)
            yield row


def crossover_rows(torch, sizes):
    for d in CROSSOVER_DIMS:
        scale = _scale("conv", d)
        for n in sizes:
            arrays = inputs("conv", n, d=d)
            for gradient in ("exact-formula", "model"):
                ours, theirs = interleaved(
                    lambda gr=gradient, a=arrays: backward("conv", gr, *a),
                    lambda a=arrays, s=scale: sdpa(torch, *a[:3], scale=s, grad=a[3]),
                )
                row = {
                    "gradient": gradient,
                    "d": d,
                    "n": n,
                    "method_s": f"{ours:.4g}",
                    "sdpa_fwd_bwd_s": f"{theirs:.4g}",
                    "sdpa_over_method": f"{theirs / ours:.3g}",
                }
                print(row, flush=True)
                yield row


def crossovers(rows):
    """For each (gradient, d): the smallest n from which the method stays faster than SDPA."""
    out = {}
    for key in sorted({(r["gradient"], r["d"]) for r in rows}):
        series = sorted(
            (r["n"], float(r["sdpa_over_method"])) for r in rows if key == (r["gradient"], r["d"])
        )
        faster = [n for i, (n, _) in enumerate(series) if all(x > 1 for _, x in series[i:])]
        out[key] = faster[0] if faster else None
    return out


def write(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(max_log2=16):
    import torch

    warnings.simplefilter("ignore", cb.ConvBasisWarning)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; causal, float32")
    sizes = [2**p for p in range(12, max_log2 + 1, 2)]
    write(HERE / "peers_forward.csv", list(forward_rows(torch, sizes)))
    rows = list(crossover_rows(torch, [2**p for p in range(10, min(max_log2, 15) + 1)]))
    write(HERE / "peers_crossover.csv", rows)
    for (gradient, d), n in crossovers(rows).items():
        print(f"crossover: conv {gradient} gradients at d = {d}: {n or 'none in the sweep'}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
