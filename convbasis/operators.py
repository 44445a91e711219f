"""The attention-operator protocol and the registry of structured implementations.

Normalised attention ``f = D⁻¹ A`` enters forward attention and all five gradient terms only
through four products (MATH.md §3):

* ``matmul(z)`` — ``f Z``
* ``rmatmul(z)`` — ``fᵀ Z``
* ``hadamard_matmul(g, y, z)`` — ``(f ∘ G Yᵀ) Z``
* ``hadamard_rmatmul(g, y, z)`` — ``(f ∘ G Yᵀ)ᵀ Z``

so gradients are written once against this protocol.  Implementations: dense (this module,
from the reference oracle), low-rank (:mod:`convbasis.polynomial`) and k-conv basis
(:mod:`convbasis.conv`).  A new structure plugs in by implementing the four products and
registering a constructor in :data:`METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from array_api_compat import array_namespace

from ._array import resolve_scale, validate_attention_inputs
from .reference import _weights

__all__ = [
    "METHODS",
    "AttentionOperator",
    "DenseAttentionOperator",
    "attention_operator",
    "dense_operator",
]


@runtime_checkable
class AttentionOperator(Protocol):
    """Normalised attention ``f (..., n, n)`` known through its products with ``(..., n, p)``."""

    def matmul(self, z): ...

    def rmatmul(self, z): ...

    def hadamard_matmul(self, g, y, z): ...

    def hadamard_rmatmul(self, g, y, z): ...

    def to_dense(self): ...


@dataclass(frozen=True)
class DenseAttentionOperator:
    """``f`` held as an explicit ``(..., n, n)`` array: the ``O(n²)`` oracle of the protocol.

    Every product costs ``O(n² p)`` (Hadamard products ``O(n² (s + p))``).
    """

    weights: Any

    def _xp(self):
        return array_namespace(self.weights)

    def matmul(self, z):
        return self.weights @ z

    def rmatmul(self, z):
        return self._xp().matrix_transpose(self.weights) @ z

    def hadamard_matmul(self, g, y, z):
        return (self.weights * (g @ self._xp().matrix_transpose(y))) @ z

    def hadamard_rmatmul(self, g, y, z):
        mT = self._xp().matrix_transpose
        return mT(self.weights * (g @ mT(y))) @ z

    def to_dense(self):
        return self.weights


def dense_operator(q, k, /, *, causal=True, scale=None):
    """The dense attention operator of ``softmax(s · Q Kᵀ)`` (masked if ``causal``).

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    causal : bool
    scale : float, optional
        Default ``1/sqrt(d)``.

    Returns
    -------
    DenseAttentionOperator
        ``O(n² d)`` time, ``O(n²)`` memory.
    """
    xp, q, k, _ = validate_attention_inputs(q, k, k, causal=causal)
    return DenseAttentionOperator(_weights(xp, q, k, resolve_scale(scale, q.shape[-1]), causal, 0))


def _lowrank(q, k, /, **options):
    from .polynomial import lowrank_operator

    return lowrank_operator(q, k, **options)


def _conv(q, k, /, **options):
    from .conv import conv_operator

    return conv_operator(q, k, **options)


METHODS = {"dense": dense_operator, "lowrank": _lowrank, "conv": _conv}
"""Operator constructors by method name; each takes ``(q, k, /, *, causal, scale, ...)``."""


def attention_operator(q, k, /, *, method="dense", causal=True, scale=None, **options):
    """Build the attention operator of ``softmax(s · Q Kᵀ)`` with the chosen structure.

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    method : {"dense", "lowrank", "conv"}
        ``"lowrank"`` takes the options of :func:`convbasis.polynomial.lowrank_operator`
        (``eps`` or ``degree``, ``kind``, ``max_rank``); ``"conv"`` those of
        :func:`convbasis.conv.conv_operator` (``rank``, ``probe``, ``delta``).
    causal : bool
    scale : float, optional

    Returns
    -------
    AttentionOperator
    """
    try:
        build = METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown attention method {method!r}; valid methods: {sorted(METHODS)}"
        ) from None
    if method == "dense" and options:
        raise TypeError(f"the dense method takes no options, got {sorted(options)}")
    return build(q, k, causal=causal, scale=scale, **options)
