"""Segment-form FFT kernels of the k-conv basis (docs/math.rst §4, docs/conv.rst).

Arrays are in the transposed layout ``(..., p, n)``: the FFT runs along the contiguous last
axis.  Segment ``i`` is one causal convolution of ``c_i[: n - σ_i]`` with
``Z[σ_i : σ_{i+1}]`` (a correlation with ``Z[σ_i:]`` for the transpose).  Consecutive segments
are grouped and share one FFT length: in a group headed by segment ``a``, segment ``i``'s
vector is shifted right by ``σ_i − σ_a``, so the group's convolutions land on the same rows
``σ_a:`` and their spectra are summed before a single inverse FFT (the transpose: one forward
FFT of ``Z[σ_a:]`` serves every segment of the group).  :func:`segment_plan` picks the groups
that minimise the FFT work.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import array_api_extra as xpx
from array_api_compat import device

from .._array import fast_length, irfft, rfft

# Complex spectrum entries per block of FFT rows (cache-sized work arrays).
_FFT_BLOCK = 1 << 22
# Segments of at most this many columns are evaluated directly (``O(L n p)``): a length-``n``
# FFT pair for a 1-column segment costs ~20x a direct pass (measured at n = 16384, p = 64,
# float32).  Recovery on generic logits gives such segments.
_DIRECT_SEGMENT = 8
# Most segments per FFT group: bounds the O(k · _GROUP_SPAN) search of segment_plan.
_GROUP_SPAN = 64
# A direct segment's multiply-add per row and column, in units of ``N log2 N`` FFT work
# (from the measurement behind _DIRECT_SEGMENT).
_DIRECT_COST = 2.0


class Segment(NamedTuple):
    """One segment of an FFT plan."""

    start: int  # σ_i
    stop: int  # σ_{i+1}
    length: int  # m_i = n − σ_i: the rows it reaches
    size: int  # FFT length of its group
    head: int  # σ_a, the start of its group's first segment


def _group_length(n, head, width):
    """FFT length of a group headed at ``head`` whose widest segment has ``width`` columns:
    every convolution then ends before ``n − head + width − 1``, so nothing wraps around onto
    the rows ``head:`` that are kept."""
    return fast_length(n - head + width - 1)


def _fft_cost(size):
    return size * math.log2(max(size, 2))


def _grouping(starts, stops, n):
    """Contiguous groups ``(a, b)`` of the segments ``a … b-1`` with least FFT work.

    A group of ``g`` segments at length ``N`` costs ``g + 1`` transforms of length ``N`` (``g``
    forward and one inverse; the transpose the other way round), against ``2 g`` transforms
    of their own lengths ungrouped: worth it where the lengths are close.  Dynamic programming
    over the last group, ``O(k · _GROUP_SPAN)``.
    """
    k = len(starts)
    best, first = [0.0] * (k + 1), [0] * (k + 1)
    for b in range(1, k + 1):
        best[b], width = math.inf, 0
        for a in range(b - 1, max(-1, b - 1 - _GROUP_SPAN), -1):
            width = max(width, stops[a] - starts[a])
            cost = best[a] + (b - a + 1) * _fft_cost(_group_length(n, starts[a], width))
            if cost < best[b]:
                best[b], first[b] = cost, a
    groups, b = [], k
    while b:
        groups.append((first[b], b))
        b = first[b]
    return groups[::-1]


def segment_plan(starts, n):
    """FFT plan of the segments ``[σ_i, σ_{i+1})``: a :class:`Segment` each.

    Runs of FFT segments (more than ``_DIRECT_SEGMENT`` columns) are split into the groups of
    :func:`_grouping`; a short segment, evaluated directly, is a group of its own.
    """
    stops = (*starts[1:], n)
    plan, run = [], []

    def close_run():
        for a, b in _grouping([starts[i] for i in run], [stops[i] for i in run], n):
            head, width = starts[run[a]], max(stops[i] - starts[i] for i in run[a:b])
            size = _group_length(n, head, width)
            plan.extend(Segment(starts[i], stops[i], n - starts[i], size, head) for i in run[a:b])
        run.clear()

    for i, (s, e) in enumerate(zip(starts, stops, strict=True)):
        if _is_direct(s, e):
            close_run()
            plan.append(Segment(s, e, n - s, _group_length(n, s, e - s), s))
        else:
            run.append(i)
    close_run()
    return tuple(plan)


def _groups(plan):
    """Index ranges of the plan's groups, in order (a direct segment: a range of one)."""
    edges = [0]
    for i in range(1, len(plan)):
        if plan[i].head != plan[i - 1].head:
            edges.append(i)
    edges.append(len(plan))
    return list(itertools.pairwise(edges))


def segment_cost(plan):
    """Work of a product by :func:`segment_matmul` per column of ``Z``, in units of
    ``N log2 N`` FFT work (compared with the tiled form's, ``_tiled.choose_tiles``)."""
    cost = 0.0
    for a, b in _groups(plan):
        seg = plan[a]
        if _is_direct(seg.start, seg.stop):
            cost += _DIRECT_COST * (seg.stop - seg.start) * seg.length
        else:
            cost += (b - a + 1) * _fft_cost(seg.size)
    return cost


def spectrum(xp, x, size):
    """``rfft`` of ``x`` zero-padded to ``size`` along the last axis.

    Empty input (an empty batch, no columns) gives the empty spectrum without a transform:
    torch's MKL FFT raises on zero-size tensors.
    """
    if math.prod(x.shape) == 0:
        dtype = xp.result_type(x.dtype, xp.complex64)
        return xp.zeros((*x.shape[:-1], size // 2 + 1), dtype=dtype, device=device(x))
    return rfft(x, size, -1, xp)


def signal(xp, f, size):
    """``irfft`` of the spectrum ``f`` to length ``size`` (empty ``f``: no transform)."""
    if math.prod(f.shape) == 0:
        return xp.zeros((*f.shape[:-1], size), dtype=xp.real(f).dtype, device=device(f))
    return irfft(f, size, -1, xp)


def _is_direct(start, stop):
    return stop - start <= _DIRECT_SEGMENT


def segment_spectra(xp, columns, plan):
    """The spectrum of each FFT segment's vector ``c_i[: m_i]`` shifted right by
    ``σ_i − σ_a`` (its group's head), at the group's length ``N``: ``(..., 1, N // 2 + 1)``
    each; ``None`` for the short segments that are evaluated directly."""
    out = []
    for i, seg in enumerate(plan):
        if _is_direct(seg.start, seg.stop):
            out.append(None)
            continue
        c = columns[..., i : i + 1, : seg.length]
        if seg.start > seg.head:
            c = xpx.pad(c, [(0, 0)] * (c.ndim - 1) + [(seg.start - seg.head, 0)], xp=xp)
        out.append(spectrum(xp, c, seg.size))
    return tuple(out)


def _column_blocks(xp, plan, zt, columns):
    """Split the ``p`` rows of ``zt`` into blocks whose spectra hold about ``_FFT_BLOCK``
    complex numbers: the multiply and the accumulation then run on cache-resident data
    (measured ~15% faster at ``n = 2^17, p = 65`` than one pass over all rows)."""
    batch = math.prod(xp.broadcast_shapes(zt.shape[:-2], columns.shape[:-2]))
    p = zt.shape[-2]
    if p == 0:  # no columns (e = 0): one empty block keeps the shapes
        return [(0, 0)]
    rows = max(1, _FFT_BLOCK // (plan[0].size * max(batch, 1)))
    count = -(-p // rows)
    rows = -(-p // count)
    return [(c, min(c + rows, p)) for c in range(0, p, rows)]


def _into(xp, a, b, *, multiply):
    """``a · b`` (or ``a + b``), into ``a`` when broadcasting does not grow it: one large
    temporary less per segment (fresh pages cost more than the arithmetic itself)."""
    if a.dtype == b.dtype and a.shape == xp.broadcast_shapes(a.shape, b.shape):
        if multiply:
            a *= b
        else:
            a += b
        return a
    return a * b if multiply else a + b


def _direct_conv(xp, c, zt):
    """``conv(c[:m], Z_seg)[:m]`` directly: ``c (..., 1, m)``, ``zt (..., p, L)``, ``L`` small."""
    m = c.shape[-1]
    y = zt[..., 0:1] * c
    for u in range(1, zt.shape[-1]):
        y = xpx.at(y)[..., u:].add(zt[..., u : u + 1] * c[..., : m - u])
    return y


def _direct_corr(xp, c, zt, s, e):
    """Columns ``s … e-1`` of ``conv(c)ᵀ Z``: ``Σ_t c[t] Z[j + t]``, one dot product each."""
    n = zt.shape[-1]
    dtype = xp.result_type(zt, c)  # torch's matmul does not promote mixed float32 / float64
    zt, c = (a if a.dtype == dtype else xp.astype(a, dtype) for a in (zt, c))
    cols = [zt[..., j:] @ xp.expand_dims(c[..., 0, : n - j], axis=-1) for j in range(s, e)]
    return cols[0] if len(cols) == 1 else xp.concat(cols, axis=-1)


def segment_matmul(xp, plan, spectra, columns, zt, n):
    """``H Z`` in the transposed layout: ``zt (..., p, n)`` -> ``(..., p, n)``.

    docs/math.rst §4 segment form: segment ``i`` adds ``conv(c_i[:m_i], Z[σ_i:σ_{i+1}])[: m_i]`` to
    rows ``σ_i:``; the segments of a group add their spectra and go back through one inverse
    FFT onto rows ``σ_a:``.  ``columns (..., k, n)`` are the vectors ``c_i`` (used directly for
    short segments), ``spectra`` from :func:`segment_spectra`.
    """
    blocks, groups = [], _groups(plan)
    for lo, hi in _column_blocks(xp, plan, zt, columns):
        out = None
        for a, b in groups:
            head, size = plan[a].head, plan[a].size
            if spectra[a] is None:
                seg = plan[a]
                c = columns[..., a : a + 1, : seg.length]
                y = _direct_conv(xp, c, zt[..., lo:hi, seg.start : seg.stop])
            else:
                total = None
                for i in range(a, b):
                    f = spectrum(xp, zt[..., lo:hi, plan[i].start : plan[i].stop], size)
                    f = _into(xp, f, spectra[i], multiply=True)
                    total = f if total is None else _into(xp, total, f, multiply=False)
                y = signal(xp, total, size)[..., : n - head]
            if out is None and head == 0:
                out = y  # the first group covers every row: no zero fill needed
                continue
            if out is None:
                shape = xp.broadcast_shapes(y.shape[:-1], zt[..., lo:hi, :].shape[:-1])
                out = xp.zeros((*shape, n), dtype=zt.dtype, device=device(zt))
            out = xpx.at(out)[..., head:].add(y)
        blocks.append(out)
    return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=-2)


def segment_rmatmul(xp, plan, spectra, columns, zt, n):
    """``Hᵀ Z`` in the transposed layout (docs/math.rst §4: the transpose is a correlation).

    Columns ``σ_i … σ_{i+1}-1`` of ``Hᵀ Z`` are ``Σ_t c_i[t] Z[j + t]``: the correlation of
    ``c_i`` with ``Z[σ_i:]``, read off the conjugate spectrum; with the shift of the vector in
    its group, off the product with the spectrum of ``Z[σ_a:]``, one forward FFT per group.
    Short segments are direct dot products.  Arguments as in :func:`segment_matmul`.
    """
    conj = [None if spec is None else xp.conj(spec) for spec in spectra]
    blocks, groups = [], _groups(plan)
    for lo, hi in _column_blocks(xp, plan, zt, columns):
        pieces = []
        for a, b in groups:
            seg = plan[a]
            if conj[a] is None:
                c = columns[..., a : a + 1, :]
                pieces.append(_direct_corr(xp, c, zt[..., lo:hi, :], seg.start, seg.stop))
                continue
            f = spectrum(xp, zt[..., lo:hi, seg.head :], seg.size)
            for i in range(a, b):
                y = signal(xp, f * conj[i], seg.size)
                pieces.append(y[..., : plan[i].stop - plan[i].start])
        if len(pieces) > 1:  # concat copies: no read-only broadcast view reaches the caller
            shape = xp.broadcast_shapes(*(p.shape[:-1] for p in pieces))
            pieces = [xp.broadcast_to(p, (*shape, p.shape[-1])) for p in pieces]
            pieces = [xp.concat(pieces, axis=-1)]
        blocks.append(pieces[0])
    return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=-2)


def c_product(lower, upper, zt, *, transpose=False):
    """``C Z`` (``Cᵀ Z`` if ``transpose``) in the transposed layout, from the exponentiated
    bases: ``C`` is ``lower`` plus, when ``upper`` is not ``None``, the transpose of ``upper``
    (which holds the strictly upper part of ``C`` transposed, so it enters through the other
    one of the two products).  ``D = C · 1`` is ``c_product(lower, upper, ones (1, n))``.
    """
    out = lower.product(zt, transpose=transpose)
    if upper is not None:
        out = out + upper.product(zt, transpose=not transpose)
    return out


def valid_mask(xp, plan, n, dev, *, strict=False):
    """Mask ``(k, n)``: entry ``t`` of vector ``i`` is used iff ``t < m_i`` (``t >= 1`` strict)."""
    lengths = xp.asarray([seg.length for seg in plan], device=dev)
    t = xp.arange(n, device=dev)[None, :]
    keep = t < lengths[:, None]
    return keep & (t >= 1) if strict else keep


def segment_index(starts, columns, xp):
    """Segment of each column index in ``columns`` (``σ_i <= j < σ_{i+1}``), same dtype."""
    edges = xp.asarray(starts, dtype=columns.dtype, device=device(columns))
    return xp.astype(xp.searchsorted(edges, columns, side="right"), columns.dtype) - 1
