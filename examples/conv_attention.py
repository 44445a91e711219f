"""Causal attention through the k-conv basis: recovery, accuracy, speed-up, dynamic range.

Run: python examples/conv_attention.py [n]
"""

import sys
import time

import numpy as np

import convbasis as cb
from convbasis.testing import rotary_conv_instance

n = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
d, segments = 64, 8
rng = np.random.default_rng(0)
starts = tuple(int(j) for j in np.linspace(0, n, segments + 1)[:-1])
q, k, v, _ = rotary_conv_instance(rng, n, d, starts, logit_scale=4.0, dtype="float32")

basis = cb.recover_conv_basis(q, k, rank=segments)
print(f"recovered {basis.rank} segments, starts {basis.starts} (true {starts})")

start = time.perf_counter()
fast = cb.conv_attention(q, k, v, rank=segments)
t_fast = time.perf_counter() - start
start = time.perf_counter()
exact = cb.attention(q, k, v, block=1024)
t_dense = time.perf_counter() - start
print(f"max error {np.abs(fast - exact).max():.2e}; {t_dense / t_fast:.1f}x faster than dense")

# Logits of magnitude 1e4: rows the FFT cannot resolve are recomputed exactly from the basis.
q, k, v, _ = rotary_conv_instance(rng, n, d, starts, logit_scale=1e4, dtype="float32")
op = cb.conv_operator(q, k, rank=segments)
out = op.matmul(v)
err = np.abs(out - cb.attention(q, k, v, block=1024)).max()
print(f"logits ~1e4: {len(op.recomputed_rows)} of {n} rows recomputed exactly, max error {err:.2e}")
