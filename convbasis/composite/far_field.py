"""The far field of composite attention: FMM key boxes seen from query-box centres.

At level ``ℓ`` the centre ``c`` of query box ``a`` (the mean of its queries) scores every key
of the boxes in its interaction list once: ``E_j = exp(s c·k_j − μ)``, ``μ`` the box maximum.
A token of query block ``I`` stands for one such key box minus the exact blocks of ``I`` in
it; its linear map is ``z ↦ Σ_{j ∈ token} E_j z_j`` (:func:`token_sums`), the sums of the
whole box less those of the dropped sub-blocks, so no token costs more than its box.  The
first-order logit of docs/math.rst §8 is built from the token sums of ``[K, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from array_api_compat import device

from .._array import index_add
from .layout import level_boxes, take_rows, top_indices

__all__ = [
    "FarField",
    "centre_logits",
    "column_mass",
    "far_field",
    "gather_boxes",
    "heavy_columns",
    "one_hot",
    "per_token",
    "token_adjoint",
    "token_sums",
]


@dataclass(frozen=True)
class FarField:
    """Centre weights and the sub-blocks each query block's tokens drop.

    Attributes
    ----------
    centres : tuple of arrays ``(B, boxes_ℓ, d)``, one per level
    shifts : tuple of arrays ``(B, boxes_ℓ, slots)``, the maxima ``μ``
    weights : tuple of arrays ``(B, boxes_ℓ, slots, w_ℓ)``, ``E`` (zero where no key)
    boxes : tuple of int arrays ``(boxes_ℓ, slots)``, key box of each slot
    token, sub, drop : arrays ``(B, nb, x)``
        For each exact block outside the band: its token, its sub-block in the
        level-concatenated arrays, and whether it is in a token at all.
    """

    centres: tuple[Any, ...]
    shifts: tuple[Any, ...]
    weights: tuple[Any, ...]
    boxes: tuple[Any, ...]
    token: Any
    sub: Any
    drop: Any
    evaluations: Any
    present: tuple[Any, ...]


def centre_logits(xp, lay, q, k, valid, scale):
    """Per level: centres ``(B, boxes, d)``, key boxes ``(boxes, slots)``, masked centre logits
    ``(B, boxes, slots, w)`` and the valid queries of each box; plus the logits computed."""
    bt, dev = q.shape[0], device(q)
    levels = []
    evaluations = xp.asarray(0.0, dtype=q.dtype, device=dev)
    minus_inf = xp.asarray(-xp.inf, dtype=q.dtype, device=dev)
    for level in lay.levels:
        width = lay.block << (level - 1)
        count = lay.padded // width
        box, ok = level_boxes(xp, lay, level, dev)
        filled = xp.sum(xp.reshape(xp.astype(valid, q.dtype), (count, width)), axis=-1)
        c = xp.sum(xp.reshape(q, (bt, count, width, q.shape[-1])), axis=-2)
        c = c / xp.reshape(xp.where(filled > 0, filled, 1), (count, 1))
        keys = gather_boxes(xp, k, box, width)  # (B, boxes, slots, w, d)
        logits = scale * xp.squeeze(keys @ c[:, :, None, :, None], axis=-1)
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


def far_field(xp, lay, levels, heavy, token, sub, drop, evaluations):
    """The :class:`FarField` of the centre logits, leaving out the exact ``heavy (B, N)`` keys."""
    centres, shifts, weights, boxes, present = [], [], [], [], []
    for level, (c, box, logits, _) in zip(lay.levels, levels, strict=True):
        width = lay.block << (level - 1)
        if heavy is not None:
            hit = xp.squeeze(gather_boxes(xp, heavy[..., None], box, width), axis=-1)
            logits = xp.where(
                hit, xp.asarray(-xp.inf, dtype=logits.dtype, device=device(logits)), logits
            )
        mu = xp.max(logits, axis=-1)
        mu = xp.where(xp.isfinite(mu), mu, xp.zeros_like(mu))
        centres.append(c)
        shifts.append(mu)
        weights.append(xp.exp(logits - mu[..., None]))
        present.append(xp.astype(xp.isfinite(logits), logits.dtype))
        boxes.append(box)
    return FarField(
        centres=tuple(centres),
        shifts=tuple(shifts),
        weights=tuple(weights),
        boxes=tuple(boxes),
        token=token,
        sub=sub,
        drop=drop,
        evaluations=evaluations,
        present=tuple(present),
    )


def gather_boxes(xp, z, box, width):
    """``z (B, N, p)`` → ``(B, boxes, slots, w, p)``: the keys of each slot's key box."""
    bt, n, p = z.shape
    zb = xp.reshape(z, (bt, n // width, width, p))
    out = xp.take(zb, xp.reshape(box, (-1,)), axis=1)
    return xp.reshape(out, (bt, *box.shape, width, p))


def _ancestors(xp, lay, level, dev):
    return xp.arange(lay.blocks, device=dev) // (1 << (level - 1))


def one_hot(xp, lay, far, dtype):
    """``(B, nb, x, T)``: which token each dropped sub-block belongs to."""
    tokens = xp.arange(lay.tokens, device=device(far.token))
    return xp.astype((far.token[..., None] == tokens) & far.drop[..., None], dtype)


def token_sums(xp, lay, far, z):
    """``Σ_{j ∈ token} E_j z_j`` for every token of every query block: ``(B, nb, T, p)``.

    Also returns the sums over the whole key boxes (before the exact blocks are dropped).
    ``O(N p)`` per level, ``O(nb · x · (T + b) p)`` for the drops.
    """
    bt, p, dev = z.shape[0], z.shape[-1], device(z)
    totals, parts = [], []
    for level, w, box in zip(lay.levels, far.weights, far.boxes, strict=True):
        width = lay.block << (level - 1)
        zg = gather_boxes(xp, z, box, width)
        sums = xp.sum(
            xp.reshape(w[..., None] * zg, (bt, *box.shape, width // lay.block, lay.block, p)),
            axis=-2,
        )  # (B, boxes, slots, subs, p)
        totals.append(xp.take(xp.sum(sums, axis=-2), _ancestors(xp, lay, level, dev), axis=1))
        parts.append(xp.reshape(sums, (bt, lay.blocks * lay.slots, p)))
    if not totals:
        empty = xp.zeros((bt, lay.blocks, 0, p), dtype=z.dtype, device=dev)
        return empty, empty
    total = xp.reshape(xp.concat(totals, axis=2), (bt, lay.blocks, lay.tokens, p))
    dropped = take_rows(xp, xp.concat(parts, axis=1), far.sub)  # (B, nb, x, p)
    hot = one_hot(xp, lay, far, z.dtype)
    return total - xp.matrix_transpose(hot) @ dropped, total


def token_adjoint(xp, lay, far, y):
    """Adjoint of :func:`token_sums`: ``y (B, nb, T, p)`` → key rows ``(B, N, p)``.

    The (negative) share of the dropped sub-blocks is returned separately, ``(B, nb, x, b, p)``
    for the exact blocks outside the band, for the caller to scatter into those key blocks.
    """
    bt, p, dev = y.shape[0], y.shape[-1], device(y)
    out = xp.zeros((bt, lay.padded, p), dtype=y.dtype, device=dev)
    subs = []
    for i, (level, w, box) in enumerate(zip(lay.levels, far.weights, far.boxes, strict=True)):
        width, children = lay.block << (level - 1), 1 << (level - 1)
        count = lay.padded // width
        ys = y[:, :, i * lay.slots : (i + 1) * lay.slots, :]
        ybox = xp.sum(xp.reshape(ys, (bt, count, children, lay.slots, p)), axis=2)
        contrib = w[..., None] * ybox[:, :, :, None, :]  # (B, boxes, slots, w, p)
        offset = xp.reshape(xp.arange(bt, device=dev) * count, (bt, 1, 1))
        target = xp.reshape(box[None, ...] + offset, (-1,))
        summed = index_add(xp, target, xp.reshape(contrib, (-1, width, p)), bt * count)
        out = out + xp.reshape(summed, (bt, lay.padded, p))
        subs.append(xp.reshape(w, (bt, lay.blocks * lay.slots, lay.block)))
    if not subs:
        return out, None
    weights = take_rows(xp, xp.concat(subs, axis=1), far.sub)  # (B, nb, x, b)
    ysel = one_hot(xp, lay, far, y.dtype) @ y  # (B, nb, x, p)
    return out, -(weights[..., None] * ysel[..., None, :])


def per_token(xp, lay, far, like):
    """Shift ``μ`` ``(B, nb, T)`` and centre ``c`` ``(B, nb, T, d)`` of each block's tokens."""
    shifts, centres = [], []
    dev = device(far.token)
    for level, mu, c in zip(lay.levels, far.shifts, far.centres, strict=True):
        anc = xp.arange(lay.blocks, device=dev) // (1 << (level - 1))
        shifts.append(xp.take(mu, anc, axis=1))
        c = xp.take(c, anc, axis=1)[:, :, None, :]
        centres.append(xp.broadcast_to(c, (*c.shape[:2], lay.slots, c.shape[-1])))
    if not shifts:
        bt = far.token.shape[0]
        z = xp.zeros((bt, lay.blocks, 0), dtype=like.dtype, device=dev)
        return z, xp.zeros((bt, lay.blocks, 0, 1), dtype=like.dtype, device=dev)
    return xp.concat(shifts, axis=-1), xp.concat(centres, axis=-2)


def heavy_columns(xp, lay, levels, q, valid, heavy):
    """The ``heavy`` key columns of largest estimated mass: ``(B, h)`` ids and ``(B, N)`` mask."""
    if not heavy or not lay.tokens:
        return None, None
    mass = column_mass(xp, lay, levels, q)
    mass = xp.where(valid, mass, xp.asarray(-1.0, dtype=mass.dtype, device=device(mass)))
    ids = top_indices(xp, mass, heavy)
    columns = xp.arange(lay.padded, device=device(q))
    mask = xp.any(ids[:, :, None] == columns, axis=1)
    return ids, mask
