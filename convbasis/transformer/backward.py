"""The transformer's backward pass: loss, every parameter gradient and the input gradient
(docs/math.rst §5, Algorithm 1 of arXiv 2408.13233)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .._array import namespace, sum_to_shape
from .._capabilities import check_eager
from ..gradients import attention_gradients, check_gradient
from ..reference import attention_backward as dense_attention_backward
from .activations import ACTIVATIONS
from .model import forward
from .norms import norm_backward
from .params import LayerParams, TransformerParams

__all__ = ["TransformerGradients", "gradient_errors", "loss_and_gradients"]


@dataclass(frozen=True)
class TransformerGradients:
    """Result of :func:`loss_and_gradients`.

    Attributes
    ----------
    loss : scalar array
    params : TransformerParams
        ``∂L/∂θ`` for every parameter, in the structure of the parameters.
    x : array ``(..., n, d_model)``
        ``∂L/∂X`` for the input (prompt/prefix tuning).
    out : array ``(..., n, d_model)``
        The model output the loss was evaluated at.
    """

    loss: Any
    params: TransformerParams
    x: Any
    out: Any


def _attention_backward(xp, q, k, v, g, attention, gradient, causal, scale, options):
    if attention == "dense" and "block" in options:
        return dense_attention_backward(
            q, k, v, g, causal=causal, scale=scale, block=options["block"]
        )
    return attention_gradients(
        q, k, v, g, method=attention, gradient=gradient, causal=causal, scale=scale, **options
    )


def _layer_backward(xp, params, p, c, g, attention, gradient, causal, scale, options):
    """``(∂L/∂X, LayerParams of gradients)`` for one layer given ``g = ∂L/∂X'``."""
    mT = xp.matrix_transpose
    act, dact = ACTIVATIONS[params.activation](xp, c.pre)
    # MLP branch: X' = Z + φ(U₂ W₁) W₂
    dw2 = sum_to_shape(xp, mT(act) @ g, p.w2.shape)
    dpre = (g @ mT(p.w2)) * dact
    dw1 = sum_to_shape(xp, mT(c.u2) @ dpre, p.w1.shape)
    du2, dgain2, dbias2 = norm_backward(
        xp, params.norm, dpre @ mT(p.w1), c.stats2, p.gain2, p.bias2
    )
    gz = g + du2
    # attention branch: Z = X + Σ_h O_h W_O[h]
    ge = xp.expand_dims(gz, axis=-3)
    dw_o = sum_to_shape(xp, mT(c.o) @ ge, p.w_o.shape)
    do = ge @ mT(p.w_o)
    dq, dk, dv = _attention_backward(
        xp, c.q, c.k, c.v, do, attention, gradient, causal, scale, options
    )
    ue = xp.expand_dims(c.u1, axis=-3)
    grads = {
        "w_q": sum_to_shape(xp, mT(ue) @ dq, p.w_q.shape),
        "w_k": sum_to_shape(xp, mT(ue) @ dk, p.w_k.shape),
        "w_v": sum_to_shape(xp, mT(ue) @ dv, p.w_v.shape),
    }
    du1 = xp.sum(dq @ mT(p.w_q) + dk @ mT(p.w_k) + dv @ mT(p.w_v), axis=-3)
    dx1, dgain1, dbias1 = norm_backward(xp, params.norm, du1, c.stats1, p.gain1, p.bias1)
    layer = LayerParams(
        **grads, w_o=dw_o, w1=dw1, w2=dw2, gain1=dgain1, bias1=dbias1, gain2=dgain2, bias2=dbias2
    )
    return gz + dx1, layer


def loss_and_gradients(
    params,
    x,
    loss,
    /,
    *,
    attention="dense",
    gradient="exact-formula",
    causal=True,
    scale=None,
    **options,
):
    """Loss and gradients for every parameter and for the input (docs/math.rst §5).

    Parameters
    ----------
    params : TransformerParams
    x : array ``(..., n, d_model)``
    loss : callable
        ``loss(out) -> (L, ∂L/∂out)``; see :func:`squared_error_loss`,
        :func:`cross_entropy_loss`.
    attention, causal, scale, options
        As in :func:`forward`; the backward uses
        :func:`convbasis.gradients.attention_gradients` with ``method=attention``.
    gradient : {"exact-formula", "model"}
        ``"model"``: the returned gradients are those of the returned loss (the approximate
        model's own).  ``"exact-formula"`` (the papers' Algorithm 1): the approximate ``f̃``
        put into the exact attention gradient formulas (docs/math.rst §7).  The same for
        ``attention="dense"``.

    Returns
    -------
    TransformerGradients
        Cost: the forward plus, per layer, the four operator products of each head's attention
        backward (almost linear in ``n`` for the fast methods) and
        ``O(n d_model (heads·d_head + d_ff))`` chain rule.
    """
    if not callable(loss):
        raise TypeError(f"loss must be callable, loss(out) -> (L, dL/dout); got {loss!r}")
    check_gradient(gradient)
    out, cache = forward(params, x, attention=attention, causal=causal, scale=scale, **options)
    xp = namespace(out)
    value, g = loss(out)
    if tuple(g.shape) != tuple(out.shape):
        # no silent broadcasting: a (1, d_model) gradient would give wrong parameter gradients
        raise ValueError(
            f"dL/dout returned by loss must have the output's shape {tuple(out.shape)}, "
            f"got {tuple(g.shape)}"
        )
    layers = []
    for p, c in zip(reversed(params.layers), reversed(cache.layers), strict=True):
        g, layer = _layer_backward(xp, params, p, c, g, attention, gradient, causal, scale, options)
        layers.append(layer)
    grads = TransformerParams(tuple(reversed(layers)), params.norm, params.activation)
    return TransformerGradients(value, grads, g, out)


def gradient_errors(approx, exact, /):
    """Per-layer relative gradient error ``max_θ ‖Δ∂θ‖_F / ‖∂θ‖_F`` and the input's
    (absolute where ``∂θ`` is exactly zero).

    A gradient that is zero in exact arithmetic (``W_K``'s at ``n = 1``) but carries rounding
    residue in ``exact`` makes its ratio meaningless: take ``exact`` from the blocked dense
    reference (``attention="dense", block=...``), which returns such zeros exactly.

    Parameters
    ----------
    approx, exact : TransformerGradients

    Returns
    -------
    dict
        ``{"layers": [float per layer], "x": float}``.
    """
    check_eager("transformer.gradient_errors", approx.x, exact.x)
    xp = namespace(exact.x)

    def rel(a, b):
        norm = float(xp.linalg.vector_norm(b))  # an exactly zero gradient: absolute error
        return float(xp.linalg.vector_norm(a - b)) / (norm if norm > 0 else 1.0)

    per_layer = []
    for la, lb in zip(approx.params.layers, exact.params.layers, strict=True):
        errs = [
            rel(getattr(la, f.name), getattr(lb, f.name))
            for f in dataclasses.fields(lb)
            if getattr(lb, f.name) is not None
        ]
        per_layer.append(max(errs))
    return {"layers": per_layer, "x": rel(approx.x, exact.x)}
