"""Every attention method over batches and heads on Dask, block by block.

:func:`attention` and :func:`attention_gradients` take Dask arrays ``(..., n, d)`` chunked
along the leading (batch/head) axes only and apply the single-process library function to
every chunk with :func:`dask.array.blockwise`: one task per chunk (named
``convbasis-attention-<method>`` or ``convbasis-gradients-<method>``; the gradients' task
returns all three, and one small task per output picks its part).  Nothing is computed when
they are called: the results are lazy Dask arrays with the leading chunks of ``q``, the
common floating dtype of the inputs (float32 stays float32) and the chunk type (NumPy or
CuPy) of the inputs.  They run on any Dask scheduler: threads, processes, a
``dask.distributed`` cluster.

Chunking rules (checked when the graph is built, before anything runs):

* every input is a Dask array, all with one chunk type (mixing in NumPy arrays is a
  ``TypeError``: wrap them with :func:`dask.array.from_array` and the chunks of ``q``);
* the leading axes of ``q``, ``k``, ``v`` (and ``grad_out``) are equal in shape and in chunks
  (no broadcasting: use :func:`dask.array.broadcast_to` and rechunk explicitly);
* the sequence and feature axes (the last two) are whole in every chunk.  A chunked one is
  refused with a ``ValueError`` that gives the ``rechunk`` call, rather than rechunked
  silently: gathering a sequence moves the whole array between workers, a cost the caller
  should choose to pay.

One chunk is one call of the library function, so every data-dependent choice is made per
chunk: the polynomial of ``method="lowrank"`` (from the chunk's largest row norms), the
segment starts of ``method="conv"`` (shared by the chunk's heads, not by the whole array).
A single chunk gives bitwise the single-process result on the whole array; several chunks
give bitwise the single-process result on each chunk (``dense`` and ``multipole`` treat
every batch element on its own, so for them only round-off can differ from the whole-array
call).  Errors raised inside a chunk (``rank=0``, a rank above ``max_rank``, ...) reach the
caller at compute time as the library's own exception.  Warnings
(:class:`~convbasis.conv.ConvBasisWarning`) are issued where the chunk runs: on a
distributed worker they go to that worker's log.

Dask is an optional dependency: ``pip install "convbasis[dask]"``.  This module imports it
only when a function is called.
"""

from __future__ import annotations

import functools
import math
import operator

import array_api_compat

from ._array import resolve_scale
from .composite import composite_attention
from .conv import conv_attention
from .gradients import attention_gradients as _attention_gradients
from .gradients import check_grad_out, check_gradient
from .multipole import multipole_attention
from .operators import check_method
from .polynomial import lowrank_attention
from .reference import attention as _dense_attention
from .results import AttentionGradients

__all__ = ["attention", "attention_gradients"]

_FORWARD = {
    "dense": _dense_attention,
    "lowrank": lowrank_attention,
    "conv": conv_attention,
    "multipole": multipole_attention,
    "composite": composite_attention,
}

# Methods whose queries and keys must be equally many in both directions.
_SAME_LENGTH = {
    "conv": "the k-conv basis",
    "multipole": "multipole attention",
    "composite": "composite attention",
}


def _dask_array():
    try:
        import dask.array as da
    except ImportError:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            'convbasis.dask needs Dask: pip install "convbasis[dask]" (dask[array] and distributed)'
        ) from None
    return da


def _describe(a):
    kind = type(a)
    return f"{kind.__module__}.{kind.__qualname__}"


def _check_dask(arrays, names, entry):
    """All of ``arrays`` are Dask arrays with one chunk library; return that library."""
    is_dask = [array_api_compat.is_dask_array(a) for a in arrays]
    if not any(is_dask):
        raise TypeError(
            f"convbasis.dask.{entry} takes Dask arrays, got "
            + ", ".join(f"{n} {_describe(a)}" for a, n in zip(arrays, names, strict=True))
            + f"; for in-memory arrays call convbasis.{entry} (method=...) or the method's "
            "own function"
        )
    if not all(is_dask):
        lazy = [n for n, flag in zip(names, is_dask, strict=True) if flag]
        eager = [
            f"{n} ({_describe(a)})"
            for a, n, flag in zip(arrays, names, is_dask, strict=True)
            if not flag
        ]
        raise TypeError(
            f"convbasis.dask.{entry}: {', '.join(lazy)} are Dask arrays but "
            f"{', '.join(eager)} are not; pass every input as a Dask array with the chunks of "
            f"{lazy[0]}, e.g. dask.array.from_array(x, chunks={lazy[0]}.chunks[:-2] + (-1, -1))"
        )
    libraries = {_describe(a._meta) for a in arrays}
    if len(libraries) > 1:
        raise TypeError(
            "all inputs must have chunks from one array library, got "
            + ", ".join(f"{n} {_describe(a._meta)}" for a, n in zip(arrays, names, strict=True))
        )
    return array_api_compat.array_namespace(arrays[0]._meta)


def _rechunk_hint(name, a):
    return f"{name} = {name}.rechunk({{{a.ndim - 2}: -1, {a.ndim - 1}: -1}})"


def _check_chunks(arrays, names):
    """Equal leading shapes and chunks; the last two axes whole in every chunk."""
    first, lead = arrays[0], names[0]
    for a, name in zip(arrays, names, strict=True):
        if a.ndim < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions (..., n, d), got shape {a.shape}"
            )
        if any(math.isnan(s) for s in a.shape):
            raise ValueError(
                f"{name} has unknown chunk sizes (shape {a.shape}); call "
                f"{name}.compute_chunk_sizes() first"
            )
        if a.shape[-2] == 0:
            raise ValueError(
                f"{name} must have a non-empty sequence axis (n >= 1), got shape {a.shape}"
            )
        if len(a.chunks[-2]) > 1 or len(a.chunks[-1]) > 1:
            axis = "sequence" if len(a.chunks[-2]) > 1 else "feature"
            raise ValueError(
                f"{name} is chunked along its {axis} axis (chunks {a.chunks[-2:]} for the "
                "last two axes); convbasis.dask splits the work along the leading "
                "(batch/head) axes only and needs every chunk to hold whole sequences: "
                f"rechunk first, {_rechunk_hint(name, a)} (this moves data between workers)"
            )
    for a, name in zip(arrays[1:], names[1:], strict=True):
        if a.shape[:-2] != first.shape[:-2]:
            raise ValueError(
                f"leading (batch/head) axes must be equal, got {lead} shape {first.shape} and "
                f"{name} shape {a.shape}; convbasis.dask does not broadcast: use "
                "dask.array.broadcast_to (gradients then come back at the broadcast shape; "
                "sum them over the broadcast axes)"
            )
        if a.chunks[:-2] != first.chunks[:-2]:
            raise ValueError(
                f"leading chunks must be equal, got {lead} chunks {first.chunks[:-2]} and "
                f"{name} chunks {a.chunks[:-2]} on the leading axes; rechunk them alike, e.g. "
                f"{name} = {name}.rechunk({lead}.chunks[:-2] + (-1, -1))"
            )


def _check_shapes(q, k, v, g, *, method, causal):
    """The shape rules of the single-process functions, checked before anything runs."""
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"k must have last dimension {q.shape[-1]} (the head dimension of q), "
            f"got shape {k.shape}"
        )
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v must have as many rows as k ({k.shape[-2]}), got shape {v.shape}")
    if q.shape[-2] != k.shape[-2]:
        if causal:
            raise ValueError(
                "causal attention needs as many queries as keys, got "
                f"q shape {q.shape} and k shape {k.shape}"
            )
        if method in _SAME_LENGTH:
            raise ValueError(
                f"{_SAME_LENGTH[method]} needs as many queries as keys, got "
                f"q shape {q.shape} and k shape {k.shape}"
            )
    if g is not None:
        check_grad_out(q, v, g)


def _prepare(arrays, names, *, entry, method, causal, scale):
    """Validate; return ``(dask.array, meta)`` with ``meta`` the outputs' empty chunk."""
    check_method(method)
    da = _dask_array()
    xp = _check_dask(arrays, names, entry)
    for a, name in zip(arrays, names, strict=True):
        if not xp.isdtype(a.dtype, "real floating"):
            raise TypeError(f"{name} must have a real floating dtype, got {a.dtype}")
    _check_chunks(arrays, names)
    q, k, v, *rest = arrays
    _check_shapes(q, k, v, rest[0] if rest else None, method=method, causal=causal)
    resolve_scale(scale, q.shape[-1])  # a non-finite scale fails here, not in every chunk
    dtype = xp.result_type(*(a.dtype for a in arrays))
    meta = da.utils.meta_from_array(q._meta, ndim=q.ndim, dtype=dtype)
    return da, meta


def _leading_indices(a):
    """Index names of the leading (batch/head) axes for ``blockwise``."""
    return tuple(f"b{i}" for i in range(a.ndim - 2))


def _attention_block(q, k, v, *, method, causal, scale, options):
    """The single-process forward of ``method`` on one chunk."""
    return _FORWARD[method](q, k, v, causal=causal, scale=scale, **options)


def _gradients_block(q, k, v, g, *, method, gradient, causal, scale, options):
    """The single-process gradients of ``method`` on one chunk: the tuple ``(dq, dk, dv)``."""
    return tuple(
        _attention_gradients(
            q, k, v, g, method=method, gradient=gradient, causal=causal, scale=scale, **options
        )
    )


def attention(q, k, v, /, *, method, causal=True, scale=None, **options):
    """Attention with any method, one single-process call per batch/head chunk.

    Parameters
    ----------
    q, k : Dask arrays ``(..., n, d)`` and ``(..., m, d)``
    v : Dask array ``(..., m, e)``
        Equal leading shapes and leading chunks; the last two axes whole in every chunk
        (module docstring).  ``m == n`` when ``causal`` and for ``"conv"``, ``"multipole"``
        and ``"composite"``.
    method : {"dense", "lowrank", "conv", "multipole", "composite"}
        Each chunk goes to :func:`convbasis.attention` (``"dense"``, takes ``block=``),
        :func:`convbasis.lowrank_attention`, :func:`convbasis.conv_attention`,
        :func:`convbasis.multipole_attention` or :func:`convbasis.composite_attention`.
    causal : bool
    scale : float, optional
        Default ``1/sqrt(d)``.
    **options
        The method's options (``block``; ``eps``, ``degree``, ``kind``, ``max_rank``;
        ``rank``, ``probe``, ``delta``, ``tolerance``; ``block``, ``basis``, ``downsample``),
        passed unchanged to every chunk.  Invalid options raise at compute time.

    Returns
    -------
    Dask array ``(..., n, e)``
        Lazy; leading chunks of ``q``, the inputs' common floating dtype, their chunk type.

    Raises
    ------
    TypeError
        Non-Dask input (alone or mixed with Dask arrays), chunks from different libraries,
        a non-floating dtype.
    ValueError
        A chunked sequence or feature axis, unequal leading shapes or chunks, shapes the
        method refuses, an unknown method or a non-finite scale.
    """
    da, meta = _prepare(
        (q, k, v), ("q", "k", "v"), entry="attention", method=method, causal=causal, scale=scale
    )
    block = functools.partial(
        _attention_block, method=method, causal=causal, scale=scale, options=options
    )
    lead = _leading_indices(q)
    return da.blockwise(
        block,
        (*lead, "n", "e"),
        *(q, (*lead, "n", "d"), k, (*lead, "m", "d"), v, (*lead, "m", "e")),
        concatenate=True,
        meta=meta,
        token=f"convbasis-attention-{method}",
    )


def attention_gradients(
    q,
    k,
    v,
    grad_out,
    /,
    *,
    method,
    gradient="exact-formula",
    causal=True,
    scale=None,
    **options,
):
    """``(dq, dk, dv)`` of any method, one single-process call per batch/head chunk.

    Each chunk goes to :func:`convbasis.attention_gradients` with the same ``method``,
    ``gradient``, ``causal``, ``scale`` and options; ``method="multipole"`` with
    ``gradient="model"`` is :func:`convbasis.multipole_attention_backward` (its gradients of
    supplied ``downsample`` kernels are not returned, as in the single-process function).

    Parameters
    ----------
    q, k, v
        As in :func:`attention`.
    grad_out : Dask array ``(..., n, e)``
        ``∂L/∂O``, chunked like ``q``.
    method : {"dense", "lowrank", "conv", "multipole", "composite"}
    gradient : {"exact-formula", "model"}
        The two meanings of :func:`convbasis.attention_gradients` (docs: "Fast gradients").
    causal : bool
    scale : float, optional
    **options
        As in :func:`convbasis.attention_gradients` (the dense method takes none).

    Returns
    -------
    AttentionGradients
        ``dq, dk, dv``: Dask arrays, lazy, shaped and chunked like ``q``, ``k``, ``v``, in the
        common floating dtype of the four inputs.  The three come from one task per chunk:
        compute them together (``dask.compute(dq, dk, dv)``), or the chunk's work runs once
        per output computed separately.

    Raises
    ------
    TypeError, ValueError
        As in :func:`attention`; also an unknown ``gradient``.
    """
    check_gradient(gradient)
    da, meta = _prepare(
        (q, k, v, grad_out),
        ("q", "k", "v", "grad_out"),
        entry="attention_gradients",
        method=method,
        causal=causal,
        scale=scale,
    )
    block = functools.partial(
        _gradients_block,
        method=method,
        gradient=gradient,
        causal=causal,
        scale=scale,
        options=options,
    )
    lead = _leading_indices(q)
    cores = (("n", "d"), ("m", "d"), ("m", "e"), ("n", "e"))
    inputs = (q, k, v, grad_out)
    # One task per chunk returns the tuple (dq, dk, dv); each output picks its part.
    tuples = da.blockwise(
        block,
        lead,
        *(x for a, core in zip(inputs, cores, strict=True) for x in (a, (*lead, *core))),
        concatenate=True,
        meta=meta,
        token=f"convbasis-gradients-{method}",
    )
    dq, dk, dv = (
        da.map_blocks(
            operator.getitem,
            tuples,
            i,
            new_axis=[len(lead), len(lead) + 1],
            chunks=(*a.chunks[:-2], *a.chunks[-2:]),
            meta=meta,
            name=f"{tuples.name}-{name}",
        )
        for i, (a, name) in enumerate(zip((q, k, v), ("dq", "dk", "dv"), strict=True))
    )
    return AttentionGradients(dq=dq, dk=dk, dv=dv)
