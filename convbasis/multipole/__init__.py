"""Fast Multipole Attention: hierarchical ``O(n log n)`` attention (docs/math.rst §6).

arXiv 2310.11960.

Every query attends its own block and the two neighbouring blocks (``block`` keys each) at full
resolution, and the rest of the sequence through the FMM interaction lists of
``L = log2(N / block) − 1`` coarser levels, where keys and values are pooled into ``basis``
tokens per box.  One softmax per query runs over all levels; a coarse token is weighted by the
number of keys it stands for, so FMA approximates exact softmax attention and is exact when
keys and values are constant inside every pooled chunk.

Definitions (``m = block``, ``p = basis``, ``N`` the padded length, ``s`` the scale):

* Level ``ℓ ≥ 1`` uses boxes of ``w_ℓ = m·2^{ℓ−1}`` keys, each pooled into ``p`` tokens of
  ``c_ℓ = w_ℓ / p`` consecutive keys.  Token ``r`` covers keys ``r c_ℓ … (r+1) c_ℓ − 1``;
  ``cnt_r`` of them are real (not padding).  With kernel ``κ`` (``κ_t = 1`` for ``"mean"``,
  the supplied weights otherwise) and gain ``g_r = 1/cnt_r`` (mean) or ``c_ℓ/cnt_r``
  (supplied), the token's key and value are ``k̄_r = g_r Σ_t κ_t k_{r c_ℓ + t}`` and
  ``v̄_r = g_r Σ_t κ_t v_{r c_ℓ + t}`` (padding rows are zero).  Its unnormalised weight for
  query ``i`` is ``cnt_r · exp(s q_i·k̄_r − M_i)``; ``M_i`` is the query's maximum over all
  levels, the normaliser ``Z_i`` sums the weights of every level.
* The equivalent ``n × n`` matrix (:func:`convbasis.reference.multipole_weights`) is
  ``f = A / Z`` with ``A[i, j] = exp(s q_i·k_j − M_i)`` on the near field and
  ``A[i, j] = ρ_j exp(s q_i·k̄_r − M_i)`` for a key ``j = r c_ℓ + t`` seen through level
  ``ℓ``, ``ρ_j = 1`` (mean) or ``c_ℓ κ_t`` (supplied).  With ``"mean"`` the rows of ``f`` sum
  to one.

Padding: ``n`` is padded with zero rows to ``N = block · 2^⌈log2⌈n/block⌉⌉``; padded keys get
zero weight and padded query rows are dropped, so the result is the FMA of the unpadded
sequence (``n < block`` is exact attention).  Cost ``O(N (3m + 4pL)(d + e))`` time (causal:
``2m + 2pL``) and ``O(N (m + d + e))`` memory; no ``n × n`` array is formed except by
:func:`~convbasis.reference.multipole_weights` and :meth:`MultipoleAttentionOperator.to_dense`.

Modules: ``convbasis.multipole.geometry`` (validation, padding, level sizes),
``convbasis.multipole.levels`` (the near and far-field levels and the one pass over them
with a running maximum) and ``convbasis.multipole.attention`` (attention, backward,
operator).
"""

from .attention import (
    MultipoleAttentionOperator,
    MultipoleGradients,
    multipole_attention,
    multipole_attention_backward,
    multipole_operator,
)
from .geometry import kernel_shapes

__all__ = [
    "MultipoleAttentionOperator",
    "MultipoleGradients",
    "kernel_shapes",
    "multipole_attention",
    "multipole_attention_backward",
    "multipole_operator",
]
