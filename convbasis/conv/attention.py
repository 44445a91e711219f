"""Conv-basis attention ``f = D⁻¹ C`` (docs/math.rst §3, §4): the operator and its builders.

:func:`conv_attention` and :func:`conv_operator` recover the basis of the logits from ``Q, K``
(:func:`~convbasis.conv.recover_conv_basis`), exponentiate it with one global shift per batch
element and run one set of FFT products; under-resolved rows go through the exact-row
safeguard (``convbasis.conv.safeguard``).  A sampled logit residual checks the recovered
basis against ``s · Q Kᵀ`` and warns (:class:`ConvBasisWarning`) when it is far off.
"""

from __future__ import annotations

import functools
import math
import random
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from array_api_compat import device

from .._array import (
    as_dtype,
    namespace,
    upcast_half,
    user_stacklevel,
    validate_attention_inputs,
    validate_qk,
)
from .._capabilities import check_eager
from ..batching import batched_call
from ..operators import check_operands, hadamard_product
from ._fft import c_product, segment_index, valid_mask
from .basis import ConvBasis, _masked_max
from .recovery import _largest, _recover, _recovery_options
from .safeguard import ExactRows, noise_floor, under_resolved_rows

__all__ = ["ConvAttentionOperator", "ConvBasisWarning", "conv_attention", "conv_operator"]

# Logit entries sampled to check the recovered basis against s · Q Kᵀ (O(samples · d)).
_RESIDUAL_SAMPLES = 512
# Warn when the sampled residual ε allows an output error 2 (e^ε − 1) ‖V‖_∞ above this.
_WARN_OUTPUT_ERROR = 1e-2


class ConvBasisWarning(UserWarning):
    """The recovered basis misses sampled logits: conv-basis attention is only approximate."""


@dataclass(frozen=True, eq=False)
class ConvAttentionOperator:
    """Normalised conv-basis attention ``f = D⁻¹ C`` as an operator (docs/math.rst §3, §4).

    ``C = M ∘ exp(S - μ)`` (causal) or ``exp(S - μ)`` with ``S`` the recovered logit basis:
    the lower part (with diagonal) from ``lower``, the strictly upper part as the transpose of
    the strictly lower part of ``upper``.  Build it with :func:`conv_operator`.

    Attributes
    ----------
    lower : ConvBasis
        Basis of the logits ``s · M ∘ Q Kᵀ``.
    upper : ConvBasis or None
        Basis of ``s · M ∘ K Qᵀ`` (bidirectional), else ``None``.
    shift : array ``(...)``
        ``μ``: the largest logit of each batch element.
    normaliser : array ``(..., n)``
        ``D = C · 1`` (``1`` on the recomputed rows, whose exact weights are normalised).
    recomputed_rows : tuple of int
        Rows whose products are computed exactly from the basis with their own maximum
        (``O(n d)`` each), because ``noise / D_r`` exceeded ``min(tolerance, 1)`` (or ``D_r``
        was not finite) in some batch element.
    tolerance : float
        The relative-error tolerance used to select those rows.
    noise : array ``(...)``
        Predicted absolute FFT error of ``C · 1`` (``u log2 N Σ_i ‖e_i‖₂ √L_i``): rows kept on the
        FFT path have relative error at most about ``2 noise / D_r`` (in units of ``‖Z‖_∞``).
    logit_residual : float
        ``ε̂ = max |basis − s · Q Kᵀ|`` over the diagonal and 512 sampled logits (all of them
        when ``n`` is small): an estimate, from below (up to the rounding of the sampled
        logits in the input's precision), of how far the basis is from the true logits (a
        start the recovery missed shows on the diagonal).  The
        output error is about ``2 (e^ε − 1) ‖V‖_∞`` for the true ``ε``; building the operator
        issues a :class:`ConvBasisWarning` when ``2 (e^ε̂ − 1) > 0.01``.
    lower_exp, upper_exp : ConvBasis, ConvBasis or None
        The bases of ``C``: ``exp(lower - μ)`` and ``exp(upper - μ)`` on its strictly lower
        part (``None`` when causal); ``C Z`` is ``c_product`` of the two (``_fft``).
    exact_rows
        The exact-row safeguard (``convbasis.conv.safeguard``): the recomputed rows, their
        blocks and exact weights.
    """

    lower: ConvBasis
    upper: ConvBasis | None
    shift: Any
    normaliser: Any
    tolerance: float
    noise: Any
    logit_residual: float
    lower_exp: ConvBasis = field(repr=False)
    upper_exp: ConvBasis | None = field(repr=False)
    exact_rows: Any = field(repr=False)

    @property
    def n(self):
        return self.lower.n

    @property
    def shape(self):
        """``(*batch, n, n)``, the shape of :meth:`to_dense`."""
        return (*self.lower.vectors.shape[:-2], self.n, self.n)

    @property
    def recomputed_rows(self):  # documented with the attributes above
        return self.exact_rows.rows

    @cached_property
    def _xp(self):
        return namespace(self.lower.vectors)

    def _c_product(self, zt, *, transpose=False):
        """``C Z`` (``Cᵀ Z`` if ``transpose``) in the transposed layout ``(..., p, n)``."""
        return c_product(self.lower_exp, self.upper_exp, zt, transpose=transpose)

    # The four products.  Kept rows have D > noise / min(tolerance, 1) > 0 and recomputed ones
    # D = 1 (the safeguard's selection), so dividing by D is safe.
    def matmul(self, z):
        """``f Z`` for ``z (..., n, p)``: ``O(k n p log n)`` plus ``O(n p)`` per recomputed row."""
        xp, (z,) = _operands(self, z=z)
        out = self._c_product(xp.matrix_transpose(z)) / self.normaliser[..., None, :]
        return as_dtype(xp, self.exact_rows.matmul_rows(xp.matrix_transpose(out), z), z.dtype)

    def rmatmul(self, z):
        """``fᵀ Z`` for ``z (..., n, p)``."""
        xp, (z,) = _operands(self, z=z)
        scaled = z * (self.exact_rows.keep_mask(z.dtype) / self.normaliser)[..., :, None]
        out = xp.matrix_transpose(self._c_product(xp.matrix_transpose(scaled), transpose=True))
        return as_dtype(xp, self.exact_rows.rmatmul_add(out, z), z.dtype)

    def hadamard_matmul(self, g, y, z):
        """``(f ∘ G Yᵀ) Z = Σ_l diag(G_l) f diag(Y_l) Z``; ``g, y (..., n, r)``, ``z (..., n, p)``.

        FFT products on the ``r p`` columns ``[Y_l ∘ Z]_l`` in few large calls
        (:func:`convbasis.operators.hadamard_product`): ``O(k n r p log n)``.
        """
        xp, (g, y, z) = _operands(self, g=g, y=y, z=z)
        return hadamard_product(xp, self.matmul, g, y, z)

    def hadamard_rmatmul(self, g, y, z):
        """``(f ∘ G Yᵀ)ᵀ Z = Σ_l diag(Y_l) fᵀ diag(G_l) Z`` (batched as ``hadamard_matmul``)."""
        xp, (g, y, z) = _operands(self, g=g, y=y, z=z)
        return hadamard_product(xp, self.rmatmul, y, g, z)

    def to_dense(self):
        """The ``(..., n, n)`` matrix ``f`` (``O(n²)``; for tests)."""
        xp = self._xp
        eye = xp.eye(self.n, dtype=self.normaliser.dtype, device=device(self.normaliser))
        return self.matmul(eye)


def _operands(op, **operands):
    """Operands ``(..., n, ·)`` checked, floating, in the dtype of ``op``'s products."""
    rows = dict.fromkeys(operands, op.n)
    return check_operands(
        op.lower.vectors, operands, rows=rows, batch=op.shape[:-2], hadamard="g" in operands
    )


@functools.lru_cache(maxsize=32)
def _sample_pairs(n, count):
    """Deterministic pseudo-random pairs ``(a, b)``, ``a >= b``, of the lower triangle (all of
    them when there are at most ``count``)."""
    if n * (n + 1) // 2 <= count:
        pairs = [(a, b) for a in range(n) for b in range(a + 1)]
    else:
        gen = random.Random(n)
        pairs = [(a, gen.randrange(a + 1)) for a in (gen.randrange(n) for _ in range(count))]
    return tuple(a for a, _ in pairs), tuple(b for _, b in pairs)


def _logit_residual(xp, q, k, scale, lower, upper):
    """``max |basis − s · Q Kᵀ|`` over the diagonal and sampled entries of the lower triangle
    (and of the ``K Qᵀ`` basis when bidirectional): ``O((n + samples) d)``, no ``n × n``
    array."""
    n, dev = lower.n, device(q)
    rows, cols = _sample_pairs(n, _RESIDUAL_SAMPLES)
    rows, cols = (xp.asarray(x, dtype=xp.int64, device=dev) for x in (rows, cols))

    def gap(basis, a, b):
        segments = segment_index(basis.starts, xp.arange(n, dtype=xp.int64, device=dev), xp)
        # Every diagonal entry (O(n d)): a start the recovery missed shows there first.
        diagonal = xp.take(basis.vectors[..., 0], segments, axis=basis.vectors.ndim - 2)
        worst = xp.abs(diagonal - scale * xp.vecdot(a, b))
        a, b = (xp.take(x, idx, axis=x.ndim - 2) for x, idx in ((a, rows), (b, cols)))
        exact = scale * xp.vecdot(a, b)
        flat = xp.reshape(basis.vectors, (*basis.vectors.shape[:-2], basis.rank * n))
        entries = xp.take(flat, xp.take(segments, cols) * n + (rows - cols), axis=flat.ndim - 1)
        return max(_largest(xp, worst), _largest(xp, xp.abs(entries - exact)))

    residual = gap(lower, q, k)
    return residual if upper is None else max(residual, gap(upper, k, q))


def _warn_if_inexact(residual, rank):
    # Attention outputs are convex combinations of V's rows: no error exceeds 2 max|V|.
    bound = min(2 * math.expm1(min(residual, 1.0)), 2.0) if residual == residual else math.nan
    if not bound <= _WARN_OUTPUT_ERROR:  # also for a NaN residual (NaN inputs)
        warnings.warn(
            f"the rank-{rank} conv basis misses sampled logits by up to {residual:.3g}, so the "
            f"attention output may be off by up to about {bound:.3g} x max|V| (docs/math.rst §4): "
            "the logits may lack a few-segment conv structure; raise rank or use another method",
            ConvBasisWarning,
            stacklevel=user_stacklevel(),
        )


def _build(xp, q, k, rank, causal, probe, delta, scale, tolerance, with_values=None):
    """Recover, exponentiate, run the FFT products, select rows to recompute (docs/math.rst §4).

    Returns the operator and, if ``with_values`` is given, ``C V`` in transposed layout.
    """
    rank, probe, delta, _, scale = _recovery_options(xp, q, k, rank, probe, delta, 0.0, scale)
    n = q.shape[-2]
    lower = ConvBasis(*_recover(xp, q, k, scale, rank, probe, delta, 0.0), n)
    shift = lower.max()
    upper = upper_exp = None
    if not causal:
        upper = ConvBasis(*_recover(xp, k, q, scale, rank, probe, delta, 0.0), n)
        strict_lower = valid_mask(xp, upper.plan, n, device(q), strict=True)
        shift = xp.maximum(shift, _masked_max(xp, upper.vectors, strict_lower))
    # docs/math.rst §4: one global shift per batch element (a row maximum cannot enter a
    # convolution).
    lower_exp = lower.exp(shift)
    if upper is not None:
        e = upper.exp(shift).vectors
        upper_exp = ConvBasis(upper.starts, xp.where(strict_lower, e, xp.zeros_like(e)), n)
    residual = _logit_residual(xp, q, k, scale, lower, upper)
    _warn_if_inexact(residual, rank)
    dtype = q.dtype if with_values is None else with_values.dtype
    # D = C · 1 and C V as separate products: V enters in its transposed view, which the
    # FFT's zero-padding copies anyway (a concatenated [Vᵀ; 1] would cost one more pass).
    ones = xp.ones((1, n), dtype=dtype, device=device(q))
    normaliser = c_product(lower_exp, upper_exp, ones)[..., 0, :]
    prod = None
    if with_values is not None:
        prod = c_product(lower_exp, upper_exp, xp.matrix_transpose(with_values))
    bases = [(lower_exp, "segment")]
    if upper_exp is not None:
        bases.append((upper_exp, "suffix"))
    noise = noise_floor(xp, bases, q.dtype)
    exact = ExactRows(lower, upper, under_resolved_rows(xp, normaliser, noise, tolerance))
    op = ConvAttentionOperator(
        lower,
        upper,
        shift,
        exact.unit_normaliser(normaliser),
        tolerance,
        noise,
        residual,
        lower_exp=lower_exp,
        upper_exp=upper_exp,
        exact_rows=exact,
    )
    return op, prod


def _tolerance(xp, dtype, tolerance):
    if tolerance is None:
        return float(xp.finfo(dtype).eps) ** 0.5
    try:
        tolerance = float(tolerance)
    except (TypeError, ValueError):
        raise ValueError(f"tolerance must be a number > 0, got {tolerance!r}") from None
    if not tolerance > 0:
        raise ValueError(
            f"tolerance must be > 0 (math.inf: recompute only unresolved rows), got {tolerance}"
        )
    return tolerance


def conv_operator(q, k, /, *, rank, causal=True, probe=1, delta=None, scale=None, tolerance=None):
    """The conv-basis attention operator ``f = D⁻¹ C`` (docs/math.rst §3, §4).

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    rank, probe, delta, scale, causal
        As in :func:`recover_conv_basis` (``eps = 0``).
    tolerance : float, optional
        Rows whose predicted relative FFT error ``noise / D_r`` exceeds this are recomputed
        exactly; default ``sqrt(eps_dtype)``.  float16/bfloat16 ``q``, ``k`` build a float32
        operator (the FFT and the normaliser's sums need its range), whose products return
        float32.  Rows with ``D_r <= noise`` (not resolved at
        all) or a non-finite ``D_r`` are always recomputed, so ``math.inf`` (or any value
        ``>= 1``) recomputes only those: never NaN/inf, and every kept row has relative
        error below about 2.

    Returns
    -------
    ConvAttentionOperator
        Recovery ``O(rank (n d + T d log n))`` plus one FFT product ``O(rank n log n)``.
    """
    check_eager("conv_operator", q, k)
    xp, q, k = validate_qk(q, k, causal=causal, same_length="the k-conv basis")
    q, k = upcast_half(xp, q, k)
    tol = _tolerance(xp, q.dtype, tolerance)
    op, _ = _build(xp, q, k, rank, causal, probe, delta, scale, tol)
    return op


def conv_attention(
    q,
    k,
    v,
    /,
    *,
    rank,
    causal=True,
    probe=1,
    delta=None,
    scale=None,
    tolerance=None,
    lengths=None,
):
    """Conv-basis attention ``O = D⁻¹ C V`` (docs/math.rst §4).

    Recovers the basis of the logits (:func:`recover_conv_basis`), exponentiates it with one
    shift per batch element, and computes ``C [V, 1]`` with one set of FFT products.
    Bidirectional attention adds the transposed strictly-lower basis of ``K Qᵀ``.  Exact up to
    FFT round-off when the logits have a non-degenerate k-conv basis of at most ``rank``
    segments.

    Rows whose normaliser is under-resolved by the FFT (predicted relative error above
    ``tolerance``, default ``sqrt(eps_dtype)``, or ``D_r <= noise``) are recomputed exactly
    from the basis with their own row maximum (``O(n d)`` each), so no NaN or inf is ever returned
    and large logits (``1e4`` in float32) give correct attention.

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    v : array ``(..., n, e)``
    rank : int
        Maximum number of segments (``>= 1``).
    causal : bool
    probe, delta, scale
        As in :func:`recover_conv_basis`.
    tolerance : float, optional
        As in :func:`conv_operator`.
    lengths : int array ``(batch,)``, optional
        As in :func:`convbasis.attention`: each sequence's basis is recovered from its own
        valid tokens.

    Returns
    -------
    array ``(..., n, e)``
        ``O(rank (n (d + e) log n))`` time, ``O(n (e + rank))`` memory beyond the inputs,
        plus ``O(n (d + e))`` per recomputed row.  ``k`` and ``v`` may have fewer heads
        than ``q`` (grouped-query attention).
    """
    check_eager("conv_attention", q, k)
    options = {"rank": rank, "causal": causal, "probe": probe, "delta": delta}
    call = functools.partial(_attention, scale=scale, tolerance=tolerance, **options)
    return batched_call(call, q, k, v, lengths=lengths)


def _attention(q, k, v, *, rank, causal, probe, delta, scale, tolerance):
    # recovery in the precision that q, k carry
    xp, q, k = validate_qk(q, k, causal=causal, same_length="the k-conv basis")
    _, _, _, like = validate_attention_inputs(q, k, v, causal=False)  # v in the common dtype
    q, k, v = upcast_half(xp, q, k, like)
    tol = _tolerance(xp, q.dtype, tolerance)
    op, prod = _build(xp, q, k, rank, causal, probe, delta, scale, tol, with_values=v)
    # In place: prod is our own intermediate, and a fresh (e, n) array costs its page faults.
    prod /= op.normaliser[..., None, :]
    # the caller's dtype: half precision was computed in float32 (upcast_half)
    return as_dtype(xp, op.exact_rows.matmul_rows(xp.matrix_transpose(prod), v), like.dtype)
