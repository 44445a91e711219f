"""convbasis: reference implementations of sub-quadratic attention algorithms.

Every function takes arrays from any library that array-api-compat supports (NumPy, CuPy,
array-api-strict, ...) and returns results in the caller's library, device and dtype.
"""

from .causal import face_splitting_product, masked_hadamard_matmul, masked_lowrank_matmul
from .reference import (
    SelfAttentionGradients,
    attention,
    attention_backward,
    attention_weights,
    self_attention_gradients,
)

__version__ = "0.1.0"

__all__ = [
    "SelfAttentionGradients",
    "attention",
    "attention_backward",
    "attention_weights",
    "face_splitting_product",
    "masked_hadamard_matmul",
    "masked_lowrank_matmul",
    "self_attention_gradients",
]
