"""The exact gradient of composite attention's own forward (docs/math.rst §7, §8).

With ``P`` the softmax weights of a row over its exact keys and tokens, ``δ = rowsum(G ∘ O)``
and ``dS = P ∘ (G·v − δ)`` (``v`` a key's value or a token's ``ṽ``), the exact part is the
dense formula on the exact keys.  A token ``τ`` of query block ``I`` enters through
``L_τ = log Σ_{j∈τ} e^{s c·k_j}``, its mean key ``k̃`` and mean value ``ṽ`` (weights
``α_j = e^{s c·k_j}/Z``) and the centre ``c``.  With ``a = Σ_i dS_iτ``,
``b = s Σ_i dS_iτ (q_i − c)``, ``g = Σ_i P_iτ G_i`` and ``β_j = k_j·b + v_j·g − (k̃·b + ṽ·g)``:

* ``dq_i += s Σ_τ dS_iτ k̃_τ``;
* ``dk_j += α_j (b + s c (a + β_j))`` for each key ``j`` of ``τ``;
* ``dc = s Σ_{j∈τ} α_j k_j β_j`` (the ``s a k̃`` terms of ``L`` and of the linear logit cancel),
  spread equally over the queries whose mean ``c`` is;
* ``dV = fᵀ G``.

Every per-key sum ``Σ_τ α_j (b, g, a, κ)_τ`` over the tokens holding key ``j`` is the
adjoint of the token sums (:func:`~convbasis.composite.far_field.token_adjoint`) applied to
``(b, g, a, κ)/Z``: it runs down the key boxes' trees with factors ``≤ 1`` and subtracts
nothing, so it is as well conditioned as the forward.  ``O(N (d + e))`` per level plus
``O(nb · x · levels · (d + e))`` for the tokens' nodes.  The selection of exact blocks and
heavy columns is piecewise constant: no gradient.
"""

from __future__ import annotations

from array_api_compat import device

from .._array import index_add, single_threaded_blas
from .far_field import gather_boxes, keys_to_rows, per_token, token_adjoint, token_sums
from .layout import as_blocks, block_chunks, scatter_blocks
from .operator import build, exact_rows, heavy_rows

__all__ = ["model_gradients"]


def model_gradients(xp, q, k, v, g, *, causal, scale, **options):
    """``(dq, dk, dv)`` of ``L(composite_attention(q, k, v))`` for ``grad_out = g``.

    Arrays as validated by :func:`convbasis.attention_gradients`; ``options`` those of
    :func:`~convbasis.composite.composite_operator`.  Results have the broadcast batch shape.
    """
    with single_threaded_blas(xp):
        return _gradients(xp, q, k, v, g, causal=causal, scale=scale, **options)


def _gradients(xp, q, k, v, g, *, causal, scale, **options):
    # grad_out may broadcast q, k, v further: the gradients are per element of its batch
    batch = xp.broadcast_shapes(*(a.shape[:-2] for a in (q, k, v, g)))
    q, k, v = (xp.broadcast_to(a, (*batch, *a.shape[-2:])) for a in (q, k, v))
    op, out = build(xp, q, k, v, causal=causal, scale=scale, **_defaults(options))
    lay, s = op.layout, op.scale
    flat = [op.flatten(xp, x) for x in (q, k, v, g)]
    qf, kf, vf, gf = flat
    qb, gb = as_blocks(xp, lay, qf), as_blocks(xp, lay, gf)
    out = as_blocks(xp, lay, op.flatten(xp, out))
    delta = xp.sum(gb * out, axis=-1)[..., None]  # (B, nb, b, 1)
    dk = xp.zeros(kf.shape, dtype=kf.dtype, device=device(kf))

    # Exact keys: the dense formula on each query block's gathered keys.
    parts = []
    for lo, hi in block_chunks(lay, op.ids.shape[-1] * (q.shape[-1] + v.shape[-1])):
        keys, values = exact_rows(xp, op, kf, lo, hi), exact_rows(xp, op, vf, lo, hi)
        p = op.exact[:, lo:hi, ...]
        ds = p * (gb[:, lo:hi, ...] @ xp.matrix_transpose(values) - delta[:, lo:hi, ...])
        parts.append(s * (ds @ keys))
        dk = dk + _scatter_blocks(xp, op, lo, hi, s * (xp.matrix_transpose(ds) @ qb[:, lo:hi, ...]))
    dq = xp.reshape(xp.concat(parts, axis=1), qf.shape)
    if op.heavy is not None:  # the heavy columns: one product with every row
        bt, h = op.heavy.shape
        keys, values = heavy_rows(xp, op, kf), heavy_rows(xp, op, vf)  # (B, h, ·)
        p = xp.reshape(op.heavy_weights, (bt, lay.padded, h))
        ds = p * (gf @ xp.matrix_transpose(values) - xp.reshape(delta, (bt, lay.padded, 1)))
        dq = dq + s * (ds @ keys)
        per = s * (xp.matrix_transpose(ds) @ qf)  # (B, h, d)
        offset = xp.reshape(xp.arange(bt, device=device(per)) * lay.padded, (bt, 1))
        add = index_add(
            xp, xp.reshape(op.heavy + offset, (-1,)), xp.reshape(per, (bt * h, -1)), bt * lay.padded
        )
        dk = dk + xp.reshape(add, dk.shape)

    if lay.tokens:
        d = q.shape[-1]
        sums = token_sums(xp, lay, op.far, xp.concat([kf, vf], axis=-1))
        mass = op.token_mass[..., None]
        mean_key, mean_value = sums[..., :d] / mass, sums[..., d:] / mass
        _, centre = per_token(xp, lay, op.far, qf)
        p = op.far_weights * op.token_mass[:, :, None, :]  # (B, nb, b, T)
        ds = p * (gb @ xp.matrix_transpose(mean_value) - delta)
        dq = dq + xp.reshape(s * (ds @ mean_key), qf.shape)
        a = xp.sum(ds, axis=-2)  # (B, nb, T)
        b = s * (xp.matrix_transpose(ds) @ qb - a[..., None] * centre)
        gv = xp.matrix_transpose(p) @ gb  # (B, nb, T, e)
        kappa = xp.sum(mean_key * b, axis=-1) + xp.sum(mean_value * gv, axis=-1)
        # per unit of the token's (shifted) centre weights
        coef = xp.concat([b, gv, a[..., None], kappa[..., None]], axis=-1) / mass
        dk_far, dc = _token_backward(xp, op, kf, vf, coef)
        dk = dk + dk_far
        dq = dq + xp.reshape(_centre_to_queries(xp, op, dc), qf.shape)
    dv = op.flatten(xp, op.rmatmul(g))
    return tuple(op.unflatten(xp, x) for x in (dq, dk, dv))


def _defaults(options):
    return {"budget": None, "block": None, "sinks": 0, "heavy": None} | options


def _scatter_blocks(xp, op, lo, hi, contrib):
    """Key-row gradient ``(B, N, d)`` from ``contrib (B, c, E, d)`` of the exact block keys."""
    lay = op.layout
    blocks = xp.reshape(
        contrib, (*contrib.shape[:2], op.ids.shape[-1], lay.block, contrib.shape[-1])
    )
    out = scatter_blocks(xp, lay, op.ids[:, lo:hi, ...], blocks)
    return xp.reshape(out, (blocks.shape[0], lay.padded, -1))


def _token_backward(xp, op, kf, vf, coef):
    """Key gradients ``(B, N, d)`` and centre gradients (per level ``(B, boxes, d)``) of the
    tokens, from per-token coefficients ``[b, g, a, κ] / Z`` ``(B, nb, T, d + e + 2)``."""
    lay, far, s = op.layout, op.far, op.scale
    d, e = kf.shape[-1], vf.shape[-1]
    per_key = token_adjoint(xp, lay, far, coef)  # per level (B, boxes, slots, w, d + e + 2)
    dc = []

    def grads():
        for level, sums, box, c in zip(lay.levels, per_key, far.boxes, far.centres, strict=True):
            width = lay.block << (level - 1)
            keys, values = gather_boxes(xp, kf, box, width), gather_boxes(xp, vf, box, width)
            sb, sg = sums[..., :d], sums[..., d : d + e]
            sa, sk = sums[..., d + e], sums[..., d + e + 1]
            # Σ_τ α_j β_j over the tokens holding key j
            beta = xp.sum(keys * sb, axis=-1) + xp.sum(values * sg, axis=-1) - sk
            dc.append(s * xp.sum(xp.sum(beta[..., None] * keys, axis=-2), axis=-2))
            yield sb + s * c[:, :, None, None, :] * (sa + beta)[..., None]

    return keys_to_rows(xp, lay, far, grads()), dc


def _centre_to_queries(xp, op, dc):
    """Spread each box centre's gradient equally over the box's valid queries: ``(B, nb, b, d)``."""
    lay = op.layout
    bt, d = dc[0].shape[0], dc[0].shape[-1]
    dev = device(dc[0])
    valid = xp.astype(xp.arange(lay.padded, device=dev) < lay.n, dc[0].dtype)
    out = 0
    for level, x in zip(lay.levels, dc, strict=True):
        width = lay.block << (level - 1)
        count = lay.padded // width
        filled = xp.sum(xp.reshape(valid, (count, width)), axis=-1)
        x = x / xp.reshape(xp.where(filled > 0, filled, 1), (count, 1))
        rows = xp.broadcast_to(x[:, :, None, :], (bt, count, width, d))
        out = out + xp.reshape(rows, (bt, lay.padded, d)) * valid[:, None]
    return xp.reshape(out, (bt, lay.blocks, lay.block, d))
