"""The k-conv basis (MATH.md §4): FFT products, exact decomposition, recovery, attention.

A lower-triangular ``H`` has a *k-conv basis* when its columns, shifted to start at the
diagonal ("aligned columns" ``H[j:, j]``), are piecewise constant in ``j``: for
``σ_i <= j < σ_{i+1}``, ``H[j:, j] = c_i[: n - j]``.  Equivalently ``H = Σ_i conv(b_i, m_i)``
with ``m_i = n - σ_i`` and ``c_i = Σ_{l<=i} b_l``.  :class:`ConvBasis` stores the starts
``σ_i`` and the *cumulative* vectors ``c_i`` (the aligned columns themselves), which is what
the segment-form products and the exponential need, and never loses precision to a
difference/cumulative-sum round trip.

Products ``H Z`` and ``Hᵀ Z`` cost ``O(k n p log n)`` by FFT in the segment form: segment
``i`` is one causal convolution of ``c_i[: n - σ_i]`` with ``Z[σ_i : σ_{i+1}]`` (a correlation
with ``Z[σ_i:]`` for the transpose), at the fast length ``>= n - σ_i + (σ_{i+1} - σ_i) - 1``.
Each spectrum of ``c_i`` is computed once per basis and shared by both products.

Attention (:func:`conv_attention`, :class:`ConvAttentionOperator`) recovers the basis of the
logits from ``Q, K`` (:func:`recover_conv_basis`), exponentiates it with a global shift and
runs one set of FFT products on ``[V, 1]``.  Rows whose normaliser the FFT cannot resolve (their
attention mass lies far below the largest entry of the matrix) are detected and recomputed
exactly from the basis with their own row maximum, so the result never contains NaN or inf.
"""

from __future__ import annotations

import functools
import math
import operator
import random
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import array_api_extra as xpx
from array_api_compat import device

from ._array import (
    as_floating,
    check_rows,
    fast_length,
    irfft,
    namespace,
    resolve_scale,
    rfft,
    validate_attention_inputs,
)

__all__ = [
    "ConvAttentionOperator",
    "ConvBasis",
    "ConvBasisWarning",
    "conv_attention",
    "conv_matmul",
    "conv_operator",
    "conv_rmatmul",
    "decompose",
    "fit",
    "recover_conv_basis",
]

# Elements per block, batch included, when rows are recomputed exactly (bounds the
# O(rows · n) work arrays; blocks of this size, not 2^22, took half the time at n = 2^17:
# cache, and causal blocks skip more of the masked triangle).  A block has at least one row.
_EXACT_BLOCK = 1 << 18
# Complex spectrum entries per block of FFT rows (cache-sized work arrays).
_FFT_BLOCK = 1 << 22
# Logit entries sampled to check the recovered basis against s · Q Kᵀ (O(samples · d)).
_RESIDUAL_SAMPLES = 512
# Warn when the sampled residual ε allows an output error 2 (e^ε − 1) ‖V‖_∞ above this.
_WARN_OUTPUT_ERROR = 1e-2


class ConvBasisWarning(UserWarning):
    """The recovered basis misses sampled logits: conv-basis attention is only approximate."""


# ----------------------------------------------------------------------------------------
# Segment-form FFT kernels.  Arrays are in the transposed layout (..., p, n): the FFT runs
# along the contiguous last axis.  A plan entry is (start, stop, length m, FFT length N).
# ----------------------------------------------------------------------------------------


def _plan(starts, n, stops=None):
    """FFT plan of the segments ``[σ_i, σ_{i+1})``: ``N_i >= m_i + L_i - 1`` (no wrap-around)."""
    if stops is None:
        stops = (*starts[1:], n)
    return tuple(
        (s, e, n - s, fast_length(n - s + (e - s) - 1)) for s, e in zip(starts, stops, strict=True)
    )


# Segments of at most this many columns are evaluated directly (``O(L n p)``): a length-``n``
# FFT pair for a 1-column segment costs ~20x a direct pass (measured at n = 16384, p = 64,
# float32).  Recovery on generic logits gives such segments.
_DIRECT_SEGMENT = 8


def _is_direct(start, stop):
    return stop - start <= _DIRECT_SEGMENT


def _spectra(xp, columns, plan):
    """``rfft(c_i[: m_i], N_i)`` for every FFT segment, each ``(..., 1, N_i // 2 + 1)``;
    ``None`` for the short segments that are evaluated directly."""
    return tuple(
        None if _is_direct(s, e) else rfft(columns[..., i : i + 1, :m], size, -1, xp)
        for i, (s, e, m, size) in enumerate(plan)
    )


def _column_blocks(xp, plan, zt, columns):
    """Split the ``p`` rows of ``zt`` into blocks whose spectra hold about ``_FFT_BLOCK``
    complex numbers: the multiply and the accumulation then run on cache-resident data
    (measured ~15% faster at ``n = 2^17, p = 65`` than one pass over all rows)."""
    batch = math.prod(xp.broadcast_shapes(zt.shape[:-2], columns.shape[:-2]))
    p = zt.shape[-2]
    rows = max(1, _FFT_BLOCK // (plan[0][3] * max(batch, 1)))
    count = -(-p // rows)
    rows = -(-p // count)
    return [(c, min(c + rows, p)) for c in range(0, p, rows)]


def _filter(xp, spec, x, size):
    """``irfft(spec · rfft(x, size), size)``.  The product goes into ``rfft``'s own output
    when broadcasting does not grow it: one large temporary less per segment (fresh pages
    cost more than the multiply itself)."""
    f = rfft(x, size, -1, xp)
    if f.dtype == spec.dtype and f.shape == xp.broadcast_shapes(f.shape, spec.shape):
        f *= spec
    else:
        f = f * spec
    return irfft(f, size, -1, xp)


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
    cols = [zt[..., j:] @ xp.expand_dims(c[..., 0, : n - j], axis=-1) for j in range(s, e)]
    return cols[0] if len(cols) == 1 else xp.concat(cols, axis=-1)


def _segment_matmul(xp, plan, spectra, columns, zt, n):
    """``H Z`` in the transposed layout: ``zt (..., p, n)`` -> ``(..., p, n)``.

    MATH §4 segment form: segment ``i`` adds ``conv(c_i[:m_i], Z[σ_i:σ_{i+1}])[: m_i]`` to
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


def _segment_rmatmul(xp, plan, spectra, columns, zt, n):
    """``Hᵀ Z`` in the transposed layout (MATH §4: the transpose is a correlation).

    Columns ``σ_i … σ_{i+1}-1`` of ``Hᵀ Z`` are ``Σ_t c_i[t] Z[j + t]``: the correlation of
    ``c_i`` with ``Z[σ_i:]``, read off the conjugate spectrum (same length ``N_i``); short
    segments are direct dot products.  Arguments as in :func:`_segment_matmul`.
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


def _valid(xp, plan, n, dev, *, strict=False):
    """Mask ``(k, n)``: entry ``t`` of vector ``i`` is used iff ``t < m_i`` (``t >= 1`` strict)."""
    lengths = xp.asarray([m for _, _, m, _ in plan], device=dev)
    t = xp.arange(n, device=dev)[None, :]
    keep = t < lengths[:, None]
    return keep & (t >= 1) if strict else keep


def _segment_index(starts, columns, xp):
    """Segment of each column index in ``columns`` (``σ_i <= j < σ_{i+1}``), same dtype."""
    edges = xp.asarray(starts, dtype=columns.dtype, device=device(columns))
    return xp.astype(xp.searchsorted(edges, columns, side="right"), columns.dtype) - 1


def _index_dtype(xp, *bases):
    """``int32`` when every flat index ``segment · n + t`` of ``bases`` fits, else ``int64``:
    half the memory traffic for the gathers of exact rows."""
    return xp.int32 if all(b.rank * b.n < 2**31 for b in bases if b is not None) else xp.int64


def _check_integer(value, name, low, high=None):
    """``value`` as an ``int`` in ``[low, high]``: Python or NumPy-style integers, not bool."""
    expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, n = {high}]"
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be {expected}, got {value!r}") from None
    if number < low or (high is not None and number > high):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return number


def _check_starts(starts, n):
    n = _check_integer(n, "n", 1)
    try:
        if any(isinstance(s, bool) for s in starts):
            raise TypeError
        starts = tuple(operator.index(s) for s in starts)
    except TypeError:
        raise ValueError(f"starts must be integers, got {starts!r}") from None
    if not starts or starts[0] != 0:
        raise ValueError(f"starts must begin with 0, got {starts}")
    if any(starts[i + 1] <= starts[i] for i in range(len(starts) - 1)) or starts[-1] >= n:
        raise ValueError(f"starts must increase strictly and stay below n = {n}, got {starts}")
    return starts


# ----------------------------------------------------------------------------------------
# The basis
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ConvBasis:
    """A k-conv basis ``H = Σ_i conv(b_i, m_i)`` of a lower-triangular ``n × n`` matrix.

    Attributes
    ----------
    starts : tuple of int
        Segment starts ``0 = σ_0 < σ_1 < … < σ_{k-1} < n`` (``m_i = n - σ_i``).
    vectors : array ``(..., k, n)``
        The cumulative vectors ``c_i = Σ_{l<=i} b_l`` of MATH.md §4, i.e. the aligned columns:
        ``H[j:, j] = c_i[: n - j]`` for ``σ_i <= j < σ_{i+1}``.  Entries ``t >= m_i`` are
        unused (zero in every basis this module builds).  Leading axes are batch axes that
        share the starts.
    n : int
        Matrix size.

    The FFT spectra of the vectors are computed on first use and reused by every later
    product (:meth:`matmul` and :meth:`rmatmul` share them).
    """

    starts: tuple[int, ...]
    vectors: Any
    n: int

    def __post_init__(self):
        object.__setattr__(self, "n", _check_integer(self.n, "n", 1))
        object.__setattr__(self, "starts", _check_starts(self.starts, self.n))
        if self.vectors.ndim < 2 or self.vectors.shape[-2:] != (len(self.starts), self.n):
            raise ValueError(
                f"vectors must have shape (..., k, n) = (..., {len(self.starts)}, {self.n}), "
                f"got {self.vectors.shape}"
            )

    @property
    def rank(self):
        """Number of segments ``k``."""
        return len(self.starts)

    @property
    def lengths(self):
        """Sub-convolution sizes ``m_i = n - σ_i``."""
        return tuple(self.n - s for s in self.starts)

    @cached_property
    def _xp(self):
        return namespace(self.vectors)

    @cached_property
    def _plan(self):
        return _plan(self.starts, self.n)

    @cached_property
    def _spectra(self):
        return _spectra(self._xp, self.vectors, self._plan)

    def basis_vectors(self):
        """The vectors ``b_i`` of ``H = Σ conv(b_i, m_i)``: ``b_0 = c_0``, ``b_i = c_i - c_{i-1}``
        on ``[: m_i]`` and zero beyond.  Shape ``(..., k, n)``."""
        xp = self._xp
        c = self.vectors
        keep = _valid(xp, self._plan, self.n, device(c))
        prev = xp.concat([xp.zeros_like(c[..., :1, :]), c[..., :-1, :]], axis=-2)
        return xp.where(keep, c - prev, xp.zeros_like(c))

    def to_dense(self):
        """The ``(..., n, n)`` matrix ``H`` (``O(n²)``; for tests)."""
        xp, n = self._xp, self.n
        dev = device(self.vectors)
        seg = _segment_index(self.starts, xp.arange(n, dtype=xp.int64, device=dev), xp)
        i = xp.arange(n, device=dev)[:, None]
        j = xp.arange(n, device=dev)[None, :]
        t = i - j
        flat_index = seg[None, :] * n + xp.where(t >= 0, t, xp.zeros_like(t))
        flat = xp.reshape(self.vectors, (*self.vectors.shape[:-2], self.rank * n))
        h = xp.take(flat, xp.reshape(flat_index, (-1,)), axis=flat.ndim - 1)
        h = xp.reshape(h, (*flat.shape[:-1], n, n))
        return xp.where(t >= 0, h, xp.zeros_like(h))

    def _check_z(self, z):
        xp = namespace(self.vectors, z)
        check_rows(z, "z")
        if z.shape[-2] != self.n:
            raise ValueError(f"z must have shape (..., n, p) with n = {self.n}, got {z.shape}")
        (z,) = as_floating(xp, (z,), ("z",))
        if z.dtype == self.vectors.dtype:
            return xp, z, self.vectors, self._spectra
        # A wider z: the vectors' spectra must be taken in the wider dtype too, or the
        # product carries the narrow dtype's FFT round-off.
        dtype = xp.result_type(z, self.vectors)
        vectors = xp.astype(self.vectors, dtype)
        return xp, xp.astype(z, dtype), vectors, _spectra(xp, vectors, self._plan)

    def matmul(self, z):
        """``H Z`` for ``z (..., n, p)``, by FFT in ``O(k n p log n)``."""
        xp, z, vectors, spectra = self._check_z(z)
        out = _segment_matmul(xp, self._plan, spectra, vectors, xp.matrix_transpose(z), self.n)
        return xp.matrix_transpose(out)

    def rmatmul(self, z):
        """``Hᵀ Z`` for ``z (..., n, p)``, by FFT in ``O(k n p log n)``."""
        xp, z, vectors, spectra = self._check_z(z)
        out = _segment_rmatmul(xp, self._plan, spectra, vectors, xp.matrix_transpose(z), self.n)
        return xp.matrix_transpose(out)

    def max(self):
        """The largest entry of ``H`` on the lower triangle, per batch element ``(...)``."""
        xp = self._xp
        keep = _valid(xp, self._plan, self.n, device(self.vectors))
        return _masked_max(xp, self.vectors, keep)

    def exp(self, shift=None):
        """The basis of ``M ∘ exp(H - shift)`` (same starts; MATH.md §4).

        ``shift`` is a scalar or an array broadcasting against the batch axes; default
        :meth:`max`, so no entry exceeds 1 and nothing overflows.  The masked (upper) entries
        of the result are exactly 0; its vectors are ``exp(c_i - shift)`` on ``[: m_i]``.
        """
        xp = self._xp
        c = self.vectors
        if shift is None:
            shift = self.max()
        shift = xp.asarray(shift, dtype=c.dtype, device=device(c))
        keep = _valid(xp, self._plan, self.n, device(c))
        minus_inf = xp.asarray(-xp.inf, dtype=c.dtype, device=device(c))
        return ConvBasis(
            self.starts, xp.exp(xp.where(keep, c - shift[..., None, None], minus_inf)), self.n
        )


def _masked_max(xp, c, keep):
    minus_inf = xp.asarray(-xp.inf, dtype=c.dtype, device=device(c))
    return xp.max(xp.where(keep, c, minus_inf), axis=(-2, -1))


# ----------------------------------------------------------------------------------------
# Products with a single conv(a, m)
# ----------------------------------------------------------------------------------------


def _single(a, z, m):
    xp = namespace(a, z)
    if a.ndim < 1:
        raise ValueError(f"a must have shape (..., n), got {a.shape}")
    check_rows(z, "z")
    a, z = as_floating(xp, (a, z), ("a", "z"))
    n = a.shape[-1]
    if z.shape[-2] != n:
        raise ValueError(f"z must have shape (..., n, p) with n = {n} (len(a)), got {z.shape}")
    if n == 0:
        raise ValueError("a must be non-empty (n >= 1)")
    m = n if m is None else m
    m = _check_integer(m, "m", 1, n)
    try:
        xp.broadcast_shapes(a.shape[:-1], z.shape[:-2])
    except ValueError:
        raise ValueError(
            f"leading (batch) axes of a {a.shape} and z {z.shape} must broadcast"
        ) from None
    plan = ((n - m, n, m, fast_length(2 * m - 1)),)
    columns = a[..., None, :]
    return xp, plan, _spectra(xp, columns, plan), columns, xp.matrix_transpose(z), n


def conv_matmul(a, z, /, *, m=None):
    """``conv(a, m) Z``: the sub-convolution whose bottom-right ``m × m`` block is
    ``conv(a[:m])`` (MATH.md §4), times ``Z``.

    Parameters
    ----------
    a : array ``(..., n)``
    z : array ``(..., n, p)``
    m : int, optional
        Block size, ``1 <= m <= n``; default ``n`` (``conv(a)``).

    Returns
    -------
    array ``(..., n, p)``
        By FFT of length ``>= 2m - 1``: ``O(m p log m)``.
    """
    xp, plan, spectra, columns, zt, n = _single(a, z, m)
    return xp.matrix_transpose(_segment_matmul(xp, plan, spectra, columns, zt, n))


def conv_rmatmul(a, z, /, *, m=None):
    """``conv(a, m)ᵀ Z`` (a correlation), with the arguments of :func:`conv_matmul`."""
    xp, plan, spectra, columns, zt, n = _single(a, z, m)
    out = _segment_rmatmul(xp, plan, spectra, columns, zt, n)
    s = plan[0][0]
    if s:
        out = xp.concat(
            [xp.zeros((*out.shape[:-1], s), dtype=out.dtype, device=device(out)), out], axis=-1
        )
    return xp.matrix_transpose(out)


# ----------------------------------------------------------------------------------------
# Exact decomposition and dense fit
# ----------------------------------------------------------------------------------------


def _check_square(h):
    xp = namespace(h)
    if h.ndim < 2 or h.shape[-1] != h.shape[-2] or h.shape[-1] == 0:
        raise ValueError(f"h must have shape (..., n, n) with n >= 1, got {h.shape}")
    (h,) = as_floating(xp, (h,), ("h",))
    return xp, h


def _aligned(xp, h):
    """Aligned columns ``a[..., j, t] = h[..., j + t, j]`` (zero for ``t >= n - j``).

    The skew trick: row ``j`` of ``hᵀ`` flattened and padded to length ``n (n + 1)``, read
    with stride ``n + 1``, starts at the diagonal entry ``hᵀ[j, j]``.
    """
    n = h.shape[-1]
    ht = xp.reshape(xp.matrix_transpose(h), (*h.shape[:-2], n * n))
    ht = xp.concat([ht, xp.zeros((*h.shape[:-2], n), dtype=h.dtype, device=device(h))], axis=-1)
    a = xp.reshape(ht, (*h.shape[:-2], n, n + 1))[..., :n]
    t = xp.arange(n, device=device(h))
    keep = t[None, :] < (n - t)[:, None]
    return xp.where(keep, a, xp.zeros_like(a))


def decompose(h, /):
    """The exact k-conv basis of a lower-triangular matrix (MATH.md §4).

    A new segment starts wherever an aligned column differs (exactly) from the previous one
    on their common length, in any batch element; so ``k <= n`` and
    ``decompose(h).to_dense()`` reproduces ``h`` to round-off.

    Parameters
    ----------
    h : array ``(..., n, n)``, zero above the diagonal

    Returns
    -------
    ConvBasis
        ``O(n²)`` time and memory.

    Raises
    ------
    ValueError
        If ``h`` is not square or has non-zeros above the diagonal.
    """
    xp, h = _check_square(h)
    n = h.shape[-1]
    i = xp.arange(n, device=device(h))
    upper = (i[None, :] > i[:, None]) & (h != 0)
    if bool(xp.any(upper)):
        raise ValueError(
            "h must be lower-triangular (zero above the diagonal); use fit() to approximate "
            "the lower triangle of a general matrix"
        )
    a = _aligned(xp, h)
    # Column j starts a segment when its aligned column differs from column j-1's (the
    # entry t = n - j of column j-1 is outside column j and is masked to 0 in both).
    prev = xp.concat([a[..., :1, :], a[..., :-1, :]], axis=-2)
    keep = i[None, :] < (n - i)[:, None]
    changed = xp.any((a != prev) & keep, axis=-1)
    if changed.ndim > 1:
        changed = xp.any(xp.reshape(changed, (-1, n)), axis=0)
    flags = [bool(x) for x in changed]
    starts = tuple([0] + [j for j in range(1, n) if flags[j]])
    vectors = xp.take(a, xp.asarray(starts, device=device(h)), axis=a.ndim - 2)
    return ConvBasis(starts, vectors, n)


def fit(h, k, /):
    """A dense best-effort ``k``-segment basis of the lower triangle of any square ``h``.

    The reference for what recovery from ``Q, K`` could achieve (MATH.md §4): segments
    start at the ``k - 1`` largest changes ``‖a_j - a_{j-1}‖₂`` between consecutive aligned
    columns (summed over batch axes; ties broken by position), and each segment is
    represented by the mean of its aligned columns, entry by entry over the columns that
    reach it — the least-squares choice for those starts.  Because the starts for ``k`` are
    a superset of those for ``k - 1``, the Frobenius error never increases with ``k``.
    The strictly upper part of ``h`` is ignored (as the causal mask does).

    Parameters
    ----------
    h : array ``(..., n, n)``
    k : int
        Number of segments, ``>= 1`` (capped at ``n``).

    Returns
    -------
    ConvBasis
        ``O(n²)`` time and memory (plus a sort of ``n`` numbers).
    """
    xp, h = _check_square(h)
    k = _check_rank(k, "k")
    n = h.shape[-1]
    dev = device(h)
    a = _aligned(xp, h)
    t = xp.arange(n, device=dev)
    keep = t[None, :] < (n - t)[:, None]
    prev = xp.concat([a[..., :1, :], a[..., :-1, :]], axis=-2)
    change = xp.sum(xp.where(keep, (a - prev) ** 2, xp.zeros_like(a)), axis=-1)
    change = xp.reshape(change, (-1, n))
    change = xp.sum(change, axis=0)[1:]
    order = xp.argsort(-change, stable=True) + 1 if n > 1 else xp.asarray([], dtype=xp.int64)
    chosen = sorted(int(j) for j in order[: min(k, n) - 1])
    starts = (0, *chosen)
    stops = (*starts[1:], n)
    # Segment means: prefix sums of aligned columns over j, divided by how many columns of
    # the segment reach entry t (column j reaches t iff j < n - t).
    total = xp.cumulative_sum(a, axis=-2, include_initial=True)
    idx_lo = xp.asarray(starts, device=dev)
    idx_hi = xp.asarray(stops, device=dev)
    sums = xp.take(total, idx_hi, axis=a.ndim - 2) - xp.take(total, idx_lo, axis=a.ndim - 2)
    reach = xp.minimum(idx_hi[:, None], (n - t)[None, :]) - idx_lo[:, None]
    reach = xp.astype(xp.maximum(reach, xp.zeros_like(reach)), h.dtype)
    means = sums / xp.maximum(reach, xp.ones_like(reach))
    return ConvBasis(starts, xp.where(reach > 0, means, xp.zeros_like(means)), n)


# ----------------------------------------------------------------------------------------
# Recovery from Q and K
# ----------------------------------------------------------------------------------------


def _check_rank(rank, name="rank"):
    return _check_integer(rank, name, 1)


def _recovery_options(xp, q, k, rank, probe, delta, eps, scale):
    n, d = q.shape[-2], q.shape[-1]
    rank = _check_rank(rank)
    probe = _check_integer(probe, "probe", 1, n)
    eps = float(eps)
    if not eps >= 0.0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    scale = resolve_scale(scale, d)
    if delta is None:
        # Two computed logits that agree in exact arithmetic differ by <= d u |s| ‖q‖‖k‖ each
        # (u = eps/2); δ covers that round-off on T entries, on top of the 4 T ε of MATH §4.
        unit = float(xp.finfo(q.dtype).eps)
        qn = float(xp.max(xp.vecdot(q, q))) ** 0.5
        kn = float(xp.max(xp.vecdot(k, k))) ** 0.5
        delta = 4 * probe * eps + 4 * probe * d * unit * abs(scale) * qn * kn
        delta = max(delta, float(xp.finfo(q.dtype).smallest_normal))
    else:
        delta = float(delta)
        if not delta > 4 * probe * eps:
            raise ValueError(
                f"delta must exceed 4 * probe * eps = {4 * probe * eps} (MATH.md §4), got {delta}"
            )
    return rank, probe, delta, eps, scale


def _recover(xp, q, k, scale, rank, probe, delta, eps):
    """Binary-search recovery (MATH.md §4) of the basis of ``s · M ∘ Q Kᵀ``: starts, vectors."""
    n = q.shape[-2]

    def column(j, length):
        # H[j : j+length, j] = s Q[j:j+length] K[j]ᵀ: O(length · d).
        return (
            scale * (q[..., j : j + length, :] @ xp.matrix_transpose(k[..., j : j + 1, :]))[..., 0]
        )

    threshold = delta - 2 * probe * eps
    starts = [0]
    probe_vec = column(0, probe)

    def differs(j):
        gap = xp.sum(xp.abs(column(j, probe) - probe_vec), axis=-1)
        # Batch elements share the starts: a column differs if it differs in any of them.
        return bool(xp.max(gap) >= threshold) if gap.ndim else bool(gap >= threshold)

    last = n - probe
    while len(starts) < rank:
        lo = starts[-1] + 1
        if lo > last or not differs(last):
            break
        hi = last
        while lo < hi:
            mid = (lo + hi) // 2
            if differs(mid):
                hi = mid
            else:
                lo = mid + 1
        starts.append(lo)
        probe_vec = column(lo, probe)
    # All columns σ_i at once, one matrix product (O(n d k)): c_i = H[σ_i:, σ_i], zero-padded.
    index = xp.asarray(starts, device=device(k))
    cols = scale * (q @ xp.matrix_transpose(xp.take(k, index, axis=k.ndim - 2)))
    vectors = [
        xpx.pad(cols[..., s:, i], [(0, 0)] * (cols.ndim - 2) + [(0, s)], xp=xp)
        for i, s in enumerate(starts)
    ]
    return tuple(starts), xp.stack(vectors, axis=-2)


def _validate_qk(q, k, causal):
    # Both directions need n == m: the same message for both (not "causal attention ...").
    xp, q, k, _ = validate_attention_inputs(q, k, k, causal=False)
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(
            "the k-conv basis needs as many queries as keys, got "
            f"q shape {q.shape} and k shape {k.shape}"
        )
    return xp, q, k


def recover_conv_basis(q, k, /, *, rank, probe=1, delta=None, eps=0.0, scale=None, causal=True):
    """Recover the k-conv basis of the logits ``s · M ∘ Q Kᵀ`` without forming them.

    MATH.md §4 ("recover k-conv"): ``c_0`` is the first column; each further start ``σ_i`` is
    the smallest ``j`` in ``(σ_{i-1}, n - T]`` whose first ``T`` aligned entries differ from
    the current ``c_{i-1}[:T]`` by ``‖·‖₁ >= δ - 2Tε``, found by binary search; ``c_i`` is
    column ``σ_i``.

    **Assumption.** The search is exact when the logits have a k-conv basis that is
    *non-degenerate*: ``‖b_i[:T]‖₁ >= δ``, ``m_{k-1} >= T``, ``δ > 4Tε``, and every column after
    a boundary differs from the previous segment's prefix (so the predicate is monotone).
    Then it returns the true starts and vectors.  On general inputs it returns a basis with
    at most ``rank`` segments whose starts are *a* change point of the predicate, not the
    best one, and whose vectors are the logit columns at those starts: the lower triangle is
    reproduced exactly on the columns ``σ_i`` and nowhere else by design.  :func:`fit` is
    the dense reference for the best ``rank``-segment approximation.

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
        Leading axes broadcast; the starts are shared by all batch elements (a column starts
        a segment if it does so in any of them), so ``rank`` bounds their union.
    rank : int
        Maximum number of segments ``k >= 1``.
    probe : int
        Probe length ``T``, ``1 <= T <= n``.
    delta : float, optional
        Detection threshold ``δ`` (must exceed ``4Tε``).  Default: ``4Tε`` plus the
        round-off of ``T`` computed logits, ``4 T d eps_dtype |s| max‖q_i‖ max‖k_j‖``.
    eps : float
        Noise level ``ε >= 0`` of the logits around an exact basis.
    scale : float, optional
        Logit scale ``s``; default ``1/sqrt(d)``.
    causal : bool
        ``True``: the basis of ``s · M ∘ Q Kᵀ``.  ``False``: the pair ``(lower, upper)`` where
        ``upper`` is the basis of ``s · M ∘ K Qᵀ`` whose strictly lower part, transposed, is
        the strictly upper part of the logits.

    Returns
    -------
    ConvBasis, or a tuple of two when ``causal=False``
        ``O(rank (n d + T d log n))`` time, ``O(rank · n)`` memory.
    """
    xp, q, k = _validate_qk(q, k, causal)
    rank, probe, delta, eps, scale = _recovery_options(xp, q, k, rank, probe, delta, eps, scale)
    n = q.shape[-2]
    lower = ConvBasis(*_recover(xp, q, k, scale, rank, probe, delta, eps), n)
    if causal:
        return lower
    upper = ConvBasis(*_recover(xp, k, q, scale, rank, probe, delta, eps), n)
    return lower, upper


# ----------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------


def _noise_floor(xp, bases, dtype):
    """Predicted absolute FFT error of ``C · 1`` (MATH.md §4: error ≈ eps × the largest terms).

    For one segment the FFT convolution of ``x`` with ``z`` has error ≲ ``u · log2(N) ·
    ‖x‖₂ ‖z‖₂``; summed over the segments of every basis with ``z = 1`` on the segment.
    Returned per batch element ``(...)``.
    """
    unit = float(xp.finfo(dtype).eps)
    total = None
    for basis, reach in bases:
        for i, (s, e, m, size) in enumerate(basis._plan):
            width = (e - s) if reach == "segment" else m
            norm = xp.sqrt(xp.sum(basis.vectors[..., i, :] ** 2, axis=-1))
            term = norm * (unit * math.log2(max(size, 2)) * math.sqrt(width))
            total = term if total is None else total + term
    return total


@dataclass(frozen=True, eq=False)
class ConvAttentionOperator:
    """Normalised conv-basis attention ``f = D⁻¹ C`` as an operator (MATH.md §3, §4).

    ``C = M ∘ exp(S - μ)`` (causal) or ``exp(S - μ)`` with ``S`` the recovered logit basis:
    the lower part (with diagonal) from ``lower``, the strictly upper part as the transpose of
    the strictly lower part of ``upper``.  Build it with :func:`conv_operator`.

    Attributes
    ----------
    lower : ConvBasis
        Basis of the logits ``s · M ∘ Q Kᵀ``.
    upper : ConvBasis or None
        Basis of ``s · M ∘ K Qᵀ`` (bidirectional), else ``None``.
    shift : array ``(...)``
        ``μ``: the largest logit of each batch element.
    normaliser : array ``(..., n)``
        ``D = C · 1`` (rows recomputed exactly where the FFT could not resolve them).
    recomputed_rows : tuple of int
        Rows whose products are computed exactly from the basis with their own maximum
        (``O(n d)`` each), because ``noise / D_r`` exceeded ``min(tolerance, 1)`` (or ``D_r``
        was not finite) in some batch element.
    tolerance : float
        The relative-error tolerance used to select those rows.
    noise : array ``(...)``
        Predicted absolute FFT error of ``C · 1`` (``u log2 N Σ_i ‖e_i‖₂ √L_i``): rows kept on the
        FFT path have relative error at most about ``2 noise / D_r`` (in units of ``‖Z‖_∞``).
    logit_residual : float
        ``ε̂ = max |basis − s · Q Kᵀ|`` over the diagonal and 512 sampled logits (all of them
        when ``n`` is small): an estimate, from below, of how far the basis is from the true
        logits (a start the recovery missed shows on the diagonal).  The
        output error is about ``2 (e^ε − 1) ‖V‖_∞`` for the true ``ε``; building the operator
        issues a :class:`ConvBasisWarning` when ``2 (e^ε̂ − 1) > 0.01``.
    """

    lower: ConvBasis
    upper: ConvBasis | None
    shift: Any
    normaliser: Any
    recomputed_rows: tuple[int, ...]
    tolerance: float
    noise: Any
    logit_residual: float
    _lower_exp: ConvBasis = field(repr=False, compare=False)
    _upper_exp: ConvBasis | None = field(repr=False, compare=False)

    @property
    def n(self):
        return self.lower.n

    @cached_property
    def _xp(self):
        return namespace(self.lower.vectors)

    # -- raw products with C in the transposed layout ------------------------------------
    def _c_product(self, zt, *, transpose=False):
        """``C Z`` (``Cᵀ Z`` if ``transpose``): the upper basis holds the strictly upper part
        transposed, so it enters through the other one of the two products."""
        products = (_segment_matmul, _segment_rmatmul)
        lower, upper = products[::-1] if transpose else products
        b, u = self._lower_exp, self._upper_exp
        out = lower(self._xp, b._plan, b._spectra, b.vectors, zt, self.n)
        if u is not None:
            out = out + upper(self._xp, u._plan, u._spectra, u.vectors, zt, self.n)
        return out

    # -- exact rows ------------------------------------------------------------------------
    def _row_blocks(self):
        """Recomputed rows in blocks ``(rows, width)``: causal row ``r`` sees only ``r + 1``
        columns, so a block needs ``width = max(rows) + 1`` of them (``n`` if bidirectional);
        blocks hold at most ``_EXACT_BLOCK`` entries over all batch elements, or one row."""
        rows = self.recomputed_rows
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

    def _exact_weights(self, rows, width):
        return _exact_weights(self._xp, self.lower, self.upper, rows, width)

    def _exact_hadamard_weights(self, rows, width, g, y):
        """Rows ``rows`` of ``f ∘ G Yᵀ`` on the first ``width`` columns, exactly."""
        xp = self._xp
        g_rows = xp.take(g, xp.asarray(rows, device=device(g)), axis=g.ndim - 2)
        return self._exact_weights(rows, width) * (g_rows @ xp.matrix_transpose(y[..., :width, :]))

    def _pad_rows(self, x):
        """Zero-pad ``(..., width, p)`` to ``(..., n, p)``."""
        pad = self.n - x.shape[-2]
        if not pad:
            return x
        return xpx.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)], xp=self._xp)

    def _gather_rows(self, pieces, base):
        """Place exact rows ``(..., R, p)`` into ``base (..., n, p)`` (our own intermediate).

        Recomputed rows come in contiguous runs (a causal prefix, typically), each written
        with one slice update: in place on NumPy, no pass over the whole output.
        """
        xp = self._xp
        rows = self.recomputed_rows
        if not rows:
            return base
        exact = pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=-2)
        shape = xp.broadcast_shapes(exact.shape[:-2], base.shape[:-2])
        if tuple(base.shape[:-2]) != tuple(shape):
            base = xp.broadcast_to(base, (*shape, *base.shape[-2:]))
            base = xp.asarray(base, copy=True)
        first = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                start = rows[first]
                base = xpx.at(base)[..., start : start + i - first, :].set(exact[..., first:i, :])
                first = i
        return base

    def _keep_mask(self, dtype):
        """``(n,)`` 1 on rows handled by the FFT, 0 on recomputed rows."""
        xp = self._xp
        dev = device(self.normaliser)
        keep = xp.ones((self.n,), dtype=dtype, device=dev)
        # Slice updates per contiguous run: integer-array assignment is not in the standard
        # (array-api-strict refuses it).
        rows, first = self.recomputed_rows, 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                keep = xpx.at(keep)[rows[first] : rows[i - 1] + 1].set(0.0)
                first = i
        return keep

    def _check(self, z, name):
        xp = namespace(self.lower.vectors, z)
        check_rows(z, name)
        if z.shape[-2] != self.n:
            raise ValueError(f"{name} must have shape (..., n, p) with n = {self.n}, got {z.shape}")
        (z,) = as_floating(xp, (z,), (name,))
        return xp.astype(z, xp.result_type(z, self.normaliser))

    def _safe_normaliser(self):
        xp = self._xp
        d = self.normaliser
        return xp.where(d > 0, d, xp.ones_like(d))

    # -- the four products -----------------------------------------------------------------
    def matmul(self, z):
        """``f Z`` for ``z (..., n, p)``: ``O(k n p log n)`` plus ``O(n p)`` per recomputed row."""
        z = self._check(z, "z")
        xp = self._xp
        out = self._c_product(xp.matrix_transpose(z)) / self._safe_normaliser()[..., None, :]
        out = xp.matrix_transpose(out)
        pieces = [self._exact_weights(r, w) @ z[..., :w, :] for r, w in self._row_blocks()]
        return self._gather_rows(pieces, out)

    def rmatmul(self, z):
        """``fᵀ Z`` for ``z (..., n, p)``."""
        z = self._check(z, "z")
        xp = self._xp
        scaled = z * (self._keep_mask(z.dtype) / self._safe_normaliser())[..., :, None]
        out = xp.matrix_transpose(self._c_product(xp.matrix_transpose(scaled), transpose=True))
        for rows, width in self._row_blocks():
            idx = xp.asarray(rows, device=device(z))
            weights = xp.matrix_transpose(self._exact_weights(rows, width))
            out = out + self._pad_rows(weights @ xp.take(z, idx, axis=z.ndim - 2))
        return out

    def _hadamard_operands(self, g, y, z):
        g, y, z = (self._check(a, name) for a, name in ((g, "g"), (y, "y"), (z, "z")))
        if g.shape[-1] != y.shape[-1]:
            raise ValueError(
                f"y must have the same number of columns as g ({g.shape[-1]}), got {y.shape}"
            )
        return g, y, z

    def hadamard_matmul(self, g, y, z):
        """``(f ∘ G Yᵀ) Z = Σ_l diag(G_l) f diag(Y_l) Z``; ``g, y (..., n, r)``, ``z (..., n, p)``.

        The ``r`` products run as one FFT product on the ``(n, r p)`` matrix
        ``[Y_l ∘ Z]_l``: ``O(k n r p log n)``.
        """
        xp = self._xp
        g, y, z = self._hadamard_operands(g, y, z)
        r, p = g.shape[-1], z.shape[-1]
        yt, zt, gt = (xp.matrix_transpose(a) for a in (y, z, g))
        stacked = yt[..., :, None, :] * zt[..., None, :, :]  # (..., r, p, n)
        flat = xp.reshape(stacked, (*stacked.shape[:-3], r * p, self.n))
        prod = self._c_product(flat) / self._safe_normaliser()[..., None, :]
        prod = xp.reshape(prod, (*prod.shape[:-2], r, p, self.n))
        out = xp.matrix_transpose(xp.sum(gt[..., :, None, :] * prod, axis=-3))
        pieces = []
        for rows, width in self._row_blocks():
            pieces.append(self._exact_hadamard_weights(rows, width, g, y) @ z[..., :width, :])
        return self._gather_rows(pieces, out)

    def hadamard_rmatmul(self, g, y, z):
        """``(f ∘ G Yᵀ)ᵀ Z = Σ_l diag(Y_l) fᵀ diag(G_l) Z`` (batched as ``hadamard_matmul``)."""
        xp = self._xp
        g, y, z = self._hadamard_operands(g, y, z)
        r, p = g.shape[-1], z.shape[-1]
        weight = self._keep_mask(z.dtype) / self._safe_normaliser()  # (..., n)
        yt, zt, gt = (xp.matrix_transpose(a) for a in (y, z, g))
        stacked = gt[..., :, None, :] * (zt * weight[..., None, :])[..., None, :, :]
        flat = xp.reshape(stacked, (*stacked.shape[:-3], r * p, self.n))
        prod = self._c_product(flat, transpose=True)
        prod = xp.reshape(prod, (*prod.shape[:-2], r, p, self.n))
        out = xp.matrix_transpose(xp.sum(yt[..., :, None, :] * prod, axis=-3))
        for rows, width in self._row_blocks():
            w = self._exact_hadamard_weights(rows, width, g, y)
            idx = xp.asarray(rows, device=device(z))
            out = out + self._pad_rows(xp.matrix_transpose(w) @ xp.take(z, idx, axis=z.ndim - 2))
        return out

    def to_dense(self):
        """The ``(..., n, n)`` matrix ``f`` (``O(n²)``; for tests)."""
        xp = self._xp
        eye = xp.eye(self.n, dtype=self.normaliser.dtype, device=device(self.normaliser))
        return self.matmul(eye)


def _exact_weights(xp, lower, upper, rows, width):
    """Softmax rows ``rows`` of the logits straight from the basis, each with its own maximum,
    on the first ``width`` columns (all columns a causal row can see when ``width > max(rows)``).

    ``(..., R, width)``; ``O(R width)`` (MATH.md §4 safeguard: no ``Q, K`` needed).
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

    seg = _segment_index(lower.starts, j, xp)
    logits = gather(lower, seg * n + xp.maximum(t, zero))
    minus_inf = xp.asarray(-xp.inf, dtype=logits.dtype, device=dev)
    if upper is None:
        logits = xp.where(t >= 0, logits, minus_inf)
    else:
        # MATH §4: S[r, j] for j > r is the strictly lower entry (j, r) of the K Qᵀ basis.
        seg_u = _segment_index(upper.starts, r, xp)
        up = gather(upper, seg_u * n + xp.maximum(-t, zero))
        logits = xp.where(t >= 0, logits, up)
    logits = logits - xp.max(logits, axis=-1, keepdims=True)
    w = xp.exp(logits)
    return w / xp.sum(w, axis=-1, keepdims=True)


@functools.lru_cache(maxsize=32)
def _sample_pairs(n, count):
    """Deterministic pseudo-random pairs ``(a, b)``, ``a >= b``, of the lower triangle (all of
    them when there are at most ``count``)."""
    if n * (n + 1) // 2 <= count:
        pairs = [(a, b) for a in range(n) for b in range(a + 1)]
    else:
        gen = random.Random(n)
        pairs = [(a, gen.randrange(a + 1)) for a in (gen.randrange(n) for _ in range(count))]
    return tuple(a for a, _ in pairs), tuple(b for _, b in pairs)


def _logit_residual(xp, q, k, scale, lower, upper):
    """``max |basis − s · Q Kᵀ|`` over the diagonal and sampled entries of the lower triangle
    (and of the ``K Qᵀ`` basis when bidirectional): ``O((n + samples) d)``, no ``n × n``
    array."""
    n, dev = lower.n, device(q)
    rows, cols = _sample_pairs(n, _RESIDUAL_SAMPLES)
    rows, cols = (xp.asarray(x, dtype=xp.int64, device=dev) for x in (rows, cols))

    def gap(basis, a, b):
        segments = _segment_index(basis.starts, xp.arange(n, dtype=xp.int64, device=dev), xp)
        # Every diagonal entry (O(n d)): a start the recovery missed shows there first.
        diagonal = xp.take(basis.vectors[..., 0], segments, axis=basis.vectors.ndim - 2)
        worst = xp.max(xp.abs(diagonal - scale * xp.vecdot(a, b)))
        a, b = (xp.take(x, idx, axis=x.ndim - 2) for x, idx in ((a, rows), (b, cols)))
        exact = scale * xp.vecdot(a, b)
        flat = xp.reshape(basis.vectors, (*basis.vectors.shape[:-2], basis.rank * n))
        entries = xp.take(flat, xp.take(segments, cols) * n + (rows - cols), axis=flat.ndim - 1)
        return max(float(worst), float(xp.max(xp.abs(entries - exact))))

    residual = gap(lower, q, k)
    return residual if upper is None else max(residual, gap(upper, k, q))


def _warn_if_inexact(residual, rank):
    # Attention outputs are convex combinations of V's rows: no error exceeds 2 max|V|.
    bound = min(2 * math.expm1(residual), 2.0) if residual == residual else math.nan
    if not bound <= _WARN_OUTPUT_ERROR:  # also for a NaN residual (NaN inputs)
        warnings.warn(
            f"the rank-{rank} conv basis misses sampled logits by up to {residual:.3g}, so the "
            f"attention output may be off by up to about {bound:.3g} x max|V| (MATH.md §4): the "
            "logits may lack a few-segment conv structure; raise rank or use another method",
            ConvBasisWarning,
            stacklevel=4,
        )


def _build(xp, q, k, rank, causal, probe, delta, scale, tolerance, with_values=None):
    """Recover, exponentiate, run the FFT products, select rows to recompute (MATH.md §4).

    Returns the operator and, if ``with_values`` is given, ``C V`` in transposed layout.
    """
    rank, probe, delta, _, scale = _recovery_options(xp, q, k, rank, probe, delta, 0.0, scale)
    n = q.shape[-2]
    lower = ConvBasis(*_recover(xp, q, k, scale, rank, probe, delta, 0.0), n)
    shift = lower.max()
    upper = upper_exp = None
    if not causal:
        upper = ConvBasis(*_recover(xp, k, q, scale, rank, probe, delta, 0.0), n)
        strict_lower = _valid(xp, upper._plan, n, device(q), strict=True)
        shift = xp.maximum(shift, _masked_max(xp, upper.vectors, strict_lower))
    # MATH §4: one global shift per batch element (a row maximum cannot enter a convolution).
    lower_exp = lower.exp(shift)
    if upper is not None:
        e = upper.exp(shift).vectors
        upper_exp = ConvBasis(upper.starts, xp.where(strict_lower, e, xp.zeros_like(e)), n)
    residual = _logit_residual(xp, q, k, scale, lower, upper)
    _warn_if_inexact(residual, rank)
    op = ConvAttentionOperator(
        lower,
        upper,
        shift,
        None,
        (),
        tolerance,
        None,
        residual,
        _lower_exp=lower_exp,
        _upper_exp=upper_exp,
    )
    dtype = q.dtype if with_values is None else with_values.dtype
    # D = C · 1 and C V as separate products: V enters in its transposed view, which the
    # FFT's zero-padding copies anyway (a concatenated [Vᵀ; 1] would cost one more pass).
    normaliser = op._c_product(xp.ones((1, n), dtype=dtype, device=device(q)))[..., 0, :]
    prod = None if with_values is None else op._c_product(xp.matrix_transpose(with_values))
    bases = [(lower_exp, "segment")]
    if upper_exp is not None:
        bases.append((upper_exp, "suffix"))
    noise = _noise_floor(xp, bases, q.dtype)[..., None]
    # Under-resolved rows: predicted relative error noise / D above min(tolerance, 1) (a D
    # within the noise floor is not resolved at all, whatever the tolerance: its row could
    # come out arbitrarily large), or D not finite.  min(tolerance, 1) is finite: no 0 · inf.
    bad = ~(normaliser * min(tolerance, 1.0) > noise) | ~xp.isfinite(normaliser)
    if bad.ndim > 1:
        bad = xp.any(xp.reshape(bad, (-1, n)), axis=0)
    rows = ()
    if bool(xp.any(bad)):
        rows = tuple(int(i) for i in xp.nonzero(bad)[0])
    op = ConvAttentionOperator(
        lower,
        upper,
        shift,
        normaliser,
        rows,
        tolerance,
        noise[..., 0],
        residual,
        _lower_exp=lower_exp,
        _upper_exp=upper_exp,
    )
    if rows:
        op = _replace_normaliser(xp, op)
    return op, prod


def _replace_normaliser(xp, op):
    """Recomputed rows get ``D_r = 1`` (their exact weights are already normalised)."""
    d = op.normaliser
    ones = xp.ones((*d.shape[:-1], len(op.recomputed_rows), 1), dtype=d.dtype, device=device(d))
    d = op._gather_rows([ones], d[..., None])
    return ConvAttentionOperator(
        op.lower,
        op.upper,
        op.shift,
        d[..., 0],
        op.recomputed_rows,
        op.tolerance,
        op.noise,
        op.logit_residual,
        _lower_exp=op._lower_exp,
        _upper_exp=op._upper_exp,
    )


def _tolerance(xp, dtype, tolerance):
    if tolerance is None:
        return float(xp.finfo(dtype).eps) ** 0.5
    try:
        tolerance = float(tolerance)
    except (TypeError, ValueError):
        raise ValueError(f"tolerance must be a number > 0, got {tolerance!r}") from None
    if not tolerance > 0:
        raise ValueError(
            f"tolerance must be > 0 (math.inf: recompute only unresolved rows), got {tolerance}"
        )
    return tolerance


def conv_operator(q, k, /, *, rank, causal=True, probe=1, delta=None, scale=None, tolerance=None):
    """The conv-basis attention operator ``f = D⁻¹ C`` (MATH.md §3, §4).

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    rank, probe, delta, scale, causal
        As in :func:`recover_conv_basis` (``eps = 0``).
    tolerance : float, optional
        Rows whose predicted relative FFT error ``noise / D_r`` exceeds this are recomputed
        exactly; default ``sqrt(eps_dtype)``.  Rows with ``D_r <= noise`` (not resolved at
        all) or a non-finite ``D_r`` are always recomputed, so ``math.inf`` (or any value
        ``>= 1``) recomputes only those: never NaN/inf, and every kept row has relative
        error below about 2.

    Returns
    -------
    ConvAttentionOperator
        Recovery ``O(rank (n d + T d log n))`` plus one FFT product ``O(rank n log n)``.
    """
    xp, q, k = _validate_qk(q, k, causal)
    tol = _tolerance(xp, q.dtype, tolerance)
    op, _ = _build(xp, q, k, rank, causal, probe, delta, scale, tol)
    return op


def conv_attention(
    q, k, v, /, *, rank, causal=True, probe=1, delta=None, scale=None, tolerance=None
):
    """Conv-basis attention ``O = D⁻¹ C V`` (MATH.md §4).

    Recovers the basis of the logits (:func:`recover_conv_basis`), exponentiates it with one
    shift per batch element, and computes ``C [V, 1]`` with one set of FFT products.
    Bidirectional attention adds the transposed strictly-lower basis of ``K Qᵀ``.  Exact up to
    FFT round-off when the logits have a non-degenerate k-conv basis of at most ``rank``
    segments.

    Rows whose normaliser is under-resolved by the FFT (predicted relative error above
    ``tolerance``, default ``sqrt(eps_dtype)``, or ``D_r <= noise``) are recomputed exactly
    from the basis with their own row maximum (``O(n d)`` each), so no NaN or inf is ever returned
    and large logits (``1e4`` in float32) give correct attention.

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    v : array ``(..., n, e)``
    rank : int
        Maximum number of segments (``>= 1``).
    causal : bool
    probe, delta, scale
        As in :func:`recover_conv_basis`.
    tolerance : float, optional
        As in :func:`conv_operator`.

    Returns
    -------
    array ``(..., n, e)``
        ``O(rank (n (d + e) log n))`` time, ``O(n (e + rank))`` memory beyond the inputs,
        plus ``O(n (d + e))`` per recomputed row.
    """
    xp, q, k = _validate_qk(q, k, causal)  # recovery in the precision that q, k carry
    _, _, _, v = validate_attention_inputs(q, k, v, causal=False)  # v in the common dtype
    tol = _tolerance(xp, q.dtype, tolerance)
    op, prod = _build(xp, q, k, rank, causal, probe, delta, scale, tol, with_values=v)
    # In place: prod is our own intermediate, and a fresh (e, n) array costs its page faults.
    prod /= op._safe_normaliser()[..., None, :]
    out = xp.matrix_transpose(prod)
    pieces = [op._exact_weights(r, w) @ v[..., :w, :] for r, w in op._row_blocks()]
    return op._gather_rows(pieces, out)
