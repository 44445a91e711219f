"""convbasis: reference implementations of sub-quadratic attention algorithms.

Every function takes arrays from any library that array-api-compat supports (NumPy, CuPy,
array-api-strict, ...) and returns results in the caller's library, device and dtype.
The dense oracles live in :mod:`convbasis.reference`; ``convbasis.self_attention_gradients``
is the operator-based version that takes ``method=``.
"""

from .causal import face_splitting_product, masked_hadamard_matmul, masked_lowrank_matmul
from .composite import (
    CompositeAttentionOperator,
    CompositeReport,
    CompositeWarning,
    composite_attention,
    composite_operator,
)
from .conv import (
    ConvAttentionOperator,
    ConvBasis,
    ConvBasisWarning,
    conv_attention,
    conv_matmul,
    conv_operator,
    conv_rmatmul,
    decompose_conv_basis,
    fit_conv_basis,
    recover_conv_basis,
)
from .exp_approximation import (
    ExpApproximationError,
    chebyshev_coefficients,
    degree_for,
    exp_approximation_error,
    exp_coefficients,
    taylor_coefficients,
)
from .gradients import attention_gradients, self_attention_gradients
from .monomial_features import rank_for
from .multipole import (
    MultipoleAttentionOperator,
    MultipoleGradients,
    multipole_attention,
    multipole_attention_backward,
    multipole_operator,
)
from .operators import AttentionOperator, DenseAttentionOperator, attention_operator
from .polynomial import (
    LowRankAttentionOperator,
    LowRankFactors,
    lowrank_attention,
    lowrank_factors,
    lowrank_operator,
)
from .reference import (
    attention,
    attention_backward,
    attention_weights,
    multipole_reference,
    multipole_weights,
)
from .results import AttentionGradients, SelfAttentionGradients

__version__ = "0.1.0"

__all__ = [
    "AttentionGradients",
    "AttentionOperator",
    "CompositeAttentionOperator",
    "CompositeReport",
    "CompositeWarning",
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
    "composite_attention",
    "composite_operator",
    "conv_attention",
    "conv_matmul",
    "conv_operator",
    "conv_rmatmul",
    "decompose_conv_basis",
    "degree_for",
    "exp_approximation_error",
    "exp_coefficients",
    "face_splitting_product",
    "fit_conv_basis",
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
