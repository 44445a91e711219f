"""Command line: ``python -m convbasis demo`` and ``python -m convbasis report``.

``demo`` runs every implemented algorithm on a default problem with NumPy and prints, per
row, the maximum error against the explicit (dense, float64) computation relative to the
largest entry of that result, and the wall time of the library call.  ``report`` prints an
accuracy/speed table of the attention methods for the caller's own sizes, and can save a plot.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import itertools
import math
import sys
import time
import warnings

import numpy as np

from . import reference, transformer
from .causal import masked_hadamard_matmul, masked_lowrank_matmul
from .conv import ConvBasisWarning, conv_attention
from .gradients import attention_gradients
from .multipole import multipole_attention
from .operators import METHODS, attention_operator
from .polynomial import lowrank_attention
from .testing import rotary_conv_instance


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
    """Max error relative to the largest expected entry (absolute where that is 0)."""
    scale = float(np.abs(expected).max())
    return float(np.abs(actual - expected).max()) / (scale if scale > 0 else 1.0)


def _rel_all(actual, expected):
    """:func:`_rel` over several outputs at once, relative to the largest entry of any."""
    scale = max(float(np.abs(b).max()) for b in expected)
    err = max(float(np.abs(a - b).max()) for a, b in zip(actual, expected, strict=True))
    return err / (scale if scale > 0 else 1.0)


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
    err = _rel_all(grads, explicit)
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

    # k-conv basis: an exact 16-segment instance (rotary positions, segment-wise key content).
    # Rotary instances need an even head dimension; at most 16 segments, one column each at least.
    d_c = max(2, d - d % 2)
    starts = tuple(sorted({int(j) for j in np.linspace(0, n, 17)[:-1]}))
    rank = len(starts)
    q_c, k_c, v_c, _ = rotary_conv_instance(rng, n, d_c, starts, logit_scale=4.0)
    exact = reference.attention(q_c, k_c, v_c)
    q_c, k_c, v_c = (a.astype(np.float32) for a in (q_c, k_c, v_c))
    out, sec = _timed(lambda: conv_attention(q_c, k_c, v_c, rank=rank))
    yield f"k-conv basis attention (exact instance, rank {rank})", n, d_c, _rel(out, exact), sec

    # Fast gradients through the conv-basis and low-rank operators (docs/math.rst §3); their cost
    # grows as d², so they run at head dimension 16 (conv) and 8 (low-rank).
    q_c, k_c, v_c, _ = rotary_conv_instance(rng, n, 16, starts, logit_scale=4.0)
    g_c = rng.standard_normal((n, 16))
    explicit = reference.attention_backward(q_c, k_c, v_c, g_c)
    q_c, k_c, v_c, g_c = (a.astype(np.float32) for a in (q_c, k_c, v_c, g_c))
    grads, sec = _timed(lambda: attention_gradients(q_c, k_c, v_c, g_c, method="conv", rank=rank))
    err = _rel_all(grads, explicit)
    yield f"conv-basis gradients (dq, dk, dv), rank {rank}", n, 16, err, sec
    g_p = rng.standard_normal((n, 8)).astype(np.float32)
    explicit = reference.attention_backward(
        *(a.astype(np.float64) for a in (q_p, k_p, v_p, g_p)), scale=1 / 8
    )
    grads, sec = _timed(
        lambda: attention_gradients(q_p, k_p, v_p, g_p, method="lowrank", eps=1e-3, scale=1 / 8)
    )
    err = _rel_all(grads, explicit)
    yield "low-rank gradients (dq, dk, dv), eps 1e-3", n, 8, err, sec

    # One training step of a small transformer (docs/math.rst §5): 2 layers, 2 heads, d_model 32,
    # conv-basis attention (rank 8): loss and every gradient by the fast backward, then one SGD
    # step.  The error is the worst per-layer relative gradient error against the dense float64
    # backward.  W_Q, W_K are shrunk so the logits are bounded; a random model has no exact
    # 8-segment basis, so this is an approximation (a few percent).
    params = transformer.init_params(32, layers=2, heads=2, xp=np, dtype=np.float32, seed=0)
    params = dataclasses.replace(
        params,
        layers=tuple(
            dataclasses.replace(p, w_q=0.2 * p.w_q, w_k=0.2 * p.w_k) for p in params.layers
        ),
    )
    x_t, target = (rng.uniform(-1, 1, (n, 32)).astype(np.float32) for _ in range(2))
    loss = transformer.squared_error_loss(target)

    def step():
        grads = transformer.loss_and_gradients(params, x_t, loss, attention="conv", rank=8)
        return grads, params.map(lambda p, g: p - 1e-2 * g, grads.params)

    with warnings.catch_warnings():  # the row reports the approximation's error itself
        warnings.simplefilter("ignore", ConvBasisWarning)
        (fast, _), sec = _timed(step)
    exact = transformer.loss_and_gradients(
        params.map(lambda a: a.astype(np.float64)),
        x_t.astype(np.float64),
        transformer.squared_error_loss(target.astype(np.float64)),
        block=512,  # the blocked reference backward: exact zeros where the maths has them
    )
    errors = transformer.gradient_errors(fast, exact)
    err = max(*errors["layers"], errors["x"])
    yield "transformer training step (2 layers, conv rank 8)", n, 32, err, sec

    # FMA on attention with a decaying relative-position bias −(i − j)/8 (one extra
    # coordinate of q and k), where attention is mostly local and FMA is accurate.
    q_b = np.concatenate([q64, np.ones((n, 1))], axis=1)
    k_b = np.concatenate([k64, np.arange(n)[:, None] / 8 / scale], axis=1)
    exact = reference.attention(q_b, k_b, v64, scale=scale, block=512)
    q_b, k_b = q_b.astype(np.float32), k_b.astype(np.float32)
    out, sec = _timed(lambda: multipole_attention(q_b, k_b, v, block=64, basis=4, scale=scale))
    yield "fast multipole attention (decaying bias, block 64)", n, d, _rel(out, exact), sec


def demo(n=2048, d=64, seed=0, file=None, progress=None):
    """Print the demo table (float32 inputs, errors against float64 explicit results).

    ``file`` defaults to standard output, ``progress`` to standard error.  Warnings raised by a
    row are collected and printed as notes after the table.
    """
    file = sys.stdout if file is None else file
    show = _Progress(sys.stderr if progress is None else progress)
    rng = np.random.default_rng(seed)
    header = f"{'algorithm':<52} {'n':>7} {'d':>4} {'rel. error':>11} {'time [s]':>9}"
    print(header, file=file)
    print("-" * len(header), file=file)
    notes = _Notes()
    rows = _rows(n, d, rng)
    for count in itertools.count(1):
        with notes.capture() as texts:
            row = next(rows, None)
        if row is None:
            break
        name, n_, d_, err, sec = row
        show.clear()
        line = f"{name:<52} {n_:>7} {d_:>4} {err:>11.2e} {sec:>9.4f}"
        print(f"{line} {notes.mark(texts)}".rstrip(), file=file, flush=True)
        show(f"row {count} done")
    show.clear()
    notes.print(file)


class _Progress:
    """Progress on ``stream``: one line rewritten in place on a terminal, otherwise one line
    per step, so that piped or logged runs show progress too."""

    def __init__(self, stream):
        self.stream = stream
        self.tty = stream.isatty()
        self.start = time.perf_counter()

    def __call__(self, message):
        text = f"... {message} ({time.perf_counter() - self.start:.1f} s elapsed)"
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self):
        """Erase the in-place line before a table row is printed (a no-op when piped)."""
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


class _Notes:
    """Warnings and refusals, numbered in table order and printed after the table.

    Capturing warnings keeps them from printing over the progress line or between rows.
    """

    def __init__(self):
        self.notes = []

    @contextlib.contextmanager
    def capture(self):
        """Yield a list of note texts for one row; the block's warnings are appended to it."""
        texts = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield texts
        # One note per distinct message: a method may warn once per head or per call.
        texts += dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught)

    def mark(self, texts):
        """Number ``texts`` as notes; their markers (``"[1] [2]"``) for the table row."""
        self.notes += texts
        first = len(self.notes) - len(texts) + 1
        return " ".join(f"[{i}]" for i in range(first, len(self.notes) + 1))

    def print(self, file):
        if self.notes:
            print("\nnotes:", file=file)
        for number, text in enumerate(self.notes, 1):
            print(f"[{number}] {text}", file=file)


# --- report -------------------------------------------------------------------------------


def _method_runners(args):
    """Forward-attention callables for every method of :data:`METHODS`, configured from the
    command line.  The built-in methods run their direct forward; any other registered method
    runs ``attention_operator(q, k, method=...).matmul(v)``."""
    causal = not args.bidirectional
    runners = {
        "dense": lambda q, k, v: reference.attention(
            q, k, v, causal=causal, scale=args.scale, block=512
        ),
        "lowrank": lambda q, k, v: lowrank_attention(
            q, k, v, causal=causal, eps=args.eps, scale=args.scale, max_rank=args.max_rank
        ),
        "conv": lambda q, k, v: conv_attention(
            q, k, v, rank=args.rank, causal=causal, scale=args.scale
        ),
        "multipole": lambda q, k, v: multipole_attention(
            q, k, v, block=args.block, basis=args.basis, causal=causal, scale=args.scale
        ),
    }
    for method in METHODS:
        if method not in runners:
            runners[method] = lambda q, k, v, m=method: attention_operator(
                q, k, method=m, causal=causal, scale=args.scale
            ).matmul(v)
    return {method: runners[method] for method in METHODS}


def _inputs(kind, n, d, dtype, rng):
    if kind == "uniform":  # bounded entries, where the polynomial method applies (docs/math.rst §2)
        return [rng.uniform(-1, 1, (n, d)).astype(dtype) for _ in range(3)]
    return [rng.standard_normal((n, d)).astype(dtype) for _ in range(3)]


def report(args, file=None, progress=None):
    """Accuracy and speed of each method against the blocked dense reference.

    Every row uses ``args.scale`` (the dense baseline and the float64 reference too).  A method
    that refuses a size (``ValueError``, e.g. a rank over ``--max-rank``) gets a row of dashes
    and a note; warnings become numbered notes after the table.
    """
    file = sys.stdout if file is None else file
    show = _Progress(sys.stderr if progress is None else progress)
    runners = _method_runners(args)
    methods = list(runners) if "all" in args.method else args.method
    rng = np.random.default_rng(args.seed)
    header = (
        f"{'method':<10} {'n':>8} {'d':>4} {'time [s]':>10} {'dense [s]':>10} "
        f"{'speed-up':>9} {'max error':>10} {'rel. error':>10}"
    )
    print(header, file=file)
    print("-" * len(header), file=file)
    notes = _Notes()
    rows = []
    for n in args.n:
        q, k, v = _inputs(args.inputs, n, args.d, args.dtype, rng)
        show(f"float64 reference at n = {n}")
        exact = reference.attention(
            *(a.astype(np.float64) for a in (q, k, v)),
            causal=not args.bidirectional,
            scale=args.scale,
            block=512,
        )
        show(f"dense baseline at n = {n}")
        dense_sec = _timed_once(lambda q=q, k=k, v=v: runners["dense"](q, k, v))[1]
        for method in methods:
            show(f"{method} at n = {n}")
            with notes.capture() as texts:
                try:
                    out, sec = _timed_once(lambda m=method, q=q, k=k, v=v: runners[m](q, k, v))
                except ValueError as exc:  # e.g. a rank over --max-rank: say so, keep going
                    out = None
                    texts.append(f"{method} refused n = {n}: {exc}")
            if out is None:
                cells = ("-", f"{dense_sec:.4f}", "-", "-", "-")
            else:
                err = float(np.abs(out - exact).max())
                rel = err / float(np.abs(exact).max())
                rows.append((method, n, sec, dense_sec, err))
                cells = (
                    f"{sec:.4f}",
                    f"{dense_sec:.4f}",
                    f"{dense_sec / sec:.1f}",
                    f"{err:.2e}",
                    f"{rel:.2e}",
                )
            show.clear()
            line = (
                f"{method:<10} {n:>8} {args.d:>4} {cells[0]:>10} {cells[1]:>10} "
                f"{cells[2]:>9} {cells[3]:>10} {cells[4]:>10}"
            )
            print(f"{line} {notes.mark(texts)}".rstrip(), file=file, flush=True)
    show.clear()
    notes.print(file)
    if args.plot:
        _plot(rows, args.plot)
        print(f"plot saved to {args.plot}", file=file)
    return rows


def _timed_once(func):
    start = time.perf_counter()
    out = func()
    return out, time.perf_counter() - start


def _plot(rows, path):
    import matplotlib  # optional: main() checks that it is installed before the run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == method]
        ax_t.loglog([r[1] for r in mine], [r[2] for r in mine], "o-", label=method)
        ax_e.loglog([r[1] for r in mine], [max(r[4], 1e-17) for r in mine], "o-", label=method)
    dense = {r[1]: r[3] for r in rows}
    ax_t.loglog(list(dense), list(dense.values()), "k--", label="dense reference")
    ax_t.set(xlabel="n", ylabel="time [s]", title="time against n")
    ax_e.set(xlabel="n", ylabel="max |error| vs float64 dense", title="accuracy")
    for ax in (ax_t, ax_e):
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _positive_int(text):
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _nonnegative_int(text):
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _integer(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _finite_float(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _fraction(text):
    value = _finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text!r}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m convbasis", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="run every algorithm on a default problem")
    p_demo.add_argument(
        "--n", type=_positive_int, default=2048, help="sequence length (default 2048)"
    )
    p_demo.add_argument("--d", type=_positive_int, default=64, help="head dimension (default 64)")
    p_demo.add_argument("--seed", type=_nonnegative_int, default=0)

    p_rep = sub.add_parser("report", help="accuracy/speed table for your own sizes")
    p_rep.add_argument(
        "--n", type=_positive_int, nargs="+", default=[4096], help="sequence lengths"
    )
    p_rep.add_argument("--d", type=_positive_int, default=8, help="head dimension (default 8)")
    p_rep.add_argument(
        "--method",
        nargs="+",
        default=["all"],
        choices=["all", *METHODS],
    )
    p_rep.add_argument("--bidirectional", action="store_true", help="no causal mask")
    p_rep.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p_rep.add_argument(
        "--inputs",
        default="uniform",
        choices=["uniform", "gaussian"],
        help="entries uniform in [-1, 1] (default) or standard normal",
    )
    p_rep.add_argument(
        "--scale", type=_finite_float, default=None, help="logit scale (default 1/sqrt(d))"
    )
    p_rep.add_argument("--eps", type=_fraction, default=1e-3, help="lowrank: exp accuracy")
    p_rep.add_argument("--max-rank", type=_positive_int, default=20000, help="lowrank: rank cap")
    p_rep.add_argument("--rank", type=_positive_int, default=16, help="conv: basis size k")
    p_rep.add_argument(
        "--block", type=_positive_int, default=64, help="multipole: block size (a power of two)"
    )
    p_rep.add_argument(
        "--basis", type=_positive_int, default=4, help="multipole: tokens per box (divides block)"
    )
    p_rep.add_argument("--seed", type=_nonnegative_int, default=0)
    p_rep.add_argument("--plot", metavar="FILE", help="save time/error plots (matplotlib)")

    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.n, args.d, args.seed)
        return 0
    # Option errors that hold for every size: refuse before the first (possibly long) run.
    if args.block & (args.block - 1):
        p_rep.error(f"argument --block: must be a power of two, got {args.block}")
    if args.block % args.basis:
        p_rep.error(f"argument --basis: must divide --block {args.block}, got {args.basis}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p_rep.error("argument --plot: needs matplotlib: python3 -m pip install matplotlib")
    report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
