"""Exact attention, its gradients, and a causal low-rank product, with NumPy arrays.

Run: python examples/quickstart.py [n]
"""

import sys

import numpy as np

import convbasis as cb

n = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((n, 16), dtype=np.float32) for _ in range(3))

out = cb.attention(q, k, v, causal=True, block=256)
dq, dk, dv = cb.attention_backward(q, k, v, np.ones_like(out))
print(f"attention output {out.shape} {out.dtype}; |dq|max = {np.abs(dq).max():.3f}")

y = cb.masked_lowrank_matmul(q / 4, k / 4, v)
explicit = np.tril((q / 4) @ (k / 4).T) @ v
print(f"(M o U V^T) Z: max |error| vs explicit = {np.abs(y - explicit).max():.2e}")
