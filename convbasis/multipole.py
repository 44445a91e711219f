"""Fast Multipole Attention: hierarchical ``O(n log n)`` attention (MATH.md §6, arXiv 2310.11960).

Every query attends its own block and the two neighbouring blocks (``block`` keys each) at full
resolution, and the rest of the sequence through the FMM interaction lists of
``L = log2(N / block) − 1`` coarser levels, where keys and values are pooled into ``basis``
tokens per box.  One softmax per query runs over all levels; a coarse token is weighted by the
number of keys it stands for, so FMA approximates exact softmax attention and is exact when
keys and values are constant inside every pooled chunk.

Definitions (``m = block``, ``p = basis``, ``N`` the padded length, ``s`` the scale):

* Level ``ℓ ≥ 1`` uses boxes of ``w_ℓ = m·2^{ℓ−1}`` keys, each pooled into ``p`` tokens of
  ``c_ℓ = w_ℓ / p`` consecutive keys.  Token ``r`` covers keys ``r c_ℓ … (r+1) c_ℓ − 1``;
  ``cnt_r`` of them are real (not padding).  With kernel ``κ`` (``κ_t = 1`` for ``"mean"``,
  the supplied weights otherwise) and gain ``g_r = 1/cnt_r`` (mean) or ``c_ℓ/cnt_r``
  (supplied), the token's key and value are ``k̄_r = g_r Σ_t κ_t k_{r c_ℓ + t}`` and
  ``v̄_r = g_r Σ_t κ_t v_{r c_ℓ + t}`` (padding rows are zero).  Its unnormalised weight for
  query ``i`` is ``cnt_r · exp(s q_i·k̄_r − M_i)``; ``M_i`` is the query's maximum over all
  levels, the normaliser ``Z_i`` sums the weights of every level.
* The equivalent ``n × n`` matrix (:func:`convbasis.reference.multipole_weights`) is
  ``f = A / Z`` with ``A[i, j] = exp(s q_i·k_j − M_i)`` on the near field and
  ``A[i, j] = ρ_j exp(s q_i·k̄_r − M_i)`` for a key ``j = r c_ℓ + t`` seen through level
  ``ℓ``, ``ρ_j = 1`` (mean) or ``c_ℓ κ_t`` (supplied).  With ``"mean"`` the rows of ``f`` sum
  to one.

Padding: ``n`` is padded with zero rows to ``N = block · 2^⌈log2⌈n/block⌉⌉``.  Padded keys get
zero weight (masked in the near field, left out of ``cnt_r`` and of the pooled means in the far
field) and padded query rows are dropped, so the result is the FMA of the unpadded sequence.
``n < block`` pads to a single block, which is exact attention.

Cost ``O(N (3m + 4pL)(d + e))`` time (causal: ``2m + 2pL``) and ``O(N (m + d + e))`` memory;
no ``n × n`` array is formed except by :func:`multipole_weights` and
:meth:`MultipoleAttentionOperator.to_dense`.  The implementation keeps a running maximum over
the levels (as FlashAttention does over key blocks), which gives the same normalised result as
subtracting the maximum over all levels at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from array_api_compat import device

from ._array import (
    as_floating,
    check_integer,
    check_last_dim,
    check_rows,
    namespace,
    resolve_scale,
    sum_to_shape,
)
from .operators import check_operands, hadamard_product

__all__ = [
    "MultipoleAttentionOperator",
    "MultipoleGradients",
    "kernel_shapes",
    "multipole_attention",
    "multipole_attention_backward",
    "multipole_operator",
]


@dataclass(frozen=True)
class _Plan:
    """Static geometry: true length ``n``, padded length ``N``, block ``m``, basis ``p``."""

    n: int
    padded: int
    block: int
    basis: int
    causal: bool

    @property
    def levels(self):
        # MATH §6: L = log2(N/m) − 1 far-field levels (none when N/m <= 2)
        return max((self.padded // self.block).bit_length() - 2, 0)

    def box(self, level):
        return self.block << (level - 1)

    def chunk(self, level):
        return self.box(level) // self.basis


def _plan(n, block, basis, causal):
    block = check_integer(block, "block")
    if block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    basis = check_integer(basis, "basis")
    if block % basis:
        raise ValueError(
            f"basis must divide the box size block={block} (every box is a multiple of "
            f"block), got basis={basis}"
        )
    blocks = -(-n // block)
    return _Plan(n, block << (blocks - 1).bit_length(), block, basis, bool(causal))


def kernel_shapes(n, /, *, block=64, basis=4):
    """Shapes of the ``downsample`` kernels for length ``n``: ``((c_1,), …, (c_L,))``.

    ``c_ℓ = block · 2^{ℓ−1} / basis`` for the ``L = log2(N/block) − 1`` far-field levels of
    the padded length ``N``.
    """
    plan = _plan(check_integer(n, "n"), block, basis, True)
    return tuple((plan.chunk(level),) for level in range(1, plan.levels + 1))


def _prepare(arrays, names, *, block, basis, causal, downsample):
    """Validate; return ``(xp, plan, arrays, kernels)`` in one floating dtype.

    ``kernels`` is ``None`` for ``"mean"`` or a tuple of ``(c_ℓ,)`` arrays.
    """
    supplied = not isinstance(downsample, str)
    if isinstance(downsample, str) and downsample != "mean":
        raise ValueError(
            f"downsample must be 'mean' or a tuple of 1-D kernels (one per level), "
            f"got {downsample!r}"
        )
    if supplied and not isinstance(downsample, (tuple, list)):
        raise ValueError(
            "downsample must be 'mean' or a tuple of 1-D kernels (one per level), "
            f"got {type(downsample).__name__}"
        )
    kernels = tuple(downsample) if supplied else ()
    xp = namespace(*arrays, *kernels)
    for a, name in zip(arrays, names, strict=True):
        check_rows(a, name)
    n, d = arrays[0].shape[-2:]
    for a, name in zip(arrays[1:], names[1:], strict=True):
        if a.shape[-2] != n:
            raise ValueError(
                f"{name} must have as many rows as q ({n}); multipole attention needs queries "
                f"and keys on one grid, got shape {a.shape}"
            )
    check_last_dim(arrays[1], names[1], d, "the head dimension of q")
    if len(arrays) == 4:
        check_last_dim(arrays[3], names[3], arrays[2].shape[-1], "the value dimension of v")
    try:
        xp.broadcast_shapes(*(a.shape[:-2] for a in arrays))
    except ValueError:
        raise ValueError(
            "leading (batch/head) axes must broadcast, got shapes "
            + ", ".join(f"{nm} {a.shape}" for a, nm in zip(arrays, names, strict=True))
        ) from None
    plan = _plan(n, block, basis, causal)
    if supplied:
        expected = [(plan.chunk(level),) for level in range(1, plan.levels + 1)]
        if len(kernels) != plan.levels:
            raise ValueError(
                f"downsample must hold one kernel per far-field level: {plan.levels} arrays "
                f"of shapes {expected} for n={n} (padded to {plan.padded}), got {len(kernels)}"
            )
        for i, (w, shape) in enumerate(zip(kernels, expected, strict=True)):
            if not xp.isdtype(w.dtype, "real floating"):
                raise TypeError(f"downsample[{i}] must have a real floating dtype, got {w.dtype}")
            if tuple(w.shape) != shape:
                raise ValueError(
                    f"downsample[{i}] (level {i + 1}) must have shape {shape} (box size "
                    f"{plan.box(i + 1)} / basis {plan.basis}), got {tuple(w.shape)}"
                )
    names_all = (*names, *(f"downsample[{i}]" for i in range(len(kernels))))
    converted = as_floating(xp, (*arrays, *kernels), names_all)
    return xp, plan, converted[: len(arrays)], (converted[len(arrays) :] if supplied else None)


def _broadcast_and_pad(xp, plan, arrays):
    """Broadcast leading axes to one batch shape and zero-pad the sequence axis to ``N``."""
    batch = xp.broadcast_shapes(*(a.shape[:-2] for a in arrays))
    out = []
    for a in arrays:
        a = xp.broadcast_to(a, (*batch, *a.shape[-2:]))
        if plan.padded > plan.n:
            pad = xp.zeros(
                (*batch, plan.padded - plan.n, a.shape[-1]), dtype=a.dtype, device=device(a)
            )
            a = xp.concat([a, pad], axis=-2)
        out.append(a)
    return out


def _shift(xp, x, step, axis):
    """``out[g] = x[g − step]`` along ``axis`` (``step = ±1``), zeros shifted in."""
    axis %= x.ndim
    lead = (slice(None),) * axis
    zeros = xp.zeros_like(x[(*lead, slice(0, 1), ...)])
    if step == 1:
        return xp.concat([zeros, x[(*lead, slice(0, x.shape[axis] - 1), ...)]], axis=axis)
    return xp.concat([x[(*lead, slice(1, None), ...)], zeros], axis=axis)


class _Level:
    """One level: ``G`` groups of ``C·R`` queries that all see the same ``T`` tokens.

    Level 0: groups are blocks (``C = 1``, ``R = m``), tokens the blocks ``i−1, i, i+1``.
    Level ``ℓ ≥ 1``: groups are *pairs* of sibling boxes (``C = 2``, ``R = w_ℓ``); both
    children see the tokens of the neighbouring pairs and a static ``(C, T)`` mask keeps each
    child's FMM interaction list (MATH §6: even ``i`` → ``i−2, i+2, i+3``; odd ``i`` →
    ``i−3, i−2, i+2``; in pair terms: even child → prev pair's first box, next pair's two
    boxes; odd child → prev pair's two boxes, next pair's second box).
    """

    def __init__(self, xp, plan, level, kernel, dtype, dev):
        self.xp, self.plan, self.level, self.kernel = xp, plan, level, kernel
        n, big, m, p = plan.n, plan.padded, plan.block, plan.basis
        if level == 0:
            self.groups, self.children, self.rows = big // m, 1, m
            slots = 2 if plan.causal else 3
            self.tokens = slots * m
            # key index of token t of block b: (b − 1)m + t; padded or missing keys are masked
            key = (xp.arange(big // m, device=dev)[:, None] - 1) * m + xp.arange(
                slots * m, device=dev
            )[None, :]
            masks = [((key >= 0) & (key < n))[:, None, None, :]]
            if plan.causal:
                r = xp.arange(m, device=dev)[:, None]
                t = xp.arange(2 * m, device=dev)[None, :]
                masks.append(((t < m) | (t - m <= r))[None, None, :, :])
            self.masks, self.mult = masks, None
            return
        w, c = plan.box(level), plan.chunk(level)
        self.groups, self.children, self.rows = big // (2 * w), 2, w
        self.chunk = c
        self.tokens = (2 if plan.causal else 4) * p
        r = xp.arange(big // c, device=dev)
        count = xp.clip(n - r * c, 0, c)  # real keys per pooled token
        count = xp.astype(count, dtype)
        one = xp.ones_like(count)
        inv = one / xp.maximum(count, one)
        self.gain = inv if kernel is None else c * inv
        pairs = xp.reshape(count, (self.groups, 2 * p))
        parts = [_shift(xp, pairs, 1, 0)]
        if not plan.causal:
            parts.append(_shift(xp, pairs, -1, 0))
        seen = xp.concat(parts, axis=-1)  # (G, T): count of each visible token
        slot = xp.arange(self.tokens, device=dev) // p  # prev0, prev1, next0, next1
        even = slot != 1
        odd = slot != 2
        child = xp.astype(xp.stack([even, odd]), dtype)  # (2, T)
        self.mult = seen[:, None, None, :] * child[None, :, None, :]  # (G, 2, 1, T)
        self.masks = [self.mult > 0]

    # -- the token map x (..., N, e) -> (..., G, T, e) and its adjoint -------------------------

    def _pool(self, x):
        xp, c = self.xp, self.chunk
        xr = xp.reshape(x, (*x.shape[:-2], x.shape[-2] // c, c, x.shape[-1]))
        if self.kernel is None:
            pooled = xp.sum(xr, axis=-2)
        else:
            pooled = xp.sum(xr * self.kernel[:, None], axis=-2)
        return pooled * self.gain[:, None]

    def gather(self, x):
        xp = self.xp
        if self.level == 0:
            xb = xp.reshape(x, (*x.shape[:-2], self.groups, self.rows, x.shape[-1]))
            parts = [_shift(xp, xb, 1, -3), xb]
            if not self.plan.causal:
                parts.append(_shift(xp, xb, -1, -3))
            return xp.concat(parts, axis=-2)
        pooled = self._pool(x)
        e, p2 = x.shape[-1], 2 * self.plan.basis
        pairs = xp.reshape(pooled, (*x.shape[:-2], self.groups, p2, e))
        parts = [_shift(xp, pairs, 1, -3)]
        if not self.plan.causal:
            parts.append(_shift(xp, pairs, -1, -3))
        return xp.concat(parts, axis=-2) if len(parts) > 1 else parts[0]

    def _token_grad(self, dt):
        """Adjoint of the shift/concat part of :meth:`gather` (before pooling)."""
        xp = self.xp
        width = self.rows if self.level == 0 else 2 * self.plan.basis
        parts = [dt[..., i * width : (i + 1) * width, :] for i in range(self.tokens // width)]
        back = _shift(xp, parts[0], -1, -3)  # tokens of the previous group came from g − 1
        rest = parts[1:]
        if self.level == 0:
            back = back + rest[0]
            rest = rest[1:]
        for part in rest:  # tokens of the next group came from g + 1
            back = back + _shift(xp, part, 1, -3)
        return back

    def scatter(self, dt):
        """Adjoint of :meth:`gather`: ``(..., G, T, e)`` → ``(..., N, e)``."""
        xp = self.xp
        back = self._token_grad(dt)
        e = dt.shape[-1]
        if self.level == 0:
            return xp.reshape(back, (*dt.shape[:-3], self.plan.padded, e))
        c = self.chunk
        pooled = xp.reshape(back, (*dt.shape[:-3], self.plan.padded // c, e))
        h = (pooled * self.gain[:, None])[..., None, :]
        spread = h * (
            xp.ones((c, 1), dtype=h.dtype, device=device(h))
            if self.kernel is None
            else self.kernel[:, None]
        )
        return xp.reshape(spread, (*dt.shape[:-3], self.plan.padded, e))

    def kernel_grad(self, dt, x):
        """``∂⟨dt, gather(x)⟩/∂κ`` summed over every leading axis: shape ``(c_ℓ,)``."""
        xp, c = self.xp, self.chunk
        back = self._token_grad(dt)
        h = xp.reshape(back, (*dt.shape[:-3], self.plan.padded // c, dt.shape[-1]))
        h = h * self.gain[:, None]
        xr = xp.reshape(x, (*x.shape[:-2], x.shape[-2] // c, c, x.shape[-1]))
        per = xr @ h[..., None]  # (..., N/c, c, 1)
        return xp.sum(xp.reshape(per, (-1, c)), axis=0)

    # -- scores ------------------------------------------------------------------------------

    def split(self, x):
        """``(..., N, e)`` → ``(..., G, C·R, e)``."""
        return self.xp.reshape(x, (*x.shape[:-2], self.groups, -1, x.shape[-1]))

    def logits(self, q, keys, scale):
        """Masked logits ``(..., G, C, R, T)`` (``-inf`` where a token is not seen)."""
        xp = self.xp
        s = scale * (self.split(q) @ xp.matrix_transpose(keys))
        s = xp.reshape(s, (*s.shape[:-2], self.children, self.rows, self.tokens))
        minus_inf = xp.asarray(-xp.inf, dtype=s.dtype, device=device(s))
        for mask in self.masks:
            s = xp.where(mask, s, minus_inf)
        return s

    def weights(self, s, shift):
        """``mult · exp(s − shift)`` with ``shift (..., N)`` (finite or ``+inf``)."""
        xp = self.xp
        shift = xp.reshape(shift, (*shift.shape[:-1], self.groups, self.children, self.rows, 1))
        w = xp.exp(s - shift)
        return w if self.mult is None else w * self.mult

    def flat(self, w):
        """``(..., G, C, R, T)`` → ``(..., G, C·R, T)``."""
        return self.xp.reshape(w, (*w.shape[:-4], self.groups, -1, self.tokens))


def _levels(xp, plan, kernels, dtype, dev):
    kernels = (None,) * plan.levels if kernels is None else kernels
    yield _Level(xp, plan, 0, None, dtype, dev)
    for level in range(1, plan.levels + 1):
        yield _Level(xp, plan, level, kernels[level - 1], dtype, dev)


def _forward(xp, plan, kernels, q, k, v, scale, *, with_output=True):
    """One pass over the levels with a running maximum: ``(out (..., N, e), lse (..., N))``.

    ``lse`` is ``+inf`` on rows that see no key (only padding rows), so that
    ``exp(s − lse) = 0`` there.
    """
    run_max = total = acc = None
    dev = device(q)
    zero = xp.asarray(0.0, dtype=q.dtype, device=dev)
    for lev in _levels(xp, plan, kernels, q.dtype, dev):
        s = lev.logits(q, lev.gather(k), scale)
        level_max = xp.reshape(xp.max(s, axis=-1), (*q.shape[:-2], plan.padded))
        new_max = level_max if run_max is None else xp.maximum(run_max, level_max)
        ref = xp.where(xp.isfinite(new_max), new_max, zero)  # MATH §0: subtract the row max
        w = lev.weights(s, ref)
        part = xp.reshape(xp.sum(w, axis=-1), ref.shape)
        if with_output:
            o = lev.flat(w) @ lev.gather(v)
            o = xp.reshape(o, (*q.shape[:-2], plan.padded, v.shape[-1]))
        if run_max is None:
            total = part
            acc = o if with_output else None
        else:
            alpha = xp.exp(run_max - ref)  # rescale the earlier levels to the new maximum
            total = total * alpha + part
            acc = acc * alpha[..., None] + o if with_output else None
        run_max = new_max
    empty = total == 0
    one = xp.ones_like(total)
    lse = xp.where(
        empty,
        xp.asarray(xp.inf, dtype=q.dtype, device=dev),
        ref + xp.log(xp.where(empty, one, total)),
    )
    out = acc / xp.where(empty, one, total)[..., None] if with_output else None
    return out, lse


_PARAMS_DOC = """
    block : int
        Block size ``m`` (a power of two): near-field boxes and the finest far-field box.
    basis : int
        Tokens ``p`` per far-field box; must divide ``block``.
    causal : bool
        Keep only keys ``j <= i`` (near field: block ``i-1`` and the causal part of ``i``;
        far field: interaction boxes before the query's box).
    downsample : ``"mean"`` or tuple of arrays
        ``"mean"``: average pooling.  Otherwise one kernel per far-field level
        ``l = 1 ... L``, array ``l-1`` of shape ``(c_l,) = (block * 2**(l-1) // basis,)``: the
        weights of a strided filter with kernel = stride = ``c_l``, shared by keys and values (see
        :func:`kernel_shapes`).  ``L`` depends on the padded length.
    scale : float, optional
        Logit scale ``s``; default ``1/sqrt(d)``."""


def multipole_attention(
    q, k, v, /, *, block=64, basis=4, causal=True, downsample="mean", scale=None
):
    """Fast Multipole Attention ``O = f V`` (MATH.md §6).

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    v : array ``(..., n, e)``
        Leading (batch/head) axes broadcast.  Any ``n >= 1``: padded as described in the
        module docstring, padded keys get zero weight and padded query rows are dropped.
    {params}

    Returns
    -------
    array ``(..., n, e)``
        ``O(n (m + p log(n/m)) (d + e))`` time, ``O(n (m + d + e))`` memory.
    """
    xp, plan, (q, k, v), kernels = _prepare(
        (q, k, v),
        ("q", "k", "v"),
        block=block,
        basis=basis,
        causal=causal,
        downsample=downsample,
    )
    scale = resolve_scale(scale, q.shape[-1])
    qp, kp, vp = _broadcast_and_pad(xp, plan, (q, k, v))
    out, _ = _forward(xp, plan, kernels, qp, kp, vp, scale)
    return out[..., : plan.n, :]


@dataclass(frozen=True)
class MultipoleGradients:
    """Gradients of ``L(O)`` for ``O = multipole_attention(q, k, v, ...)``.

    Attributes
    ----------
    dq, dk, dv : arrays shaped like ``q``, ``k``, ``v``
        Summed over the axes each input was broadcast along.
    ddownsample : tuple of ``(c_ℓ,)`` arrays, or ``None``
        Gradients of the supplied ``downsample`` kernels (``None`` for ``"mean"``).
    """

    dq: Any
    dk: Any
    dv: Any
    ddownsample: tuple[Any, ...] | None


def multipole_attention_backward(
    q, k, v, grad_out, /, *, block=64, basis=4, causal=True, downsample="mean", scale=None
):
    """Gradients of FMA with respect to ``q``, ``k``, ``v`` and the downsampling kernels.

    With ``P`` the normalised weights of every (query, token) pair of every level,
    ``δ = rowsum(G ∘ O)``: ``dS = P ∘ (G uᵀ − δ)``, ``dq = s dS κ``, token gradients
    ``dκ = s dSᵀ Q``, ``du = Pᵀ G`` (MATH.md §3 applied to the token list), mapped back to
    keys and values through the adjoint of the pooling and interaction-list gather.

    Parameters
    ----------
    q, k, v : arrays ``(..., n, d)``, ``(..., n, d)``, ``(..., n, e)``
    grad_out : array ``(..., n, e)``
        ``∂L/∂O``.
    {params}

    Returns
    -------
    MultipoleGradients
        Same cost as :func:`multipole_attention` (about three times the work); no ``n × n``
        array.
    """
    xp, plan, (q, k, v, g), kernels = _prepare(
        (q, k, v, grad_out),
        ("q", "k", "v", "grad_out"),
        block=block,
        basis=basis,
        causal=causal,
        downsample=downsample,
    )
    scale = resolve_scale(scale, q.shape[-1])
    qp, kp, vp, gp = _broadcast_and_pad(xp, plan, (q, k, v, g))
    out, lse = _forward(xp, plan, kernels, qp, kp, vp, scale)
    delta = xp.sum(gp * out, axis=-1)  # MATH §3: δ = rowsum(G ∘ O)
    dq = xp.zeros_like(qp)
    dk = xp.zeros_like(kp)
    dv = xp.zeros_like(vp)
    dkernels = []
    for lev in _levels(xp, plan, kernels, qp.dtype, device(qp)):
        keys, values = lev.gather(kp), lev.gather(vp)
        w = lev.weights(lev.logits(qp, keys, scale), lse)
        g3 = lev.split(gp)
        dp = xp.reshape(g3 @ xp.matrix_transpose(values), w.shape)
        ds = lev.flat(w * (dp - xp.reshape(delta, (*w.shape[:-1], 1))))
        dq = dq + scale * xp.reshape(ds @ keys, qp.shape)
        dkeys = scale * (xp.matrix_transpose(ds) @ lev.split(qp))
        dvalues = xp.matrix_transpose(lev.flat(w)) @ g3
        dk = dk + lev.scatter(dkeys)
        dv = dv + lev.scatter(dvalues)
        if lev.level and kernels is not None:
            dkernels.append(lev.kernel_grad(dkeys, kp) + lev.kernel_grad(dvalues, vp))
    n = plan.n
    return MultipoleGradients(
        dq=sum_to_shape(xp, dq[..., :n, :], q.shape),
        dk=sum_to_shape(xp, dk[..., :n, :], k.shape),
        dv=sum_to_shape(xp, dv[..., :n, :], v.shape),
        ddownsample=None if kernels is None else tuple(dkernels),
    )


@dataclass(frozen=True)
class MultipoleAttentionOperator:
    """The normalised FMA weight matrix ``f`` (``(..., n, n)``) as an operator.

    Build with :func:`multipole_operator`.  ``matmul(z) = f z`` and ``rmatmul(z) = fᵀ z`` cost
    ``O(n (m + p log(n/m)) e)`` for ``z (..., n, e)``, the Hadamard products with a rank-``s``
    ``G Yᵀ`` ``s`` times that; ``to_dense()`` is ``O(n²)``, for tests.

    Attributes
    ----------
    q, k : arrays ``(..., N, d)``
        Broadcast and zero-padded to the padded length ``N``.
    lse : array ``(..., N)``
        Log of each row's normaliser (``+inf`` on padding rows that see no key).
    n, block, basis, causal, scale, downsample
        The problem (``downsample`` is ``None`` for ``"mean"``).
    """

    q: Any
    k: Any
    lse: Any
    n: int
    block: int
    basis: int
    causal: bool
    scale: float
    downsample: tuple[Any, ...] | None

    @property
    def shape(self):
        """``(*batch, n, n)``, the shape of :meth:`to_dense`."""
        return (*self.q.shape[:-2], self.n, self.n)

    def _setup(self, z, name):
        xp, (z,) = check_operands(self.q, {name: z}, rows={name: self.n})
        plan = _plan(self.n, self.block, self.basis, self.causal)
        try:
            xp.broadcast_shapes(self.q.shape[:-2], z.shape[:-2])
        except ValueError:
            raise ValueError(
                f"{name} leading axes must broadcast against {self.q.shape[:-2]}, "
                f"got shape {z.shape}"
            ) from None
        (zp,) = _broadcast_and_pad(xp, plan, (z,))
        q, k, lse = self.q, self.k, self.lse
        if q.dtype != zp.dtype:
            dtype = xp.result_type(q, zp)
            q, k, lse, zp = (xp.astype(a, dtype) for a in (q, k, lse, zp))
        return xp, plan, q, k, lse, zp

    def _terms(self, xp, plan, q, k, lse):
        for lev in _levels(xp, plan, self.downsample, q.dtype, device(q)):
            yield lev, lev.weights(lev.logits(q, lev.gather(k), self.scale), lse)

    def matmul(self, z, /):
        """``f z`` for ``z (..., n, e)``."""
        xp, plan, q, k, lse, zp = self._setup(z, "z")
        out = 0
        for lev, w in self._terms(xp, plan, q, k, lse):
            o = lev.flat(w) @ lev.gather(zp)
            out = out + xp.reshape(o, (*o.shape[:-3], plan.padded, zp.shape[-1]))
        return out[..., : self.n, :]

    def rmatmul(self, z, /):
        """``fᵀ z`` for ``z (..., n, e)``."""
        xp, plan, q, k, lse, zp = self._setup(z, "z")
        out = 0
        for lev, w in self._terms(xp, plan, q, k, lse):
            out = out + lev.scatter(xp.matrix_transpose(lev.flat(w)) @ lev.split(zp))
        return out[..., : self.n, :]

    def _hadamard_operands(self, g, y, z):
        rows = dict.fromkeys("gyz", self.n)
        xp, arrays = check_operands(self.q, {"g": g, "y": y, "z": z}, rows=rows, hadamard=True)
        return (xp, *arrays)

    def hadamard_matmul(self, g, y, z, /):
        """``(f ∘ G Yᵀ) z = Σ_l diag(G_l) f diag(Y_l) z``; ``g, y (..., n, s)``, ``z (..., n, e)``.

        Products of ``f`` with ``s e`` columns in all (docs/math.rst §3).
        """
        xp, g, y, z = self._hadamard_operands(g, y, z)
        return hadamard_product(xp, self.matmul, g, y, z)

    def hadamard_rmatmul(self, g, y, z, /):
        """``(f ∘ G Yᵀ)ᵀ z = Σ_l diag(Y_l) fᵀ diag(G_l) z`` (as :meth:`hadamard_matmul`)."""
        xp, g, y, z = self._hadamard_operands(g, y, z)
        return hadamard_product(xp, self.rmatmul, y, g, z)

    def to_dense(self):
        """The ``(..., n, n)`` matrix ``f`` (``matmul`` of the identity; ``O(n²)``)."""
        xp = namespace(self.q)
        return self.matmul(xp.eye(self.n, dtype=self.q.dtype, device=device(self.q)))


def multipole_operator(q, k, /, *, block=64, basis=4, causal=True, downsample="mean", scale=None):
    """Build the FMA weight operator ``f`` for queries ``q`` and keys ``k`` ``(..., n, d)``.

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    {params}

    Returns
    -------
    MultipoleAttentionOperator
        Construction computes the row normalisers: ``O(n (m + p log(n/m)) d)``.
    """
    xp, plan, (q, k), kernels = _prepare(
        (q, k), ("q", "k"), block=block, basis=basis, causal=causal, downsample=downsample
    )
    scale = resolve_scale(scale, q.shape[-1])
    qp, kp = _broadcast_and_pad(xp, plan, (q, k))
    _, lse = _forward(xp, plan, kernels, qp, kp, None, scale, with_output=False)
    return MultipoleAttentionOperator(
        q=qp,
        k=kp,
        lse=lse,
        n=plan.n,
        block=plan.block,
        basis=plan.basis,
        causal=plan.causal,
        scale=scale,
        downsample=kernels,
    )


for _func in (
    multipole_attention,
    multipole_attention_backward,
    multipole_operator,
):
    if _func.__doc__:  # None under python -OO
        _func.__doc__ = _func.__doc__.replace("{params}", _PARAMS_DOC.strip("\n").lstrip())
del _func
