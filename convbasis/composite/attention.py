"""Composite attention ``O = f V`` with a sampled estimate of its error (docs/math.rst §8)."""

from __future__ import annotations

import functools
import math
import numbers
import random
import warnings
from dataclasses import dataclass
from typing import Any

from array_api_compat import device

from .._array import check_integer, user_stacklevel, validate_attention_inputs
from .._capabilities import EagerOnlyError, traced
from ..batching import batched_call
from .operator import CompositeWarning, build

__all__ = ["CompositeReport", "CompositeWarning", "composite_attention"]

# Bootstrap resamples of the sampled rows for the error interval.
_RESAMPLES = 400


@dataclass(frozen=True)
class CompositeReport:
    """What a composite attention call cost and how accurate it estimates itself to be.

    Attributes
    ----------
    exact_fraction : float
        Share of the allowed logits (``n (n + 1) / 2`` causal, ``n²`` otherwise) computed
        exactly, mean over the batch.
    work_fraction : float
        All logit evaluations — exact ones, far-field tokens (once per query row), the
        far-field centres and the block scores — over the allowed logits.
    error_estimate : float
        Estimated ``‖O − O_exact‖_F / ‖O_exact‖_F`` over the whole batch, from ``samples``
        rows computed exactly.
    error_interval : tuple of float
        95% bootstrap interval of ``error_estimate`` over the sampled rows.
    error_estimates : array
        The estimate for each batch element, shape ``batch``, in the caller's library.
    budget : int
        Exact keys per row of the returned result (grown by ``target_error``).
    samples : int
    target_met : bool or None
        Whether ``error_estimate <= target_error`` (``None`` without a target).
    """

    exact_fraction: float
    work_fraction: float
    error_estimate: float
    error_interval: tuple[float, float]
    error_estimates: Any
    budget: int
    samples: int
    target_met: bool | None


def composite_attention(
    q,
    k,
    v,
    /,
    *,
    causal=True,
    scale=None,
    budget=None,
    block=None,
    sinks=0,
    heavy=None,
    target_error=None,
    max_fraction=0.5,
    samples=None,
    seed=0,
    return_report=False,
    lengths=None,
):
    """Composite attention: exact band, sinks, heavy columns and top blocks + FMM far field.

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    v : array ``(..., n, e)``
        Leading (batch/head) axes broadcast.
    causal : bool
    scale : float, optional
        Default ``1/sqrt(d)``.
    budget, block, sinks, heavy
        As in :func:`composite_operator`.
    target_error : float, optional
        In ``(0, 1)``: double the budget until the estimated error is at most this, or the
        exact fraction reaches ``max_fraction`` (then a :class:`CompositeWarning`).
    max_fraction : float
        In ``(0, 1]``.
    samples : int, optional
        Rows computed exactly for the error estimate, in ``[1, n]``; default ``min(32, n)``.
    seed : int
        Seed of the sampled rows.
    return_report : bool
        Also return a :class:`CompositeReport`.
    lengths : int array ``(batch,)``, optional
        As in :func:`convbasis.attention`; not with ``target_error`` or ``return_report``
        (the report describes one call).

    Returns
    -------
    array ``(..., n, e)``, or ``(array, CompositeReport)``
        ``O(n (budget + log(n/b)) (d + e) + (n/b)² d)`` time and ``O(n · budget)`` memory;
        the estimate adds ``O(samples · n (d + e))``.  ``k`` and ``v`` may have fewer heads
        than ``q`` (grouped-query attention; the report's ``error_estimates`` then have the
        grouped batch shape ``(..., h_kv, G)``).
    """
    if lengths is not None and (target_error is not None or return_report):
        raise ValueError(
            "composite_attention takes lengths= without target_error= and return_report=True: "
            "each distinct length is its own call, and the report describes one call"
        )
    options = dict(
        causal=causal,
        scale=scale,
        budget=budget,
        block=block,
        sinks=sinks,
        heavy=heavy,
        target_error=target_error,
        max_fraction=max_fraction,
        samples=samples,
        seed=seed,
        return_report=return_report,
    )
    return batched_call(functools.partial(_attention, **options), q, k, v, lengths=lengths)


def _attention(
    q,
    k,
    v,
    *,
    causal,
    scale,
    budget,
    block,
    sinks,
    heavy,
    target_error,
    max_fraction,
    samples,
    seed,
    return_report,
):
    xp, q, k, v = validate_attention_inputs(q, k, v, causal=causal)
    n = q.shape[-2]
    samples = min(32, n) if samples is None else samples
    samples = check_integer(samples, "samples", high=n, what=f"n = {n}")
    seed = check_integer(seed, "seed", low=0)
    if target_error is not None and not (_is_real(target_error) and 0 < target_error < 1):
        raise ValueError(f"target_error must be a number in (0, 1), got {target_error!r}")
    if not (_is_real(max_fraction) and 0 < max_fraction <= 1):
        raise ValueError(f"max_fraction must be a number in (0, 1], got {max_fraction!r}")
    if (target_error is not None or return_report) and traced(q, k, v):
        raise EagerOnlyError(
            "composite_attention(return_report=True or target_error=...) is eager only: the "
            "report and the budget loop read the error estimate back into Python; under "
            "jax.jit call it without them"
        )
    options = dict(causal=causal, scale=scale, block=block, sinks=sinks, heavy=heavy)
    budget = min(128, n) if budget is None else min(check_integer(budget, "budget"), n)
    options["weights"] = False  # the forward and its report need no weights
    op, out = build(xp, q, k, v, budget=budget, **options)
    if target_error is None and not return_report:
        return out
    estimate = _estimate(xp, q, k, v, out, op, samples, seed)
    while target_error is not None and estimate[0] > target_error:
        grown = None if budget >= n else build(xp, q, k, v, budget=min(2 * budget, n), **options)
        if grown is None or grown[0].exact_fraction > max_fraction:
            why = (
                "the budget is already n (float round-off)"
                if grown is None
                else f"doubling the budget would exceed max_fraction={max_fraction}"
            )
            warnings.warn(
                f"composite attention: estimated error {estimate[0]:.3g} above target_error="
                f"{target_error} at budget {budget} (exact fraction {op.exact_fraction:.3g}); "
                f"{why}",
                CompositeWarning,
                stacklevel=user_stacklevel(),
            )
            break
        budget, (op, out) = min(2 * budget, n), grown
        estimate = _estimate(xp, q, k, v, out, op, samples, seed)
    if not return_report:
        return out
    error, interval, per_batch = estimate
    report = CompositeReport(
        exact_fraction=op.exact_fraction,
        work_fraction=op.work_fraction,
        error_estimate=error,
        error_interval=interval,
        error_estimates=per_batch,
        budget=budget,
        samples=samples,
        target_met=None if target_error is None else error <= target_error,
    )
    return out, report


def _is_real(x):
    """A real number, not a bool (``True`` is not a fraction)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _estimate(xp, q, k, v, out, op, samples, seed):
    """Relative error on ``samples`` random rows computed exactly: ``(total, interval, per
    batch element)``; ``O(samples · n (d + e))``."""
    n = q.shape[-2]
    rng = random.Random(seed)
    rows = sorted(rng.sample(range(n), samples))
    index = xp.asarray(rows, device=device(q))
    logits = op.scale * (xp.take(q, index, axis=-2) @ xp.matrix_transpose(k))  # (..., s, n)
    if op.layout.causal:
        allowed = xp.arange(n, device=device(q))[None, :] <= index[:, None]
        logits = xp.where(
            allowed, logits, xp.asarray(-xp.inf, dtype=logits.dtype, device=device(q))
        )
    logits = logits - xp.max(logits, axis=-1, keepdims=True)
    weights = xp.exp(logits)
    exact = (weights / xp.sum(weights, axis=-1, keepdims=True)) @ v
    exact = xp.broadcast_to(exact, (*op.batch, *exact.shape[-2:]))
    diff = xp.sum((xp.take(out, index, axis=-2) - exact) ** 2, axis=-1)  # (*batch, s)
    norm = xp.sum(exact**2, axis=-1)
    per_batch = xp.sqrt(xp.sum(diff, axis=-1) / xp.sum(norm, axis=-1))
    batch_axes = tuple(range(diff.ndim - 1))
    if batch_axes:
        diff, norm = xp.sum(diff, axis=batch_axes), xp.sum(norm, axis=batch_axes)
    a, b = [float(x) for x in diff], [float(x) for x in norm]
    return _ratio(a, b), _interval(a, b, n, rng), per_batch


def _ratio(a, b):
    total = sum(b)
    return math.sqrt(sum(a) / total) if total > 0 else math.nan


def _interval(a, b, n, rng):
    """95% percentile bootstrap of ``sqrt(Σa / Σb)`` over the sampled rows (exact if all)."""
    s = len(a)
    if s == n:
        value = _ratio(a, b)
        return (value, value)
    draws = []
    for _ in range(_RESAMPLES):
        pick = [rng.randrange(s) for _ in range(s)]
        total = sum(b[i] for i in pick)
        if total > 0:
            draws.append(math.sqrt(sum(a[i] for i in pick) / total))
    if not draws:
        return (math.nan, math.nan)
    draws.sort()
    return (draws[int(0.025 * (len(draws) - 1))], draws[int(0.975 * (len(draws) - 1))])
