"""The levels of Fast Multipole Attention and the one pass over them (docs/math.rst §6).

A level is ``G`` groups of ``C·R`` queries that all see the same ``T`` tokens; it maps keys or
values ``(..., N, e)`` to those tokens ``(..., G, T, e)`` (:meth:`gather`), maps token
gradients back (:meth:`scatter`, the adjoint) and scores the queries of each group against its
tokens.  Level 0 is the near field, levels ``ℓ ≥ 1`` the pooled far field.
"""

from __future__ import annotations

import itertools

from array_api_compat import device

from .._array import stacked_matmul

__all__ = ["forward", "iter_levels"]


def _shift(xp, x, step, axis):
    """``out[g] = x[g − step]`` along ``axis`` (``step = ±1``), zeros shifted in."""
    axis %= x.ndim
    lead = (slice(None),) * axis
    zeros = xp.zeros_like(x[(*lead, slice(0, 1), ...)])
    if step == 1:
        return xp.concat([zeros, x[(*lead, slice(0, x.shape[axis] - 1), ...)]], axis=axis)
    return xp.concat([x[(*lead, slice(1, None), ...)], zeros], axis=axis)


class _Level:
    """What every level shares: the scores of ``G`` groups of ``C·R`` queries against ``T``
    tokens and the adjoint of the group shifts.

    A subclass sets ``groups`` (``G``), ``children`` (``C``), ``rows`` (``R``), ``tokens``
    (``T``), ``width`` (tokens per shifted group), ``own`` (whether the group's own tokens are
    among its ``T``), ``mask`` (a boolean array broadcasting against the logits) and ``mult``
    (``None`` or the token multiplicities ``(G, C, 1, T)``).
    """

    def __init__(self, xp, geo, level, kernel):
        self.xp, self.geo, self.level, self.kernel = xp, geo, level, kernel

    def _token_grad(self, dt):
        """Adjoint of the shift/concat part of :meth:`gather` (before any pooling)."""
        xp, width = self.xp, self.width
        parts = [dt[..., i * width : (i + 1) * width, :] for i in range(self.tokens // width)]
        back = _shift(xp, parts[0], -1, -3)  # tokens of the previous group came from g − 1
        rest = parts[1:]
        if self.own:
            back = back + rest[0]
            rest = rest[1:]
        for part in rest:  # tokens of the next group came from g + 1
            back = back + _shift(xp, part, 1, -3)
        return back

    def split(self, x):
        """``(..., N, e)`` → ``(..., G, C·R, e)``."""
        # explicit sizes, not -1: an empty batch leaves -1 undetermined
        per_group = x.shape[-2] // self.groups
        return self.xp.reshape(x, (*x.shape[:-2], self.groups, per_group, x.shape[-1]))

    def logits(self, q, keys, scale=None):
        """Masked logits ``(..., G, C, R, T)`` (``-inf`` where a token is not seen); ``scale``
        None: ``q`` is scaled already."""
        xp = self.xp
        # the scale goes on the n × d queries, not the n × T logits: one pass less over them
        q = q if scale is None else scale * q
        s = stacked_matmul(xp, self.split(q), xp.matrix_transpose(keys))
        s = xp.reshape(s, (*s.shape[:-2], self.children, self.rows, self.tokens))
        minus_inf = xp.asarray(-xp.inf, dtype=s.dtype, device=device(s))
        return xp.where(self.mask, s, minus_inf)

    def weights(self, s, shift):
        """``mult · exp(s − shift)`` with ``shift (..., N)`` (finite or ``+inf``)."""
        xp = self.xp
        shift = xp.reshape(shift, (*shift.shape[:-1], self.groups, self.children, self.rows, 1))
        s = s - shift  # a caller that drops its logits keeps only this difference alive
        w = xp.exp(s)
        return w if self.mult is None else w * self.mult

    def flat(self, w):
        """``(..., G, C, R, T)`` → ``(..., G, C·R, T)``."""
        return self.xp.reshape(
            w, (*w.shape[:-4], self.groups, w.shape[-3] * w.shape[-2], self.tokens)
        )


class _NearLevel(_Level):
    """Level 0: groups are blocks (``C = 1``, ``R = m``), tokens the keys of blocks ``i−1, i,
    i+1`` (causal: ``i−1`` and the causal part of ``i``)."""

    def __init__(self, xp, geo, dev):
        super().__init__(xp, geo, 0, None)
        n, big, m = geo.n, geo.padded, geo.block
        self.groups, self.children, self.rows = big // m, 1, m
        slots = 2 if geo.causal else 3
        self.tokens, self.width, self.own = slots * m, m, True
        # key index of token t of block b: (b − 1)m + t; padded or missing keys are masked
        blocks = xp.arange(big // m, device=dev)[:, None]
        key = (blocks - 1) * m + xp.arange(slots * m, device=dev)[None, :]
        mask = ((key >= 0) & (key < n))[:, None, None, :]
        if geo.causal:
            r = xp.arange(m, device=dev)[:, None]
            t = xp.arange(2 * m, device=dev)[None, :]
            mask = mask & ((t < m) | (t - m <= r))[None, None, :, :]
        self.mask, self.mult = mask, None

    def gather(self, x):
        """``(..., N, e)`` → ``(..., G, T, e)``: each block's neighbouring keys or values."""
        xp = self.xp
        xb = xp.reshape(x, (*x.shape[:-2], self.groups, self.rows, x.shape[-1]))
        parts = [_shift(xp, xb, 1, -3), xb]
        if not self.geo.causal:
            parts.append(_shift(xp, xb, -1, -3))
        return xp.concat(parts, axis=-2)

    def scatter(self, dt):
        """Adjoint of :meth:`gather`: ``(..., G, T, e)`` → ``(..., N, e)``."""
        back = self._token_grad(dt)
        return self.xp.reshape(back, (*dt.shape[:-3], self.geo.padded, dt.shape[-1]))


class _FarLevel(_Level):
    """Level ``ℓ ≥ 1``: groups are *pairs* of sibling boxes (``C = 2``, ``R = w_ℓ``); both
    children see the pooled tokens of the neighbouring pairs and a static ``(C, T)`` mask keeps
    each child's FMM interaction list (docs/math.rst §6: even ``i`` → ``i−2, i+2, i+3``; odd ``i`` →
    ``i−3, i−2, i+2``; in pair terms: even child → prev pair's first box, next pair's two
    boxes; odd child → prev pair's two boxes, next pair's second box).
    """

    def __init__(self, xp, geo, level, kernel, dtype, dev):
        super().__init__(xp, geo, level, kernel)
        n, big, p = geo.n, geo.padded, geo.basis
        w, c = geo.box(level), geo.chunk(level)
        self.groups, self.children, self.rows = big // (2 * w), 2, w
        self.chunk = c
        self.tokens, self.width, self.own = (2 if geo.causal else 4) * p, 2 * p, False
        r = xp.arange(big // c, device=dev)
        count = xp.clip(n - r * c, 0, c)  # real keys per pooled token
        count = xp.astype(count, dtype)
        one = xp.ones_like(count)
        inv = one / xp.maximum(count, one)
        self.gain = inv if kernel is None else c * inv
        pairs = xp.reshape(count, (self.groups, 2 * p))
        parts = [_shift(xp, pairs, 1, 0)]
        if not geo.causal:
            parts.append(_shift(xp, pairs, -1, 0))
        seen = xp.concat(parts, axis=-1)  # (G, T): count of each visible token
        slot = xp.arange(self.tokens, device=dev) // p  # prev0, prev1, next0, next1
        even = slot != 1
        odd = slot != 2
        child = xp.astype(xp.stack([even, odd]), dtype)  # (2, T)
        self.mult = seen[:, None, None, :] * child[None, :, None, :]  # (G, 2, 1, T)
        self.mask = self.mult > 0

    def sums(self, x, below=None):
        """Sums of ``x (..., N, e)`` over this level's chunks, ``(..., N/c, e)``; from the
        level below's sums ``below`` (chunks half as long) when given."""
        xp = self.xp
        if below is not None:
            pairs = (*below.shape[:-2], below.shape[-2] // 2, 2, below.shape[-1])
            return xp.sum(xp.reshape(below, pairs), axis=-2)
        c = self.chunk
        return xp.sum(xp.reshape(x, (*x.shape[:-2], x.shape[-2] // c, c, x.shape[-1])), axis=-2)

    def _pool(self, x, sums=None):
        xp, c = self.xp, self.chunk
        if self.kernel is None:
            pooled = self.sums(x) if sums is None else sums
        else:
            xr = xp.reshape(x, (*x.shape[:-2], x.shape[-2] // c, c, x.shape[-1]))
            pooled = xp.sum(xr * self.kernel[:, None], axis=-2)
        return pooled * self.gain[:, None]

    def gather(self, x, sums=None):
        """``(..., N, e)`` → ``(..., G, T, e)``: the pooled tokens of the neighbouring pairs
        (from the chunk sums ``sums`` of :meth:`sums` when given, with the mean kernel)."""
        xp = self.xp
        pooled = self._pool(x, sums)
        e, p2 = x.shape[-1], 2 * self.geo.basis
        pairs = xp.reshape(pooled, (*x.shape[:-2], self.groups, p2, e))
        parts = [_shift(xp, pairs, 1, -3)]
        if not self.geo.causal:
            parts.append(_shift(xp, pairs, -1, -3))
        return xp.concat(parts, axis=-2) if len(parts) > 1 else parts[0]

    def scatter(self, dt):
        """Adjoint of :meth:`gather`: ``(..., G, T, e)`` → ``(..., N, e)``."""
        xp, c = self.xp, self.chunk
        back = self._token_grad(dt)
        e = dt.shape[-1]
        pooled = xp.reshape(back, (*dt.shape[:-3], self.geo.padded // c, e))
        h = (pooled * self.gain[:, None])[..., None, :]
        spread = h * (
            xp.ones((c, 1), dtype=h.dtype, device=device(h))
            if self.kernel is None
            else self.kernel[:, None]
        )
        return xp.reshape(spread, (*dt.shape[:-3], self.geo.padded, e))

    def kernel_grad(self, dt, x):
        """``∂⟨dt, gather(x)⟩/∂κ`` summed over every leading axis: shape ``(c_ℓ,)``."""
        xp, c = self.xp, self.chunk
        back = self._token_grad(dt)
        h = xp.reshape(back, (*dt.shape[:-3], self.geo.padded // c, dt.shape[-1]))
        h = h * self.gain[:, None]
        xr = xp.reshape(x, (*x.shape[:-2], x.shape[-2] // c, c, x.shape[-1]))
        per = xr @ h[..., None]  # (..., N/c, c, 1)
        return xp.sum(xp.reshape(per, (-1, c)), axis=0)


def iter_levels(xp, geo, kernels, dtype, dev):
    """The near field, then the far-field levels ``1 … L`` (``kernels`` None for the mean)."""
    kernels = (None,) * geo.levels if kernels is None else kernels
    yield _NearLevel(xp, geo, dev)
    for level in range(1, geo.levels + 1):
        yield _FarLevel(xp, geo, level, kernels[level - 1], dtype, dev)


def _gathered(levels, x):
    """``lev.gather(x)`` of each level in turn; the mean-pooled far levels' chunk sums are
    built from the level below's (each level's chunks are twice as long), so ``x`` is read
    once for all of them."""
    below = None
    for lev in levels:
        if isinstance(lev, _FarLevel) and lev.kernel is None:
            below = lev.sums(x, below)
            yield lev.gather(x, below)
        else:
            below = None
            yield lev.gather(x)


def forward(xp, geo, kernels, q, k, v, scale, *, with_output=True):
    """One pass over the levels: ``(out (..., N, e), lse (..., N))``.

    The row maxima come first, the far levels' (``T = 2·basis`` or ``4·basis`` logits per row,
    computed again when used) and the near field's, so one maximum serves every level and no
    partial output is rescaled; the near field, the largest, is used and dropped first.
    ``lse`` is ``+inf`` on rows that see no key (only padding rows), so that
    ``exp(s − lse) = 0`` there.
    """
    dev = device(q)
    zero = xp.asarray(0.0, dtype=q.dtype, device=dev)
    levels = list(iter_levels(xp, geo, kernels, q.dtype, dev))
    near, far = levels[0], levels[1:]
    rows = (*q.shape[:-2], geo.padded)
    # The far levels' few pooled tokens carry the scale (far cheaper than scaling q for each);
    # their logits are computed again when used rather than kept.
    far_logits = (lev.logits(q, scale * x) for lev, x in zip(far, _gathered(far, k), strict=True))
    # The far levels all have T tokens per row: their elementwise maximum first, then one
    # reduction over T (NumPy reduces a short last axis slowly, a level at a time 10x slower).
    # explicit sizes, not -1: an empty batch leaves -1 undetermined
    highest = None
    for s in far_logits:
        s = xp.reshape(s, (*rows, s.shape[-1]))
        highest = s if highest is None else xp.maximum(highest, s)
    near_logits = near.logits(q, near.gather(k), scale)
    top = xp.max(xp.reshape(near_logits, (*rows, near.tokens)), axis=-1)
    if far:
        top = xp.maximum(top, xp.max(highest, axis=-1))
    # docs/math.rst §0: subtract the row maximum
    ref = xp.where(xp.isfinite(top), top, zero)
    logits = itertools.chain(
        [near_logits],
        (lev.logits(q, scale * x) for lev, x in zip(far, _gathered(far, k), strict=True)),
    )
    del near_logits
    values = _gathered(levels, v) if with_output else None
    total = acc = None
    for lev in levels:
        w = lev.weights(next(logits), ref)  # each level's logits dropped as they are used
        # row sums as a product with ones: NumPy sums a short last axis slowly
        ones = xp.ones((w.shape[-1], 1), dtype=w.dtype, device=dev)
        part = xp.reshape(w @ ones, ref.shape)
        total = part if total is None else total + part
        if with_output:
            o = stacked_matmul(xp, lev.flat(w), next(values))
            o = xp.reshape(o, (*q.shape[:-2], geo.padded, v.shape[-1]))
            acc = o if acc is None else acc + o
    empty = total == 0
    one = xp.ones_like(total)
    lse = xp.where(
        empty,
        xp.asarray(xp.inf, dtype=q.dtype, device=dev),
        ref + xp.log(xp.where(empty, one, total)),
    )
    out = acc / xp.where(empty, one, total)[..., None] if with_output else None
    return out, lse
