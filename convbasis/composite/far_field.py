"""The far field of composite attention: FMM key boxes seen from query-box centres.

At level ``ℓ`` the centre ``c`` of query box ``a`` (the mean of its queries) scores every key
of the boxes in its interaction list once: ``u_j = s c·k_j``.  A token ``τ`` of query block
``I`` stands for one such key box less the exact blocks of ``I`` in it; its linear map is
``z ↦ Σ_{j∈τ} e^{u_j − m_τ} z_j`` (:func:`token_sums`), ``m_τ`` the token's own largest centre
logit, so its mass ``Z_τ = Σ_{j∈τ} e^{u_j − m_τ}`` lies in ``[1, |τ|]``.

The sums are built without subtraction.  Over the ``2^{ℓ−1}`` sub-blocks (one block each) of
every key box sits a binary tree; a node ``ν`` holds the largest centre logit ``m_ν`` of its
keys and its sums relative to it, ``Σ_{j∈ν} e^{u_j − m_ν} z_j``, merged bottom-up with the
factors ``e^{m_child − m_ν} ≤ 1`` (:func:`node_sums`).  The keys a token keeps are the
disjoint union of few nodes (:func:`far_field`): the whole box (the root) when it drops no
sub-block, otherwise the drop-free siblings of the paths from its dropped sub-blocks to the
root, at most ``ℓ − 1`` per dropped sub-block.  A token adds those nodes' sums with the
factors ``e^{m_ν − m_τ} ≤ 1``, so no term is ever subtracted: however far below the dropped
keys the kept ones lie, their mass is not lost to rounding.  The adjoint
(:func:`token_adjoint`) runs the same factors down the trees.  The first-order logit of
docs/math.rst §8 is built from the token sums of ``[K, 1]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from array_api_compat import device

from .._array import index_add, map_chunks
from .layout import block_chunks, far_positions, level_boxes, paired, take_rows, top_indices

__all__ = [
    "FarField",
    "centre_logits",
    "column_mass",
    "far_field",
    "gather_boxes",
    "heavy_columns",
    "keys_to_rows",
    "node_sums",
    "one_hot",
    "per_token",
    "token_adjoint",
    "token_sums",
]


@dataclass(frozen=True)
class FarField:
    """The centre weights, the key-box trees and the nodes each query block's tokens keep.

    A level's trees are stored in one ``(B, boxes_ℓ, slots, 2^ℓ)`` array per quantity: the
    ``2^{ℓ−1}`` leaves (height 0), then the ``2^{ℓ−1−h}`` nodes of each height ``h``, the root
    last and one unused entry; :func:`node_sums` concatenates the levels.

    Attributes
    ----------
    centres : tuple of arrays ``(B, boxes_ℓ, d)``, one per level
    boxes : tuple of int arrays ``(boxes_ℓ, slots)``, key box of each slot
    weights : tuple of arrays ``(B, boxes_ℓ, slots, w_ℓ)``
        ``e^{u_j − m_leaf}`` of every key relative to its sub-block's maximum (zero where no
        key, a heavy column or padding).
    ups : tuple of arrays ``(B, boxes_ℓ, slots, 2^ℓ)``
        ``e^{m_ν − m_parent}`` of every node (zero for empty nodes and the unused entry; the
        root's is not used).
    shift : array ``(B, nb, T)``
        ``m_τ`` of every token (0 for empty tokens).
    keep : bool array ``(B, nb, T)``
        Whether the token holds a key.
    roots : array ``(B, nb, T)``
        1 where the token is its whole (non-empty) key box, else 0.
    token : int array ``(B, nb, x)``
        The token of each exact block outside the band, sorted by key block (-1: in none).
    nodes : int array ``(B, nb, x, H)``
        For the dropped sub-block of each such slot, the kept node at height ``h`` that it
        accounts for (``H = levels − 1``), in the concatenated node arrays.
    node_weights : array ``(B, nb, x, H)``
        ``e^{m_ν − m_τ}`` of those nodes (zero where a slot accounts for none).
    evaluations : array
        Centre logits computed per batch element.
    """

    centres: tuple[Any, ...]
    boxes: tuple[Any, ...]
    weights: tuple[Any, ...]
    ups: tuple[Any, ...]
    shift: Any
    keep: Any
    roots: Any
    token: Any
    nodes: Any
    node_weights: Any
    evaluations: Any

    def astype(self, xp, dtype):
        """The same far field with its weights in ``dtype``."""
        return dataclasses.replace(
            self,
            weights=tuple(xp.astype(w, dtype) for w in self.weights),
            ups=tuple(xp.astype(u, dtype) for u in self.ups),
            roots=xp.astype(self.roots, dtype),
            node_weights=xp.astype(self.node_weights, dtype),
        )


def centre_logits(xp, lay, q, k, valid, scale):
    """Per level: centres ``(B, boxes, d)``, key boxes ``(boxes, slots)``, masked centre logits
    ``(B, boxes, slots, w)`` and the valid queries of each box; plus the logits computed."""
    bt, dev = q.shape[0], device(q)
    levels = []
    evaluations = xp.asarray(0.0, dtype=q.dtype, device=dev)
    minus_inf = xp.asarray(-xp.inf, dtype=q.dtype, device=dev)
    # query sums and counts of the level-1 boxes (one block each), then pairs of the level below
    filled = xp.sum(xp.reshape(xp.astype(valid, q.dtype), (lay.blocks, lay.block)), axis=-1)
    total = xp.sum(xp.reshape(q, (bt, lay.blocks, lay.block, q.shape[-1])), axis=-2)
    for level in lay.levels:
        width = lay.block << (level - 1)
        count = lay.padded // width
        if level > 1:
            filled = xp.sum(xp.reshape(filled, (count, 2)), axis=-1)
            total = xp.sum(xp.reshape(total, (bt, count, 2, q.shape[-1])), axis=-2)
        box, ok = level_boxes(xp, lay, level, dev)
        c = total / xp.reshape(xp.where(filled > 0, filled, 1), (count, 1))

        def logit(a, slot, keys, c=c):
            return scale * xp.squeeze(keys @ c[:, a, :, None], axis=-1)  # (B, A, w)

        keys = xp.reshape(k, (bt, count, width, k.shape[-1]))
        logits = paired(xp, lay, level, keys, logit, -xp.inf)  # (B, boxes, slots, w)
        keys_valid = xp.reshape(
            xp.take(xp.reshape(valid, (count, width)), xp.reshape(box, (-1,)), axis=0),
            (*box.shape, width),
        )
        seen = ok[:, :, None] & keys_valid & (filled > 0)[:, None, None]
        evaluations = evaluations + xp.sum(xp.astype(seen, q.dtype))
        levels.append((c, box, xp.where(seen, logits, minus_inf), filled))
    return levels, evaluations


def column_mass(xp, lay, levels, like):
    """Estimated attention mass of every key column, ``(B, N)``, from the centre logits.

    Each centre's softmax over its interaction-list keys, weighted by the queries it stands
    for, summed per key over all centres: a key that many far queries favour scores high.
    """
    bt = like.shape[0]
    mass = xp.zeros((bt, lay.padded), dtype=like.dtype, device=device(like))
    for level, (_, box, logits, filled) in zip(lay.levels, levels, strict=True):
        width = lay.block << (level - 1)
        count = lay.padded // width
        top = xp.max(logits, axis=(-2, -1), keepdims=True)
        top = xp.where(xp.isfinite(top), top, xp.zeros_like(top))
        w = xp.exp(logits - top)
        total = xp.sum(w, axis=(-2, -1), keepdims=True)
        w = w / xp.where(total > 0, total, xp.ones_like(total)) * filled[:, None, None]
        offset = xp.reshape(xp.arange(bt, device=device(like)) * count, (bt, 1, 1))
        target = xp.reshape(box[None, ...] + offset, (-1,))
        summed = index_add(xp, target, xp.reshape(w, (-1, width)), bt * count)
        mass = mass + xp.reshape(summed, (bt, lay.padded))
    return mass


def _relative(xp, x, top):
    """``e^{x − top}`` for ``top >= x`` wherever ``x`` is finite: 0 where ``x = −∞`` (also when
    ``top`` is), NaN where either is."""
    return xp.exp(x - xp.where(xp.isinf(top), xp.zeros_like(top), top))


def _maxima(xp, x, groups):
    """Maxima of consecutive groups along the last axis, group sizes ``groups`` in turn
    (each level of maxima grouped again), and the factors ``e^{x − max}`` of every entry
    relative to its group's maximum: two lists, one array per step."""
    maxima, factors = [], []
    for size in groups:
        grouped = xp.reshape(x, (*x.shape[:-1], x.shape[-1] // size, size))
        x = xp.max(grouped, axis=-1)
        factor = _relative(xp, grouped, x[..., None])
        factors.append(xp.reshape(factor, (*grouped.shape[:-2], -1)))
        maxima.append(x)
    return maxima, factors


def _repeat(xp, x, times, axis):
    """Each entry of ``x`` along ``axis`` (negative) ``times`` times in a row."""
    axis = x.ndim + axis
    y = xp.expand_dims(x, axis=axis + 1)
    y = xp.broadcast_to(y, (*x.shape[: axis + 1], times, *x.shape[axis + 1 :]))
    return xp.reshape(y, (*x.shape[:axis], x.shape[axis] * times, *x.shape[axis + 1 :]))


def _heights(level):
    """``(start, count)`` of each height's nodes in a level's tree layout."""
    subs = 1 << (level - 1)
    return [(2 * subs - (2 * subs >> h), subs >> h) for h in range(level)]


def _tree_size(lay):
    """Entries of one level's trees in the concatenated node arrays, ``2 nb slots``."""
    return 2 * lay.blocks * lay.slots


def _ancestors(xp, lay, level, dev):
    return xp.arange(lay.blocks, device=dev) // (1 << (level - 1))


def far_field(xp, lay, levels, heavy, ids, ok, evaluations):
    """The :class:`FarField` of the centre logits, leaving out the exact ``heavy (B, N)`` keys.

    ``ids, ok (B, nb, x)``: the exact blocks of each query block outside the band.  Each
    dropped sub-block accounts for the drop-free siblings along its path to the root: at
    height ``h`` the sibling ``σ`` of its ancestor ``u``, unless another dropped sub-block of
    the token lies in ``σ`` (then that path covers it) or in ``u`` too (then the first, for a
    left sibling, or the last of them, for a right one, accounts for ``σ``).  With the drops in
    key order these tests only look at each drop's neighbours: ``O(x · levels)`` per query
    block.
    """
    dev = device(ids)
    bt, nb = ids.shape[0], lay.blocks
    dtype = evaluations.dtype
    centres, boxes, weights, ups, maxima, top = [], [], [], [], [], []
    for level, (c, box, logits, _) in zip(lay.levels, levels, strict=True):
        width, subs = lay.block << (level - 1), 1 << (level - 1)
        if heavy is not None:
            hit = xp.squeeze(gather_boxes(xp, heavy[..., None], box, width), axis=-1)
            logits = xp.where(hit, xp.asarray(-xp.inf, dtype=dtype, device=dev), logits)
        heights, factors = _maxima(xp, logits, [lay.block] + [2] * (level - 1))
        weights.append(factors[0])
        unused = xp.full((*logits.shape[:-1], 1), -xp.inf, dtype=dtype, device=dev)
        nodes = xp.concat([*heights, unused], axis=-1)  # (B, boxes, slots, 2W)
        # the root's factor (it has no parent) and the unused entry's are never used
        ups.append(xp.concat([*factors[1:], xp.zeros_like(unused), xp.zeros_like(unused)], axis=-1))
        centres.append(c)
        boxes.append(box)
        maxima.append(xp.reshape(nodes, (bt, -1)))
        top.append(xp.take(heights[-1][..., 0], _ancestors(xp, lay, level, dev), axis=1))
    tokens = lay.tokens
    token, leaf, subs, tree = far_positions(xp, lay, ids, ok)
    drop = token >= 0
    # In key order the drops of one token are adjacent (its box is an interval of keys).
    order = xp.argsort(xp.where(drop, ids, nb), axis=-1, stable=True)
    token, leaf, subs, tree, drop = (
        xp.take_along_axis(a, order, axis=-1) for a in (token, leaf, subs, tree, drop)
    )
    x, depth = ids.shape[-1], max(len(lay.levels) - 1, 0)
    hot = one_hot(xp, lay, token, xp.bool)  # (B, nb, x, T)
    minus_inf = xp.asarray(-xp.inf, dtype=dtype, device=dev)
    if x and depth:
        same = (token[..., 1:] == token[..., :-1]) & drop[..., 1:]
        no = xp.zeros((*token.shape[:-1], 1), dtype=xp.bool, device=dev)
        has_next, has_prev = xp.concat([same, no], axis=-1), xp.concat([no, same], axis=-1)
        nxt = xp.concat([leaf[..., 1:], leaf[..., -1:]], axis=-1)
        prv = xp.concat([leaf[..., :1], leaf[..., :-1]], axis=-1)
        index, used = [], []
        for h in range(depth):
            u, un, up = leaf // (1 << h), nxt // (1 << h), prv // (1 << h)
            right = u % 2 == 0
            free_right = right & (~has_next | ((un != u) & (un != u + 1)))
            free_left = ~right & (~has_prev | ((up != u) & (up != u - 1)))
            here = drop & (subs >= 2 << h) & (free_right | free_left)
            sibling = u + 1 - 2 * (u % 2)
            node = tree + 2 * subs - (2 * subs) // (1 << h) + sibling
            index.append(xp.where(here, node, xp.zeros_like(node)))
            used.append(here)
        nodes = xp.stack(index, axis=-1)  # (B, nb, x, H)
        used = xp.stack(used, axis=-1)
        flat = xp.concat(maxima, axis=1)[..., None]
        node_max = xp.reshape(take_rows(xp, flat, xp.reshape(nodes, (bt, nb, -1))), nodes.shape)
        node_max = xp.where(used, node_max, minus_inf)
        per_drop = xp.max(node_max, axis=-1)  # (B, nb, x)
    else:
        nodes = xp.zeros((*token.shape, depth), dtype=token.dtype, device=dev)
        node_max = xp.full(nodes.shape, -xp.inf, dtype=dtype, device=dev)
        per_drop = xp.full(token.shape, -xp.inf, dtype=dtype, device=dev)
    if tokens:
        whole = xp.reshape(xp.concat(top, axis=-1), (bt, nb, tokens))  # root maxima
        if x:
            dropped = xp.any(hot, axis=-2)
            from_drops = xp.max(xp.where(hot, per_drop[..., None], minus_inf), axis=-2)
        else:
            dropped = xp.zeros(whole.shape, dtype=xp.bool, device=dev)
            from_drops = whole
        shift = xp.where(dropped, from_drops, whole)
        own = xp.take_along_axis(shift, xp.clip(token, 0, tokens - 1), axis=-1)
    else:
        shift = xp.zeros((bt, nb, 0), dtype=dtype, device=dev)
        dropped = xp.zeros(shift.shape, dtype=xp.bool, device=dev)
        own = xp.zeros(token.shape, dtype=dtype, device=dev)
    keep = xp.isfinite(shift)
    return FarField(
        centres=tuple(centres),
        boxes=tuple(boxes),
        weights=tuple(weights),
        ups=tuple(ups),
        shift=xp.where(keep, shift, xp.zeros_like(shift)),
        keep=keep,
        roots=xp.astype(keep & ~dropped, dtype),
        token=token,
        nodes=nodes,
        node_weights=_relative(xp, node_max, own[..., None]),
        evaluations=evaluations,
    )


def gather_boxes(xp, z, box, width):
    """``z (B, N, p)`` → ``(B, boxes, slots, w, p)``: the keys of each slot's key box."""
    bt, n, p = z.shape
    zb = xp.reshape(z, (bt, n // width, width, p))
    out = xp.take(zb, xp.reshape(box, (-1,)), axis=1)
    return xp.reshape(out, (bt, *box.shape, width, p))


def one_hot(xp, lay, token, dtype):
    """``(B, nb, x, T)``: which token each (sorted) exact slot outside the band drops into."""
    tokens = xp.arange(lay.tokens, device=device(token))
    return xp.astype(token[..., None] == tokens, dtype)


def node_sums(xp, lay, far, z):
    """``Σ_{j∈ν} e^{u_j − m_ν} z_j`` of every tree node, level-concatenated: ``(B, R, p)``
    with ``R = 2 nb slots · levels``; and the roots of each level, ``(B, boxes, slots, p)``.

    ``O(N p)`` per level for the leaves, ``O(nb p)`` for the rest of the trees.
    """
    bt, p = z.shape[0], z.shape[-1]
    levels = list(zip(lay.levels, far.weights, far.ups, far.boxes, strict=True))

    def trees(i, _):
        level, w, up, box = levels[i]
        subs = 1 << (level - 1)

        def leaves(a, slot, zk):
            wk = w[:, a, slot, :]
            wk = xp.reshape(wk, (*wk.shape[:2], subs, 1, lay.block))
            return xp.squeeze(wk @ zk, axis=-2)  # (B, A, W, p)

        zb = xp.reshape(z, (bt, lay.blocks // subs, subs, lay.block, p))
        heights = [paired(xp, lay, level, zb, leaves, 0.0)]  # (B, boxes, slots, W, p)
        for start, count in _heights(level)[:-1]:
            merged = up[..., start : start + count, None] * heights[-1]
            heights.append(xp.sum(xp.reshape(merged, (bt, *box.shape, count // 2, 2, p)), axis=-2))
        unused = xp.zeros_like(heights[-1])
        tree = xp.concat([*heights, unused], axis=-2)  # per (box, slot): leaves … root, unused
        return xp.reshape(tree, (bt, -1, p)), heights[-1][..., 0, :]

    # the levels are independent: their trees are built on threads
    built = map_chunks(xp, trees, [(i, i + 1) for i in range(len(levels))])
    return xp.concat([tree for tree, _ in built], axis=1), [root for _, root in built]


def _candidates(far):
    """Whether the query blocks' drops account for any nodes (static)."""
    return bool(far.nodes.shape[-1] and far.nodes.shape[-2])


def _chunks(lay, far, p):
    per_block = (far.nodes.shape[-2] * far.nodes.shape[-1] + lay.tokens) * p
    return block_chunks(lay, -(-per_block // lay.block))


def token_sums(xp, lay, far, z):
    """``Σ_{j ∈ τ} e^{u_j − m_τ} z_j`` for every token of every query block: ``(B, nb, T, p)``.

    The root of each token that drops nothing plus, for the others, the nodes their drops
    account for: ``O(N p)`` per level, ``O(nb · x · (levels + T) p)`` for the nodes.
    """
    bt, p, dev = z.shape[0], z.shape[-1], device(z)
    if not lay.tokens:
        return xp.zeros((bt, lay.blocks, 0, p), dtype=z.dtype, device=dev)
    nodes, roots = node_sums(xp, lay, far, z)
    candidates = _candidates(far)

    def chunk(lo, hi):
        whole = [
            xp.take(r, _ancestors(xp, lay, level, dev)[lo:hi], axis=1)
            for level, r in zip(lay.levels, roots, strict=True)
        ]
        out = far.roots[:, lo:hi, :, None] * xp.concat(whole, axis=2)  # (B, c, T, p)
        if not candidates:
            return out
        index = far.nodes[:, lo:hi, ...]
        kept = take_rows(xp, nodes, xp.reshape(index, (bt, hi - lo, -1)))
        kept = xp.reshape(kept, (*index.shape, p))  # (B, c, x, H, p)
        per_drop = xp.squeeze(far.node_weights[:, lo:hi, :, None, :] @ kept, axis=-2)
        hot = one_hot(xp, lay, far.token[:, lo:hi, ...], z.dtype)
        return out + xp.matrix_transpose(hot) @ per_drop

    return xp.concat(map_chunks(xp, chunk, _chunks(lay, far, p)), axis=1)


def token_adjoint(xp, lay, far, y):
    """Adjoint of :func:`token_sums` on each key box: ``y (B, nb, T, p)`` → per level, one at a
    time, ``Σ_τ e^{u_j − m_τ} y_τ`` over the tokens ``τ`` holding key ``j`` of each slot's box,
    ``(B, boxes, slots, w, p)`` (:func:`keys_to_rows` sums them into key rows).

    ``y`` enters the roots and the kept nodes, then runs down the trees with the factors
    ``e^{m_child − m_ν}``: sums of non-negative multiples of ``y``, nothing subtracted.
    """
    bt, p, dev = y.shape[0], y.shape[-1], device(y)
    size = _tree_size(lay)
    total = None
    if _candidates(far):
        # scattered in a few chunks, each about the size of the node arrays
        x, depth = far.nodes.shape[-2:]
        step = max(1, -(-size * len(lay.levels) // (x * depth)))
        offset = xp.reshape(xp.arange(bt, device=dev) * size * len(lay.levels), (bt, 1, 1, 1))
        for lo in range(0, lay.blocks, step):
            hi = min(lo + step, lay.blocks)
            hot = one_hot(xp, lay, far.token[:, lo:hi, ...], y.dtype)
            into = far.node_weights[:, lo:hi, ..., None] * (hot @ y[:, lo:hi, ...])[..., None, :]
            index = xp.reshape(far.nodes[:, lo:hi, ...] + offset, (-1,))
            part = index_add(xp, index, xp.reshape(into, (-1, p)), bt * size * len(lay.levels))
            total = part if total is None else total + part
        total = xp.reshape(total, (bt, size * len(lay.levels), p))
    whole = far.roots[..., None] * y
    for i, (level, w, up) in enumerate(zip(lay.levels, far.weights, far.ups, strict=True)):
        subs = 1 << (level - 1)
        count = lay.blocks // subs
        ys = whole[:, :, i * lay.slots : (i + 1) * lay.slots, :]
        ys = xp.sum(xp.reshape(ys, (bt, count, subs, lay.slots, p)), axis=2)  # into the roots
        tree = (
            None
            if total is None
            else xp.reshape(total[:, i * size : (i + 1) * size, :], (bt, count, lay.slots, -1, p))
        )
        heights = _heights(level)
        down = ys[..., None, :] if tree is None else tree[..., -2:-1, :] + ys[..., None, :]
        for start, n_nodes in reversed(heights[:-1]):
            down = up[..., start : start + n_nodes, None] * _repeat(xp, down, 2, axis=-2)
            if tree is not None:
                down = down + tree[..., start : start + n_nodes, :]
        yield w[..., None] * _repeat(xp, down, lay.block, axis=-2)


def keys_to_rows(xp, lay, far, per_key):
    """Sum per-level values ``(B, boxes, slots, w, p)`` of the boxes' keys (an iterable, one
    level at a time) into key rows ``(B, N, p)``."""
    out = None
    for level, box, values in zip(lay.levels, far.boxes, per_key, strict=True):
        bt, p, dev = values.shape[0], values.shape[-1], device(values)
        width = lay.block << (level - 1)
        count = lay.padded // width
        offset = xp.reshape(xp.arange(bt, device=dev) * count, (bt, 1, 1))
        target = xp.reshape(box[None, ...] + offset, (-1,))
        summed = index_add(xp, target, xp.reshape(values, (-1, width, p)), bt * count)
        summed = xp.reshape(summed, (bt, lay.padded, p))
        out = summed if out is None else out + summed
    return out


def per_token(xp, lay, far, like):
    """Shift ``m_τ`` ``(B, nb, T)`` and centre ``c`` ``(B, nb, T, d)`` of each block's tokens."""
    centres = []
    dev = device(far.token)
    for level, c in zip(lay.levels, far.centres, strict=True):
        c = xp.take(c, _ancestors(xp, lay, level, dev), axis=1)[:, :, None, :]
        centres.append(xp.broadcast_to(c, (*c.shape[:2], lay.slots, c.shape[-1])))
    if not centres:
        bt = far.token.shape[0]
        return far.shift, xp.zeros((bt, lay.blocks, 0, 1), dtype=like.dtype, device=dev)
    return far.shift, xp.concat(centres, axis=-2)


def heavy_columns(xp, lay, levels, q, valid, heavy):
    """The ``heavy`` key columns of largest estimated mass: ``(B, h)`` ids and ``(B, N)`` mask."""
    if not heavy or not lay.tokens:
        return None, None
    mass = column_mass(xp, lay, levels, q)
    mass = xp.where(valid, mass, xp.asarray(-1.0, dtype=mass.dtype, device=device(mass)))
    ids = top_indices(xp, mass, heavy)
    bt, dev = ids.shape[0], device(q)
    rows = xp.reshape(ids + xp.reshape(xp.arange(bt, device=dev) * lay.padded, (bt, 1)), (-1,))
    ones = xp.ones((rows.shape[0], 1), dtype=q.dtype, device=dev)
    mask = index_add(xp, rows, ones, bt * lay.padded) > 0
    return ids, xp.reshape(mask, (bt, lay.padded))
