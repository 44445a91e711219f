"""Where composite attention is exact and where it is summarised (docs/math.rst §8).

The padded sequence is cut into ``nb = 2^J`` blocks of ``b`` rows.  Query block ``I`` sees

* its **band**, blocks ``I − 1, I`` (and ``I + 1`` without the causal mask), exactly;
* its **sinks**, the first ``h`` key blocks, exactly;
* its **top blocks**, the ``t`` far key blocks of highest block-level score, exactly;
* every other allowed key through **far-field tokens**: the FMM interaction lists of
  docs/math.rst §6 with the finest boxes one block wide — at level ``ℓ = 1 … J − 1`` the query
  box ``a = I >> (ℓ − 1)`` (width ``w = b 2^{ℓ−1}``) sees key boxes ``a − 2`` (even ``a``) or
  ``a − 2, a − 3`` (odd ``a``), and without the mask also ``a + 2`` and ``a + 3`` / ``a + 2``.
  Together with the band these lists cover every key exactly once, so the exact blocks outside
  the band each lie in exactly one token of ``I``, which drops them (:func:`far_positions`).

Everything here is integer bookkeeping on ``(nb,)``-sized index arrays and the block scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import array_api_extra as xpx
from array_api_compat import device

from .._array import index_add, map_chunks

__all__ = [
    "Layout",
    "as_blocks",
    "block_chunks",
    "block_mask",
    "block_scores",
    "exact_count",
    "far_positions",
    "heavy_mask",
    "layout",
    "level_boxes",
    "pad",
    "paired",
    "scatter_blocks",
    "score_count",
    "select_blocks",
    "take_rows",
    "top_indices",
]

# Entries of one chunk of the (query block × key block) score matrix.
_SCORE_CHUNK = 1 << 21
# Entries of one chunk of gathered exact keys or operands, ``(B, chunk, E·b, p)``.
_ROW_CHUNK = 1 << 21


@dataclass(frozen=True)
class Layout:
    """Block geometry: ``n`` rows padded to ``padded = blocks · block``, ``blocks = 2^J``."""

    n: int
    block: int
    blocks: int
    causal: bool

    @property
    def padded(self):
        return self.blocks * self.block

    @property
    def levels(self):
        """Far-field levels ``1 … J − 1`` (none when ``blocks <= 2``)."""
        return range(1, max(int(math.log2(self.blocks)), 1))

    @property
    def slots(self):
        """Key boxes per query box and level: 2 with the causal mask, 3 without."""
        return 2 if self.causal else 3

    @property
    def tokens(self):
        """Far-field tokens per query block: ``slots`` per level."""
        return self.slots * len(self.levels)

    @property
    def band(self):
        """Offsets of the band blocks."""
        return (-1, 0) if self.causal else (-1, 0, 1)

    def offsets(self, parity):
        """Key-box offsets of each slot for a query box of this parity (``None``: unused)."""
        if self.causal:
            return (-2, -3) if parity else (-2, None)
        return (-2, 2, -3) if parity else (-2, 2, 3)


def layout(n, block, causal):
    """The :class:`Layout` of ``n`` rows in blocks of ``block`` (``blocks`` a power of two)."""
    blocks = 1 << max(math.ceil(math.log2(math.ceil(n / block))), 0)
    return Layout(n=n, block=block, blocks=blocks, causal=causal)


def level_boxes(xp, lay, level, dev):
    """Key box of every (query box, slot) at ``level``: ``(boxes, slots)`` ints and validity."""
    boxes = lay.blocks >> (level - 1)
    a = xp.arange(boxes, device=dev)
    odd = a % 2 == 1
    index, ok = [], []
    for even_offset, odd_offset in zip(lay.offsets(0), lay.offsets(1), strict=True):
        even, step = even_offset or 0, (odd_offset or 0) - (even_offset or 0)
        key = a + even + step * (a % 2)
        found = (key >= 0) & (key < boxes)
        if even_offset is None:
            found = found & odd
        if odd_offset is None:
            found = found & ~odd
        index.append(xp.where(found, key, xp.zeros_like(key)))
        ok.append(found)
    return xp.stack(index, axis=-1), xp.stack(ok, axis=-1)


def paired(xp, lay, level, z, func, fill):
    """``func(a, slot, z_K)`` for every query box and slot at ``level``: ``(B, boxes, slots, ...)``.

    ``z (B, boxes, ...)`` holds the level's boxes of keys; ``a`` is a slice of query boxes
    and ``z_K`` the rows of ``z`` at their key boxes for ``slot``.  A slot's key box is its
    query box shifted by the offset for the box's parity (:meth:`Layout.offsets`), so both are
    strided slices and no key is copied.  ``fill`` where a slot has no key box.
    """
    boxes = lay.blocks >> (level - 1)
    half = boxes // 2
    pieces = {}
    for slot in range(lay.slots):
        for parity in (0, 1):
            o = lay.offsets(parity)[slot]
            if o is None:
                continue
            lo = max(0, -((o + parity) // 2))  # query box parity + 2i has key box ≥ 0
            hi = min(half, (boxes - 1 - o - parity) // 2 + 1)  # … and < boxes
            if lo < hi:
                start = parity + o + 2 * lo
                keys = z[:, start : start + 2 * (hi - lo) - 1 : 2, ...]
                a = slice(parity + 2 * lo, parity + 2 * hi - 1, 2)
                pieces[slot, parity] = (lo, hi, func(a, slot, keys))
    like = next(iter(pieces.values()))[2]
    dev = device(like)

    def filler(count):
        shape = (like.shape[0], count, *like.shape[2:])
        return xp.full(shape, fill, dtype=like.dtype, device=dev)

    slots = []
    for slot in range(lay.slots):
        halves = []
        for parity in (0, 1):
            if (slot, parity) not in pieces:
                halves.append(filler(half))
                continue
            lo, hi, piece = pieces[slot, parity]
            parts = [filler(lo)] if lo else []
            parts += [piece, filler(half - hi)] if hi < half else [piece]
            halves.append(xp.concat(parts, axis=1) if len(parts) > 1 else piece)
        both = xp.stack(halves, axis=2)  # (B, half, 2, ...): query box 2i + parity
        slots.append(xp.reshape(both, (like.shape[0], boxes, *like.shape[2:])))
    return xp.stack(slots, axis=2)


def select_blocks(xp, lay, scores, sinks, top):
    """The exact key blocks of every query block: band, sinks, then the ``top`` best scored.

    Parameters
    ----------
    scores : array ``(B, nb, nb)`` or callable
        Block-level scores of (query block, key block); a callable ``(lo, hi) -> (B, hi−lo,
        nb)`` computes them in chunks of query blocks, so the ``nb × nb`` matrix never exists.
    sinks, top : int

    Returns
    -------
    ids, ok : arrays ``(B, nb, E)``
        Key block of each exact slot (clipped into range) and whether the slot is used;
        ``E = len(band) + sinks + top``, the band first.
    """
    nb = lay.blocks

    def chunk(lo, hi):
        s = scores(lo, hi)
        dev = device(s)
        query = xp.arange(lo, hi, device=dev)[:, None]
        key = xp.arange(nb, device=dev)[None, :]
        far = (key < query - 1) if lay.causal else (xp.abs(key - query) > 1)
        sink = key < sinks
        minus_inf = xp.asarray(-xp.inf, dtype=s.dtype, device=dev)
        s = xp.where(far & ~sink, s, minus_inf)
        parts = []
        for o in lay.band:
            b = query + o
            parts.append((xp.broadcast_to(b, (*s.shape[:-1], 1)), (b >= 0) & (b < nb)))
        for h in range(sinks):
            b = xp.full(query.shape, h, device=dev)
            parts.append((xp.broadcast_to(b, (*s.shape[:-1], 1)), far[:, h : h + 1]))
        if top:
            order = top_indices(xp, s, top)
            best = xp.take_along_axis(s, order, axis=-1)
            parts.append((order, best > minus_inf))
        ids = xp.concat(
            [xp.broadcast_to(i, (*s.shape[:-1], i.shape[-1])) for i, _ in parts], axis=-1
        )
        ok = xp.concat(
            [xp.broadcast_to(k, (*s.shape[:-1], k.shape[-1])) for _, k in parts], axis=-1
        )
        return xp.clip(ids, 0, nb - 1), ok

    step = max(1, _SCORE_CHUNK // max(nb, 1))
    chunks = map_chunks(xp, chunk, [(lo, min(lo + step, nb)) for lo in range(0, nb, step)])
    ids = xp.concat([c[0] for c in chunks], axis=-2)
    ok = xp.concat([c[1] for c in chunks], axis=-2)
    return ids, ok


def top_indices(xp, x, count):
    """Indices of the ``count`` largest entries along the last axis, in no particular order.

    A partition, not a sort (``O(m)`` per row where the library has one: NumPy's
    ``argpartition``, torch's ``topk``); ``count`` may be the whole axis.
    """
    if count >= x.shape[-1]:
        return xp.argsort(-x, axis=-1, stable=True)
    return xpx.argpartition(-x, count - 1, axis=-1, xp=xp)[..., :count]


def far_positions(xp, lay, ids, ok):
    """The far-field token of each exact block outside the band and its place in the token's
    key-box tree.

    For query block ``I`` and key block ``K`` (both ``(B, nb, x)`` ints, ``ok`` masks unused
    slots): the level ``ℓ`` and slot whose key box ``K >> (ℓ − 1)`` is in the interaction list
    of ``a = I >> (ℓ − 1)``.  Returns ``token`` (``(ℓ − 1)·slots + slot``, ``-1`` where ``ok``
    is false), ``leaf`` (``K``'s sub-block in its box, ``K mod 2^{ℓ−1}``), ``subs`` (the box's
    sub-blocks, ``2^{ℓ−1}``) and ``tree`` (where the box's tree starts in the
    level-concatenated node arrays of :class:`~convbasis.composite.far_field.FarField`,
    ``(ℓ − 1)·2·nb·slots + (a·slots + slot)·2^ℓ``).
    """
    nb, slots = lay.blocks, lay.slots
    dev = device(ids)
    query = xp.reshape(xp.arange(nb, device=dev), (nb, 1))
    # The token's level is the coarsest at which the key box is no neighbour of the query
    # box (one level up the parents are neighbours: the box is in the interaction list).
    level, subs, rel = xp.zeros_like(ids), xp.ones_like(ids), xp.zeros_like(ids)
    for lev in lay.levels:
        width = 1 << (lev - 1)
        r = ids // width - query // width
        far = (r >= 2) | (r <= -2)
        level = xp.where(far, lev - 1, level)
        subs = xp.where(far, width, subs)
        rel = xp.where(far, r, rel)
    a = query // subs
    slot = xp.full(ids.shape, -1, dtype=ids.dtype, device=dev)
    for k in range(slots):
        for parity in (0, 1):
            o = lay.offsets(parity)[k]
            if o is not None:
                slot = xp.where((a % 2 == parity) & (rel == o), k, slot)
    found = ok & (slot >= 0)
    token = xp.where(found, level * slots + slot, xp.full_like(slot, -1))
    tree = level * 2 * nb * slots + (a * slots + slot) * 2 * subs
    tree = xp.where(found, tree, xp.zeros_like(tree))
    return token, ids % subs, subs, tree


def pad(xp, x, padded):
    """Zero-pad ``(B, n, p)`` to ``(B, padded, p)``."""
    extra = padded - x.shape[-2]
    if not extra:
        return x
    zeros = xp.zeros((x.shape[0], extra, x.shape[-1]), dtype=x.dtype, device=device(x))
    return xp.concat([x, zeros], axis=-2)


def as_blocks(xp, lay, x):
    """``(B, N, p)`` → ``(B, nb, b, p)``."""
    return xp.reshape(x, (x.shape[0], lay.blocks, lay.block, x.shape[-1]))


def take_rows(xp, x, index):
    """``x (B, R, ...)`` at per-batch rows ``index (B, nb, m)`` → ``(B, nb, m, ...)``."""
    bt, rows = x.shape[:2]
    flat = xp.reshape(x, (bt * rows, *x.shape[2:]))
    offset = xp.reshape(xp.arange(bt, device=device(index)) * rows, (bt, 1, 1))
    out = xp.take(flat, xp.reshape(index + offset, (-1,)), axis=0)
    return xp.reshape(out, (*index.shape, *x.shape[2:]))


def scatter_blocks(xp, lay, ids, values):
    """Sum ``values (B, c, m, b, p)`` into the key blocks ``ids (B, c, m)``: ``(B, nb, b, p)``."""
    bt = ids.shape[0]
    offset = xp.reshape(xp.arange(bt, device=device(ids)) * lay.blocks, (bt, 1, 1))
    flat = xp.reshape(values, (-1, *values.shape[-2:]))
    out = index_add(xp, xp.reshape(ids + offset, (-1,)), flat, bt * lay.blocks)
    return xp.reshape(out, (bt, lay.blocks, *values.shape[-2:]))


def block_chunks(lay, per_block):
    """Query-block ranges whose gathered ``(B, c, E, p)`` operand holds about ``2^21`` entries."""
    step = max(1, _ROW_CHUNK // max(per_block * lay.block, 1))
    for lo in range(0, lay.blocks, step):
        yield lo, min(lo + step, lay.blocks)


def block_scores(xp, lay, qb, kb, valid):
    """Cheap (query block, key block) scores ``q̄·k̄`` of the block-mean query and key.

    One dot product per block pair.  (A Gaussian correction from the keys' spread,
    ``s²/2 q̄²·var(k)``, chose the same blocks on real heads: docs/composite.rst.)  Empty key
    blocks score ``-inf``.
    """
    count = xp.sum(xp.reshape(xp.astype(valid, qb.dtype), (lay.blocks, lay.block)), axis=-1)
    per = xp.where(count > 0, count, xp.ones_like(count))[:, None]
    qbar = xp.sum(qb, axis=-2) / per
    kbar = xp.sum(kb, axis=-2) / per
    empty = xp.where(count > 0, xp.zeros_like(count), -xp.inf)

    def scores(lo, hi):
        return qbar[:, lo:hi, ...] @ xp.matrix_transpose(kbar) + empty

    return scores


def block_mask(xp, lay, ids, ok, heavy, lo, hi):
    """Which keys of the exact block slots of query blocks ``lo:hi`` the rows see, as
    ``(keys (B, c, 1, E), rows (b, E) or None)``: their product is the mask.

    ``keys``: the slot used, the key not padding and not one of the ``heavy (B, N)`` columns
    (which have their own exact part).  Only the band's diagonal block holds keys in a row's
    future (sinks and top blocks lie before the band), so ``rows``, with the causal mask, is
    one static ``b × b`` triangle there.
    """
    b = lay.block
    dev = device(ids)
    ids, ok = ids[:, lo:hi, ...], ok[:, lo:hi, ...]
    keys = ok[..., None] & (ids[..., None] * b + xp.arange(b, device=dev) < lay.n)
    if heavy is not None:
        keys = keys & ~take_rows(xp, xp.reshape(heavy, (heavy.shape[0], -1, b)), ids)
    keys = xp.reshape(keys, (*ids.shape[:2], 1, -1))  # (B, c, 1, E)
    if not lay.causal:
        return keys, None
    row = xp.arange(b, device=dev)
    rows = [xp.ones((b, b), dtype=xp.bool, device=dev)] * ids.shape[-1]
    rows[lay.band.index(0)] = row[None, :] <= row[:, None]
    return keys, xp.concat(rows, axis=-1)


def heavy_mask(xp, lay, heavy, lo, hi):
    """Which heavy columns ``heavy (B, h)`` the rows of query blocks ``lo:hi`` see:
    ``(B, c | 1, b | 1, h)``, those not padding nor in the row's future."""
    cols = (heavy < lay.n)[:, None, None, :]
    if not lay.causal:
        return cols
    b = lay.block
    query_pos = xp.reshape(xp.arange(lo * b, hi * b, device=device(heavy)), (hi - lo, b, 1))
    return cols & (heavy[:, None, None, :] <= query_pos)


def exact_count(xp, lay, keys, rows, heavy, lo, hi, dtype):
    """Exact logits of the valid rows of query blocks ``lo:hi`` (a 0-d array): the block
    slots' (:func:`block_mask`'s ``keys`` and ``rows``) and the visible heavy columns'
    ``heavy (B, h)``, counted per column rather than per logit."""
    b, dev = lay.block, device(keys)
    start = xp.arange(lo, hi, device=dev) * b
    stop = xp.minimum(start + b, xp.full_like(start, lay.n))
    valid = xp.astype(xp.arange(b, device=dev)[None, :] < (stop - start)[:, None], dtype)
    per_key = (
        xp.sum(valid, axis=-1, keepdims=True)
        if rows is None
        else valid @ xp.astype(rows, dtype)  # (c, 1 | E): valid rows seeing each key
    )
    count = xp.sum(xp.astype(keys[:, :, 0, :], dtype) * per_key)
    if heavy is None:
        return count
    first = start[:, None]
    if lay.causal:  # rows from max(block start, column) to the block's last valid row
        first = xp.maximum(first, heavy[:, None, :])
    per_column = xp.clip(stop[:, None] - first, 0, None)
    per_column = xp.where((heavy < lay.n)[:, None, :], per_column, xp.zeros_like(per_column))
    return count + xp.sum(xp.astype(per_column, dtype))


def score_count(lay):
    """Dot products of the block scores per batch element: one per far (query, key) block pair."""
    filled = -(-lay.n // lay.block)
    if lay.causal:
        pairs = sum(max(0, i - 1) for i in range(filled))
    else:
        pairs = sum(filled - sum(0 <= i + o < filled for o in lay.band) for i in range(filled))
    return float(pairs)
