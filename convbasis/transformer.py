"""A multi-layer transformer with an almost-linear backward pass (MATH.md §5).

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
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

from ._array import (
    as_floating,
    check_integer,
    check_last_dim,
    check_rows,
    namespace,
    sum_to_shape,
)
from .gradients import GRADIENTS, attention_gradients
from .operators import METHODS, attention_operator
from .reference import attention as dense_attention
from .reference import attention_backward as dense_attention_backward

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

NORMS = ("none", "layer", "rms")
"""Norm options: identity, LayerNorm (gain and bias), RMSNorm (gain)."""

NORM_EPS = 1e-5
"""The ``ε`` inside both norms' square root."""

_GELU_C = math.sqrt(2.0 / math.pi)


def _relu(xp, z):
    return xp.where(z > 0, z, xp.zeros_like(z)), xp.astype(z > 0, z.dtype)


def _gelu(xp, z):
    # tanh form: φ(z) = ½ z (1 + tanh(c (z + 0.044715 z³)))
    # z * z rather than z**2 / z**3: NumPy's float32 power with a cube is ~100x slower
    z2 = z * z
    t = xp.tanh(_GELU_C * (z + 0.044715 * (z2 * z)))
    dt = _GELU_C * (1.0 + 3 * 0.044715 * z2)
    return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dt


def _identity(xp, z):
    return z, xp.ones_like(z)


ACTIVATIONS = {"relu": _relu, "gelu": _gelu, "identity": _identity}
"""Element-wise activations ``φ``; each maps ``(xp, z)`` to ``(φ(z), φ'(z))``."""


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class LayerParams:
    """Weights of one layer (arrays in one namespace and floating dtype).

    Attributes
    ----------
    w_q, w_k, w_v : ``(heads, d_model, d_head)``
        Per-head projections, stacked along the head axis.
    w_o : ``(heads, d_head, d_model)``
        Output projection: the ``(heads·d_head, d_model)`` matrix applied to the concatenated
        heads, split per head (``concat(O_h) W_O = Σ_h O_h W_O[h]``).
    w1 : ``(d_model, d_ff)``
    w2 : ``(d_ff, d_model)``
    gain1, gain2 : ``(d_model,)`` or None
        Gains of norm₁ and norm₂ (LayerNorm and RMSNorm); None without norms.
    bias1, bias2 : ``(d_model,)`` or None
        Biases of the LayerNorms; None otherwise.
    """

    w_q: Any
    w_k: Any
    w_v: Any
    w_o: Any
    w1: Any
    w2: Any
    gain1: Any = None
    bias1: Any = None
    gain2: Any = None
    bias2: Any = None


@dataclass(frozen=True)
class TransformerParams:
    """All parameters: a tuple of :class:`LayerParams` plus the (non-array) configuration.

    Attributes
    ----------
    layers : tuple of LayerParams
    norm : {"none", "layer", "rms"}
    activation : {"relu", "gelu", "identity"}

    Gradients come back in this same structure (``norm`` and ``activation`` copied).
    """

    layers: tuple
    norm: str = "none"
    activation: str = "gelu"

    def __post_init__(self):
        _check_choice(self.norm, NORMS, "norm")
        _check_choice(self.activation, ACTIVATIONS, "activation")

    @property
    def d_model(self):
        return self.layers[0].w_q.shape[-2]

    def leaves(self):
        """``{"layers[i].name": array}`` for every parameter array present (not None)."""
        return {
            f"layers[{i}].{f.name}": getattr(layer, f.name)
            for i, layer in enumerate(self.layers)
            for f in dataclasses.fields(layer)
            if getattr(layer, f.name) is not None
        }

    def map(self, func, *others):
        """New params with ``func(a, *b)`` on each array (``others`` share the structure).

        E.g. one SGD step: ``params.map(lambda p, g: p - lr * g, grads.params)``.
        """
        layers = tuple(
            LayerParams(
                **{
                    f.name: None
                    if getattr(layer, f.name) is None
                    else func(
                        getattr(layer, f.name), *(getattr(o.layers[i], f.name) for o in others)
                    )
                    for f in dataclasses.fields(layer)
                }
            )
            for i, layer in enumerate(self.layers)
        )
        return TransformerParams(layers, self.norm, self.activation)


def _check_choice(value, valid, name):
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {sorted(valid)}")


def init_params(
    d_model,
    /,
    *,
    layers,
    heads,
    xp,
    d_head=None,
    d_ff=None,
    norm="none",
    activation="gelu",
    dtype=None,
    seed=0,
):
    """Random parameters (Gaussian, variance ``1/fan_in``; gains 1, biases 0).

    Parameters
    ----------
    d_model : int
    layers, heads : int
    xp : array namespace
        Where the arrays are built (``xp.asarray`` of Python floats from :mod:`random`
        seeded with ``seed``, so the values do not depend on the backend).
    d_head : int, optional
        Default ``d_model // heads``.
    d_ff : int, optional
        Default ``4 · d_model``.
    norm, activation : str
        See :data:`NORMS` and :data:`ACTIVATIONS`.
    dtype : floating dtype of ``xp``, optional
        Default ``xp.float64``.
    seed : int

    Returns
    -------
    TransformerParams
    """
    _check_choice(norm, NORMS, "norm")
    _check_choice(activation, ACTIVATIONS, "activation")

    d_model, layers, heads = (
        check_integer(value, name)
        for value, name in ((d_model, "d_model"), (layers, "layers"), (heads, "heads"))
    )
    d_head = check_integer(max(d_model // heads, 1) if d_head is None else d_head, "d_head")
    d_ff = check_integer(4 * d_model if d_ff is None else d_ff, "d_ff")
    dtype = xp.float64 if dtype is None else dtype
    gen = random.Random(seed)

    def normal(shape, fan_in):
        size = math.prod(shape)
        sd = 1.0 / math.sqrt(fan_in)
        return xp.reshape(xp.asarray([gen.gauss(0.0, sd) for _ in range(size)], dtype=dtype), shape)

    def const(value):
        return xp.full((d_model,), value, dtype=dtype)

    out = []
    for _ in range(layers):
        qkv = [normal((heads, d_model, d_head), d_model) for _ in range(3)]
        norms = {}
        if norm != "none":
            norms = {"gain1": const(1.0), "gain2": const(1.0)}
        if norm == "layer":
            norms |= {"bias1": const(0.0), "bias2": const(0.0)}
        out.append(
            LayerParams(
                *qkv,
                w_o=normal((heads, d_head, d_model), heads * d_head),
                w1=normal((d_model, d_ff), d_model),
                w2=normal((d_ff, d_model), d_ff),
                **norms,
            )
        )
    return TransformerParams(tuple(out), norm, activation)


# --------------------------------------------------------------------------- norms


def _norm_forward(xp, kind, x, gain, bias):
    """``(y, (xhat, r))``; ``r = 1/sqrt(var + ε)`` per row, ``xhat`` the normalised rows."""
    if kind == "none":
        return x, None
    if kind == "layer":
        x = x - xp.mean(x, axis=-1, keepdims=True)
    r = 1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + NORM_EPS)
    xhat = x * r
    y = xhat * gain
    return (y + bias if bias is not None else y), (xhat, r)


def _norm_backward(xp, kind, dy, stats, gain, bias):
    """``(dx, dgain, dbias)``; exact chain rule, ``O(n d_model)``."""
    if kind == "none":
        return dy, None, None
    xhat, r = stats
    dgain = sum_to_shape(xp, dy * xhat, gain.shape)
    dbias = sum_to_shape(xp, dy, bias.shape) if bias is not None else None
    dxhat = dy * gain
    proj = xp.mean(dxhat * xhat, axis=-1, keepdims=True)
    dx = dxhat - xhat * proj
    if kind == "layer":
        dx = dx - xp.mean(dxhat, axis=-1, keepdims=True)
    return r * dx, dgain, dbias


# --------------------------------------------------------------------------- forward


@dataclass(frozen=True)
class LayerCache:
    """What the backward of one layer needs (``h`` = heads axis, before ``n``).

    ``x`` layer input; ``u1``/``u2`` norm outputs with ``stats1``/``stats2``; ``q, k, v, o``
    per-head ``(..., heads, n, d_head)``; ``z`` residual after attention; ``pre`` = ``u2 W₁``.
    """

    x: Any
    u1: Any
    stats1: Any
    q: Any
    k: Any
    v: Any
    o: Any
    z: Any
    u2: Any
    stats2: Any
    pre: Any


@dataclass(frozen=True)
class ForwardCache:
    """Per-layer caches plus the attention settings used, so the backward matches."""

    layers: tuple
    attention: str
    causal: bool
    scale: Any
    options: dict


def _check_params(xp, params):
    """Consistent shapes and real floating dtypes in every layer; clear errors otherwise."""
    if not params.layers:
        raise ValueError("params must have at least one layer")
    first = params.layers[0]
    if getattr(first.w_q, "ndim", None) != 3:
        raise ValueError(
            "layers[0].w_q must have shape (heads, d_model, d_head), "
            f"got {getattr(first.w_q, 'shape', type(first.w_q).__name__)}"
        )
    heads, d_model, d_head = first.w_q.shape
    d_v = getattr(first.w_v, "shape", (None,))[-1]
    d_ff = getattr(first.w1, "shape", (None,))[-1]
    expected = {
        "w_q": (heads, d_model, d_head),
        "w_k": (heads, d_model, d_head),
        "w_v": (heads, d_model, d_v),
        "w_o": (heads, d_v, d_model),
        "w1": (d_model, d_ff),
        "w2": (d_ff, d_model),
    }
    norms = {"none": (), "layer": ("gain1", "bias1", "gain2", "bias2"), "rms": ("gain1", "gain2")}
    for i, layer in enumerate(params.layers):
        for f in dataclasses.fields(layer):
            value, name = getattr(layer, f.name), f"layers[{i}].{f.name}"
            if f.name in expected:
                shape = expected[f.name]
            elif f.name in norms[params.norm]:
                shape = (d_model,)
            else:
                if value is not None:
                    raise ValueError(f"{name} must be None with norm={params.norm!r}")
                continue
            if value is None:
                raise ValueError(f"{name} is missing (None); norm={params.norm!r} needs it")
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
            if not xp.isdtype(value.dtype, "real floating"):
                raise TypeError(f"{name} must have a real floating dtype, got {value.dtype}")


def _validate_input(params, x, attention):
    if not isinstance(params, TransformerParams):
        raise TypeError(f"params must be TransformerParams, got {type(params).__name__}")
    _check_choice(attention, METHODS, "attention method")
    xp = namespace(x, *params.leaves().values())
    _check_params(xp, params)
    check_rows(x, "x")
    check_last_dim(x, "x", params.d_model, "d_model of params")
    (x,) = as_floating(xp, (x,), ("x",))
    return xp, x


def _attention_forward(xp, q, k, v, attention, causal, scale, options):
    if attention == "dense":
        # dense: the reference oracle; ``block`` bounds its memory to O(block·n) per head
        return dense_attention(q, k, v, causal=causal, scale=scale, block=options.get("block"))
    # forward through the same operator the backward will rebuild, so loss and gradients agree
    op = attention_operator(q, k, method=attention, causal=causal, scale=scale, **options)
    return op.matmul(v)


def _attention_backward(xp, q, k, v, g, attention, gradient, causal, scale, options):
    if attention == "dense" and "block" in options:
        return dense_attention_backward(
            q, k, v, g, causal=causal, scale=scale, block=options["block"]
        )
    return attention_gradients(
        q, k, v, g, method=attention, gradient=gradient, causal=causal, scale=scale, **options
    )


def _check_options(attention, options):
    if attention == "dense" and set(options) - {"block"}:
        raise TypeError(f"dense attention takes only the block option, got {sorted(options)}")


def forward(params, x, /, *, causal=True, attention="dense", scale=None, **options):
    """Run the transformer, keeping what the backward needs.

    Parameters
    ----------
    params : TransformerParams
    x : array ``(..., n, d_model)``
        Input embeddings; leading axes are a batch.
    causal : bool
    attention : {"dense", "lowrank", "conv", "multipole"}
        Structure of each head's attention matrix ``f``.  ``options`` go to the operator
        (:func:`convbasis.operators.attention_operator`); ``"dense"`` takes only ``block``
        (rows per block of the reference oracle, ``O(block·n)`` memory).
    scale : float, optional
        Logit scale; default ``1/sqrt(d_head)``.

    Returns
    -------
    (out, cache)
        ``out`` ``(..., n, d_model)`` and a :class:`ForwardCache`.  Cost per layer: one
        attention per head (``O(n² d_head)`` dense, almost linear for fast methods) plus
        ``O(n d_model (heads·d_head + d_ff))``.
    """
    xp, x = _validate_input(params, x, attention)
    _check_options(attention, options)
    act = ACTIVATIONS[params.activation]
    caches = []
    for p in params.layers:
        u1, stats1 = _norm_forward(xp, params.norm, x, p.gain1, p.bias1)
        ue = xp.expand_dims(u1, axis=-3)  # (..., 1, n, d_model): heads broadcast
        q, k, v = ue @ p.w_q, ue @ p.w_k, ue @ p.w_v
        o = _attention_forward(xp, q, k, v, attention, causal, scale, options)
        z = x + xp.sum(o @ p.w_o, axis=-3)  # concat(O_h) W_O = Σ_h O_h W_O[h]
        u2, stats2 = _norm_forward(xp, params.norm, z, p.gain2, p.bias2)
        pre = u2 @ p.w1
        caches.append(LayerCache(x, u1, stats1, q, k, v, o, z, u2, stats2, pre))
        x = z + act(xp, pre)[0] @ p.w2
    return x, ForwardCache(tuple(caches), attention, causal, scale, dict(options))


# --------------------------------------------------------------------------- backward


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


def _layer_backward(xp, params, p, c, g, attention, gradient, causal, scale, options):
    """``(∂L/∂X, LayerParams of gradients)`` for one layer given ``g = ∂L/∂X'``."""
    mT = xp.matrix_transpose
    act, dact = ACTIVATIONS[params.activation](xp, c.pre)
    # MLP branch: X' = Z + φ(U₂ W₁) W₂
    dw2 = sum_to_shape(xp, mT(act) @ g, p.w2.shape)
    dpre = (g @ mT(p.w2)) * dact
    dw1 = sum_to_shape(xp, mT(c.u2) @ dpre, p.w1.shape)
    du2, dgain2, dbias2 = _norm_backward(
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
    dx1, dgain1, dbias1 = _norm_backward(xp, params.norm, du1, c.stats1, p.gain1, p.bias1)
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
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
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

    Parameters
    ----------
    approx, exact : TransformerGradients

    Returns
    -------
    dict
        ``{"layers": [float per layer], "x": float}``.
    """
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


# --------------------------------------------------------------------------- losses


def squared_error_loss(target, /):
    """The papers' loss ``L = ½ ‖out − E‖²_F`` (``∂L/∂out = out − E``) as a callable.

    Parameters
    ----------
    target : array shaped like the model output
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
        vocab = xp.arange(self.w_vocab.shape[-1], dtype=self.labels.dtype)
        onehot = xp.astype(xp.expand_dims(self.labels, axis=-1) == vocab, logits.dtype)
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
    """
    xp = namespace(w_vocab, labels)
    if w_vocab.ndim != 2:
        raise ValueError(f"w_vocab must have shape (d_model, vocab), got {w_vocab.shape}")
    if not xp.isdtype(labels.dtype, "integral"):
        raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
    return CrossEntropyLoss(w_vocab, labels)
