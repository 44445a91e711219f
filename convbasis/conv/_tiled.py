"""Tiled FFT products of a k-conv basis (docs/conv.rst, "Tiled products").

Cut ``H`` into ``B × B`` tiles and each block of ``B`` columns into *pieces*, the columns of
the block that lie in one segment.  The tile of row block ``r`` and piece ``(j, i)`` (column
block ``j``, segment ``i``) is Toeplitz: ``H[rB + x, jB + y] = c_i[δB + x − y]`` with
``δ = r − j``, lags ``−B < x − y < B``; its product with the piece's columns is a circular
convolution at length ``2B`` with the window ``h_{i,δ}`` of ``c_i`` (negative lags wrapped to
the end).  In the frequency domain each output block is a sum over pieces,

    Ŷ_r[f] = Σ_p ĥ_{i(p), r − j(p)}[f] Ẑ_p[f]     (r >= j(p)),

one ``(nb × P) @ (P × p)`` matrix product per frequency.  The work per column of ``Z`` is
``P + nb`` FFTs of length ``2B`` and ``n P`` complex multiply-adds in BLAS, against about
``k / 2`` FFTs of length ``~n`` in the segment form of :mod:`._fft`: fewer and shorter
transforms once there are more than a few segments.  The transpose is a correlation: the
conjugate window spectra, the matrix product transposed, each piece's columns kept.

Arrays here are in the natural layout ``(..., n, p)``; the FFT runs along the rows.
"""

from __future__ import annotations

import bisect
import itertools
import math
from typing import NamedTuple

import array_api_extra as xpx
from array_api_compat import device

from .._array import irfft, rfft

# Smallest tile: below it the FFTs are too short to beat the segment form's overheads.
_MIN_BLOCK = 64
# A complex multiply-add in the batched BLAS product costs about one unit of ``N log2 N``
# FFT work per column (both measured at n = 2^17, p = 64, float32: ~2e-10 s each).
_MAC_COST = 1.0
# Measured tiled times ran 1.2-1.6x their model against the segment form's (gathers, masks,
# layout copies): the tiled form must win by this factor to be chosen.
_OVERHEAD = 1.4
# Complex spectrum entries of the pieces per column block of ``Z`` (bounds the work arrays
# near the size of ``Z`` itself).
_SPECTRUM_BLOCK = 1 << 22


class Tiles(NamedTuple):
    """The tiling of an ``n × n`` k-conv basis."""

    block: int  # B
    count: int  # nb = ⌈n / B⌉ blocks of rows and of columns
    pieces: tuple  # (j, i, a, b): columns a … b-1 of column block j, in segment i


def tile_pieces(starts, n, block):
    """The pieces ``(j, i, a, b)`` of ``B = block``: block ``j``'s columns in segment ``i``."""
    count = -(-n // block)
    edges = sorted({*starts, *range(0, n, block), n})
    pieces = []
    for a, b in itertools.pairwise(edges):
        pieces.append((a // block, bisect.bisect_right(starts, a) - 1, a, b))
    return Tiles(block, count, tuple(pieces))


def tiled_cost(tiles):
    """Work per column of ``Z``, in units of ``N log2 N`` FFT work (docstring of the module)."""
    return _cost(tiles.block, tiles.count, len(tiles.pieces))


def _cost(block, count, pieces):
    size = 2 * block
    ffts = (pieces + count) * size * math.log2(size)
    return ffts + _MAC_COST * (block + 1) * count * pieces


def choose_tiles(starts, n, segment_cost):
    """The cheapest tiling of powers of two ``B >= _MIN_BLOCK`` if it beats ``segment_cost``
    (the segment form's work in the same units) by ``_OVERHEAD``, else ``None``."""
    best, block = None, _MIN_BLOCK
    while block < n:
        # A block holds one piece, plus one per segment start inside it.
        count = -(-n // block)
        cost = _cost(block, count, count + sum(1 for s in starts if s % block))
        if best is None or cost < best[0]:
            best = cost, block
        block *= 2
    if best is None or _OVERHEAD * best[0] >= segment_cost:
        return None
    return tile_pieces(starts, n, best[1])


def _zero_row(xp, x):
    """``x (..., R, w)`` with a zero row appended (the target of out-of-range gathers)."""
    return xpx.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, 1), (0, 0)], xp=xp)


def tile_spectra(xp, vectors, tiles):
    """``Â (..., B + 1, nb, P)``: ``Â[f, r, p] = ĥ_{i(p), r − j(p)}[f]``, zero for ``r < j(p)``.

    ``vectors (..., k, n)``.  One FFT of the ``k nb`` windows, each the lags
    ``δB − B < t < δB + B`` of ``c_i`` in circular order (lag ``δB + u`` at ``u``, negative
    ``u`` wrapped to ``2B + u``); lags below 0 or at ``n`` and beyond are zero.
    """
    block, count, pieces = tiles
    k, n = vectors.shape[-2:]
    dev = device(vectors)
    # Padded c: B zeros in front (negative lags), zeros behind up to lag (nb + 1) B.
    padded = xpx.pad(
        vectors, [(0, 0)] * (vectors.ndim - 1) + [(block, count * block - n + block)], xp=xp
    )
    u = xp.arange(2 * block, device=dev)
    lag = xp.where(u < block, u, u - 2 * block)  # lag offset of circular position u
    delta = xp.arange(count, device=dev)[:, None] * block
    index = xp.where(u == block, 0, delta + lag + block)  # u = B: the lag −B, zero
    windows = xp.take(padded, xp.reshape(index, (-1,)), axis=padded.ndim - 1)
    windows = xp.reshape(windows, (*vectors.shape[:-2], k * count, 2 * block))
    spectra = _zero_row(xp, rfft(windows, 2 * block, -1, xp))  # (..., k nb + 1, B + 1)
    # Gather the (r, p) entries straight into frequency-major order: the transposed view's
    # take is a fresh C-order array, as the batched matrix product wants it.
    rows = [
        [i * count + r - j if r >= j else k * count for j, i, _, _ in pieces] for r in range(count)
    ]
    flat = xp.asarray(rows, device=dev)
    out = xp.take(xp.matrix_transpose(spectra), xp.reshape(flat, (-1,)), axis=spectra.ndim - 1)
    return xp.reshape(out, (*out.shape[:-1], count, len(pieces)))


def _column_chunks(tiles, p, batch):
    per_column = len(tiles.pieces) * (tiles.block + 1) * max(batch, 1)
    width = max(1, _SPECTRUM_BLOCK // per_column)
    return [(c, min(c + width, p)) for c in range(0, p, width)]


def _blocks(xp, z, tiles):
    """``z (..., n, p)`` zero-padded to ``nb B`` rows, as ``(..., nb, B, p)``."""
    block, count, _ = tiles
    n = z.shape[-2]
    if count * block > n:
        z = xpx.pad(z, [(0, 0)] * (z.ndim - 2) + [(0, count * block - n), (0, 0)], xp=xp)
    return xp.reshape(z, (*z.shape[:-2], count, block, z.shape[-1]))


def _piece_mask(xp, tiles, dtype, dev):
    """``(P, B, 1)`` mask of each piece's rows within its block, or ``None`` when every piece
    is a whole block."""
    block, _, pieces = tiles
    if all(b - a == block for _, _, a, b in pieces):
        return None
    x = xp.arange(block, device=dev)[None, :]
    lo = xp.asarray([a - j * block for j, _, a, _ in pieces], device=dev)[:, None]
    hi = xp.asarray([b - j * block for j, _, _, b in pieces], device=dev)[:, None]
    return xp.astype((x >= lo) & (x < hi), dtype)[..., None]


def _natural(xp, y, n):
    """``(..., B, nb, p)``, rows of each block -> ``(..., n, p)``, the blocks in order."""
    block = y.shape[-3]
    y = xp.permute_dims(y, (*range(y.ndim - 3), y.ndim - 2, y.ndim - 3, y.ndim - 1))
    y = xp.reshape(y, (*y.shape[:-3], y.shape[-3] * block, y.shape[-1]))
    return y[..., :n, :]


def _empty_product(xp, spectra, z):
    shape = xp.broadcast_shapes(spectra.shape[:-3], z.shape[:-2])
    return xp.zeros((*shape, *z.shape[-2:]), dtype=z.dtype, device=device(z))


def _frequency_major(xp, x):
    """``(..., m, B + 1, p)`` -> the view ``(..., B + 1, m, p)``."""
    axes = tuple(range(x.ndim - 3))
    return xp.permute_dims(x, (*axes, x.ndim - 2, x.ndim - 3, x.ndim - 1))


def _chunked(xp, tiles, spectra, z, product):
    """``product(z_chunk, mask)`` over the column chunks of ``z (..., n, p)``, concatenated;
    the empty product without a transform."""
    if math.prod(z.shape) == 0 or math.prod(spectra.shape) == 0:
        return _empty_product(xp, spectra, z)
    mask = _piece_mask(xp, tiles, z.dtype, device(z))
    batch = math.prod(xp.broadcast_shapes(spectra.shape[:-3], z.shape[:-2]))
    out = [product(z[..., lo:hi], mask) for lo, hi in _column_chunks(tiles, z.shape[-1], batch)]
    return out[0] if len(out) == 1 else xp.concat(out, axis=-1)


def tiled_matmul(xp, tiles, spectra, z):
    """``H Z`` for ``z (..., n, p)`` from :func:`tile_spectra` ``spectra``: ``(..., n, p)``."""
    block, _, pieces = tiles
    which = xp.asarray([j for j, _, _, _ in pieces], device=device(z))

    def product(z, mask):
        frames = xp.take(_blocks(xp, z, tiles), which, axis=z.ndim - 2)
        if mask is not None:
            frames = frames * mask
        f = _frequency_major(xp, rfft(frames, 2 * block, -2, xp))  # (..., B + 1, P, w)
        y = irfft(spectra @ f, 2 * block, -3, xp)[..., :block, :, :]  # (..., B, nb, w)
        return _natural(xp, y, z.shape[-2])

    return _chunked(xp, tiles, spectra, z, product)


def tiled_rmatmul(xp, tiles, spectra, z):
    """``Hᵀ Z`` for ``z (..., n, p)``, with the arguments of :func:`tiled_matmul`."""
    block, count, pieces = tiles
    adjoint = xp.conj(xp.matrix_transpose(spectra))  # (..., B + 1, P, nb)
    # The first piece of each block carries it; the others (a segment start inside the
    # block: at most k − 1 of them) are added after.
    first = [None] * count
    for index, (j, _, _, _) in enumerate(pieces):
        if first[j] is None:
            first[j] = index
    extra = [(index, j) for index, (j, _, _, _) in enumerate(pieces) if first[j] != index]
    first = xp.asarray(first, device=device(z))

    def product(z, mask):
        f = _frequency_major(xp, rfft(_blocks(xp, z, tiles), 2 * block, -2, xp))
        y = irfft(adjoint @ f, 2 * block, -3, xp)[..., :block, :, :]  # (..., B, P, w)
        if mask is not None:
            y = y * xp.permute_dims(mask, (1, 0, 2))
        total = xp.take(y, first, axis=y.ndim - 2)  # (..., B, nb, w)
        for index, j in extra:
            total = xpx.at(total)[..., j, :].add(y[..., index, :])
        return _natural(xp, total, z.shape[-2])

    return _chunked(xp, tiles, spectra, z, product)
