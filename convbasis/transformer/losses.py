"""Losses for :func:`~convbasis.transformer.loss_and_gradients`: callables
``loss(out) -> (L, ∂L/∂out)``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import array_api_extra as xpx
from array_api_compat import device

from .._array import namespace, sum_to_shape
from .._capabilities import traced

__all__ = ["CrossEntropyLoss", "cross_entropy_loss", "squared_error_loss"]


def squared_error_loss(target, /):
    """The papers' loss ``L = ½ ‖out − E‖²_F`` (``∂L/∂out = out − E``) as a callable.

    Parameters
    ----------
    target : array
        Shaped like the model output.
    """

    def loss(out):
        diff = out - target
        return 0.5 * _sum_all(diff * diff), diff

    return loss


def _sum_all(a):
    xp = namespace(a)
    return xp.sum(xp.reshape(a, (-1,)))


@dataclass(frozen=True)
class CrossEntropyLoss:
    """Mean token cross-entropy through a vocabulary projection ``logits = out W_vocab``.

    ``L = −(1/N) Σ_i log softmax(out_i W_vocab)[label_i]`` over the ``N`` tokens;
    ``∂L/∂out = (softmax − onehot) W_vocabᵀ / N``.  Calling it gives ``(L, ∂L/∂out)``;
    :meth:`w_vocab_gradient` gives ``∂L/∂W_vocab = outᵀ (softmax − onehot) / N`` too.

    Attributes
    ----------
    w_vocab : array ``(d_model, vocab)``
    labels : integer array ``(..., n)`` with values in ``[0, vocab)``
    """

    w_vocab: Any
    labels: Any

    def _parts(self, out):
        xp = namespace(out, self.w_vocab)
        logits = out @ self.w_vocab
        shifted = logits - xp.max(logits, axis=-1, keepdims=True)
        e = xp.exp(shifted)
        total = xp.sum(e, axis=-1, keepdims=True)
        vocab = self.w_vocab.shape[-1]
        onehot = xpx.one_hot(self.labels, vocab, dtype=logits.dtype, xp=xp)
        # Only traced labels get past cross_entropy_loss's range check: outside [0, vocab)
        # they give NaN, not a one-hot row of zeros (a finite, wrong loss).
        inside = (self.labels >= 0) & (self.labels < vocab)
        nan = xp.asarray(xp.nan, dtype=logits.dtype, device=device(logits))
        onehot = xp.where(inside[..., None], onehot, nan)
        tokens = math.prod(self.labels.shape)
        picked = xp.sum(onehot * (shifted - xp.log(total)), axis=-1)
        value = -_sum_all(picked) / tokens
        return xp, value, (e / total - onehot) / tokens

    def __call__(self, out):
        xp, value, dlogits = self._parts(out)
        return value, dlogits @ xp.matrix_transpose(self.w_vocab)

    def w_vocab_gradient(self, out, /):
        """``∂L/∂W_vocab`` ``(d_model, vocab)`` at model output ``out``."""
        xp, _, dlogits = self._parts(out)
        return sum_to_shape(xp, xp.matrix_transpose(out) @ dlogits, self.w_vocab.shape)


def cross_entropy_loss(w_vocab, labels, /):
    """Mean cross-entropy of ``labels`` under ``softmax(out W_vocab)``; see
    :class:`CrossEntropyLoss`.

    Parameters
    ----------
    w_vocab : array ``(d_model, vocab)``
    labels : integer array ``(..., n)``
        Values in ``[0, vocab)``, checked here; under JAX tracing they cannot be read, and a
        label outside the range makes the loss and its gradient NaN.
    """
    xp = namespace(w_vocab, labels)
    if w_vocab.ndim != 2:
        raise ValueError(f"w_vocab must have shape (d_model, vocab), got {tuple(w_vocab.shape)}")
    if not xp.isdtype(labels.dtype, "integral"):
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    vocab = w_vocab.shape[-1]
    if math.prod(labels.shape) and not traced(labels):
        if not (int(xp.min(labels)) >= 0 and int(xp.max(labels)) < vocab):
            raise ValueError(f"labels must lie in [0, vocab = {vocab}), got values outside")
    return CrossEntropyLoss(w_vocab, labels)
