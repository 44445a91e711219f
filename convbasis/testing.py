"""Helpers for tests and benchmarks: conversion to NumPy and closeness checks.

This module may use NumPy directly: it compares results, it computes nothing the library
returns.  Instance generators for the structured methods live here too.
"""

from __future__ import annotations

import array_api_compat
import numpy as np

__all__ = ["assert_close", "assert_within_reference_error", "to_numpy"]


def to_numpy(x):
    """A NumPy copy of ``x`` from any supported library (CuPy copies to the host)."""
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if isinstance(x, (np.ndarray, np.generic)):  # NumPy reductions may return scalars
        return np.asarray(x)
    return np.from_dlpack(x)


def assert_close(actual, desired, *, rtol=0.0, atol=0.0, xp=None, dtype=None, err_msg=""):
    """Assert ``|actual - desired| <= atol + rtol |desired|`` entrywise.

    When ``xp`` / ``dtype`` are given, also check that ``actual`` belongs to that namespace
    and has that dtype (results must stay in the caller's library and precision).
    """
    if xp is not None:
        # Compare namespaces of real arrays, so wrappers (a read-only NumPy) count as theirs.
        got = array_api_compat.array_namespace(actual)
        want = array_api_compat.array_namespace(xp.asarray([0.0]))
        if got is not want:
            raise AssertionError(f"result is a {got.__name__} array, expected {want.__name__}")
    if dtype is not None and actual.dtype != dtype:
        raise AssertionError(f"result has dtype {actual.dtype}, expected {dtype}")
    a = to_numpy(actual).astype(np.float64)
    d = to_numpy(desired).astype(np.float64)
    if a.shape != d.shape:
        raise AssertionError(f"shape {a.shape} != expected {d.shape}. {err_msg}")
    np.testing.assert_allclose(a, d, rtol=rtol, atol=atol, err_msg=err_msg)


def assert_within_reference_error(
    actual, golden, baseline, *, factor=3.0, magnitude=None, err_msg=""
):
    """FlashAttention-style check: ``actual``'s error is a small multiple of a baseline's.

    ``golden`` is a float64 result; ``baseline`` is the plain dense computation in the same
    dtype as ``actual``.  Passes when ``max|actual - golden| <= factor · max|baseline -
    golden| + 8 eps M`` (the last term covers a baseline that is exact by luck).  ``M`` is
    ``magnitude``, the largest sum of absolute terms behind an entry (a sum that cancels is
    rounded relative to its terms, not its result), by default ``max|golden|``.
    """
    a, g, b = (to_numpy(x).astype(np.float64) for x in (actual, golden, baseline))
    if a.shape != g.shape:
        raise AssertionError(f"shape {a.shape} != expected {g.shape}. {err_msg}")
    eps = float(np.finfo(to_numpy(actual).dtype).eps)
    scale = float(np.max(np.abs(g), initial=0.0)) if magnitude is None else float(magnitude)
    err, base = float(np.max(np.abs(a - g), initial=0.0)), float(np.max(np.abs(b - g), initial=0.0))
    bound = factor * base + 8 * eps * scale
    if not err <= bound:
        raise AssertionError(
            f"error {err:.3e} exceeds {factor} x baseline error {base:.3e} + 8 eps "
            f"(bound {bound:.3e}). {err_msg}"
        )


def _segment_of(n, starts):
    starts = tuple(int(s) for s in starts)
    if not starts or starts[0] != 0 or np.any(np.diff(starts) <= 0):
        raise ValueError(f"starts must begin with 0 and increase strictly, got {starts}")
    if starts[-1] >= n:
        raise ValueError(f"starts must stay below n = {n}, got {starts}")
    return starts, np.searchsorted(np.asarray(starts), np.arange(n), side="right") - 1


def _mix(rng, q, k):
    """Rotate ``q`` and ``k`` by one random orthogonal matrix (keeps every dot product)."""
    d = q.shape[-1]
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q @ basis, k @ basis


def rotary_conv_instance(
    rng, n, d, starts, *, logit_scale=1.0, gap=0.25, value_dim=None, scale=None, dtype="float64"
):
    """An exact k-conv instance from rotary positions with segment-wise key content.

    ``q_i = R(i) q̄`` and ``k_j = R(j) κ_{seg(j)}`` with ``R`` the RoPE rotation (pairs of
    coordinates rotated by ``position · θ_m``, ``θ_m = 10000^{-2m/d}``), so
    ``s ⟨q_i, k_j⟩ = s ⟨q̄, R(j - i) κ_{seg(j)}⟩`` depends only on ``i - j`` and the segment
    of ``j`` (docs/math.rst §4): the causal logits have an exact basis with the given ``starts``.
    The diagonal logits ``s ⟨q̄, κ_l⟩`` of consecutive segments differ by at least
    ``gap · logit_scale`` (and all segments' are distinct), so the recovery with ``probe=1``
    is non-degenerate.  ``logit_scale`` sets the logits' typical magnitude.

    Returns
    -------
    q, k : ``(n, d)`` NumPy arrays; v : ``(n, value_dim or d)``; starts : tuple of int
    """
    if d % 2:
        raise ValueError(f"rotary instances need an even head dimension d, got {d}")
    starts, seg = _segment_of(n, starts)
    s = 1.0 / np.sqrt(d) if scale is None else float(scale)
    count = len(starts)
    qbar = rng.standard_normal(d)
    qbar /= np.linalg.norm(qbar)
    # Diagonal logits: distinct values spaced by >= gap·logit_scale, in random order.
    levels = np.linspace(-1.0, 1.0, count) if count > 1 else np.zeros(1)
    if count > 1 and levels[1] - levels[0] < gap:
        levels = levels * gap / (levels[1] - levels[0])
    targets = rng.permutation(levels) * logit_scale
    kappa = rng.standard_normal((count, d))
    kappa -= np.outer(kappa @ qbar, qbar)
    kappa *= logit_scale / (np.linalg.norm(kappa, axis=1, keepdims=True) + 1e-300)
    kappa += np.outer(targets, qbar)
    kappa /= s  # so that s ⟨q̄, κ_l⟩ = targets[l]

    theta = 10000.0 ** (-np.arange(d // 2) * 2.0 / d)

    def rotate(x, positions):
        angle = positions[:, None] * theta[None, :]
        cos, sin = np.cos(angle), np.sin(angle)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty((len(positions), d))
        out[:, 0::2] = x0 * cos - x1 * sin
        out[:, 1::2] = x0 * sin + x1 * cos
        return out

    pos = np.arange(n, dtype=np.float64)
    q = rotate(np.broadcast_to(qbar, (n, d)), pos)
    k = rotate(kappa[seg], pos)
    v = rng.standard_normal((n, d if value_dim is None else value_dim))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), starts


def alibi_conv_instance(
    rng, n, d, *, slope=0.1, starts=(0,), biases=None, value_dim=None, scale=None, dtype="float64"
):
    """An exact k-conv instance with ALiBi-style linear biases.

    ``s ⟨q_i, k_j⟩ = -slope · (i - j) + β_{seg(j)}``: with one segment (``biases=None``,
    ``starts=(0,)``) this is ALiBi, an exact ``k = 1`` basis; per-segment key biases ``β_l``
    make it an exact ``k``-segment basis whose rows have different maxima (the dynamic-range
    stress case of docs/math.rst §4).  The three-dimensional construction
    ``q_i = [-slope i, 1, 1] / s``, ``k_j = [1, slope j, β]`` is rotated by a random orthogonal
    ``d × d`` matrix (``d >= 3``).

    Returns
    -------
    q, k : ``(n, d)`` NumPy arrays; v : ``(n, value_dim or d)``; starts : tuple of int
    """
    if d < 3:
        raise ValueError(f"ALiBi instances need d >= 3, got {d}")
    starts, seg = _segment_of(n, starts)
    s = 1.0 / np.sqrt(d) if scale is None else float(scale)
    beta = np.zeros(len(starts)) if biases is None else np.asarray(biases, dtype=np.float64)
    if beta.shape != (len(starts),):
        raise ValueError(f"biases must have one entry per segment ({len(starts)}), got {beta}")
    pos = np.arange(n, dtype=np.float64)
    q = np.zeros((n, d))
    k = np.zeros((n, d))
    q[:, 0], q[:, 1], q[:, 2] = -slope * pos / s, 1.0 / s, 1.0 / s
    k[:, 0], k[:, 1], k[:, 2] = 1.0, slope * pos, beta[seg]
    q, k = _mix(rng, q, k)
    v = rng.standard_normal((n, d if value_dim is None else value_dim))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), starts
