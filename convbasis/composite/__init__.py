"""Composite attention: an exact near field plus a structured far field (docs/math.rst §8).

:mod:`.layout` decides which keys each query block sees exactly, :mod:`.far_field` builds the
FMM tokens that stand for the rest, :mod:`.operator` joins both in one softmax as an attention
operator, and :mod:`.attention` applies it with a sampled estimate of its error.
"""

from .attention import CompositeReport, composite_attention
from .operator import CompositeAttentionOperator, CompositeWarning, composite_operator

__all__ = [
    "CompositeAttentionOperator",
    "CompositeReport",
    "CompositeWarning",
    "composite_attention",
    "composite_operator",
]
