"""Worked example of docs/transformer.rst: loss and gradients three ways, errors and times.

Writes ``transformer_example_table.rst`` (included by the page) and ``transformer_example.png``
next to this script.  Run: ``python3 docs/figures/transformer_example.py``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import time

import numpy as np

from convbasis import transformer as T

HERE = pathlib.Path(__file__).parent
N, D_MODEL, LAYERS, HEADS, D_HEAD = 4096, 32, 3, 4, 4
QK_SHRINK = 0.2


def timed(func, repeat=2):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = func()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    rng = np.random.default_rng(0)
    params = T.init_params(
        D_MODEL, layers=LAYERS, heads=HEADS, d_head=D_HEAD, xp=np, norm="layer", seed=0
    )
    # bounded logits (the polynomial method's regime, docs/math.rst §2): shrink W_Q and W_K
    params = T.TransformerParams(
        tuple(
            dataclasses.replace(layer, w_q=QK_SHRINK * layer.w_q, w_k=QK_SHRINK * layer.w_k)
            for layer in params.layers
        ),
        params.norm,
        params.activation,
    )
    x = rng.uniform(-1, 1, (N, D_MODEL))
    loss = T.squared_error_loss(rng.uniform(-1, 1, (N, D_MODEL)))
    runs = {"dense": {"block": 1024}, "lowrank": {"eps": 1e-3}}
    if importlib.util.find_spec("convbasis.conv") is not None:
        runs["conv"] = {"rank": 8}
    results = {}
    for method, options in runs.items():
        seconds, grads = timed(
            lambda m=method, o=options: T.loss_and_gradients(params, x, loss, attention=m, **o)
        )
        results[method] = (seconds, grads, options)
    dense = results["dense"][1]
    rows = []
    for method, (seconds, grads, options) in results.items():
        errors = T.gradient_errors(grads, dense)
        opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "-"
        rel_loss = abs(float(grads.loss) - float(dense.loss)) / abs(float(dense.loss))
        rows.append((method, opts, seconds, rel_loss, errors))
    lines = [
        ".. list-table:: Loss and gradients of a 3-layer, 4-head model, n = 4096, float64, "
        "NumPy, 2 cores",
        "   :header-rows: 1",
        "",
        "   * - attention",
        "     - options",
        "     - seconds",
        "     - relative loss error",
        "     - per-layer relative gradient error",
        "     - ∂L/∂X relative error",
    ]
    for method, opts, seconds, rel_loss, errors in rows:
        per_layer = ", ".join(f"{e:.1e}" for e in errors["layers"])
        lines += [
            f"   * - ``{method}``",
            f"     - {opts}",
            f"     - {seconds:.2f}",
            f"     - {rel_loss:.1e}",
            f"     - {per_layer}",
            f"     - {errors['x']:.1e}",
        ]
    (HERE / "transformer_example_table.rst").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for method, _, seconds, _, errors in rows[1:]:
        ax.semilogy(
            range(1, LAYERS + 1),
            errors["layers"],
            "o-",
            label=f"{method} ({seconds:.2f} s vs dense {rows[0][2]:.2f} s)",
        )
    ax.set_xlabel("layer")
    ax.set_ylabel("relative gradient error vs dense")
    ax.set_xticks(range(1, LAYERS + 1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "transformer_example.png", dpi=120)


if __name__ == "__main__":
    main()
