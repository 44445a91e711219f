"""All gradients of one self-attention layer, dense and through the low-rank operator, and the
two meanings of a fast method's gradient.

Run: python examples/gradients.py [n]
"""

import sys

import numpy as np

import convbasis as cb

n = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
d_model = d_head = 4
rng = np.random.default_rng(0)
x = rng.uniform(-1, 1, (n, d_model))
w_q, w_k, w_v = (rng.uniform(-1, 1, (d_model, d_head)) / 2 for _ in range(3))
g = rng.standard_normal((n, d_head))

dense = cb.self_attention_gradients(x, w_q, w_k, w_v, g)
fast = cb.self_attention_gradients(x, w_q, w_k, w_v, g, method="lowrank", eps=1e-4)
for i, (a, b) in enumerate(zip(fast.terms, dense.terms, strict=True), 1):
    print(f"T{i}: relative error {np.abs(a - b).max() / np.abs(b).max():.1e}")
print(f"dW_V: relative error {np.abs(fast.dw_v - dense.dw_v).max() / np.abs(dense.dw_v).max():.1e}")

# The two meanings of a fast method's gradient (docs: "Fast gradients"): the exact formulas with
# the approximate attention (default), and the exact gradient of the method's own output.
q, k, v = x @ w_q, x @ w_k, x @ w_v
exact = cb.attention_backward(q, k, v, g)
for gradient in ("exact-formula", "model"):
    for method, options in (("lowrank", {"eps": 1e-4}), ("multipole", {"block": 64, "basis": 4})):
        grads = cb.attention_gradients(q, k, v, g, method=method, gradient=gradient, **options)
        err = max(np.abs(a - b).max() / np.abs(b).max() for a, b in zip(grads, exact, strict=True))
        print(f"{method:>9} {gradient:>13}: largest relative difference from exact {err:.1e}")
