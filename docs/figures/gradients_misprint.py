"""Finite-difference evidence for the corrected gradient terms (docs/gradients.rst).

Prints, for a random causal and bidirectional layer in float64, the relative mismatch between
the central-difference directional derivative and ``<t, gradient>`` for the printed
(arXiv 2408.13233, Lemma D.17/G.3) and corrected forms of T5 and dL/dW_V.
"""

import numpy as np

from convbasis import attention, attention_weights
from convbasis.reference import self_attention_gradients


def main():
    rng = np.random.default_rng(1)
    n, d_model, d_head = 12, 5, 4
    x = rng.standard_normal((n, d_model))
    w_q, w_k, w_v = rng.standard_normal((3, d_model, d_head)) / np.sqrt(d_model)
    g = rng.standard_normal((n, d_head))
    print("| mask | quantity | printed form: rel. mismatch | corrected form: rel. mismatch |")
    print("|---|---|---|---|")
    for causal in (True, False):
        res = self_attention_gradients(x, w_q, w_k, w_v, g, causal=causal)
        f = attention_weights(x @ w_q, x @ w_k, causal=causal)

        def loss(x_, w_v_, causal=causal):
            return float(np.sum(g * attention(x_ @ w_q, x_ @ w_k, x_ @ w_v_, causal=causal)))

        h = 1e-6
        # T5 is the part of dL/dX that flows through V = X W_V: perturb X only inside V.
        t = rng.standard_normal(x.shape)

        def loss_v(x_, causal=causal):
            return float(np.sum(g * attention(x @ w_q, x @ w_k, x_ @ w_v, causal=causal)))

        fd = (loss_v(x + h * t) - loss_v(x - h * t)) / (2 * h)
        printed, corrected = f @ g @ w_v.T, res.terms[4]
        rows = [("T5 = ∂L/∂X through V", fd, printed, corrected, t)]
        t = rng.standard_normal(w_v.shape)
        fd = (loss(x, w_v + h * t) - loss(x, w_v - h * t)) / (2 * h)
        rows.append(("∂L/∂W_V", fd, x.T @ f @ g, res.dw_v, t))
        for name, fd, printed, corrected, t in rows:
            mis = [abs(np.sum(t * a) - fd) / abs(fd) for a in (printed, corrected)]
            mask = "causal" if causal else "bidirectional"
            print(f"| {mask} | {name} | {mis[0]:.2e} | {mis[1]:.2e} |")


if __name__ == "__main__":
    main()
