"""Segment-form FFT kernels of the k-conv basis (docs/math.rst §4).

Arrays are in the transposed layout ``(..., p, n)``: the FFT runs along the contiguous last
axis.  A plan entry is ``(start, stop, length m, FFT length N)``; :func:`segment_plan` builds
the plan of a basis.  Segment ``i`` is one causal convolution of ``c_i[: n - σ_i]`` with
``Z[σ_i : σ_{i+1}]`` (a correlation with ``Z[σ_i:]`` for the transpose), at the fast length
``>= n - σ_i + (σ_{i+1} - σ_i) - 1``.
"""

from __future__ import annotations

import math

import array_api_extra as xpx
from array_api_compat import device

from .._array import fast_length, irfft, rfft

# Complex spectrum entries per block of FFT rows (cache-sized work arrays).
_FFT_BLOCK = 1 << 22
# Segments of at most this many columns are evaluated directly (``O(L n p)``): a length-``n``
# FFT pair for a 1-column segment costs ~20x a direct pass (measured at n = 16384, p = 64,
# float32).  Recovery on generic logits gives such segments.
_DIRECT_SEGMENT = 8


def segment_plan(starts, n, stops=None):
    """FFT plan of the segments ``[σ_i, σ_{i+1})``: ``N_i >= m_i + L_i - 1`` (no wrap-around)."""
    if stops is None:
        stops = (*starts[1:], n)
    return tuple(
        (s, e, n - s, fast_length(n - s + (e - s) - 1)) for s, e in zip(starts, stops, strict=True)
    )


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
    """``rfft(c_i[: m_i], N_i)`` for every FFT segment, each ``(..., 1, N_i // 2 + 1)``;
    ``None`` for the short segments that are evaluated directly."""
    return tuple(
        None if _is_direct(s, e) else spectrum(xp, columns[..., i : i + 1, :m], size)
        for i, (s, e, m, size) in enumerate(plan)
    )


def _column_blocks(xp, plan, zt, columns):
    """Split the ``p`` rows of ``zt`` into blocks whose spectra hold about ``_FFT_BLOCK``
    complex numbers: the multiply and the accumulation then run on cache-resident data
    (measured ~15% faster at ``n = 2^17, p = 65`` than one pass over all rows)."""
    batch = math.prod(xp.broadcast_shapes(zt.shape[:-2], columns.shape[:-2]))
    p = zt.shape[-2]
    if p == 0:  # no columns (e = 0): one empty block keeps the shapes
        return [(0, 0)]
    rows = max(1, _FFT_BLOCK // (plan[0][3] * max(batch, 1)))
    count = -(-p // rows)
    rows = -(-p // count)
    return [(c, min(c + rows, p)) for c in range(0, p, rows)]


def _filter(xp, spec, x, size):
    """``irfft(spec · rfft(x, size), size)``.  The product goes into ``rfft``'s own output
    when broadcasting does not grow it: one large temporary less per segment (fresh pages
    cost more than the multiply itself)."""
    f = spectrum(xp, x, size)
    if f.dtype == spec.dtype and f.shape == xp.broadcast_shapes(f.shape, spec.shape):
        f *= spec
    else:
        f = f * spec
    return signal(xp, f, size)


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
    rows ``σ_i:``; ``columns (..., k, n)`` are the vectors ``c_i`` (used directly for short
    segments), ``spectra`` their FFTs.
    """
    blocks = []
    for lo, hi in _column_blocks(xp, plan, zt, columns):
        out = None
        for i, ((s, e, m, size), spec) in enumerate(zip(plan, spectra, strict=True)):
            if spec is None:
                y = _direct_conv(xp, columns[..., i : i + 1, :m], zt[..., lo:hi, s:e])
            else:
                y = _filter(xp, spec, zt[..., lo:hi, s:e], size)[..., :m]
            if out is None and s == 0:
                out = y  # the first segment covers every row: no zero fill needed
                continue
            if out is None:
                shape = xp.broadcast_shapes(y.shape[:-1], zt[..., lo:hi, :].shape[:-1])
                out = xp.zeros((*shape, n), dtype=zt.dtype, device=device(zt))
            out = xpx.at(out)[..., s:].add(y)
        blocks.append(out)
    return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=-2)


def segment_rmatmul(xp, plan, spectra, columns, zt, n):
    """``Hᵀ Z`` in the transposed layout (docs/math.rst §4: the transpose is a correlation).

    Columns ``σ_i … σ_{i+1}-1`` of ``Hᵀ Z`` are ``Σ_t c_i[t] Z[j + t]``: the correlation of
    ``c_i`` with ``Z[σ_i:]``, read off the conjugate spectrum (same length ``N_i``); short
    segments are direct dot products.  Arguments as in :func:`segment_matmul`.
    """
    conj = [None if spec is None else xp.conj(spec) for spec in spectra]
    blocks = []
    for lo, hi in _column_blocks(xp, plan, zt, columns):
        pieces = []
        for i, ((s, e, _, size), spec) in enumerate(zip(plan, conj, strict=True)):
            if spec is None:
                pieces.append(_direct_corr(xp, columns[..., i : i + 1, :], zt[..., lo:hi, :], s, e))
                continue
            y = _filter(xp, spec, zt[..., lo:hi, s:], size)
            pieces.append(y[..., : e - s])
        if len(pieces) > 1:  # concat copies: no read-only broadcast view reaches the caller
            shape = xp.broadcast_shapes(*(p.shape[:-1] for p in pieces))
            pieces = [xp.broadcast_to(p, (*shape, p.shape[-1])) for p in pieces]
            pieces = [xp.concat(pieces, axis=-1)]
        blocks.append(pieces[0])
    return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=-2)


def c_product(xp, lower, upper, zt, *, transpose=False):
    """``C Z`` (``Cᵀ Z`` if ``transpose``) in the transposed layout, from the exponentiated
    bases: ``C`` is ``lower`` plus, when ``upper`` is not ``None``, the transpose of ``upper``
    (which holds the strictly upper part of ``C`` transposed, so it enters through the other
    one of the two products).  ``D = C · 1`` is ``c_product(xp, lower, upper, ones (1, n))``.
    """
    products = (segment_matmul, segment_rmatmul)
    first, second = products[::-1] if transpose else products
    out = first(xp, lower.plan, lower.spectra, lower.vectors, zt, lower.n)
    if upper is not None:
        out = out + second(xp, upper.plan, upper.spectra, upper.vectors, zt, lower.n)
    return out


def valid_mask(xp, plan, n, dev, *, strict=False):
    """Mask ``(k, n)``: entry ``t`` of vector ``i`` is used iff ``t < m_i`` (``t >= 1`` strict)."""
    lengths = xp.asarray([m for _, _, m, _ in plan], device=dev)
    t = xp.arange(n, device=dev)[None, :]
    keep = t < lengths[:, None]
    return keep & (t >= 1) if strict else keep


def segment_index(starts, columns, xp):
    """Segment of each column index in ``columns`` (``σ_i <= j < σ_{i+1}``), same dtype."""
    edges = xp.asarray(starts, dtype=columns.dtype, device=device(columns))
    return xp.astype(xp.searchsorted(edges, columns, side="right"), columns.dtype) - 1
