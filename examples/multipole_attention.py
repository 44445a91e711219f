"""Fast Multipole Attention against exact attention on a locally decaying problem.

Run: python examples/multipole_attention.py [n]
"""

import sys
import time

import numpy as np

import convbasis as cb

n = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
d = 32
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((n, d)).astype(np.float32) for _ in range(3))
# A relative-position bias -(i - j)/8 through one extra coordinate: attention decays with distance.
q = np.concatenate([q, np.ones((n, 1), np.float32)], axis=1)
k = np.concatenate([k, (np.arange(n)[:, None] / 8 * np.sqrt(d)).astype(np.float32)], axis=1)

start = time.perf_counter()
fast = cb.multipole_attention(q, k, v, block=64, basis=4, scale=1 / np.sqrt(d))
t_fast = time.perf_counter() - start
exact = cb.attention(q, k, v, scale=1 / np.sqrt(d), block=1024)
print(f"FMA max error {np.abs(fast - exact).max():.2e}, {t_fast:.3f} s")
