"""The per-row norms of the transformer (LayerNorm, RMSNorm) and their exact backward."""

from __future__ import annotations

from .._array import sum_to_shape

__all__ = ["NORMS", "NORM_EPS", "norm_backward", "norm_forward"]

NORMS = ("none", "layer", "rms")
"""The norm options (identity, LayerNorm with gain and bias, RMSNorm with gain)."""

NORM_EPS = 1e-5
"""The ``ε`` inside both norms' square root."""


def norm_forward(xp, kind, x, gain, bias):
    """``(y, (xhat, r))``; ``r = 1/sqrt(var + ε)`` per row, ``xhat`` the normalised rows."""
    if kind == "none":
        return x, None
    if kind == "layer":
        x = x - xp.mean(x, axis=-1, keepdims=True)
    r = 1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + NORM_EPS)
    xhat = x * r
    y = xhat * gain
    return (y + bias if bias is not None else y), (xhat, r)


def norm_backward(xp, kind, dy, stats, gain, bias):
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
