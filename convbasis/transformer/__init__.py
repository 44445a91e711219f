"""A multi-layer transformer with an almost-linear backward pass (docs/math.rst §5).

Layer ``ℓ`` maps ``X (..., n, d_model)`` to

    Z  = X + MHA(norm₁(X)),        MHA(U) = Σ_h attention(U W_Q[h], U W_K[h], U W_V[h]) W_O[h]
    X' = Z + MLP(norm₂(Z)),        MLP(U) = φ(U W₁) W₂

and :func:`loss_and_gradients` walks the layers backwards (Algorithm 1 of arXiv 2408.13233):
the attention gradients come from :func:`convbasis.gradients.attention_gradients` with the chosen
structure of ``f`` (any method of :data:`convbasis.operators.METHODS`: ``"dense"``,
``"lowrank"``, ``"conv"``, ``"multipole"``); everything else is the exact, linear-in-``n``
chain rule.  The result holds a gradient for every parameter and for the input ``X``
(prompt/prefix tuning).

For a fast method the forward output is ``op.matmul(V)`` of the method's operator.  With
``gradient="model"`` the loss and its gradients belong to that one (approximate) model; with
the default ``gradient="exact-formula"`` (the papers' Algorithm 1) the gradients put the
approximate ``f̃`` into the exact formulas, which is not the gradient of the computed loss
(docs/math.rst §7).

Modules: ``convbasis.transformer.params`` (parameters and their initialisation),
``convbasis.transformer.activations``, ``convbasis.transformer.norms``,
``convbasis.transformer.model`` (the forward pass and its caches),
``convbasis.transformer.backward`` (:func:`loss_and_gradients`) and
``convbasis.transformer.losses``.
"""

from __future__ import annotations

from . import activations as _activations
from . import norms as _norms
from .backward import TransformerGradients, gradient_errors, loss_and_gradients
from .losses import CrossEntropyLoss, cross_entropy_loss, squared_error_loss
from .model import ForwardCache, LayerCache, forward
from .norms import NORM_EPS as NORM_EPS  # public as before, though not in __all__
from .params import LayerParams, TransformerParams, init_params

# Bound here rather than imported so that autodoc, which reads data docstrings from the
# documented module's own source, still shows them on the package's API page.
ACTIVATIONS = _activations.ACTIVATIONS
"""Element-wise activations ``φ``; each maps ``(xp, z)`` to ``(φ(z), φ'(z))``."""

NORMS = _norms.NORMS
"""The norm options (identity, LayerNorm with gain and bias, RMSNorm with gain)."""

__all__ = [
    "ACTIVATIONS",
    "NORMS",
    "CrossEntropyLoss",
    "ForwardCache",
    "LayerCache",
    "LayerParams",
    "TransformerGradients",
    "TransformerParams",
    "cross_entropy_loss",
    "forward",
    "gradient_errors",
    "init_params",
    "loss_and_gradients",
    "squared_error_loss",
]
