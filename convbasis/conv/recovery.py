"""Recovery of the k-conv basis of the logits ``s · M ∘ Q Kᵀ`` from ``Q, K`` (docs/math.rst §4)."""

from __future__ import annotations

import math

import array_api_extra as xpx
from array_api_compat import device

from .._array import (
    check_integer,
    resolve_scale,
    validate_qk,
)
from .._capabilities import check_eager
from .basis import ConvBasis

__all__ = ["recover_conv_basis"]


def _recovery_options(xp, q, k, rank, probe, delta, eps, scale):
    n, d = q.shape[-2], q.shape[-1]
    rank = check_integer(rank, "rank")
    probe = check_integer(probe, "probe", high=n, what=f"n = {n}")
    eps = float(eps)
    if not eps >= 0.0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    scale = resolve_scale(scale, d)
    if delta is None:
        # Two computed logits that agree in exact arithmetic differ by <= d u |s| ‖q‖‖k‖ each
        # (u = eps/2); δ covers that round-off on T entries, on top of the 4 T ε of
        # docs/math.rst §4.
        unit = float(xp.finfo(q.dtype).eps)
        qn = _largest(xp, xp.vecdot(q, q)) ** 0.5
        kn = _largest(xp, xp.vecdot(k, k)) ** 0.5
        delta = 4 * probe * eps + 4 * probe * d * unit * abs(scale) * qn * kn
        delta = max(delta, float(xp.finfo(q.dtype).smallest_normal))
    else:
        delta = float(delta)
        if not delta > 4 * probe * eps:
            raise ValueError(
                f"delta must exceed 4 * probe * eps = {4 * probe * eps} (docs/math.rst §4), "
                f"got {delta}"
            )
    return rank, probe, delta, eps, scale


def _largest(xp, x):
    """``max(x)`` as a float; 0 for an empty batch (no column of it differs or needs room)."""
    return float(xp.max(x)) if math.prod(x.shape) else 0.0


def _recover(xp, q, k, scale, rank, probe, delta, eps):
    """Binary-search recovery (docs/math.rst §4) of the basis of ``s · M ∘ Q Kᵀ``: starts and
    vectors."""
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
        return _largest(xp, gap) >= threshold

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
    vectors = xp.stack(vectors, axis=-2)
    # NaN/inf inputs propagate (docs: conventions).  The basis sees K only at the segment starts
    # and Q through shifted rows, so a non-finite entry elsewhere would vanish from the result:
    # the whole batch element's basis becomes NaN instead.
    finite = xp.all(xp.isfinite(q), axis=(-2, -1)) & xp.all(xp.isfinite(k), axis=(-2, -1))
    if not bool(xp.all(finite)):
        nan = xp.asarray(xp.nan, dtype=vectors.dtype, device=device(vectors))
        vectors = xp.where(finite[..., None, None], vectors, nan)
    return tuple(starts), vectors


def recover_conv_basis(q, k, /, *, rank, probe=1, delta=None, eps=0.0, scale=None, causal=True):
    """Recover the k-conv basis of the logits ``s · M ∘ Q Kᵀ`` without forming them.

    docs/math.rst §4 ("recover k-conv"): ``c_0`` is the first column; each further start ``σ_i`` is
    the smallest ``j`` in ``(σ_{i-1}, n - T]`` whose first ``T`` aligned entries differ from
    the current ``c_{i-1}[:T]`` by ``‖·‖₁ >= δ - 2Tε``, found by binary search; ``c_i`` is
    column ``σ_i``.

    **Assumption.** The search is exact when the logits have a k-conv basis that is
    *non-degenerate*: ``‖b_i[:T]‖₁ >= δ``, ``m_{k-1} >= T``, ``δ > 4Tε``, and every column after
    a boundary differs from the previous segment's prefix (so the predicate is monotone).
    Then it returns the true starts and vectors.  On general inputs it returns a basis with
    at most ``rank`` segments whose starts are *a* change point of the predicate, not the
    best one, and whose vectors are the logit columns at those starts: the lower triangle is
    reproduced exactly on the columns ``σ_i`` and nowhere else by design.
    :func:`~convbasis.conv.fit_conv_basis` is the dense reference for the best
    ``rank``-segment approximation.

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
    check_eager("recover_conv_basis", q, k)
    xp, q, k = validate_qk(q, k, causal=causal, same_length="the k-conv basis")
    rank, probe, delta, eps, scale = _recovery_options(xp, q, k, rank, probe, delta, eps, scale)
    n = q.shape[-2]
    lower = ConvBasis(*_recover(xp, q, k, scale, rank, probe, delta, eps), n)
    if causal:
        return lower
    upper = ConvBasis(*_recover(xp, k, q, scale, rank, probe, delta, eps), n)
    return lower, upper
