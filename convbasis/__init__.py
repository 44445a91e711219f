"""convbasis: reference implementations of sub-quadratic attention algorithms.

Every function takes arrays from any library that array-api-compat supports (NumPy, CuPy,
array-api-strict, ...) and returns results in the caller's library, device and dtype.
The dense oracles live in :mod:`convbasis.reference`; ``convbasis.self_attention_gradients``
is the operator-based version that takes ``method=``.
"""

from .causal import face_splitting_product, masked_hadamard_matmul, masked_lowrank_matmul
from .conv import (
    ConvAttentionOperator,
    ConvBasis,
    ConvBasisWarning,
    conv_attention,
    conv_matmul,
    conv_operator,
    conv_rmatmul,
    decompose,
    fit,
    recover_conv_basis,
)
from .gradients import attention_gradients, self_attention_gradients
from .multipole import (
    MultipoleAttentionOperator,
    MultipoleGradients,
    multipole_attention,
    multipole_attention_backward,
    multipole_operator,
    multipole_reference,
    multipole_weights,
)
from .operators import AttentionOperator, DenseAttentionOperator, attention_operator
from .polynomial import (
    ExpApproximationError,
    LowRankAttentionOperator,
    LowRankFactors,
    chebyshev_coefficients,
    degree_for,
    exp_approximation_error,
    exp_coefficients,
    lowrank_attention,
    lowrank_factors,
    lowrank_operator,
    rank_for,
    taylor_coefficients,
)
from .reference import SelfAttentionGradients, attention, attention_backward, attention_weights

__version__ = "0.1.0"

__all__ = [
    "AttentionOperator",
    "ConvAttentionOperator",
    "ConvBasis",
    "ConvBasisWarning",
    "DenseAttentionOperator",
    "ExpApproximationError",
    "LowRankAttentionOperator",
    "LowRankFactors",
    "MultipoleAttentionOperator",
    "MultipoleGradients",
    "SelfAttentionGradients",
    "attention",
    "attention_backward",
    "attention_gradients",
    "attention_operator",
    "attention_weights",
    "chebyshev_coefficients",
    "conv_attention",
    "conv_matmul",
    "conv_operator",
    "conv_rmatmul",
    "decompose",
    "degree_for",
    "exp_approximation_error",
    "exp_coefficients",
    "face_splitting_product",
    "fit",
    "lowrank_attention",
    "lowrank_factors",
    "lowrank_operator",
    "masked_hadamard_matmul",
    "masked_lowrank_matmul",
    "multipole_attention",
    "multipole_attention_backward",
    "multipole_operator",
    "multipole_reference",
    "multipole_weights",
    "rank_for",
    "recover_conv_basis",
    "self_attention_gradients",
    "taylor_coefficients",
]
