"""Transformer parameters: per-layer weights, the model configuration and their initialisation."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any

import array_api_extra as xpx

from .._array import check_integer
from .activations import ACTIVATIONS
from .norms import NORMS

__all__ = ["LayerParams", "TransformerParams", "check_choice", "init_params"]


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
        check_choice(self.norm, NORMS, "norm")
        check_choice(self.activation, ACTIVATIONS, "activation")

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


def check_choice(value, valid, name):
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
    device=None,
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
        Default: the namespace's default floating dtype on ``device`` (``float64`` for NumPy).
    device : device of ``xp``, optional
        Where every array goes (e.g. ``"cuda"`` for torch); default: the namespace's default.
    seed : int

    Returns
    -------
    TransformerParams
    """
    check_choice(norm, NORMS, "norm")
    check_choice(activation, ACTIVATIONS, "activation")

    d_model, layers, heads = (
        check_integer(value, name)
        for value, name in ((d_model, "d_model"), (layers, "layers"), (heads, "heads"))
    )
    d_head = check_integer(max(d_model // heads, 1) if d_head is None else d_head, "d_head")
    d_ff = check_integer(4 * d_model if d_ff is None else d_ff, "d_ff")
    dtype = xpx.default_dtype(xp, device=device) if dtype is None else dtype
    gen = random.Random(seed)

    def normal(shape, fan_in):
        size = math.prod(shape)
        sd = 1.0 / math.sqrt(fan_in)
        values = [gen.gauss(0.0, sd) for _ in range(size)]
        return xp.reshape(xp.asarray(values, dtype=dtype, device=device), shape)

    def const(value):
        return xp.full((d_model,), value, dtype=dtype, device=device)

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
