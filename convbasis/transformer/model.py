"""The transformer's forward pass (docs/math.rst §5) and what it keeps for the backward."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .._array import as_floating, check_last_dim, check_rows, namespace
from .._capabilities import check_eager
from ..operators import attention_operator, check_method
from ..reference import attention as dense_attention
from .activations import ACTIVATIONS
from .norms import norm_forward
from .params import TransformerParams

__all__ = ["ForwardCache", "LayerCache", "forward"]


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
    check_method(attention)
    xp = namespace(x, *params.leaves().values())
    _check_params(xp, params)
    check_rows(x, "x")
    check_last_dim(x, "x", params.d_model, "d_model of params")
    (x,) = as_floating(xp, (x,), ("x",))
    # One dtype throughout: torch's matmul does not promote float32 against float64.
    dtypes = {str(a.dtype) for a in (x, *params.leaves().values())}
    if len(dtypes) > 1:
        raise TypeError(
            f"x and every parameter must share one floating dtype, got {sorted(dtypes)}: "
            "cast x with xp.astype, or the parameters with params.map"
        )
    return xp, x


def _attention_forward(xp, q, k, v, attention, causal, scale, options):
    if attention == "dense":
        # dense: the reference oracle; ``block`` bounds its memory to O(block·n) per head
        return dense_attention(q, k, v, causal=causal, scale=scale, block=options.get("block"))
    # forward through the same operator the backward will rebuild, so loss and gradients agree
    op = attention_operator(q, k, method=attention, causal=causal, scale=scale, **options)
    return op.matmul(v)


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
    leaves = params.leaves().values()
    check_eager("transformer.forward", x, *leaves, method=attention, option="attention")
    act = ACTIVATIONS[params.activation]
    caches = []
    for p in params.layers:
        u1, stats1 = norm_forward(xp, params.norm, x, p.gain1, p.bias1)
        ue = xp.expand_dims(u1, axis=-3)  # (..., 1, n, d_model): heads broadcast
        q, k, v = ue @ p.w_q, ue @ p.w_k, ue @ p.w_v
        o = _attention_forward(xp, q, k, v, attention, causal, scale, options)
        z = x + xp.sum(o @ p.w_o, axis=-3)  # concat(O_h) W_O = Σ_h O_h W_O[h]
        u2, stats2 = norm_forward(xp, params.norm, z, p.gain2, p.bias2)
        pre = u2 @ p.w1
        caches.append(LayerCache(x, u1, stats1, q, k, v, o, z, u2, stats2, pre))
        x = z + act(xp, pre)[0] @ p.w2
    return x, ForwardCache(tuple(caches), attention, causal, scale, dict(options))
