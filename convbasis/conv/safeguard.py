"""The exact-row safeguard of conv-basis attention (docs/math.rst §4).

The FFT products of ``C = exp(S - μ)`` carry an absolute error about ``u log2 N`` times the
largest terms (:func:`noise_floor`).  A row whose normaliser ``D_r = (C · 1)_r`` does not
stand well above that floor (its attention mass lies far below the largest entry of the
matrix) is *under-resolved*: :class:`ExactRows` selects those rows and recomputes their
softmax weights straight from the logit basis, each with its own row maximum, so the result
never contains NaN or inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import array_api_extra as xpx
from array_api_compat import device

from .._array import namespace
from ._fft import segment_index
from .basis import ConvBasis

# Elements per block, batch included, when rows are recomputed exactly (bounds the
# O(rows · n) work arrays; blocks of this size, not 2^22, took half the time at n = 2^17:
# cache, and causal blocks skip more of the masked triangle).  A block has at least one row.
_EXACT_BLOCK = 1 << 18


def noise_floor(xp, bases, dtype):
    """Predicted absolute FFT error of ``C · 1`` (docs/math.rst §4: eps × the largest terms).

    For one segment the FFT convolution of ``x`` with ``z`` has error ≲ ``u · log2(N) ·
    ‖x‖₂ ‖z‖₂``; summed over the segments of every basis with ``z = 1`` on the segment
    (``bases`` holds ``(basis, "segment")`` for ``C``'s lower part and ``(basis, "suffix")``
    for the transposed upper part).  A tiled basis (docs/conv.rst, "Tiled products") sums
    that bound over the tiles: segment ``i``'s at most ``w / B + 2`` pieces, each against a
    window of ``c_i`` (every lag in two), give ``u · log2(2B) · ‖c_i‖₂ √(2 (w + 2B))`` for
    ``w`` columns of ``z``.  Returned per batch element ``(...)``.
    """
    unit = float(xp.finfo(dtype).eps)
    total = None
    for basis, reach in bases:
        tiles = basis.tiles
        for i, seg in enumerate(basis.plan):
            width = (seg.stop - seg.start) if reach == "segment" else seg.length
            if tiles is None:
                factor = math.log2(max(seg.size, 2)) * math.sqrt(width)
            else:
                factor = math.log2(2 * tiles.block) * math.sqrt(2 * (width + 2 * tiles.block))
            norm = xp.sqrt(xp.sum(basis.vectors[..., i, :] ** 2, axis=-1))
            term = norm * (unit * factor)
            total = term if total is None else total + term
    return total


def under_resolved_rows(xp, normaliser, noise, tolerance):
    """Rows ``r`` with predicted relative error ``noise / D_r`` above ``min(tolerance, 1)``
    in some batch element, or ``D_r`` not finite; ``normaliser (..., n)``, ``noise (...)``.

    A ``D_r`` within the noise floor is not resolved at all, whatever the tolerance: its row
    could come out arbitrarily large.  ``min(tolerance, 1)`` is finite: no ``0 · inf``.
    """
    n = normaliser.shape[-1]
    bad = ~(normaliser * min(tolerance, 1.0) > noise[..., None]) | ~xp.isfinite(normaliser)
    if bad.ndim > 1:
        bad = xp.any(xp.reshape(bad, (-1, n)), axis=0)
    if not bool(xp.any(bad)):
        return ()
    return tuple(int(i) for i in xp.nonzero(bad)[0])


def _index_dtype(xp, *bases):
    """``int32`` when every flat index ``segment · n + t`` of ``bases`` fits, else ``int64``:
    half the memory traffic for the gathers of exact rows."""
    return xp.int32 if all(b.rank * b.n < 2**31 for b in bases if b is not None) else xp.int64


def _runs(rows):
    """Contiguous runs of the increasing ``rows``: index pairs ``(a, b)`` with ``rows[a:b]``
    consecutive integers."""
    first = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            yield first, i
            first = i


def exact_weights(xp, lower, upper, rows, width):
    """Softmax rows ``rows`` of the logits straight from the bases ``lower, upper`` (as in
    :class:`ExactRows`), each with its own maximum, on the first ``width`` columns (all a
    causal row can see when ``width > max(rows)``).

    ``(..., R, width)``; ``O(R width)`` (docs/math.rst §4 safeguard: no ``Q, K`` needed).
    """
    n = lower.n
    dev = device(lower.vectors)
    index = _index_dtype(xp, lower, upper)
    r = xp.asarray(rows, dtype=index, device=dev)[:, None]
    j = xp.arange(width, dtype=index, device=dev)[None, :]
    t = r - j
    zero = xp.zeros((), dtype=index, device=dev)

    def gather(basis, index):
        flat = xp.reshape(basis.vectors, (*basis.vectors.shape[:-2], basis.rank * n))
        out = xp.take(flat, xp.reshape(index, (-1,)), axis=flat.ndim - 1)
        return xp.reshape(out, (*flat.shape[:-1], *index.shape))

    seg = segment_index(lower.starts, j, xp)
    logits = gather(lower, seg * n + xp.maximum(t, zero))
    minus_inf = xp.asarray(-xp.inf, dtype=logits.dtype, device=dev)
    if upper is None:
        logits = xp.where(t >= 0, logits, minus_inf)
    else:
        # docs/math.rst §4: S[r, j] for j > r is the strictly lower entry (j, r) of the K Qᵀ basis.
        seg_u = segment_index(upper.starts, r, xp)
        up = gather(upper, seg_u * n + xp.maximum(-t, zero))
        logits = xp.where(t >= 0, logits, up)
    logits = logits - xp.max(logits, axis=-1, keepdims=True)
    w = xp.exp(logits)
    return w / xp.sum(w, axis=-1, keepdims=True)


@dataclass(frozen=True, eq=False)
class ExactRows:
    """The recomputed rows of ``f = D⁻¹ C``: exact softmax rows from the logit bases, each with
    its own maximum (``O(n)`` per row and column of ``Z``), in blocks of bounded memory.

    :meth:`weights` gives the rows, :meth:`matmul_rows` and :meth:`rmatmul_add` put them into
    the FFT products (:meth:`place`, :meth:`keep_mask`, :meth:`pad` are their pieces).

    Attributes
    ----------
    lower : ConvBasis
        Basis of the logits ``s · M ∘ Q Kᵀ`` (not exponentiated).
    upper : ConvBasis or None
        Basis of ``s · M ∘ K Qᵀ`` (bidirectional), else ``None``.
    rows : tuple of int
        The recomputed rows, increasing.
    """

    lower: ConvBasis
    upper: ConvBasis | None
    rows: tuple[int, ...] = ()

    @property
    def n(self):
        return self.lower.n

    @cached_property
    def _xp(self):
        return namespace(self.lower.vectors)

    def blocks(self):
        """The rows in blocks ``(rows, width)``: causal row ``r`` sees only ``r + 1`` columns,
        so a block needs ``width = max(rows) + 1`` of them (``n`` if bidirectional); blocks
        hold at most ``_EXACT_BLOCK`` entries over all batch elements, or one row."""
        rows = self.rows
        batch = math.prod(self.lower.vectors.shape[:-2]) or 1
        a = 0
        while a < len(rows):
            b = a + 1
            while b < len(rows):
                width = rows[b] + 1 if self.upper is None else self.n
                if (b + 1 - a) * width * batch > _EXACT_BLOCK:
                    break
                b += 1
            yield rows[a:b], (rows[b - 1] + 1 if self.upper is None else self.n)
            a = b

    def weights(self, rows, width):
        """Exact softmax rows ``rows`` on the first ``width`` columns (:func:`exact_weights`)."""
        return exact_weights(self._xp, self.lower, self.upper, rows, width)

    def matmul_rows(self, base, z):
        """``base (..., n, p)`` with the recomputed rows set to those of ``f Z``, computed
        exactly; ``z (..., n, p)``."""
        pieces = [self.weights(r, w) @ z[..., :w, :] for r, w in self.blocks()]
        return self.place(pieces, base)

    def rmatmul_add(self, base, z):
        """``base (..., n, p)`` plus the recomputed rows' part of ``fᵀ Z``: ``Σ_r f[r]ᵀ Z[r]``
        over those rows."""
        xp = self._xp
        for rows, width in self.blocks():
            idx = xp.asarray(rows, device=device(z))
            weights = xp.matrix_transpose(self.weights(rows, width))
            base = base + self.pad(weights @ xp.take(z, idx, axis=z.ndim - 2))
        return base

    def place(self, pieces, base):
        """Place exact rows ``(..., R, p)`` (the blocks' pieces, in order) into ``base
        (..., n, p)``, which must be the caller's own intermediate.

        Recomputed rows come in contiguous runs (a causal prefix, typically), each written
        with one slice update: in place on NumPy, no pass over the whole output.
        """
        xp = self._xp
        rows = self.rows
        if not rows:
            return base
        exact = pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=-2)
        shape = xp.broadcast_shapes(exact.shape[:-2], base.shape[:-2])
        if tuple(base.shape[:-2]) != tuple(shape):
            base = xp.broadcast_to(base, (*shape, *base.shape[-2:]))
            base = xp.asarray(base, copy=True)
        for a, b in _runs(rows):
            base = xpx.at(base)[..., rows[a] : rows[a] + b - a, :].set(exact[..., a:b, :])
        return base

    def unit_normaliser(self, d):
        """``d (..., n)`` with ``D_r = 1`` on the recomputed rows (their exact weights are
        already normalised); ``d`` must be the caller's own intermediate."""
        if not self.rows:
            return d
        xp = self._xp
        ones = xp.ones((*d.shape[:-1], len(self.rows), 1), dtype=d.dtype, device=device(d))
        return self.place([ones], d[..., None])[..., 0]

    def keep_mask(self, dtype):
        """``(n,)`` 1 on rows handled by the FFT, 0 on recomputed rows."""
        xp = self._xp
        keep = xp.ones((self.n,), dtype=dtype, device=device(self.lower.vectors))
        # Slice updates per contiguous run: integer-array assignment is not in the standard
        # (array-api-strict refuses it).
        for a, b in _runs(self.rows):
            keep = xpx.at(keep)[self.rows[a] : self.rows[b - 1] + 1].set(0.0)
        return keep

    def pad(self, x):
        """Zero-pad ``(..., width, p)`` to ``(..., n, p)``."""
        pad = self.n - x.shape[-2]
        if not pad:
            return x
        return xpx.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)], xp=self._xp)
