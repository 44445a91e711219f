"""The k-conv basis (docs/math.rst §4): FFT products, exact decomposition, recovery, attention.

A lower-triangular ``H`` has a k-conv basis when its aligned columns ``H[j:, j]`` are
piecewise constant in ``j`` (:class:`ConvBasis`: the starts ``σ_i`` and cumulative vectors
``c_i``); products ``H Z`` and ``Hᵀ Z`` then cost ``O(k n p log n)`` by FFT in the segment form
(``convbasis.conv._fft``).  :func:`decompose_conv_basis` finds the exact basis of a dense
matrix, :func:`fit_conv_basis` a best-effort one, and :func:`recover_conv_basis` the basis of
the logits from ``Q, K`` without forming them.

Attention (:func:`conv_attention`, :class:`ConvAttentionOperator`) exponentiates the
recovered basis with a global shift and runs one set of FFT products on ``[V, 1]``.  Rows whose
normaliser the FFT cannot resolve are recomputed exactly from the basis with their own row
maximum (``convbasis.conv.safeguard``), so the result never contains NaN or inf.

Modules: ``convbasis.conv.basis`` (the basis, single sub-convolution products,
decomposition, fit), ``convbasis.conv.recovery``, ``convbasis.conv.safeguard``,
``convbasis.conv.attention``, and the private FFT kernels ``_fft``.
"""

from .attention import ConvAttentionOperator, ConvBasisWarning, conv_attention, conv_operator
from .basis import ConvBasis, conv_matmul, conv_rmatmul, decompose_conv_basis, fit_conv_basis
from .recovery import recover_conv_basis

__all__ = [
    "ConvAttentionOperator",
    "ConvBasis",
    "ConvBasisWarning",
    "conv_attention",
    "conv_matmul",
    "conv_operator",
    "conv_rmatmul",
    "decompose_conv_basis",
    "fit_conv_basis",
    "recover_conv_basis",
]
