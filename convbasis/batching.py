"""How a batch of attention problems is laid out: grouped-query heads and variable lengths.

Every attention function takes ``(..., heads, n, d)`` arrays (docs: "Conventions").  Two
layouts beyond plain broadcasting are handled here, once, around any attention call:

* **Grouped-query attention** (GQA): ``k`` and ``v`` with ``h_kv`` heads and ``q`` with
  ``h_q = G · h_kv``; query head ``i`` attends with key/value head ``i // G``, as in
  ``scaled_dot_product_attention(enable_gqa=True)``.  The head axis is split into
  ``(h_kv, G)`` and the key/value heads get a broadcast axis of length one, so no key or value
  is copied and every method sees ordinary broadcasting; gradients of ``k`` and ``v`` come back
  summed over each group by the methods' own broadcasting rule.
* **Variable lengths** (``lengths=``): sequence ``b`` of the batch has ``lengths[b]`` valid
  tokens.  The sequences of each length are called together, truncated to it, and the output
  rows (and gradient rows) beyond a length are zero: keys beyond a length never reach a valid
  row, whatever their values, for every method.  The cost is one call per distinct length.
  A method that makes one choice per call (lowrank's polynomial, conv's segment starts) makes
  it for the sequences of one length together, as for the entries of any batch.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace

import array_api_compat
from array_api_compat import device

from ._array import check_integer, namespace
from ._validation import broadcast_shapes

__all__ = ["LAYOUT_HINT", "batched_call", "check_lengths", "check_lengths_options", "group_heads"]

LAYOUT_HINT = (
    "convbasis takes (..., heads, n, d) arrays, as torch's scaled_dot_product_attention does; "
    "for (batch, n, heads, d) tensors (the flash-attn layout) pass x.transpose(1, 2)"
)


def _heads(arrays):
    """The head counts (axis ``-3``) of ``arrays`` other than one, as a set."""
    return {int(a.shape[-3]) for a in arrays if a.ndim >= 3} - {1}


def group_heads(queries, keys):
    """``G``, the query heads per key/value head, or ``1`` when the heads broadcast plainly.

    ``queries`` are the arrays with the query rows (``q``, ``grad_out``), ``keys`` those with
    the key rows (``k``, ``v``).
    """
    q_heads, kv_heads = _heads(queries), _heads(keys)
    if len(q_heads) > 1 or len(kv_heads) > 1 or not q_heads or not kv_heads:
        return 1  # plain broadcasting, or shapes that the method's own check will name
    (hq,), (hkv,) = q_heads, kv_heads
    if hq == hkv or hkv > hq:
        return 1  # more key heads than query heads: the method's broadcast check names them
    if hq % hkv:
        raise ValueError(
            "leading (batch/head) axes must broadcast, or the key/value heads must divide the "
            f"query heads (grouped-query attention): q has {hq} heads and k, v have {hkv} "
            f"(axis -3). {LAYOUT_HINT}"
        )
    return hq // hkv


def _split_heads(xp, a, groups, *, query):
    """``(..., h, n, ·)`` as ``(..., h / G, G, n, ·)`` (query side) or ``(..., h, 1, n, ·)``."""
    if a.ndim < 3:
        return a
    *batch, h, n, w = a.shape
    if not query or h == 1:
        return xp.reshape(a, (*batch, h, 1, n, w))
    return xp.reshape(a, (*batch, h // groups, groups, n, w))


def check_lengths_options(method, lengths, options):
    """Refuse ``lengths`` with multipole's supplied ``downsample`` kernels: one kernel per
    far-field level ties them to the padded length, which each sequence length changes."""
    downsample = options.get("downsample", "mean")
    supplied = not (isinstance(downsample, str) and downsample == "mean")
    if lengths is not None and method == "multipole" and supplied:
        raise ValueError(
            "lengths= needs downsample='mean': supplied downsampling kernels, one per level, "
            "are tied to the padded length, which each sequence length changes"
        )


def check_lengths(lengths, batch, n, m):
    """``lengths`` as a tuple of Python ints, one per entry of the first batch axis.

    Eager: the values choose which rows each call sees.
    """
    if n != m:
        raise ValueError(
            f"lengths= needs as many queries as keys (one length per sequence), got n = {n} "
            f"and m = {m}; for cross-attention truncate the inputs yourself"
        )
    if not batch:
        raise ValueError(
            "lengths= needs a batch axis: inputs (batch, ..., n, d), one length per batch entry"
        )
    if array_api_compat.is_array_api_obj(lengths):
        lx = array_api_compat.array_namespace(lengths)
        if lengths.ndim != 1 or not lx.isdtype(lengths.dtype, "integral"):
            raise TypeError(
                f"lengths must be a 1-D integer array, one length per entry of the first batch "
                f"axis, got dtype {lengths.dtype} and shape {tuple(lengths.shape)}"
            )
        try:
            out = tuple(int(lengths[i]) for i in range(lengths.shape[0]))
        except TypeError as exc:  # a JAX tracer (jax.errors.ConcretizationTypeError and kin)
            raise TypeError(
                "lengths must be concrete (a NumPy array or a tuple of ints): each distinct "
                "length is one call on the truncated sequences, so under jax.jit pass lengths "
                f"as a static argument ({type(exc).__name__})"
            ) from None
    else:
        try:
            out = tuple(check_integer(x, "each length", low=0) for x in lengths)
        except TypeError:
            raise TypeError(
                f"lengths must be a 1-D integer array or a sequence of ints, got {lengths!r}"
            ) from None
    if len(out) != batch[0]:
        raise ValueError(
            f"lengths must have one entry per entry of the first batch axis ({batch[0]}), got "
            f"{len(out)}"
        )
    bad = [x for x in out if not 0 <= x <= n]
    if bad:
        raise ValueError(f"lengths must lie in [0, n = {n}], got {bad[0]}. {LAYOUT_HINT}")
    return out


def batched_call(func, q, k, v, *rows, lengths=None):
    """``func(q, k, v, *rows)`` with grouped-query heads and ``lengths`` applied.

    ``rows`` are arrays shaped like the output (``grad_out``).  ``func`` returns the output
    ``(..., n, e)`` (or, without ``lengths``, a tuple that starts with it) or a gradient
    dataclass whose fields ``dq``, ``dk``, ``dv`` are shaped like ``q``, ``k``, ``v`` (its
    other fields, such as kernel gradients, are summed over the calls).  Without grouped
    heads or lengths this is just ``func(q, k, v, *rows)``.
    """
    xp = namespace(q, k, v, *rows)
    groups = group_heads((q, *rows), (k, v))
    if groups > 1:
        if lengths is not None and q.ndim < 4:
            raise ValueError(
                "lengths= with grouped-query heads needs a batch axis before the heads: "
                f"(batch, heads, n, d) arrays, got q shape {tuple(q.shape)}"
            )
        shapes = {"dq": q.shape, "dk": k.shape, "dv": v.shape}
        q, *rows = (_split_heads(xp, a, groups, query=True) for a in (q, *rows))
        k, v = (_split_heads(xp, a, groups, query=False) for a in (k, v))
        out = batched_call(func, q, k, v, *rows, lengths=lengths)
        if isinstance(out, tuple):  # (output, report): the report keeps the grouped shape
            return (_merge_heads(xp, out[0]), *out[1:])
        if is_dataclass(out):
            return replace(out, **{f: xp.reshape(getattr(out, f), s) for f, s in shapes.items()})
        return _merge_heads(xp, out)
    if lengths is None:
        return func(q, k, v, *rows)
    arrays = (q, k, v, *rows)
    try:
        batch = broadcast_shapes(*(tuple(a.shape[:-2]) for a in arrays))
    except ValueError:
        return func(q, k, v, *rows)  # the method's own check names the shapes
    sizes = check_lengths(lengths, batch, q.shape[-2], k.shape[-2])
    if all(size == q.shape[-2] for size in sizes):
        return func(q, k, v, *rows)
    return _by_length(xp, func, arrays, sizes, batch)


def _merge_heads(xp, out):
    """``(..., h_kv, G, n, e)`` → ``(..., h_kv · G, n, e)``."""
    *batch, hkv, g, n, e = out.shape
    return xp.reshape(out, (*batch, hkv * g, n, e))


def _by_length(xp, func, arrays, sizes, batch):
    """One call per distinct length on the sequences of that length, reassembled in order.

    Arrays with the whole first batch axis are split between the calls; the others (broadcast
    along it) are shared, and their gradients are the sums of the calls'.  A length of zero
    runs on one row of zeros for the result's shapes, never on the padding, and gives zeros.
    """
    dev = device(arrays[0])
    n, count = arrays[0].shape[-2], len(sizes)
    split = [a.ndim - 2 == len(batch) and a.shape[0] == count for a in arrays]
    order, parts = [], []
    for size in sorted(set(sizes)):
        members = [b for b, s in enumerate(sizes) if s == size]
        order.extend(members)
        index = xp.asarray(members, device=dev)
        inputs = [
            (xp.take(a, index, axis=0) if s else a)[..., : max(size, 1), :]
            for a, s in zip(arrays, split, strict=True)
        ]
        if size == 0:  # one row of zeros, never the padding, for the result's shapes
            inputs = [xp.zeros_like(a) for a in inputs]
        out = func(*inputs)
        parts.append((len(members), _zeros_like(xp, out) if size == 0 else out))
    inverse = [0] * count
    for position, b in enumerate(order):
        inverse[b] = position
    inverse = xp.asarray(inverse, device=dev)

    def assemble(results, batch):
        blocks = [
            xp.broadcast_to(_pad_rows(xp, r, n), (members, *batch[1:], n, r.shape[-1]))
            for (members, _), r in zip(parts, results, strict=True)
        ]
        return xp.take(xp.concat(blocks, axis=0), inverse, axis=0)

    first = parts[0][1]
    if not is_dataclass(first):
        return assemble([r for _, r in parts], batch)
    grads = {}
    for name, a, s in zip(("dq", "dk", "dv"), arrays[:3], split[:3], strict=True):
        results = [getattr(r, name) for _, r in parts]
        if s:
            grads[name] = assemble(results, tuple(a.shape[:-2]))
        else:
            grads[name] = _sum([_pad_rows(xp, r, n) for r in results])
    others = {
        f.name: _sum([getattr(r, f.name) for _, r in parts])
        for f in fields(first)
        if f.name not in grads
    }
    return replace(first, **grads, **others)


def _pad_rows(xp, a, n):
    """``a (..., r, w)`` with zero rows appended up to ``n``."""
    if a.shape[-2] == n:
        return a
    pad = xp.zeros((*a.shape[:-2], n - a.shape[-2], a.shape[-1]), dtype=a.dtype, device=device(a))
    return xp.concat((a, pad), axis=-2)


def _zeros_like(xp, result):
    """Zeros in the place of every array of ``result`` (an array, tuple, dataclass or None)."""
    if result is None:
        return None
    if is_dataclass(result):
        return replace(
            result, **{f.name: _zeros_like(xp, getattr(result, f.name)) for f in fields(result)}
        )
    if isinstance(result, tuple):
        return tuple(_zeros_like(xp, r) for r in result)
    return xp.zeros_like(result)


def _sum(values):
    """The sum of ``values`` (arrays, or tuples of arrays summed elementwise, or all None)."""
    if values[0] is None:
        return None
    if isinstance(values[0], tuple):
        return tuple(_sum(list(parts)) for parts in zip(*values, strict=True))
    total = values[0]
    for x in values[1:]:
        total = total + x
    return total
