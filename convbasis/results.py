"""The result types of the gradient functions (frozen dataclasses).

Every function that differentiates attention with respect to ``q``, ``k`` and ``v`` returns
one :class:`AttentionGradients`: :func:`convbasis.attention_backward`,
:func:`convbasis.attention_gradients` (either meaning, every method),
:func:`convbasis.multipole_attention_backward` and :func:`convbasis.dask.attention_gradients`.
The gradients of a whole self-attention layer (with respect to ``x`` and the weights, with the
five terms of docs/math.rst §3) are a different quantity: :class:`SelfAttentionGradients`.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any

__all__ = ["AttentionGradients", "SelfAttentionGradients"]


@dataclass(frozen=True, eq=False)
class AttentionGradients:
    """Gradients of ``L(O)`` for attention ``O = f V`` with respect to ``q``, ``k``, ``v``.

    Unpacks as ``dq, dk, dv = grads`` and indexes as ``grads[0]`` … ``grads[2]``, as the tuple
    that convbasis 0.1 returned did.

    Attributes
    ----------
    dq, dk, dv : arrays shaped like ``q``, ``k``, ``v``
        Summed over the axes each input was broadcast along (grouped-query heads included).
    ddownsample : tuple of ``(c_ℓ,)`` arrays, or ``None``
        Gradients of Fast Multipole Attention's supplied ``downsample`` kernels; ``None``
        everywhere else.
    """

    dq: Any
    dk: Any
    dv: Any
    ddownsample: tuple[Any, ...] | None = None

    def __post_init__(self):
        _register_with_jax()

    def __iter__(self):
        return iter((self.dq, self.dk, self.dv))

    def __getitem__(self, index):
        return (self.dq, self.dk, self.dv)[index]

    def __len__(self):
        return 3


def _register_with_jax():
    """Make :class:`AttentionGradients` a JAX pytree, so that a function under ``jax.jit``,
    ``vmap`` or ``grad`` may return one.  Done on the first result made while JAX is loaded
    (looked up, never imported): registering at import would miss a JAX imported later."""
    global _REGISTERED
    jax = sys.modules.get("jax")
    if _REGISTERED or jax is None:
        return
    with _LOCK:
        if not _REGISTERED:
            fields = ["dq", "dk", "dv", "ddownsample"]
            jax.tree_util.register_dataclass(AttentionGradients, data_fields=fields, meta_fields=[])
            _REGISTERED = True


_REGISTERED = False
_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class SelfAttentionGradients:
    """Gradients of ``L(O)`` for ``O = softmax(s · X W_Q W_Kᵀ Xᵀ) X W_V`` (docs/math.rst §3).

    Attributes
    ----------
    terms : tuple of 5 arrays, each ``(..., n, d_model)``
        ``T1 … T5`` of docs/math.rst §3; they sum to ``dx``.
    dx : array ``(..., n, d_model)``
        ``∂L/∂X``.
    dw : array ``(..., d_model, d_model)``
        ``∂L/∂W`` for the product ``W = W_Q W_Kᵀ``.
    dw_q, dw_k, dw_v : arrays shaped like ``w_q``, ``w_k``, ``w_v``
        Weight gradients (summed over any axis the weight was broadcast along).
    """

    terms: tuple[Any, Any, Any, Any, Any]
    dx: Any
    dw: Any
    dw_q: Any
    dw_k: Any
    dw_v: Any
