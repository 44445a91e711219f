"""Polynomial method: low-rank factors of ``exp(s·Q Kᵀ)`` and almost-linear attention.

Every logit ``x = s⟨q, k⟩`` lies in ``[-R, R]`` with ``R = |s| max‖q‖ max‖k‖``.  A polynomial
``P`` with ``|P(x)/eˣ − 1| ≤ ε`` on ``[-R, R]`` (:mod:`convbasis.exp_approximation`) turns
``exp(S)`` into ``P(S) = U Vᵀ`` with symmetric monomial features of rank ``C(d+g, g)``
(:mod:`convbasis.monomial_features`), and attention into products with thin factors:
``O(n r (d + e))`` instead of ``O(n² (d + e))``.  Every entry of ``Ã = P(S)``, and hence every
normaliser ``D = Ã·1``, stays positive because ``ε < 1``.

The degree is chosen as the smallest one whose relative error, measured on a fine grid of
``[-R, R]``, is at most ``ε``; a closed-form bound is reported next to it.  The rank grows as
``C(d+g, g)``: the method pays off only for small head dimension and bounded entries, and a
rank above ``max_rank`` (by default: what
:data:`~convbasis.polynomial.FEATURE_MEMORY_BUDGET` allows) is refused with a
``ValueError`` rather than allocated.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

from array_api_compat import device

from ._array import (
    check_integer,
    contiguous,
    namespace,
    resolve_scale,
    scan_blocks,
    validate_attention_inputs,
    validate_qk,
)
from ._capabilities import check_eager
from .batching import batched_call
from .causal import masked_product
from .exp_approximation import (
    _check_degree,
    _check_eps,
    _check_kind,
    _fine_points,
    _measured_error,
    degree_for,
    exp_coefficients,
)
from .monomial_features import feature_weights, features, monomial_blocks, rank_for
from .operators import check_operands, hadamard_product

__all__ = [
    "FEATURE_MEMORY_BUDGET",
    "LowRankAttentionOperator",
    "LowRankFactors",
    "lowrank_attention",
    "lowrank_factors",
    "lowrank_operator",
]


def _physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not POSIX, or the names are unknown
        return None


#: Bytes of ``n × r`` features that ``max_rank=None`` allows: a quarter of physical memory
#: (``os.sysconf``), or 4 GiB where that is unknown.  The default rank cap is
#: ``FEATURE_MEMORY_BUDGET // (B · max(n, m) · itemsize)`` (``B`` the batch size).
FEATURE_MEMORY_BUDGET = (_physical_memory() or 2**34) // 4

# Feature entries per factor per row block of the streamed attention (2 MiB in float32).
_BLOCK_ENTRIES = 2**19
_MAX_BLOCK_ROWS = 256
_DIAGONAL_ROWS = 128


@dataclass(frozen=True)
class _Polynomial:
    """Degree, coefficients and input scalings shared by factors, attention and operators."""

    degree: int
    coeffs: tuple
    radius: float
    kind: str
    rel_error: float
    rank: int
    q_scale: float
    k_scale: float
    weights: tuple
    norm_max: tuple  # (max‖q_i‖, max‖k_j‖): R = |s| · their product


def _row_norm_max(xp, x):
    if not math.prod(x.shape):  # an empty batch: no logits to bound
        return 0.0
    return float(xp.max(xp.sqrt(xp.sum(x * x, axis=-1))))


def _check_overflow(xp, q, k, coeffs, radius, degree):
    """Every entry of ``U Vᵀ``, and every row sum of ``Ã``, is at most ``n Σ_t |c_t| R^t``:
    refuse a radius for which that overflows the dtype."""
    log_terms = [0.0]  # the constant term c_0 ≈ 1
    if radius > 0:
        log_terms = [math.log(abs(c)) + t * math.log(radius) for t, c in enumerate(coeffs) if c]
    top = max(log_terms)
    log_total = (
        top
        + math.log(sum(math.exp(x - top) for x in log_terms))
        + math.log(max(q.shape[-2], k.shape[-2]))
    )
    limit = math.log(float(xp.finfo(q.dtype).max)) - math.log(16.0)
    if log_total > limit:
        raise ValueError(
            f"radius R={radius:.4g} is too large for {q.dtype} features of degree {degree}: "
            f"n·Σ_t |c_t| R^t ≈ e^{log_total:.1f} overflows (limit e^{limit:.1f}); "
            "rescale q and k or use a smaller degree"
        )


def _check_budget(xp, q, k, rank, what):
    """The default cap (``max_rank=None``): one ``(B, max(n, m), r)`` feature array must fit
    in :data:`~convbasis.polynomial.FEATURE_MEMORY_BUDGET`; checked on the numbers alone, before
    anything of size ``r`` exists (the monomial tables included)."""
    batch = _batch_size(q.shape[:-2], k.shape[:-2])
    rows, itemsize = max(q.shape[-2], k.shape[-2]), xp.finfo(q.dtype).bits // 8
    cap = max(FEATURE_MEMORY_BUDGET // max(batch * rows * itemsize, 1), 1)
    if rank > cap:
        raise ValueError(
            f"the polynomial features would need rank {rank} = C(d+g, g) with {what}: "
            f"{float(rank) * batch * rows * itemsize:.3g} bytes for batch {batch} * {rows} "
            f"rows * rank * {itemsize} bytes, above the default max_rank={cap} that "
            f"FEATURE_MEMORY_BUDGET={FEATURE_MEMORY_BUDGET} bytes allows; pass max_rank= to "
            "allow more"
        )


def _choose_polynomial(xp, q, k, scale, eps, degree, kind, max_rank):
    """Choose the polynomial for inputs ``q, k`` and check rank and overflow (docs/math.rst §2).

    Costs ``O(n d)`` (row norms); refuses before any ``n × r`` allocation.
    """
    _check_kind(kind)
    if (eps is None) == (degree is None):
        raise ValueError(
            f"give exactly one of eps and degree, got eps={eps!r} and degree={degree!r}"
        )
    max_rank = check_integer(max_rank, "max_rank", optional=True)
    if eps is not None:
        eps = _check_eps(eps)
    else:
        _check_degree(degree, kind)
    d = q.shape[-1]
    q_max, k_max = _row_norm_max(xp, q), _row_norm_max(xp, k)
    # docs/math.rst §2: Cauchy–Schwarz, every logit lies in [-R, R].
    radius = abs(scale) * q_max * k_max
    if not math.isfinite(radius):
        raise ValueError(
            f"q and k must be finite to bound the logits, got max row norms {q_max} and {k_max}"
        )
    if eps is not None:
        degree = degree_for(eps, radius, kind=kind)
    rank = rank_for(d, degree)
    need = f"eps={eps:g}" if eps is not None else f"degree={degree}"
    if max_rank is not None and rank > max_rank:
        raise ValueError(
            f"the polynomial features would need rank {rank} = C(d+g, g) with d={d}, "
            f"g={degree} ({kind}, {need}, R={radius:.4g}), above max_rank={max_rank}"
        )
    coeffs = exp_coefficients(degree, radius, kind=kind)
    _check_overflow(xp, q, k, coeffs, radius, degree)
    if max_rank is None:
        _check_budget(xp, q, k, rank, f"d={d}, g={degree} ({kind}, {need}, R={radius:.4g})")
    # Balance the factors: max‖q̃‖ = max‖k̃‖ = √R, so each feature is at most √(|c_t| R^t).
    root = math.sqrt(abs(scale))
    balance = math.sqrt(k_max / q_max) if q_max > 0 and k_max > 0 else 1.0
    q_scale, k_scale = root * balance, math.copysign(root / balance, scale)
    rel_error = _measured_error(coeffs, radius, _fine_points(degree))
    return _Polynomial(
        degree=degree,
        coeffs=coeffs,
        radius=radius,
        kind=kind,
        rel_error=rel_error,
        rank=rank,
        q_scale=q_scale,
        k_scale=k_scale,
        weights=feature_weights(coeffs, d),
        norm_max=(q_max, k_max),
    )


def _weight_arrays(xp, poly, like):
    left, right = poly.weights
    return (
        xp.asarray(left, dtype=like.dtype, device=device(like)),
        xp.asarray(right, dtype=like.dtype, device=device(like)),
    )


def _check_positive(kind, rel_error, degree, radius):
    # A Chebyshev P is positive on [-R, R] only while its relative error there is below 1.
    if kind == "chebyshev" and rel_error >= 1:
        raise ValueError(
            f"degree {degree} gives relative error {rel_error:.3g} >= 1 on [-R, R] "
            f"(R={radius:.4g}): normalisers could vanish; use a larger degree or eps"
        )


@dataclass(frozen=True)
class LowRankFactors:
    """``U Vᵀ ≈ exp(s · Q Kᵀ)`` entrywise with relative error ``rel_error_bound``.

    Attributes
    ----------
    u : array ``(..., n, r)``
        ``φ(Q)``, ``r = C(d + degree, degree)``.
    v : array ``(..., m, r)``
        ``ψ(K)``.
    degree : int
    radius : float
        ``R = |s| max‖q‖ max‖k‖``: every logit lies in ``[-R, R]``.
    rel_error_bound : float
        ``max |P(x)/eˣ − 1|`` over ``[-R, R]`` measured on a fine grid (``<= eps`` when
        ``eps`` was given); float round-off in the factors' dtype comes on top.
    kind : str
        ``"chebyshev"`` or ``"taylor"``.
    """

    u: Any
    v: Any
    degree: int
    radius: float
    rel_error_bound: float
    kind: str

    @property
    def rank(self):
        return self.u.shape[-1]

    def to_dense(self):
        """``U Vᵀ`` as an ``(..., n, m)`` array (``O(n m r)``)."""
        xp = namespace(self.u)
        return self.u @ xp.matrix_transpose(self.v)


def lowrank_factors(q, k, /, *, eps=None, degree=None, kind="chebyshev", scale=None, max_rank=None):
    """Low-rank factors ``U Vᵀ ≈ exp(s · Q Kᵀ)`` with entrywise relative error ``<= eps``.

    Parameters
    ----------
    q : array ``(..., n, d)``
    k : array ``(..., m, d)``
    eps : float in ``(0, 1)``, optional
        Target relative error; the degree is the smallest meeting it on ``[-R, R]``.
    degree : int, optional
        Fixed degree instead (exactly one of ``eps`` and ``degree``; even for Taylor).
    kind : ``"chebyshev"`` or ``"taylor"``
    scale : float, optional
        Logit scale ``s``; default ``1/sqrt(d)``.
    max_rank : int, optional
        Refuse (``ValueError``) a rank ``C(d+g, g)`` above this.  Default: the largest rank
        whose ``(B, max(n, m), r)`` features fit in
        :data:`~convbasis.polynomial.FEATURE_MEMORY_BUDGET` (``B`` the batch size), checked
        before anything of size ``r`` is allocated.

    Returns
    -------
    LowRankFactors
        ``O((n + m) r)`` time and memory, ``r = C(d + g, g)``.

    Raises
    ------
    ValueError
        ``eps`` outside ``(0, 1)``, both or neither of ``eps``/``degree``, a rank above
        ``max_rank`` (or its default), or a radius so large that the features overflow the
        dtype (checked before any ``n × r`` allocation).
    """
    check_eager("lowrank_factors", q, k)
    xp, q, k = validate_qk(q, k, causal=False)
    s = resolve_scale(scale, q.shape[-1])
    poly = _choose_polynomial(xp, q, k, s, eps, degree, kind, max_rank)
    w_left, w_right = _weight_arrays(xp, poly, q)
    return LowRankFactors(
        u=features(xp, q * poly.q_scale, poly.degree, w_left),
        v=features(xp, k * poly.k_scale, poly.degree, w_right),
        degree=poly.degree,
        radius=poly.radius,
        rel_error_bound=poly.rel_error,
        kind=poly.kind,
    )


def _chunk_for(rank):
    """Rows per chunk of the masked product, measured on NumPy (n = 16384, p = 9).

    c = 64 was fastest for r = 165 … 1287, c = 32 for r = 45 (docs/polynomial.rst).  A
    smaller c multiplies the ``(n/c) r p`` chunk states and runs tiny matmuls below BLAS
    speed; a larger one inflates the ``n c r`` diagonal blocks.
    """
    return 32 if rank < 128 else 64


def _batch_size(*shapes):
    """Number of elements of the broadcast batch shape (shapes already checked)."""
    width = max(len(s) for s in shapes)
    padded = [(1,) * (width - len(s)) + tuple(s) for s in shapes]
    return math.prod(max(dims) for dims in zip(*padded, strict=True))


def _block_rows(built, batch, n):
    """Rows per block of :func:`lowrank_attention`: ``_BLOCK_ENTRIES`` entries per factor
    (``B b r'``, ``r'`` the monomials built), between 16 and ``_MAX_BLOCK_ROWS`` (the
    ``b × b`` diagonal block costs ``O(b (d + g + e))`` per row)."""
    rows = _BLOCK_ENTRIES // max(batch * built, 1)
    return max(min(rows, _MAX_BLOCK_ROWS, n), min(16, n))


def _diagonal_block(xp, coeffs, qt, kt, zt, keep):
    """``((M ∘ P(Q̃_b K̃_bᵀ)) Z_b)ᵀ`` from the transposed ``(d, b)`` and ``(p, b)`` rows: a
    block's own keys, from its logits in ``O(b² (d + g + p))`` (the features would take
    ``O(b² r)``); ``P`` by Horner's rule, ``keep = Mᵀ``.  Queries go ``_DIAGONAL_ROWS`` at a
    time against the keys up to them, which skips most masked entries and keeps the
    temporaries small."""
    out = []
    for lo in range(0, qt.shape[-1], _DIAGONAL_ROWS):
        hi = min(lo + _DIAGONAL_ROWS, qt.shape[-1])
        x = xp.matrix_transpose(kt[..., :hi]) @ qt[..., lo:hi]  # (key, query)
        a = xp.zeros_like(x) + coeffs[-1]
        for c in coeffs[-2::-1]:
            a = a * x + c
        out.append(zt[..., :hi] @ (a * keep[:hi, lo:hi]))
    return out[0] if len(out) == 1 else xp.concat(out, axis=-1)


def _nested_layout(d, degree, weights):
    """Groups of the two top degrees' monomials and their weights (see
    :func:`_streamed_attention`).

    With ``h = g − 2``, the degree-``(h+1)`` monomials with last index ``j`` are ``x_j`` times
    the first ``P_j = C(j+h, h)`` monomials of degree ``h``, and those of degree ``g`` with
    the two last indices ``i >= j`` are ``x_i x_j`` times the same prefix.  Group ``j`` holds
    both as a ``P_j × (d − j + 1)`` grid (column 0: ``x_j``; column ``c``: ``x_j x_{j+c−1}``).
    Returns ``(P_j, grid of w_φ w_ψ)`` per group.
    """
    h = degree - 2
    low = math.comb(d + h, h)
    mid = math.comb(d + h, h + 1)  # monomials of degree h + 1
    prefixes = [math.comb(j + h, h) for j in range(d)]
    starts = [sum(prefixes[:j]) for j in range(d)]  # piece j within a degree-(h+1) block
    tops = [low + mid + math.comb(i + h + 1, h + 2) for i in range(d)]  # degree g, last i
    groups = []
    for j, size in enumerate(prefixes):
        columns = [low + starts[j]] + [tops[i] + starts[j] for i in range(j, d)]
        groups.append((size, [[weights[c + row] for c in columns] for row in range(size)]))
    return groups


def _streamed_attention(xp, poly, q, k, v, *, causal):
    """``D̃⁻¹ Ã V`` a block of ``b`` rows at a time (docs/polynomial.rst, "Attention").

    A block's output is ``φ(Q_b)`` times the running state ``Σ_j ψ(K_j)ᵀ Z_j``,
    ``Z = [V, 1]``, of the blocks before it (of all blocks, bidirectional) plus, causal, its
    own masked part (:func:`_diagonal_block`).  Everything is transposed, rows last, so that
    elementwise products run over long contiguous rows; features are unweighted and the
    weights ``w_φ w_ψ = c_t (t choose α)`` multiply the states.  Only degrees
    ``<= h = g − 2`` are built: with ``B`` the degree-``h`` block and the factors
    ``F_j = x_j [1, x_j, …, x_{d−1}]`` of group ``j`` (:func:`_nested_layout`), the top two
    degrees' states are ``B[:P_j] (F_j ⊗ Z)`` and their share of the output
    ``Σ_c F_{jc} ∘ (S_jᵀ B[:P_j])_c``: one product per group on ``(d − j + 1)(e + 1)``
    columns.  So ``r' = C(d+h, h)`` monomials are built (1287 of 6435 for ``d = 8, g = 7``).
    """
    n, m, d, e = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    p = e + 1
    nested = poly.degree >= 2
    h = poly.degree - 2 if nested else poly.degree  # degrees 0 … h are built
    low = rank_for(d, h)
    dev, dtype = device(q), q.dtype
    # Monomials of x̂ = x̃ / √R, whose entries are at most 1, so R^t moves into the weights.
    norm = math.sqrt(poly.radius) if poly.radius > 0 else 1.0
    weights = []
    for t in range(poly.degree + 1):
        lo, hi = rank_for(d, t - 1) if t else 0, rank_for(d, t)
        pairs = zip(poly.weights[0][lo:hi], poly.weights[1][lo:hi], strict=True)
        weights += [a * b * norm ** (2 * t) for a, b in pairs]
    # A state entry is at most n max|w| max|Z|: refuse where that alone would overflow.
    limit = float(xp.finfo(dtype).max) / 16
    if max(map(abs, weights)) * max(n, m) > limit:
        raise ValueError(
            f"radius R={poly.radius:.4g} is too large for {dtype} states of degree "
            f"{poly.degree}: the weights c_t·multinomial·R^t reach "
            f"{max(map(abs, weights)):.3g}; rescale q and k or use a smaller degree"
        )
    w_low = xp.asarray(weights[:low], dtype=dtype, device=dev)[:, None]
    groups, edge = [], 0  # (P_j, weights (P_j, d − j + 1, 1), group j's factor rows)
    for size, grid in _nested_layout(d, poly.degree, weights) if nested else []:
        grid = xp.asarray(grid, dtype=dtype, device=dev)[..., None]
        groups.append((size, grid, edge, edge + grid.shape[-2]))
        edge += grid.shape[-2]
    batch = _batch_size(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    rows = _block_rows(low, batch, max(n, m))
    mT = xp.matrix_transpose

    def transposed(x, i, scale):
        return contiguous(xp, mT(x[..., i * rows : min((i + 1) * rows, x.shape[-2]), :] * scale))

    def normalised(xt):
        return xt if norm == 1.0 else xt * (1 / norm)

    def z_of(i):
        # docs/math.rst §2.4: Z = [V, 1] gives the numerator and D in one product
        vt = mT(v[..., i * rows : min((i + 1) * rows, m), :])
        return xp.concat(
            [vt, xp.ones((*vt.shape[:-2], 1, vt.shape[-1]), dtype=dtype, device=dev)], axis=-2
        )

    def factors(xt):
        """``F_j`` of every group, stacked: ``(..., J, b)``."""
        ones = xp.ones((*xt.shape[:-2], 1, xt.shape[-1]), dtype=dtype, device=dev)
        return xp.concat(
            [xt[..., j : j + 1, :] * xp.concat([ones, xt[..., j:, :]], axis=-2) for j in range(d)],
            axis=-2,
        )

    def flat(x):
        return xp.reshape(x, (*x.shape[:-2], x.shape[-2] * x.shape[-1]))

    def state(i):
        if causal and i == count - 1:
            return None  # no later block reads it
        kt, zt = normalised(transposed(k, i, poly.k_scale)), z_of(i)
        blocks = monomial_blocks(xp, kt, h, axis=-2)
        parts = [flat(xp.concat([blk @ mT(zt) for blk in blocks], axis=-2) * w_low)]
        if nested:
            right = factors(kt)[..., :, None, :] * zt[..., None, :, :]  # (..., J, p, b)
            for size, grid, lo, hi in groups:
                columns = xp.reshape(
                    right[..., lo:hi, :, :], (*right.shape[:-3], (hi - lo) * p, right.shape[-1])
                )
                out = blocks[-1][..., :size, :] @ mT(columns)
                out = xp.reshape(out, (*out.shape[:-1], hi - lo, p)) * grid
                parts.append(xp.reshape(out, (*out.shape[:-3], size * (hi - lo) * p)))
        return xp.concat(parts, axis=-1)

    keep = None
    if causal:
        keep = xp.arange(rows, device=dev)[:, None] <= xp.arange(rows, device=dev)[None, :]
        keep = xp.astype(keep, dtype)

    def finish(i, seen):
        qt = transposed(q, i, poly.q_scale)
        b = qt.shape[-1]
        yt = None
        if causal:
            kt = transposed(k, i, poly.k_scale)
            yt = _diagonal_block(xp, poly.coeffs, qt, kt, z_of(i), keep)
        if seen is not None:
            qt = normalised(qt)
            blocks = monomial_blocks(xp, qt, h, axis=-2)
            s_low = xp.reshape(seen[..., : low * p], (*seen.shape[:-1], low, p))
            start = 0
            for blk in blocks:
                stop = start + blk.shape[-2]
                part = mT(s_low[..., start:stop, :]) @ blk
                yt = part if yt is None else yt + part
                start = stop
            if nested:
                coef = factors(qt)
                start = low * p
                for size, _, lo, hi in groups:
                    grid = seen[..., start : start + size * (hi - lo) * p]
                    start += size * (hi - lo) * p
                    grid = xp.reshape(grid, (*seen.shape[:-1], size, (hi - lo) * p))
                    out = mT(grid) @ blocks[-1][..., :size, :]
                    out = xp.reshape(out, (*out.shape[:-2], hi - lo, p, b))
                    yt = yt + xp.sum(out * coef[..., lo:hi, None, :], axis=-3)
        return mT(yt[..., :e, :] / yt[..., e:, :])

    count = math.ceil(n / rows)
    if causal:
        out, _ = scan_blocks(xp, count, state, finish)
    else:
        _, total = scan_blocks(xp, math.ceil(m / rows), state, None)
        out, _ = scan_blocks(xp, count, None, lambda i, _: finish(i, total))
    return xp.concat(out, axis=-2)


def lowrank_attention(
    q,
    k,
    v,
    /,
    *,
    causal=True,
    eps=None,
    degree=None,
    kind="chebyshev",
    scale=None,
    max_rank=None,
    lengths=None,
):
    """Softmax attention through the polynomial factors: ``O = D̃⁻¹ Ã V``, ``Ã = φ(Q) ψ(K)ᵀ``.

    Rows go in blocks of ``b``: bidirectional, ``[num, den] = φ(Q_b) Σ_j ψ(K_j)ᵀ [V_j, 1]``;
    causal, the sum runs over earlier blocks and the block's own ``b × b`` masked part comes
    from its logits, ``P(s Q_b K_bᵀ)`` (docs/math.rst §1-2).  The ``n × r`` factors are never
    held whole.  If ``|Ã − A| <= εA`` entrywise then ``‖Õ − O‖_∞ <= 2ε/(1−ε) ‖V‖_∞``
    (docs/math.rst §2.4).

    Parameters
    ----------
    q : array ``(..., n, d)``
    k : array ``(..., m, d)`` (``m == n`` when ``causal``)
    v : array ``(..., m, e)``
        Leading batch/head axes broadcast.
    causal : bool
    eps, degree, kind, scale, max_rank
        As in :func:`lowrank_factors`.
    lengths : int array ``(batch,)``, optional
        As in :func:`convbasis.attention` (the polynomial is chosen per distinct length).

    Returns
    -------
    array ``(..., n, e)``
        ``O(n r (e + 1) + n b (d + g + e))`` time, ``r = C(d+g, g)``; ``O(B (r' b + r e))``
        memory per thread beyond inputs and output, for blocks of
        ``b = min(2^19 / (B r'), 256)`` rows, ``r' = C(d+g−2, g−2)`` the monomials built
        and ``B`` the batch size.  NumPy pipelines the blocks over threads.  ``k`` and ``v``
        may have fewer heads than ``q`` (grouped-query attention).
    """
    check_eager("lowrank_attention", q, k)
    options = {"eps": eps, "degree": degree, "kind": kind, "max_rank": max_rank}
    call = functools.partial(_attention, causal=causal, scale=scale, **options)
    return batched_call(call, q, k, v, lengths=lengths)


def _attention(q, k, v, *, causal, eps, degree, kind, scale, max_rank):
    xp, q, k, v = validate_attention_inputs(q, k, v, causal=causal)
    s = resolve_scale(scale, q.shape[-1])
    poly = _choose_polynomial(xp, q, k, s, eps, degree, kind, max_rank)
    _check_positive(poly.kind, poly.rel_error, poly.degree, poly.radius)
    return _streamed_attention(xp, poly, q, k, v, causal=causal)


def _unnormalised_product(xp, u, v, z, *, causal, transpose):
    """``Ã Z`` or ``Ãᵀ Z`` with ``Ã = U Vᵀ``, masked (docs/math.rst §1: prefix or suffix sums)
    if causal."""
    if transpose:
        u, v = v, u
    if causal:
        chunk = min(_chunk_for(u.shape[-1]), u.shape[-2])
        return masked_product(xp, u, v, z, upper=transpose, strict=False, chunk=chunk)
    return u @ (xp.matrix_transpose(v) @ z)


@dataclass(frozen=True)
class LowRankAttentionOperator:
    """``f = D⁻¹ Ã`` with ``Ã = U Vᵀ`` (``M ∘ U Vᵀ`` if causal) and ``D = diag(Ã·1)``.

    The four products of docs/math.rst §3 cost ``O(n r p)`` (bidirectional) or
    ``O(n r (p + c))`` (causal, chunk ``c``) each; the Hadamard ones ``s`` times that for
    ``G, Y`` of width ``s``.  The normaliser is computed once, at construction.

    Attributes
    ----------
    u : array ``(..., n, r)``
    v : array ``(..., m, r)``
    normaliser : array ``(..., n, 1)``
        ``Ã·1``; positive (docs/math.rst §2: ``P >= (1 − ε) eˣ > 0`` on ``[-R, R]``).
    causal : bool
    degree, radius, rel_error_bound, kind
        As in :class:`LowRankFactors`.
    """

    u: Any
    v: Any
    normaliser: Any
    causal: bool
    degree: int
    radius: float
    rel_error_bound: float
    kind: str

    @property
    def shape(self):
        """``(*batch, n, m)``, the shape of :meth:`to_dense`: ``(..., m, p)`` -> ``(..., n, p)``."""
        batch = namespace(self.u).broadcast_shapes(self.u.shape[:-2], self.v.shape[:-2])
        return (*batch, self.u.shape[-2], self.v.shape[-2])

    def _product(self, xp, z, transpose):
        u, v = self.u, self.v
        if z.dtype != u.dtype:
            u, v = xp.astype(u, z.dtype), xp.astype(v, z.dtype)
        return _unnormalised_product(xp, u, v, z, causal=self.causal, transpose=transpose)

    def _normaliser(self, xp, like):
        d = self.normaliser
        return d if d.dtype == like.dtype else xp.astype(d, like.dtype)

    def matmul(self, z, /):
        """``f Z`` for ``z (..., m, p)`` -> ``(..., n, p)``."""
        xp, (z,) = check_operands(
            self.u, {"z": z}, batch=self.shape[:-2], rows={"z": self.shape[-1]}
        )
        return self._product(xp, z, False) / self._normaliser(xp, z)

    def rmatmul(self, z, /):
        """``fᵀ Z = Ãᵀ D⁻¹ Z`` for ``z (..., n, p)`` -> ``(..., m, p)``."""
        xp, (z,) = check_operands(
            self.u, {"z": z}, batch=self.shape[:-2], rows={"z": self.shape[-2]}
        )
        return self._product(xp, z / self._normaliser(xp, z), True)

    def hadamard_matmul(self, g, y, z, /):
        """``(f ∘ G Yᵀ) Z = D⁻¹ Σ_l diag(G_l) Ã diag(Y_l) Z`` (docs/math.rst §3).

        ``g (..., n, s)``, ``y (..., m, s)``, ``z (..., m, p)`` -> ``(..., n, p)``.
        """
        n, m = self.shape[-2:]
        operands = {"g": g, "y": y, "z": z}
        xp, (g, y, z) = check_operands(
            self.u, operands, batch=self.shape[:-2], rows={"g": n, "y": m, "z": m}, hadamard=True
        )
        out = hadamard_product(xp, lambda w: self._product(xp, w, False), g, y, z)
        return out / self._normaliser(xp, z)

    def hadamard_rmatmul(self, g, y, z, /):
        """``(f ∘ G Yᵀ)ᵀ Z = Σ_l diag(Y_l) Ãᵀ diag(G_l) D⁻¹ Z`` (docs/math.rst §3).

        ``g (..., n, s)``, ``y (..., m, s)``, ``z (..., n, p)`` -> ``(..., m, p)``.
        """
        n, m = self.shape[-2:]
        operands = {"g": g, "y": y, "z": z}
        xp, (g, y, z) = check_operands(
            self.u, operands, batch=self.shape[:-2], rows={"g": n, "y": m, "z": n}, hadamard=True
        )
        z = z / self._normaliser(xp, z)
        return hadamard_product(xp, lambda w: self._product(xp, w, True), y, g, z)

    def to_dense(self):
        """``f`` as an ``(..., n, m)`` array (``O(n m r)``; for tests)."""
        xp = namespace(self.u)
        a = self.u @ xp.matrix_transpose(self.v)
        if self.causal:
            n, m = self.shape[-2:]
            keep = xp.arange(n, device=device(a))[:, None] >= xp.arange(m, device=device(a))
            a = xp.where(keep, a, xp.zeros_like(a))
        return a / self.normaliser


def lowrank_operator(
    q, k, /, *, causal=True, eps=None, degree=None, kind="chebyshev", scale=None, max_rank=None
):
    """The normalised low-rank attention operator ``f = D⁻¹ Ã`` for ``q, k``.

    Parameters
    ----------
    q : array ``(..., n, d)``
    k : array ``(..., m, d)`` (``m == n`` when ``causal``)
    causal, eps, degree, kind, scale, max_rank
        As in :func:`lowrank_attention`.

    Returns
    -------
    LowRankAttentionOperator
        Holds the ``n × r`` factors: ``O((n + m) r)`` memory; ``D`` costs one product.
    """
    check_eager("lowrank_operator", q, k)
    xp, q, k = validate_qk(q, k, causal=causal)
    factors = lowrank_factors(
        q, k, eps=eps, degree=degree, kind=kind, scale=scale, max_rank=max_rank
    )
    _check_positive(factors.kind, factors.rel_error_bound, factors.degree, factors.radius)
    ones = xp.ones((*factors.v.shape[:-1], 1), dtype=q.dtype, device=device(q))
    return LowRankAttentionOperator(
        u=factors.u,
        v=factors.v,
        normaliser=_unnormalised_product(
            xp, factors.u, factors.v, ones, causal=causal, transpose=False
        ),
        causal=causal,
        degree=factors.degree,
        radius=factors.radius,
        rel_error_bound=factors.rel_error_bound,
        kind=factors.kind,
    )
