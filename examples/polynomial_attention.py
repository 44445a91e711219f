"""Causal attention through the polynomial method: degree, rank, error and speed-up.

Run: python examples/polynomial_attention.py [n]
"""

import sys
import time

import numpy as np

import convbasis as cb

n = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
d = 8
rng = np.random.default_rng(0)
q, k, v = (rng.uniform(-1, 1, (n, d)).astype(np.float32) for _ in range(3))

factors = cb.lowrank_factors(q, k, eps=1e-3, scale=1 / d)
print(f"R = {factors.radius:.3f}: degree {factors.degree}, rank {factors.u.shape[-1]}")

start = time.perf_counter()
fast = cb.lowrank_attention(q, k, v, eps=1e-3, scale=1 / d)
t_fast = time.perf_counter() - start
start = time.perf_counter()
exact = cb.attention(q, k, v, scale=1 / d, block=1024)
t_dense = time.perf_counter() - start
print(
    f"max error {np.abs(fast - exact).max():.2e} (bound {2e-3 / (1 - 1e-3):.1e} x max|V|); "
    f"{t_dense / t_fast:.1f}x faster than dense"
)
