"""Composite attention ``f`` as an operator: exact near field + FMM far-field tokens.

Row ``i`` of query block ``I`` is one softmax over two parts (docs/math.rst §8):

* exact logits ``s q_i·k_j`` for the keys of ``I``'s exact blocks (:mod:`.layout`);
* one logit per far-field token ``τ`` (a key box ``K`` of ``I``'s interaction lists less its
  exact blocks, seen from the centre ``c`` of ``I``'s query box at that level):
  ``log Σ_{j∈τ} e^{s c·k_j} + s (q_i − c)·k̃_τ`` with ``k̃_τ`` the ``e^{s c·k}``-weighted mean
  key of ``τ`` — the first-order expansion of ``log Σ_{j∈τ} e^{s q_i·k_j}`` around ``c``, a
  lower bound by convexity, so a token never outweighs the keys it stands for.  The token's
  value is the same weighted mean of the values.

So ``f_ij`` is the exact weight for exact keys and ``W_iτ e^{s c·k_j}/Z_τ`` for the key ``j``
of token ``τ``: a linear operator with four products like every other structure.  The token
sums are evaluated relative to each token's own largest centre logit and without subtraction
(:mod:`.far_field`), so a token keeps its keys' mass however far below its box's exact keys
they lie.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from array_api_compat import device

from .._array import (
    check_integer,
    index_add,
    map_chunks,
    resolve_scale,
    single_threaded_blas,
    validate_qk,
)
from ..operators import SquareProducts, check_operands
from .far_field import (
    centre_logits,
    far_field,
    heavy_columns,
    keys_to_rows,
    per_token,
    token_adjoint,
    token_sums,
)
from .layout import (
    as_blocks,
    block_chunks,
    block_mask,
    block_scores,
    exact_count,
    heavy_mask,
    layout,
    pad,
    scatter_blocks,
    score_count,
    select_blocks,
    take_rows,
)

__all__ = [
    "CompositeAttentionOperator",
    "CompositeCost",
    "CompositeWarning",
    "composite_operator",
    "exact_rows",
    "heavy_rows",
]


class CompositeWarning(UserWarning):
    """A composite result to distrust: ``target_error`` not met within ``max_fraction``."""


@dataclass(frozen=True)
class CompositeCost:
    """What one composite pass computed: its layout and logit counts (no weights).

    Attributes
    ----------
    layout
        The block geometry (``convbasis.composite.layout.Layout``).
    batch : tuple of int
        Broadcast leading axes of ``q`` and ``k``; internally flattened to ``B`` rows.
    scale : float
    counts : tuple
        Logit evaluations per batch element: exact, far-field tokens, centres, block scores.
    """

    layout: Any
    batch: tuple[int, ...]
    scale: float
    counts: tuple[Any, ...]

    def flatten(self, xp, x):
        """``x (..., n, p)`` broadcast to the batch, flattened and padded: ``(B, N, p)``."""
        return _flat(xp, x, self.batch, self.layout.padded)

    def unflatten(self, xp, x):
        """``(B, N, p)`` → ``(*batch, n, p)``."""
        x = x[:, : self.layout.n, :]
        return xp.reshape(x, (*self.batch, *x.shape[-2:]))

    @property
    def allowed(self):
        """The number of allowed logits per batch element (``n (n + 1) / 2`` causal, else
        ``n²``)."""
        n = self.layout.n
        return n * (n + 1) // 2 if self.layout.causal else n * n

    @property
    def exact_fraction(self):
        """Share of the allowed logits computed exactly (mean over the batch), a float."""
        return float(self.counts[0]) / self.allowed

    @property
    def work_fraction(self):
        """All logit evaluations (exact, far-field tokens per row, centres, block scores)
        over the allowed logits, a float: the honest cost relative to dense attention."""
        return sum(float(c) for c in self.counts) / self.allowed


@dataclass(frozen=True)
class CompositeAttentionOperator(CompositeCost, SquareProducts):
    """The normalised composite weights ``f (..., n, n)`` as an operator.

    Build with :func:`composite_operator`.  ``matmul(z)`` and ``rmatmul(z)`` cost
    ``O(n (E + T) p)`` for ``z (..., n, p)`` with ``E`` exact keys and ``T`` far-field tokens
    per row, plus ``O(n p log(n/b))`` for the token sums (the key boxes' trees, and up to
    ``log2(n/b)`` nodes per exact block outside the band); the Hadamard products with a
    rank-``s`` ``G Yᵀ`` ``s`` times that; ``to_dense()`` is ``O(n²)``, for tests.

    Attributes
    ----------
    layout, batch, scale, counts
        As in ``CompositeCost`` (what a forward-only pass returns).
    ids : int array ``(B, nb, E/b)``
        Key block of each exact slot of each query block: the band first, then the sinks,
        then the top blocks.
    used : bool array ``(B, nb, E/b)``
        Whether the slot holds a key block (near the edges and for short sequences some do
        not).
    heavy : int array ``(B, h)`` or None
        The heavy key columns every query sees exactly.
    exact : array ``(B, nb, b, E)``
        Normalised weights of the exact blocks' keys (zero where a slot is unused, a key is
        masked, or a key is a heavy column: those are in ``heavy_weights``).
    heavy_weights : array ``(B, nb, b, h)`` or None
        Normalised weights of the heavy columns (zero for padding and, causal, the future).
    far
        The far field (``convbasis.composite.far_field.FarField``).
    far_weights : array ``(B, nb, b, T)``
        ``W_iτ / Z_τ``: the weight of a unit of token ``τ``'s sums (zero for dropped tokens).
    token_mass : array ``(B, nb, T)``
        ``Z_τ = Σ_{j∈τ} e^{s c·k_j − m_τ}``, the token's centre weights relative to its own
        largest centre logit ``m_τ`` (1 for empty tokens).
    """

    ids: Any
    used: Any
    heavy: Any
    exact: Any
    heavy_weights: Any
    far: Any
    far_weights: Any
    token_mass: Any

    @property
    def shape(self):
        """``(*batch, n, n)``, the shape of ``to_dense()``."""
        return (*self.batch, self.layout.n, self.layout.n)

    def _prepare(self, z, name="z"):
        """Check ``z (..., n, p)`` and fold it into ``(B, N, p')``.

        Axes along which ``z`` broadcasts the operator (the operator has size 1 there) become
        columns, so every internal array keeps the operator's ``B`` rows; :meth:`_finish`
        unfolds them.
        """
        xp, (z,) = check_operands(
            self.exact, {name: z}, rows={name: self.layout.n}, batch=self.batch
        )
        full = tuple(xp.broadcast_shapes(self.batch, z.shape[:-2]))
        own = (1,) * (len(full) - len(self.batch)) + tuple(self.batch)
        extra = [i for i, (o, f) in enumerate(zip(own, full, strict=True)) if o == 1 and f > 1]
        keep = [i for i in range(len(full)) if i not in extra]
        z = xp.broadcast_to(z, (*full, *z.shape[-2:]))
        last = len(full)
        z = xp.permute_dims(z, (*keep, last, *extra, last + 1))
        z = xp.reshape(z, (math.prod(self.batch), self.layout.n, -1))
        fold = (full, keep, extra, z.shape[-1])
        return xp, pad(xp, z, self.layout.padded), self._cast(xp, z.dtype), fold

    def _cast(self, xp, dtype):
        if dtype == self.exact.dtype:
            return self
        return dataclasses.replace(
            self,
            exact=xp.astype(self.exact, dtype),
            heavy_weights=None
            if self.heavy_weights is None
            else xp.astype(self.heavy_weights, dtype),
            far_weights=xp.astype(self.far_weights, dtype),
            far=self.far.astype(xp, dtype),
        )

    def _finish(self, xp, out, fold):
        """``(B, N, p')`` → ``(*batch, n, p)``: the inverse of :meth:`_prepare`'s fold."""
        full, keep, extra, _ = fold
        n = self.layout.n
        out = out[:, :n, :]
        p = out.shape[-1] // max(math.prod(full[i] for i in extra), 1)
        out = xp.reshape(out, (*(full[i] for i in keep), n, *(full[i] for i in extra), p))
        order = [*keep, *extra]
        inverse = [order.index(i) for i in range(len(full))]
        last = len(full)
        perm = [inverse[i] if inverse[i] < len(keep) else inverse[i] + 1 for i in range(last)]
        return xp.permute_dims(out, (*perm, len(keep), last + 1))

    def matmul(self, z, /):
        """``f z`` for ``z (..., n, p)``."""
        xp, z, op, fold = self._prepare(z)
        lay = self.layout
        with single_threaded_blas(xp):
            parts = map_chunks(
                xp,
                lambda lo, hi: op.exact[:, lo:hi, ...] @ exact_rows(xp, op, z, lo, hi),
                block_chunks(lay, op.ids.shape[-1] * z.shape[-1]),
            )
            out = xp.concat(parts, axis=1)
            if op.heavy is not None:
                out = out + _heavy_matmul(xp, op, z)
            if lay.tokens:
                out = out + op.far_weights @ token_sums(xp, lay, op.far, z)
        return self._finish(xp, xp.reshape(out, z.shape), fold)

    def rmatmul(self, z, /):
        """``fᵀ z`` for ``z (..., n, p)``."""
        xp, z, op, fold = self._prepare(z)
        with single_threaded_blas(xp):
            out = _transposed(xp, op, z)
        return self._finish(xp, out, fold)

    @property
    def _like(self):
        return self.exact


def composite_operator(
    q, k, /, *, causal=True, scale=None, budget=None, block=None, sinks=0, heavy=None
):
    """Build the composite attention operator ``f`` for ``q, k (..., n, d)``.

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
        Leading (batch/head) axes broadcast.
    causal : bool
    scale : float, optional
        Default ``1/sqrt(d)``.
    budget : int, optional
        Exact keys per query row, positive (default ``min(128, n)``): the band (``2·block``
        causal, ``3·block`` otherwise), ``sinks·block`` leading keys, ``heavy`` columns and
        top-scored key blocks in what is left.  Must cover the band and sinks (unless those
        cover every key); ``n`` or more is exact attention.
    block : int, optional
        Rows per block (positive; values above ``n`` act as ``n``).  Default 8 up to
        ``n = 4096``, above it the largest power of two ``≤ sqrt(n / 64)``, at least 16
        (32 from ``n = 2^16``): the ``(n/b)²`` block scores then grow like ``n``, not ``n²``.
    sinks : int
        Leading key blocks every query sees exactly (attention sinks such as ``[CLS]``).
    heavy : int, optional
        Key columns every query sees exactly, chosen by their estimated attention mass
        (``convbasis.composite.far_field.column_mass``); default half the budget left
        after the band and sinks, rounded up to whole blocks.

    Returns
    -------
    CompositeAttentionOperator
        ``O(n (budget + log(n/b)) d + (n/b)² d)`` time (the last term: block scores, in chunks
        of ``2^21``), ``O(n · budget)`` memory; no ``n × n`` array.
    """
    xp, q, k = validate_qk(q, k, causal=causal, same_length="composite attention")
    op, _ = build(
        xp,
        q,
        k,
        None,
        causal=causal,
        scale=scale,
        budget=budget,
        block=block,
        sinks=sinks,
        heavy=heavy,
    )
    return op


def build(xp, q, k, v, *, causal, scale, budget, block, sinks, heavy, weights=True):
    """The operator of validated ``q, k`` and, when ``v`` is given, ``f v`` ``(..., n, e)``
    from the same pass (one gather of the exact keys and values, one far-field sum).

    With ``weights=False`` (``v`` given) only the ``CompositeCost`` of the pass is
    returned with ``f v``: a forward that keeps no ``O(n · budget)`` weights.
    """
    n, d = q.shape[-2:]
    if k.shape[-2] != n:
        raise ValueError(
            f"composite attention needs as many queries as keys, got q shape {q.shape} and "
            f"k shape {k.shape}"
        )
    block = default_block(n) if block is None else check_integer(block, "block")
    block = min(block, n)
    budget = min(128, n) if budget is None else budget
    # n or more is exact attention: one budget serves sequences of any length (lengths=)
    budget = min(check_integer(budget, "budget"), n)
    lay = layout(n, block, causal)
    filled = -(-n // lay.block)
    sinks = check_integer(sinks, "sinks", low=0, high=filled, what=f"ceil(n / block) = {filled}")
    top, heavy = _split_budget(lay, budget, sinks, heavy)
    with single_threaded_blas(xp):
        op, out = _build(xp, lay, q, k, v, resolve_scale(scale, d), sinks, top, heavy, weights)
    return op, None if out is None else op.unflatten(xp, out)


def default_block(n):
    """8 up to ``n = 4096``, then the largest power of two ``≤ sqrt(n / 64)`` (at least 16),
    which keeps the ``(n/b)² ≤ 64 n`` block scores linear in ``n`` (docs/composite.rst)."""
    if n <= 4096:
        return 8
    return max(16, 1 << ((n // 64).bit_length() - 1) // 2)


def _split_budget(lay, budget, sinks, heavy):
    """``(top blocks, heavy columns)`` from the budget left after the band and the sinks."""
    needed = (len(lay.band) + sinks) * lay.block
    if budget < min(needed, lay.n):
        raise ValueError(
            f"budget must cover the band and the sinks, (len(band) + sinks)·block = {needed} "
            f"keys (or n = {lay.n}), got {budget}"
        )
    left = max(budget - needed, 0)
    if heavy is None:  # about half of what is left, in whole blocks (docs/composite.rst)
        heavy = min(-(-left // (2 * lay.block)) * lay.block, left)
    heavy = check_integer(heavy, "heavy", low=0, high=left, what=f"budget - band - sinks = {left}")
    if budget >= lay.n:  # every key fits: exact attention
        return lay.blocks, 0
    heavy = min(heavy, lay.n) if lay.tokens else 0
    top = (left - heavy) // lay.block
    return max(0, min(top, lay.blocks - len(lay.band) - sinks)), heavy


def _build(xp, lay, q, k, v, scale, sinks, top, heavy, weights):
    batch = tuple(xp.broadcast_shapes(*(a.shape[:-2] for a in (q, k, v) if a is not None)))
    bt, n, d, b, nb = math.prod(batch), lay.n, q.shape[-1], lay.block, lay.blocks
    dev = device(q)
    q, k, v = (None if a is None else _flat(xp, a, batch, lay.padded) for a in (q, k, v))
    valid = xp.arange(lay.padded, device=dev) < n
    qb, kb = as_blocks(xp, lay, q), as_blocks(xp, lay, k)
    ids, ok = select_blocks(xp, lay, block_scores(xp, lay, qb, kb, valid), sinks, top)
    band = len(lay.band)
    levels, evaluations = centre_logits(xp, lay, q, k, valid, scale)
    heavy_ids, is_heavy = heavy_columns(xp, lay, levels, q, valid, heavy)
    far = far_field(xp, lay, levels, is_heavy, ids[..., band:], ok[..., band:], evaluations)

    # Far-field logits: first order around each token's centre (module docstring).
    ones = xp.ones((bt, lay.padded, 1), dtype=q.dtype, device=dev)
    parts = [k, ones] if v is None else [k, ones, v]
    sums = token_sums(xp, lay, far, xp.concat(parts, axis=-1))
    # Relative to the token's own maximum: in [1, |τ|] for a token with keys, 0 without.
    keep = far.keep
    mass = xp.where(keep, sums[..., d], xp.ones_like(sums[..., d]))
    mean_key = sums[..., :d] / mass[..., None]
    shift, centre = per_token(xp, lay, far, q)
    offset = shift - scale * xp.sum(centre * mean_key, axis=-1) + xp.log(mass)  # (B, nb, T)
    scaled = scale * qb  # once here rather than on every logit
    token_logits = scaled @ xp.matrix_transpose(mean_key) + offset[:, :, None, :]
    minus_inf = xp.asarray(-xp.inf, dtype=q.dtype, device=dev)
    token_logits = xp.where(keep[:, :, None, :], token_logits, minus_inf)

    source = k if v is None else xp.concat([k, v], axis=-1)
    # The heavy columns are the same for every row: one product of all queries with them.
    heavy_source = None
    if heavy_ids is not None:
        heavy_source = take_rows(xp, source, heavy_ids[:, None, :])[:, 0, ...]  # (B, h, ·)

    def chunk(lo, hi):
        keys = _gather(xp, lay, source, ids[:, lo:hi, ...])  # (B, c, E, ·)
        logits = scaled[:, lo:hi, ...] @ xp.matrix_transpose(keys[..., :d])
        keys_seen, rows_seen = block_mask(xp, lay, ids, ok, is_heavy, lo, hi)
        mask = keys_seen if rows_seen is None else keys_seen & rows_seen
        logits = xp.where(mask, logits, minus_inf)
        seen = exact_count(xp, lay, keys_seen, rows_seen, heavy_ids, lo, hi, q.dtype)
        top_logit = xp.max(logits, axis=-1)
        if heavy_source is not None:
            heavy_logits = _rows_times(xp, scaled[:, lo:hi, ...], heavy_source[..., :d], True)
            cols = heavy_mask(xp, lay, heavy_ids, lo, hi)
            heavy_logits = xp.where(cols, heavy_logits, minus_inf)
            top_logit = xp.maximum(top_logit, xp.max(heavy_logits, axis=-1))
        tok = token_logits[:, lo:hi, ...]
        if lay.tokens:
            top_logit = xp.maximum(top_logit, xp.max(tok, axis=-1))
        top_logit = xp.where(xp.isfinite(top_logit), top_logit, xp.zeros_like(top_logit))
        w = xp.exp(logits - top_logit[..., None])
        t = xp.exp(tok - top_logit[..., None])
        norm = xp.sum(w, axis=-1) + xp.sum(t, axis=-1)
        wh = None
        if heavy_source is not None:
            wh = xp.exp(heavy_logits - top_logit[..., None])
            norm = norm + xp.sum(wh, axis=-1)
        norm = xp.where(norm > 0, norm, xp.ones_like(norm))[..., None]
        t = t / mass[:, lo:hi, None, :]  # per unit of the token sums
        out = None
        if v is not None:  # normalised once, on the output rather than on every weight
            out = w @ keys[..., d:] + t @ sums[:, lo:hi, :, d + 1 :]
            if wh is not None:
                out = out + _rows_times(xp, wh, heavy_source[..., d:], False)
            out = out / norm
        if not weights:
            return None, None, None, seen, out
        return w / norm, None if wh is None else wh / norm, t / norm, seen, out

    parts = map_chunks(xp, chunk, block_chunks(lay, ids.shape[-1] * source.shape[-1]))
    exact, heavy_weights, far_weights, seen, outs = zip(*parts, strict=True)
    rows = xp.reshape(xp.astype(valid, q.dtype), (nb, b, 1))
    counts = (
        sum(seen) / bt,
        xp.sum(xp.astype(keep[:, :, None, :], q.dtype) * rows) / bt,
        far.evaluations,
        score_count(lay),
    )
    out = None if v is None else xp.reshape(xp.concat(outs, axis=1), v.shape)
    if not weights:
        return CompositeCost(layout=lay, batch=batch, scale=scale, counts=counts), out
    op = CompositeAttentionOperator(
        layout=lay,
        batch=batch,
        ids=ids,
        used=ok,
        heavy=heavy_ids,
        exact=xp.concat(exact, axis=1),
        heavy_weights=None if heavy_source is None else xp.concat(heavy_weights, axis=1),
        far=far,
        far_weights=xp.concat(far_weights, axis=1),
        token_mass=mass,
        scale=scale,
        counts=counts,
    )
    return op, out


def _flat(xp, a, batch, padded):
    """``a (..., n, p)`` broadcast to ``batch``, flattened to ``(B, n, p)`` and padded."""
    a = xp.broadcast_to(a, (*batch, *a.shape[-2:]))
    return pad(xp, xp.reshape(a, (math.prod(batch), *a.shape[-2:])), padded)


def _gather(xp, lay, x, ids):
    """Rows of ``x (B, N, p)`` at the exact blocks ``ids (B, c, E/b)``: ``(B, c, E, p)``."""
    rows = take_rows(xp, as_blocks(xp, lay, x), ids)  # (B, c, E/b, b, p)
    return xp.reshape(rows, (*rows.shape[:2], ids.shape[-1] * lay.block, rows.shape[-1]))


def _rows_times(xp, x, y, transpose):
    """``x (B, c, b, r)`` with its rows flattened times ``y (B, h, r)`` (``yᵀ`` when
    ``transpose``, else ``y (B, r, t)``): one large product per batch row, ``(B, c, b, ·)``."""
    flat = xp.reshape(x, (x.shape[0], -1, x.shape[-1]))
    out = flat @ (xp.matrix_transpose(y) if transpose else y)
    return xp.reshape(out, (*x.shape[:3], out.shape[-1]))


def _heavy_matmul(xp, op, z):
    """The heavy columns' part of ``f z`` for padded, flattened ``z (B, N, p)``: ``(B, nb, b,
    p)``."""
    return _rows_times(xp, op.heavy_weights, heavy_rows(xp, op, z), False)


def _transposed(xp, op, z):
    """``fᵀ z`` for padded, flattened ``z (B, N, p)``."""
    lay = op.layout
    zb = as_blocks(xp, lay, z)

    def chunk(lo, hi):
        c = xp.matrix_transpose(op.exact[:, lo:hi, ...]) @ zb[:, lo:hi, ...]
        c = xp.reshape(c, (*c.shape[:2], op.ids.shape[-1], lay.block, c.shape[-1]))
        return scatter_blocks(xp, lay, op.ids[:, lo:hi, ...], c)

    parts = map_chunks(xp, chunk, block_chunks(lay, op.ids.shape[-1] * z.shape[-1]))
    out = xp.reshape(sum(parts[1:], parts[0]), z.shape)
    if op.heavy is not None:
        bt, h = op.heavy.shape
        weights = xp.reshape(op.heavy_weights, (bt, lay.padded, h))
        ch = xp.matrix_transpose(weights) @ z  # (B, h, p)
        offset = xp.reshape(xp.arange(bt, device=device(z)) * lay.padded, (bt, 1))
        target = xp.reshape(op.heavy + offset, (-1,))
        add = index_add(xp, target, xp.reshape(ch, (bt * h, ch.shape[-1])), bt * lay.padded)
        out = out + xp.reshape(add, z.shape)
    if lay.tokens:
        y = xp.matrix_transpose(op.far_weights) @ zb  # (B, nb, T, p)
        out = out + keys_to_rows(xp, lay, op.far, token_adjoint(xp, lay, op.far, y))
    return out


def exact_rows(xp, op, x, lo, hi):
    """Rows of ``x (B, N, p)`` at the exact block keys of query blocks ``lo:hi``:
    ``(B, c, E, p)`` (the heavy columns: :func:`heavy_rows`)."""
    return _gather(xp, op.layout, x, op.ids[:, lo:hi, ...])


def heavy_rows(xp, op, x):
    """Rows of ``x (B, N, p)`` at the heavy columns: ``(B, h, p)``."""
    return take_rows(xp, x, op.heavy[:, None, :])[:, 0, ...]
