"""Element-wise activations ``φ`` of the transformer's MLP, each with its derivative."""

from __future__ import annotations

import math

__all__ = ["ACTIVATIONS"]

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
