"""Causal-mask products of low-rank matrices ("prefix products", docs/math.rst §1).

``(M ∘ U Vᵀ) Z`` with ``M[i, j] = 1`` iff ``i >= j`` never needs the ``n × n`` matrix: row
``i`` is ``U[i] · Σ_{j<=i} V[j]ᵀ Z[j]``.  The chunked form below splits the rows into chunks
of ``c``; inside a chunk the small ``c × c`` masked block is multiplied directly, and the
chunks before it enter through an exclusive prefix sum of the ``r × p`` chunk states
``V_tᵀ Z_t`` (``convbasis._array.chunk_scan_map``: one call over all chunks, or on NumPy
blocks of chunks pipelined over threads).

Cost ``O(n c (r + p) + n r p)``; memory ``O(n c + n r p / c)`` beyond inputs and outputs (on
NumPy's pipeline only a few blocks' worth), never ``O(n²)`` or ``O(n r p)``.
"""

from __future__ import annotations

import math

import array_api_extra as xpx
from array_api_compat import device

from ._array import (
    as_floating,
    check_integer,
    check_rows,
    chunk_scan_map,
    contiguous,
    namespace,
)
from .operators import hadamard_product

__all__ = [
    "face_splitting_product",
    "masked_hadamard_matmul",
    "masked_lowrank_matmul",
]


def _validate(arrays, names):
    xp = namespace(*arrays)
    for a, name in zip(arrays, names, strict=True):
        check_rows(a, name)
    n = arrays[0].shape[-2]
    for a, name in zip(arrays[1:], names[1:], strict=True):
        if a.shape[-2] != n:
            raise ValueError(f"{name} must have n = {n} rows like {names[0]}, got shape {a.shape}")
    return (xp, *as_floating(xp, arrays, names))


def _check_pair(a, b, name_a, name_b):
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{name_b} must have the same rank (last dimension) as {name_a}: "
            f"{name_a} has shape {a.shape}, {name_b} has shape {b.shape}"
        )


def _chunk_size(chunk, n, r, p):
    """Rows per chunk: balances the ``n c (r+p)`` intra-chunk cost against the per-chunk
    matmul overhead; measured best near 64 for ``r, p <= 128`` on NumPy."""
    if chunk is None:
        chunk = 64 if max(r, p) <= 128 else 32
    return min(check_integer(chunk, "chunk", optional=True), n)


def _in_chunks(xp, a, chunk, count):
    """``(..., n, w)`` -> ``(..., count, chunk, w)``, zero-padding the last chunk."""
    pad = count * chunk - a.shape[-2]
    if pad:
        a = xpx.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, pad), (0, 0)], xp=xp)
    return xp.reshape(a, (*a.shape[:-2], count, chunk, a.shape[-1]))


def masked_product(xp, u, v, z, *, upper, strict, chunk):
    """Chunked ``(M ∘ U Vᵀ) Z`` (``upper=False``) or ``(Mᵀ ∘ U Vᵀ) Z`` (``upper=True``).

    Private kernel shared by the public products: arrays already validated and promoted.
    ``strict`` drops the diagonal.  Leading axes broadcast as in ``matmul``.
    """
    n, p = u.shape[-2], z.shape[-1]
    rows = xp.arange(chunk, device=device(u))[:, None]
    cols = xp.arange(chunk, device=device(u))[None, :]
    keep = (
        (rows < cols if strict else rows <= cols)
        if upper
        else (rows > cols if strict else rows >= cols)
    )
    keep = xp.astype(keep, u.dtype)
    mT = xp.matrix_transpose

    def states(u_c, v_c, z_c):
        return mT(v_c) @ z_c

    def diagonal_blocks(u_c, v_c, z_c):
        block = u_c @ contiguous(xp, mT(v_c))
        block *= keep
        return block @ z_c

    def chunk_rows(u_c, v_c, z_c, seen):
        out = diagonal_blocks(u_c, v_c, z_c)
        out += u_c @ seen
        return out

    # docs/math.rst §1: chunk states S_t = V_tᵀ Z_t; each chunk sees their exclusive prefix (suffix)
    # sum.
    count = math.ceil(n / chunk)
    u_c, v_c, z_c = (_in_chunks(xp, a, chunk, count) for a in (u, v, z))
    if count == 1:
        return diagonal_blocks(u_c, v_c, z_c)[..., 0, :n, :]
    out = chunk_scan_map(xp, states, chunk_rows, u_c, v_c, z_c, reverse=upper)
    return xp.reshape(out, (*out.shape[:-3], count * chunk, p))[..., :n, :]


def masked_lowrank_matmul(u, v, z, /, *, transpose=False, strict=False, chunk=None):
    """``(M ∘ U Vᵀ) Z`` or ``(M ∘ U Vᵀ)ᵀ Z`` without forming the ``n × n`` matrix.

    Parameters
    ----------
    u, v : arrays ``(..., n, r)``
        Low-rank factors of ``U Vᵀ``.
    z : array ``(..., n, p)``
        Leading axes of all three broadcast.
    transpose : bool
        Compute ``(M ∘ U Vᵀ)ᵀ Z = (Mᵀ ∘ V Uᵀ) Z`` (suffix sums) instead.
    strict : bool
        Use the strictly lower mask ``i > j``.
    chunk : int, optional
        Rows per chunk ``c`` (default 64; 32 when ``max(r, p) > 128``).

    Returns
    -------
    array ``(..., n, p)``
        ``O(n c (r + p) + n r p)`` time; ``O(n c + n r p / c)`` extra memory.

    Examples
    --------
    >>> import numpy as np
    >>> u, v, z = np.ones((4, 1)), np.ones((4, 1)), np.ones((4, 1))
    >>> masked_lowrank_matmul(u, v, z)[:, 0]
    array([1., 2., 3., 4.])
    """
    xp, u, v, z = _validate((u, v, z), ("u", "v", "z"))
    _check_pair(u, v, "u", "v")
    chunk = _chunk_size(chunk, u.shape[-2], u.shape[-1], z.shape[-1])
    if transpose:
        u, v = v, u
    return masked_product(xp, u, v, z, upper=transpose, strict=strict, chunk=chunk)


def masked_hadamard_matmul(u, v, g, y, z, /, *, transpose=False, strict=False, chunk=None):
    """``(M ∘ U Vᵀ ∘ G Yᵀ) Z`` or its transpose, in the loop form of docs/math.rst §1.

    Uses ``(M ∘ U Vᵀ ∘ G Yᵀ) Z = Σ_l diag(G[:, l]) (M ∘ U Vᵀ) diag(Y[:, l]) Z`` (transpose:
    ``Σ_l diag(Y[:, l]) (M ∘ U Vᵀ)ᵀ diag(G[:, l]) Z``), so the rank-``r s`` face-splitting
    factor is never materialised; the ``s`` terms run as few masked products on many columns
    (:func:`convbasis.operators.hadamard_product`).

    Parameters
    ----------
    u, v : arrays ``(..., n, r)``
    g, y : arrays ``(..., n, s)``
    z : array ``(..., n, p)``
    transpose, strict, chunk
        As in :func:`masked_lowrank_matmul`.

    Returns
    -------
    array ``(..., n, p)``
        Masked products on ``s p`` columns in all: ``O(n c (r + s p) + n r s p)`` time,
        ``O(n (c + p) + 2^23)`` memory.
    """
    xp, u, v, g, y, z = _validate((u, v, g, y, z), ("u", "v", "g", "y", "z"))
    _check_pair(u, v, "u", "v")
    _check_pair(g, y, "g", "y")
    if g.shape[-1] == 0:
        raise ValueError(f"g must have at least one column, got shape {g.shape}")
    chunk = _chunk_size(chunk, u.shape[-2], u.shape[-1], z.shape[-1])
    left, right = (y, g) if transpose else (g, y)
    if transpose:
        u, v = v, u

    def product(w):
        return masked_product(xp, u, v, w, upper=transpose, strict=strict, chunk=chunk)

    return hadamard_product(xp, product, left, right, z)


def face_splitting_product(u, g, /):
    """Row-wise Kronecker product: ``(U ⊙ G)[i, a·s + b] = U[i, a] · G[i, b]``.

    With it ``M ∘ U Vᵀ ∘ G Yᵀ = M ∘ (U ⊙ G)(V ⊙ Y)ᵀ`` (docs/math.rst §1).

    Parameters
    ----------
    u : array ``(..., n, r)``
    g : array ``(..., n, s)``

    Returns
    -------
    array ``(..., n, r s)``
        ``O(n r s)`` time and memory.
    """
    xp, u, g = _validate((u, g), ("u", "g"))
    prod = u[..., :, :, None] * g[..., :, None, :]
    return xp.reshape(prod, (*prod.shape[:-2], u.shape[-1] * g.shape[-1]))
