"""The exact gradient of conv-basis attention's own forward (docs/math.rst §7).

The model is ``Õ = softmax(H̃) V`` with ``H̃`` the recovered logit basis: for ``j`` in segment
``i``, ``H̃[j + t, j] = c_i[t] = s Q[σ_i + t] · K[σ_i]``.  With ``f̃`` the model's weights,
``δ = rowsum(G ∘ Õ)`` and ``P̃ = f̃ ∘ (G Vᵀ) − diag(δ) f̃``,

    ∂L/∂c_i[t] = Σ_{j ∈ seg i} P̃[j + t, j]
               = e_i[t] (Σ_{j ∈ seg i} G̃[j + t]·V[j] − Σ_{j ∈ seg i} δ̃[j + t])

with ``e_i = exp(c_i − μ)``, ``G̃ = D⁻¹G`` and ``δ̃ = D⁻¹δ``: per segment one cross-correlation
of ``G̃`` with ``V`` summed over the value channels (summed in the frequency domain, so one
inverse FFT) and a window sum of ``δ̃``.  Then ``dQ[σ_i + t] += s ∂c_i[t] K[σ_i]`` and
``dK[σ_i] += s Σ_t ∂c_i[t] Q[σ_i + t]``; bidirectional attention adds the same for the basis of
``K Qᵀ`` with the roles of ``G̃`` and ``V`` exchanged.  The segment starts are piecewise
constant in ``(Q, K)``: no gradient.  Rows the safeguard recomputes exactly
(``convbasis.conv.safeguard``) contribute their exact ``P̃`` rows instead of the FFT path.

Cost ``O(k n e log n)`` plus ``O(k n d)`` — that of the forward — against ``O(k n d e log n)``
for the exact-formula route.
"""

from __future__ import annotations

import array_api_extra as xpx
from array_api_compat import device

from .._array import fast_length, upcast_half
from ._fft import _DIRECT_SEGMENT, signal, spectrum
from .attention import conv_operator

__all__ = ["model_gradients"]


def _correlation(xp, a, b, start, stop):
    """``c[t] = Σ_{u < L} Σ_e a[e, σ + u + t] b[e, σ + u]`` for ``t < n − σ`` (``L = stop − σ``).

    ``a, b (..., e, n)`` in the transposed layout; ``a`` is zero beyond ``n``.  By FFT of length
    ``>= m + L − 1`` (no wrap-around), channels summed before the inverse; short segments
    directly in ``O(L n e)``.
    """
    n = a.shape[-1]
    m, width = n - start, stop - start
    if width <= _DIRECT_SEGMENT:
        out = None
        for u in range(width):
            row = xp.sum(a[..., :, start + u :] * b[..., :, start + u : start + u + 1], axis=-2)
            if u:
                row = xpx.pad(row, [(0, 0)] * (row.ndim - 1) + [(0, u)], xp=xp)
            out = row if out is None else out + row
        return out
    size = fast_length(m + width - 1)
    product = spectrum(xp, a[..., :, start:], size) * xp.conj(
        spectrum(xp, b[..., :, start:stop], size)
    )
    return signal(xp, xp.sum(product, axis=-2), size)[..., :m]


def _window_sums(xp, total, start, stop, *, upper):
    """Per lag ``t < n − σ``: ``Σ_{j ∈ [σ, τ)} x[j + t]`` (lower; ``x`` zero beyond ``n``) or
    ``Σ_{j ∈ [σ, τ), j + t < n} x[j]`` (upper), from ``total``, the inclusive-initial prefix sum
    of ``x (..., n)``."""
    n = total.shape[-1] - 1
    t = xp.arange(n - start, device=device(total))
    if upper:
        hi = xp.clip(n - t, start, stop)
        return xp.take(total, hi, axis=-1) - total[..., start : start + 1]
    hi, lo = xp.clip(stop + t, 0, n), xp.clip(start + t, 0, n)
    return xp.take(total, hi, axis=-1) - xp.take(total, lo, axis=-1)


def _fft_lags(xp, exp_basis, a, b, dscaled, *, upper):
    """``∂L/∂c_i`` from the rows kept on the FFT path, ``(..., k, n)``."""
    n = exp_basis.n
    stops = (*exp_basis.starts[1:], n)
    total = xp.cumulative_sum(dscaled, axis=-1, include_initial=True)  # (..., n + 1)
    out = []
    for i, (start, stop) in enumerate(zip(exp_basis.starts, stops, strict=True)):
        lag = _correlation(xp, a, b, start, stop) - _window_sums(
            xp, total, start, stop, upper=upper
        )
        lag = exp_basis.vectors[..., i, : n - start] * lag
        out.append(xpx.pad(lag, [(0, 0)] * (lag.ndim - 1) + [(0, start)], xp=xp))
    return xp.stack(out, axis=-2)


def _take_flat(xp, x, index):
    """``x[..., index // w, index % w]`` for ``x (..., R, w)`` and an integer array ``index``."""
    flat = xp.reshape(x, (*x.shape[:-2], x.shape[-2] * x.shape[-1]))
    out = xp.take(flat, xp.reshape(index, (-1,)), axis=flat.ndim - 1)
    return xp.reshape(out, (*flat.shape[:-1], *index.shape))


def _exact_lags(xp, op, g, v, delta, lower_lags, upper_lags):
    """Add the exact ``P̃`` rows of the recomputed rows to ``∂L/∂c`` (lower, upper).

    Row ``r`` gives ``P̃[r, r − t]`` to ``c_{seg(r − t)}[t]`` and (bidirectional)
    ``P̃[r, r + t]`` to ``c^u_{seg_u(r)}[t]``.  The rows of a block are increasing, so the rows
    feeding segment ``i`` at lag ``t`` (``σ_i + t <= r < σ_{i+1} + t``, or ``σ_i <= r <
    σ_{i+1}``) are a contiguous run: one prefix sum over the rows and two gathers per segment
    replace a masked sum, ``O(R n + k n)`` per block.
    """
    exact = op.exact_rows
    n, dev = op.n, device(g)
    t = xp.arange(n, device=dev)
    for rows, width in exact.blocks():
        idx = xp.asarray(rows, device=dev)
        g_rows, d_rows = (xp.take(a, idx, axis=a.ndim - 2) for a in (g, delta))
        p = exact.weights(rows, width) * (g_rows @ xp.matrix_transpose(v[..., :width, :]) - d_rows)
        local = xp.arange(len(rows), device=dev)[:, None] * width
        r = idx[:, None]

        def lags(cols, ok, p=p, local=local, width=width):
            got = _take_flat(xp, p, local + xp.clip(cols, 0, width - 1))
            total = xp.where(ok, got, xp.zeros_like(got))
            return xp.cumulative_sum(total, axis=-2, include_initial=True)  # (..., R + 1, T)

        # Row r feeds the lower lags t <= r only: lags up to the block's last row, O(R r_max)
        # rather than O(R n) (the recomputed rows are mostly the first ones, whose normalisers
        # the FFT resolves worst).
        span = rows[-1] + 1
        ts = t[:span]
        prefix = lags(r - ts[None, :], r >= ts[None, :])
        stops = (*op.lower.starts[1:], n)
        lo = [xp.searchsorted(idx, start + ts) for start in op.lower.starts]
        hi = [xp.searchsorted(idx, stop + ts) for stop in stops]
        lo, hi = xp.stack(lo), xp.stack(hi)  # (k, T) run bounds per segment and lag
        runs = _take_flat(xp, prefix, hi * span + ts) - _take_flat(xp, prefix, lo * span + ts)
        lower_lags = xp.concat([lower_lags[..., :span] + runs, lower_lags[..., span:]], axis=-1)
        if op.upper is not None:
            ahead = r + t[None, :]
            prefix = lags(ahead, (ahead < n) & (t[None, :] >= 1))
            stops = (*op.upper.starts[1:], n)
            edges = xp.asarray((*op.upper.starts, n), device=dev)
            bounds = xp.searchsorted(idx, edges)
            runs = xp.take(prefix, bounds, axis=prefix.ndim - 2)
            upper_lags = upper_lags + runs[..., 1:, :] - runs[..., :-1, :]
    return lower_lags, upper_lags


def _chain(xp, lags, basis, rows_of, cols_of, scale, d_rows, d_cols):
    """``c_i[t] = s R[σ_i + t] · C[σ_i]``: add ``s ∂c_i[t] C[σ_i]`` to ``d_rows[σ_i + t]`` and
    ``s Σ_t ∂c_i[t] R[σ_i + t]`` to ``d_cols[σ_i]``."""
    n = basis.n
    for i, start in enumerate(basis.starts):
        lag = lags[..., i : i + 1, : n - start]  # (..., 1, m)
        d_rows = xpx.at(d_rows)[..., start:, :].add(
            scale * xp.matrix_transpose(lag) * cols_of[..., start : start + 1, :]
        )
        d_cols = xpx.at(d_cols)[..., start : start + 1, :].add(
            scale * (lag @ rows_of[..., start:, :])
        )
    return d_rows, d_cols


def model_gradients(xp, q, k, v, g, *, causal, scale, given=None, **options):
    """``(dq, dk, dv)`` of ``L(conv_attention(q, k, v, ...))`` through the recovered basis.

    Arrays already validated and in one dtype; ``given``: ``(q, k)`` as the caller passed
    them, whose precision the recovery uses (as :func:`conv_attention` does); ``options`` go to
    :func:`conv_operator`.  Results have the broadcast batch shape.
    ``O(k n (e log n + d))`` time, ``O(n (k + e))`` memory beyond the inputs (plus the exact
    rows, ``O(n (d + e))`` each).
    """
    op = conv_operator(*(given or (q, k)), causal=causal, scale=scale, **options)
    q, k, v, g = upcast_half(xp, q, k, v, g)  # as the operator is (its FFT needs float32)
    batch = xp.broadcast_shapes(op.shape[:-2], v.shape[:-2], g.shape[:-2])
    q, k, v, g = (xp.broadcast_to(a, (*batch, *a.shape[-2:])) for a in (q, k, v, g))
    out = op.matmul(v)
    delta = xp.sum(g * out, axis=-1, keepdims=True)  # (..., n, 1)
    # docs/math.rst §7: the FFT path sees G̃ = G/D and δ̃ = δ/D on the rows it keeps.
    weight = op.exact_rows.keep_mask(g.dtype) / op.normaliser  # (..., n)
    gt = xp.matrix_transpose(g * weight[..., None])
    vt = xp.matrix_transpose(v)
    dscaled = delta[..., 0] * weight
    lower_lags = _fft_lags(xp, op.lower_exp, gt, vt, dscaled, upper=False)
    upper_lags = None
    if op.upper is not None:
        upper_lags = _fft_lags(xp, op.upper_exp, vt, gt, dscaled, upper=True)
    if op.recomputed_rows:
        lower_lags, upper_lags = _exact_lags(xp, op, g, v, delta, lower_lags, upper_lags)
    dq, dk = xp.zeros_like(q), xp.zeros_like(k)
    dq, dk = _chain(xp, lower_lags, op.lower, q, k, scale, dq, dk)
    if upper_lags is not None:
        dk, dq = _chain(xp, upper_lags, op.upper, k, q, scale, dk, dq)
    return dq, dk, op.rmatmul(g)
