"""k-conv basis (docs/math.rst §4): FFT products, decomposition, fit, recovery, attention."""

from __future__ import annotations

import itertools
import math

import array_api_compat
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convbasis.conv import (
    ConvAttentionOperator,
    ConvBasis,
    ConvBasisWarning,
    _tiled,
    conv_attention,
    conv_matmul,
    conv_operator,
    conv_rmatmul,
    decompose_conv_basis,
    fit_conv_basis,
    recover_conv_basis,
)
from convbasis.conv import basis as basis_module
from convbasis.conv._fft import segment_cost, segment_plan
from convbasis.reference import attention, attention_weights
from convbasis.testing import (
    alibi_conv_instance,
    assert_close,
    assert_within_reference_error,
    rotary_conv_instance,
    to_numpy,
)

N_VALUES = (1, 2, 3, 5, 31, 64, 127, 257)
DTYPES = ("float32", "float64")
EXACT = np.longdouble


# --------------------------------------------------------------------------------------
# Dense NumPy oracles.  Golden results use extended precision (``EXACT``), so that the error
# of the plain dense computation in float64 is measured rather than zero by construction.
# --------------------------------------------------------------------------------------


def sub_conv_dense(a, m=None):
    """``conv(a, m)`` explicitly: ``(..., n)`` -> ``(..., n, n)``, zero outside the bottom-right
    ``m × m`` block, ``conv(a[:m])`` inside (docs/math.rst §4)."""
    n = a.shape[-1]
    m = n if m is None else m
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    t = i - j
    inside = (t >= 0) & (j >= n - m)
    return np.where(inside, a[..., np.clip(t, 0, n - 1)], 0.0)


def basis_dense(starts, vectors, n):
    """``H`` from its aligned columns: ``H[j + t, j] = c_{seg(j)}[t]``."""
    vectors = np.asarray(vectors)
    seg = np.searchsorted(np.asarray(starts), np.arange(n), side="right") - 1
    h = np.zeros((*vectors.shape[:-2], n, n), dtype=vectors.dtype)
    for j in range(n):
        h[..., j:, j] = vectors[..., seg[j], : n - j]
    return h


def aligned_columns(h):
    """``a[..., j, t] = h[..., j + t, j]`` (zero beyond the matrix)."""
    n = h.shape[-1]
    a = np.zeros(h.shape, dtype=h.dtype)
    for j in range(n):
        a[..., j, : n - j] = h[..., j:, j]
    return a


def random_starts(rng, n, k):
    """``0`` and ``k - 1`` distinct random starts in ``[1, n)``."""
    k = min(k, n)
    rest = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False)) if k > 1 else []
    return (0, *(int(s) for s in rest))


def random_vectors(rng, starts, n, batch=(), dtype="float64"):
    """Generic cumulative vectors ``c_i`` (zero beyond ``m_i``), rounded to ``dtype``."""
    c = rng.standard_normal((*batch, len(starts), n))
    for i, s in enumerate(starts):
        c[..., i, n - s :] = 0.0
    return c.astype(dtype)


def logits_dense(q, k, scale=None, causal=True):
    q, k = np.asarray(q, dtype=EXACT), np.asarray(k, dtype=EXACT)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    h = s * q @ np.swapaxes(k, -1, -2)
    return np.tril(h) if causal else h


def softmax_dense(logits, causal):
    n = logits.shape[-1]
    mask = np.tril(np.ones((n, n), dtype=bool)) if causal else np.ones((n, n), dtype=bool)
    x = np.where(mask, logits, -np.inf)
    w = np.exp(x - x.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)


def exact(*arrays):
    return tuple(np.asarray(a, dtype=EXACT) for a in arrays)


def golden_attention(q, k, v, causal, scale=None):
    """Softmax attention in extended precision from the (rounded) inputs."""
    return softmax_dense(logits_dense(q, k, scale, causal=False), causal) @ exact(v)[0]


def as_xp(xp, *arrays):
    return tuple(xp.asarray(a) for a in arrays)


# --------------------------------------------------------------------------------------
# Products with one conv(a, m)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", N_VALUES)
def test_conv_products_match_dense_toeplitz(xp, rng, n, dtype):
    a = rng.standard_normal(n).astype(dtype)
    z = rng.standard_normal((n, 3)).astype(dtype)
    ms = sorted({None, 1, n, int(rng.integers(1, n + 1))}, key=lambda m: -1 if m is None else m)
    for m in ms:
        mat64 = sub_conv_dense(a.astype(EXACT), m)
        mat = mat64.astype(dtype)
        for func, dense64, dense in (
            (conv_matmul, mat64, mat),
            (conv_rmatmul, mat64.T, mat.T),
        ):
            out = func(xp.asarray(a), xp.asarray(z), m=m)
            assert out.dtype == xp.asarray(z).dtype
            assert out.shape == (n, 3)
            assert_within_reference_error(
                out, dense64 @ z.astype(EXACT), dense @ z, factor=3, err_msg=f"m={m}"
            )
    # m = n is the default (a full lower-triangular Toeplitz matrix)
    assert_close(
        conv_matmul(xp.asarray(a), xp.asarray(z)), conv_matmul(xp.asarray(a), xp.asarray(z), m=n)
    )


def test_conv_products_known_values(xp):
    # conv([1, 2, 3]) = [[1,0,0],[2,1,0],[3,2,1]]; its bottom-right 2×2 block alone for m = 2
    a = xp.asarray([1.0, 2.0, 3.0])
    z = xp.asarray([[1.0], [10.0], [100.0]])
    assert_close(conv_matmul(a, z), np.array([[1.0], [12.0], [123.0]]), atol=1e-12)
    assert_close(conv_rmatmul(a, z), np.array([[321.0], [210.0], [100.0]]), atol=1e-12)
    assert_close(conv_matmul(a, z, m=2), np.array([[0.0], [10.0], [120.0]]), atol=1e-12)
    assert_close(conv_rmatmul(a, z, m=2), np.array([[0.0], [210.0], [100.0]]), atol=1e-12)
    assert_close(conv_matmul(a, z, m=1), np.array([[0.0], [0.0], [100.0]]), atol=1e-12)


def test_conv_products_batch_axes_and_promotion(xp, rng):
    n, p = 31, 2
    a = rng.standard_normal((2, 1, n))
    z = rng.standard_normal((3, n, p)).astype(np.float32)
    for m in (None, 17):
        mat = sub_conv_dense(a, m)  # (2, 1, n, n)
        for func, dense in ((conv_matmul, mat), (conv_rmatmul, np.swapaxes(mat, -1, -2))):
            out = func(xp.asarray(a), xp.asarray(z), m=m)
            assert out.dtype == xp.float64  # float32 z promoted with float64 a
            assert out.shape == (2, 3, n, p)
            golden = sub_conv_dense(a.astype(EXACT), m) @ z.astype(EXACT)
            baseline = dense @ z.astype(np.float64)
            assert_within_reference_error(out, golden, baseline, factor=3)


@settings(deadline=None)
@given(
    n=st.sampled_from(N_VALUES),
    p=st.integers(1, 4),
    batch=st.lists(st.integers(1, 3), max_size=2).map(tuple),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_conv_products_property(xp, n, p, batch, dtype, seed, data):
    rng = np.random.default_rng(seed)
    m = data.draw(st.integers(1, n), label="m")
    a = rng.standard_normal((*batch, n)).astype(dtype)
    z = rng.standard_normal((n, p)).astype(dtype)
    mat64 = sub_conv_dense(a.astype(EXACT), m)
    mat = mat64.astype(dtype)
    out = conv_matmul(xp.asarray(a), xp.asarray(z), m=m)
    assert out.dtype == xp.asarray(z).dtype and out.shape == (*batch, n, p)
    assert_within_reference_error(out, mat64 @ z.astype(EXACT), mat @ z, factor=3)
    out = conv_rmatmul(xp.asarray(a), xp.asarray(z), m=m)
    assert out.dtype == xp.asarray(z).dtype and out.shape == (*batch, n, p)
    assert_within_reference_error(
        out,
        np.swapaxes(mat64, -1, -2) @ z.astype(EXACT),
        np.swapaxes(mat, -1, -2) @ z,
        factor=3,
    )


# --------------------------------------------------------------------------------------
# ConvBasis: dense form, products, exponential
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", N_VALUES)
def test_basis_products_match_dense(xp, rng, conv_route, n, dtype):
    for k in sorted({1, 2, 5, n}):
        starts = random_starts(rng, n, k)
        c = random_vectors(rng, starts, n, dtype=dtype)
        z = rng.standard_normal((n, 4)).astype(dtype)
        basis = ConvBasis(starts, xp.asarray(c), n)
        assert basis.rank == len(starts) and basis.lengths == tuple(n - s for s in starts)
        h64 = basis_dense(starts, c.astype(EXACT), n)
        h = h64.astype(dtype)
        dense = basis.to_dense()
        assert dense.dtype == xp.asarray(c).dtype
        assert_close(dense, h64)  # to_dense only copies entries: exact
        for out, golden, base in (
            (basis.matmul(xp.asarray(z)), h64 @ z.astype(EXACT), h @ z),
            (basis.rmatmul(xp.asarray(z)), h64.T @ z.astype(EXACT), h.T @ z),
        ):
            assert out.dtype == xp.asarray(z).dtype and out.shape == (n, 4)
            assert_within_reference_error(out, golden, base, factor=3, err_msg=f"starts={starts}")


@pytest.mark.parametrize(
    "starts",
    [
        tuple(range(0, 1024, 64)),  # equal segments: grouped
        (0, 300, 304, 310, 600, 700, 1000),  # short (direct) segments between long ones
        (0, 5, 900, 1020),
        (0,),
    ],
)
def test_grouped_segment_plans_are_exact(xp, rng, starts, monkeypatch):
    # docs/conv.rst: segments of a group share one FFT length and one inverse FFT; the length
    # must keep every convolution of the group off the rows it keeps (no wrap-around).
    monkeypatch.setattr(basis_module, "choose_tiles", lambda starts, n, cost: None)
    n = 1024
    plan = segment_plan(starts, n)
    assert tuple(seg.start for seg in plan) == starts
    groups = {}
    for seg in plan:
        groups.setdefault(seg.head, []).append(seg)
    for head, members in groups.items():
        assert members[0].start == head and len({seg.size for seg in members}) == 1
        if any(seg.stop - seg.start <= 8 for seg in members):
            assert len(members) == 1  # a direct segment is a group of its own
        width = max(seg.stop - seg.start for seg in members)
        assert members[0].size >= n - head + width - 1
    if len(starts) == 16:
        assert len(groups) < len(starts)  # grouping happens where the lengths are close
    c = random_vectors(rng, starts, n, batch=(2,))
    z = rng.standard_normal((n, 3))
    basis = ConvBasis(starts, xp.asarray(c), n)
    h = basis_dense(starts, c, n)
    he, ze = exact(h, z)
    assert_within_reference_error(basis.matmul(xp.asarray(z)), he @ ze, h @ z, factor=3)
    ht, het = np.swapaxes(h, -1, -2), np.swapaxes(he, -1, -2)
    assert_within_reference_error(basis.rmatmul(xp.asarray(z)), het @ ze, ht @ z, factor=3)


@pytest.mark.parametrize(
    ("n", "starts", "block"),
    [
        (1024, tuple(range(0, 1024, 64)), 128),  # segments of whole blocks
        (1024, (0, 300, 304, 310, 600, 700, 1000), 64),  # several pieces in one block
        (1000, (0, 5, 900, 999), 128),  # a last partial block, a one-column segment
        (200, (0,), 256),  # one block larger than n
        (33, (0, 1, 2, 3, 32), 16),
    ],
)
def test_tiled_products_are_exact(xp, rng, n, starts, block):
    # docs/conv.rst "Tiled products": every tile of one segment is a circular convolution
    # at length 2B; the pieces cover each column exactly once.
    tiles = _tiled.tile_pieces(starts, n, block)
    covered = [col for _, _, a, b in tiles.pieces for col in range(a, b)]
    assert covered == list(range(n))
    assert all(a // block == j == (b - 1) // block for j, _, a, b in tiles.pieces)
    c = random_vectors(rng, starts, n, batch=(2, 1))
    z = rng.standard_normal((3, n, 5))
    xc = xp.asarray(c)
    spectra = _tiled.tile_spectra(xp, xc, tiles)
    h = basis_dense(starts, c, n)
    he, ze = exact(h, z)
    got = _tiled.tiled_matmul(xp, tiles, spectra, xp.asarray(z))
    assert got.shape == (2, 3, n, 5)
    assert_within_reference_error(got, he @ ze, h @ z, factor=3)
    ht, het = np.swapaxes(h, -1, -2), np.swapaxes(he, -1, -2)
    got = _tiled.tiled_rmatmul(xp, tiles, spectra, xp.asarray(z))
    assert_within_reference_error(got, het @ ze, ht @ z, factor=3)
    for empty in ((3, n, 0), (0, n, 5)):
        for product in (_tiled.tiled_matmul, _tiled.tiled_rmatmul):
            out = product(xp, tiles, spectra, xp.asarray(np.ones(empty)))
            assert out.shape == (2, empty[0], n, empty[2])


def test_route_follows_the_cost_model():
    # Many long segments: the tiled form's shorter FFTs win (docs/conv.rst); one segment,
    # or a tiny matrix, keep the segment form.
    n = 2**17
    for starts, tiled in (
        (tuple(range(0, n, n // 16)), True),
        ((0,), False),
        ((0, n // 2), False),
    ):
        basis = ConvBasis(starts, np.zeros((len(starts), n), dtype=np.float32), n)
        assert (basis.tiles is not None) == tiled, starts
        if tiled:
            assert _tiled.tiled_cost(basis.tiles) * 1.4 < segment_cost(basis.plan)
    assert ConvBasis((0, 3), np.zeros((2, 40)), 40).tiles is None


@pytest.mark.parametrize("n", [1, 5, 64])
def test_basis_vectors_sum_to_dense(xp, rng, n):
    starts = random_starts(rng, n, 4)
    c = random_vectors(rng, starts, n, batch=(2,))
    basis = ConvBasis(starts, xp.asarray(c), n)
    b = to_numpy(basis.basis_vectors())
    total = sum(sub_conv_dense(b[..., i, :], n - s) for i, s in enumerate(starts))
    assert_close(total, basis_dense(starts, c, n), atol=1e-12)
    # entries beyond m_i are zero
    for i, s in enumerate(starts):
        assert np.all(b[..., i, n - s :] == 0)


def test_basis_batch_axes(xp, rng, conv_route):
    n = 64
    starts = (0, 7, 30, 63)
    c = random_vectors(rng, starts, n, batch=(2, 1))
    z = rng.standard_normal((3, n, 5))
    basis = ConvBasis(starts, xp.asarray(c), n)
    h = basis_dense(starts, c, n)  # (2, 1, n, n)
    assert_close(basis.to_dense(), h)
    mm, rm = basis.matmul(xp.asarray(z)), basis.rmatmul(xp.asarray(z))
    assert mm.shape == rm.shape == (2, 3, n, 5)
    he, ze = exact(h, z)
    ht, het = np.swapaxes(h, -1, -2), np.swapaxes(he, -1, -2)
    assert_within_reference_error(mm, he @ ze, h @ z, factor=3)
    assert_within_reference_error(rm, het @ ze, ht @ z, factor=3)
    # spectra are cached and shared: a second product gives the same answer
    assert_close(basis.matmul(xp.asarray(z)), to_numpy(mm))


def test_basis_mixed_precision_promotes(xp, rng, conv_route):
    n = 31
    starts = (0, 10)
    c = random_vectors(rng, starts, n, dtype="float32")
    basis = ConvBasis(starts, xp.asarray(c), n)
    z = rng.standard_normal((n, 2))
    out = basis.matmul(xp.asarray(z))
    assert out.dtype == xp.float64
    h = basis_dense(starts, c.astype(EXACT), n)
    assert_within_reference_error(out, h @ z.astype(EXACT), h.astype(np.float64) @ z, factor=3)


@settings(deadline=None)
@given(
    n=st.sampled_from(N_VALUES),
    k=st.integers(1, 8),
    p=st.integers(1, 4),
    batch=st.lists(st.integers(1, 3), max_size=2).map(tuple),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_basis_products_property(xp, n, k, p, batch, dtype, seed):
    rng = np.random.default_rng(seed)
    starts = random_starts(rng, n, k)
    c = random_vectors(rng, starts, n, batch=batch, dtype=dtype)
    z = rng.standard_normal((n, p)).astype(dtype)
    basis = ConvBasis(starts, xp.asarray(c), n)
    h64 = basis_dense(starts, c.astype(EXACT), n)
    h = h64.astype(dtype)
    ht64, ht = np.swapaxes(h64, -1, -2), np.swapaxes(h, -1, -2)
    z64 = z.astype(EXACT)
    out = basis.matmul(xp.asarray(z))
    assert out.dtype == xp.asarray(z).dtype and out.shape == (*batch, n, p)
    assert_within_reference_error(out, h64 @ z64, h @ z, factor=3)
    out = basis.rmatmul(xp.asarray(z))
    assert out.dtype == xp.asarray(z).dtype and out.shape == (*batch, n, p)
    assert_within_reference_error(out, ht64 @ z64, ht @ z, factor=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_basis_exp_and_max(xp, rng, dtype):
    n = 31
    starts = (0, 4, 20)
    c = 30.0 * random_vectors(rng, starts, n, batch=(2,), dtype=dtype)
    basis = ConvBasis(starts, xp.asarray(c), n)
    h = basis_dense(starts, c.astype(np.float64), n)
    lower = np.tril(np.ones((n, n), dtype=bool))
    top = np.max(np.where(lower, h, -np.inf), axis=(-2, -1))
    assert_close(basis.max(), top)
    e = basis.exp()
    assert e.starts == starts and e.vectors.dtype == xp.asarray(c).dtype
    expected = np.where(lower, np.exp(h - top[:, None, None]), 0.0)
    # exp of an argument h - shift rounded in dtype: relative error <= 2 eps |h - shift|
    info = np.finfo(dtype)
    rtol = 2 * float(info.eps) * (2 * float(np.max(np.abs(h))) + 1)
    tiny = float(info.smallest_normal)  # results below it underflow in dtype
    assert_close(e.to_dense(), expected, rtol=rtol, atol=tiny)
    assert np.max(to_numpy(e.to_dense())) <= 1.0
    # an explicit shift, as a scalar and per batch element
    shift = float(np.max(top)) + 1.0
    e = basis.exp(shift)
    assert_close(e.to_dense(), np.where(lower, np.exp(h - shift), 0.0), rtol=rtol, atol=tiny)
    shift = top - 2.0
    e = basis.exp(xp.asarray(shift.astype(dtype)))
    expected = np.where(lower, np.exp(h - shift.astype(dtype)[:, None, None]), 0.0)
    assert_close(e.to_dense(), expected, rtol=rtol, atol=tiny)


# --------------------------------------------------------------------------------------
# Exact decomposition and dense fit
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", N_VALUES)
def test_decompose_round_trip(xp, rng, n):
    # a matrix with a known basis: decompose_conv_basis finds exactly its starts and vectors
    for k in sorted({1, 3, n}):
        starts = random_starts(rng, n, k)
        c = random_vectors(rng, starts, n)
        h = basis_dense(starts, c, n)
        basis = decompose_conv_basis(xp.asarray(h))
        assert basis.starts == starts
        assert_close(basis.vectors, c)
        assert_close(basis.to_dense(), h)
    # a generic lower-triangular matrix: every column starts a segment (k = n)
    h = np.tril(rng.standard_normal((n, n)))
    basis = decompose_conv_basis(xp.asarray(h))
    assert basis.starts == tuple(range(n))
    assert_close(basis.to_dense(), h)
    assert_close(basis.vectors, aligned_columns(h))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decompose_batch_axes(xp, rng, dtype):
    n = 31
    # two batch elements with different bases: the shared starts are the union
    h0 = basis_dense((0, 5, 20), random_vectors(rng, (0, 5, 20), n), n)
    h1 = basis_dense((0, 12), random_vectors(rng, (0, 12), n), n)
    h = np.stack([h0, h1])[:, None].astype(dtype)  # (2, 1, n, n)
    basis = decompose_conv_basis(xp.asarray(h))
    assert basis.starts == (0, 5, 12, 20)
    assert basis.vectors.shape == (2, 1, 4, n)
    assert basis.vectors.dtype == xp.asarray(h).dtype
    assert_close(basis.to_dense(), h)


@settings(deadline=None)
@given(
    n=st.sampled_from(N_VALUES),
    k=st.integers(1, 10),
    batch=st.lists(st.integers(1, 2), max_size=2).map(tuple),
    seed=st.integers(0, 2**16),
)
def test_decompose_property(xp, n, k, batch, seed):
    rng = np.random.default_rng(seed)
    starts = random_starts(rng, n, k)
    h = basis_dense(starts, random_vectors(rng, starts, n, batch=batch), n)
    basis = decompose_conv_basis(xp.asarray(h))
    assert basis.rank <= n
    assert basis.starts == starts
    assert_close(basis.to_dense(), h)


def test_decompose_repeated_columns_merge(xp):
    # conv(b_1, m_1) with b_1 = 0 on the entries inside the matrix is not a new segment
    n = 5
    h = basis_dense((0,), np.arange(1.0, n + 1)[None, :], n)
    assert decompose_conv_basis(xp.asarray(h)).starts == (0,)
    assert decompose_conv_basis(xp.asarray(np.zeros((n, n)))).starts == (0,)


def test_decompose_bad_input(xp):
    h = np.tril(np.ones((4, 4)))
    h[1, 3] = 1e-300
    with pytest.raises(ValueError, match=r"h must be lower-triangular \(zero above the diagonal\)"):
        decompose_conv_basis(xp.asarray(h))
    with pytest.raises(ValueError, match=r"h must have shape \(\.\.\., n, n\) with n >= 1"):
        decompose_conv_basis(xp.asarray(np.zeros((3, 4))))
    with pytest.raises(ValueError, match=r"h must have shape \(\.\.\., n, n\) with n >= 1"):
        decompose_conv_basis(xp.asarray(np.zeros(3)))
    with pytest.raises(ValueError, match=r"h must have shape \(\.\.\., n, n\) with n >= 1"):
        decompose_conv_basis(xp.asarray(np.zeros((0, 0))))
    with pytest.raises(TypeError, match="h must have a real floating dtype"):
        decompose_conv_basis(xp.asarray(np.eye(3, dtype=np.int64)))


def _frobenius_lower(basis, h):
    return float(np.linalg.norm(np.tril(to_numpy(basis.to_dense()) - h)))


@pytest.mark.parametrize("n", [1, 2, 5, 31, 64])
def test_fit_error_non_increasing(xp, rng, n):
    h = rng.standard_normal((2, n, n))  # the upper part is ignored
    errors = []
    for k in range(1, n + 3):
        basis = fit_conv_basis(xp.asarray(h), k)
        assert basis.rank == min(k, n)
        errors.append(_frobenius_lower(basis, np.tril(h)))
    assert all(b <= a * (1 + 1e-12) + 1e-12 for a, b in itertools.pairwise(errors))
    # k >= n reproduces the lower triangle; k = 1 does not (generic input)
    assert errors[n - 1] <= 1e-12 * np.linalg.norm(h)
    assert_close(fit_conv_basis(xp.asarray(h), n + 5).to_dense(), np.tril(h), atol=1e-12)
    if n > 1:
        assert errors[0] > 0.1


def test_fit_single_segment_is_column_mean(xp, rng):
    n = 5
    h = np.tril(rng.standard_normal((n, n)))
    basis = fit_conv_basis(xp.asarray(h), 1)
    a = aligned_columns(h)
    # entry t is the mean over the n - t columns that reach it
    expected = np.array([a[: n - t, t].mean() for t in range(n)])
    assert_close(basis.vectors[0, :], expected, atol=1e-14)


@pytest.mark.parametrize("n", [3, 31, 127])
def test_fit_exact_at_true_rank(xp, rng, n):
    starts = random_starts(rng, n, 4)
    c = random_vectors(rng, starts, n, batch=(2,))
    h = basis_dense(starts, c, n)
    basis = fit_conv_basis(xp.asarray(h + np.triu(rng.standard_normal((n, n)), 1)), len(starts))
    assert basis.starts == starts
    assert_close(basis.vectors, c, atol=1e-13)
    assert_close(basis.to_dense(), h, atol=1e-13)
    if len(starts) > 1:  # one segment fewer cannot be exact
        assert _frobenius_lower(fit_conv_basis(xp.asarray(h), len(starts) - 1), h) > 1e-3


def test_fit_bad_input(xp):
    h = xp.asarray(np.zeros((4, 4)))
    for k in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match=f"k must be a positive integer, got {k!r}"):
            fit_conv_basis(h, k)
    with pytest.raises(ValueError, match=r"h must have shape \(\.\.\., n, n\) with n >= 1"):
        fit_conv_basis(xp.asarray(np.zeros((4, 3))), 2)


# --------------------------------------------------------------------------------------
# Recovery from Q and K
# --------------------------------------------------------------------------------------

ROTARY_STARTS = {
    1: (0,),
    2: (0, 40),
    3: (0, 17, 80),
    5: (0, 3, 31, 64, 100),
}


def _check_recovered(basis, q, k, true_starts, scale=None, causal=True):
    """Starts equal the true ones; vectors are the logit columns at those starts; the dense
    form matches the lower-triangular logits to the round-off of the logits themselves."""
    assert basis.starts == tuple(true_starts)
    h = logits_dense(q, k, scale, causal=True)
    eps = float(np.finfo(q.dtype).eps)
    d = q.shape[-1]
    s = 1.0 / math.sqrt(d) if scale is None else scale
    qn = np.linalg.norm(q.astype(np.float64), axis=-1).max()
    kn = np.linalg.norm(k.astype(np.float64), axis=-1).max()
    roundoff = 2 * d * eps * abs(s) * qn * kn  # two computed logits that agree exactly
    assert_close(basis.vectors, aligned_columns(h)[..., list(true_starts), :], atol=roundoff / 2)
    assert_close(basis.to_dense(), h, atol=roundoff)
    # the same basis as the dense reference: fit_conv_basis with the true number of segments
    # finds the same starts on the dense logits (their round-off is far below the segment changes)
    dense = fit_conv_basis(h, len(true_starts))
    assert dense.starts == basis.starts
    assert_close(basis.vectors, dense.vectors, atol=roundoff)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", sorted(ROTARY_STARTS))
def test_recover_rotary_instance(xp, rng, dtype, count):
    n, d = 127, 8
    q, k, _, starts = rotary_conv_instance(rng, n, d, ROTARY_STARTS[count], dtype=dtype)
    for rank in (count, count + 3):  # extra rank is not used on an exact instance
        basis = recover_conv_basis(*as_xp(xp, q, k), rank=rank)
        assert basis.vectors.dtype == xp.asarray(q).dtype
        _check_recovered(basis, q, k, starts)
    # fewer segments than the truth: the first ones, found in order
    if count > 1:
        basis = recover_conv_basis(*as_xp(xp, q, k), rank=count - 1)
        assert basis.starts == starts[:-1]
    # decompose_conv_basis of the exact basis built from the recovered vectors: the same starts
    basis = recover_conv_basis(*as_xp(xp, q, k), rank=count)
    assert decompose_conv_basis(basis.to_dense()).starts == starts


@pytest.mark.parametrize("probe", [1, 2, 5])
def test_recover_probe_and_scale(xp, rng, probe):
    n, d = 64, 6
    starts = (0, 10, 33)
    q, k, _, starts = rotary_conv_instance(rng, n, d, starts, scale=0.3)
    basis = recover_conv_basis(*as_xp(xp, q, k), rank=5, probe=probe, scale=0.3)
    _check_recovered(basis, q, k, starts, scale=0.3)


def test_recover_alibi_instance(xp, rng):
    n, d = 257, 4
    q, k, _, starts = alibi_conv_instance(rng, n, d, slope=0.05)
    basis = recover_conv_basis(*as_xp(xp, q, k), rank=4)
    _check_recovered(basis, q, k, starts)
    # per-segment biases: an exact multi-segment basis
    q, k, _, starts = alibi_conv_instance(
        rng, n, d, slope=0.05, starts=(0, 50, 51, 200), biases=(0.0, 1.0, -2.0, 0.5)
    )
    basis = recover_conv_basis(*as_xp(xp, q, k), rank=6)
    _check_recovered(basis, q, k, starts)


def test_recover_batch_axes_share_starts(xp, rng):
    n, d = 64, 4
    q0, k0, _, _ = rotary_conv_instance(rng, n, d, (0, 20))
    q1, k1, _, _ = rotary_conv_instance(rng, n, d, (0, 20, 45))
    q, k = np.stack([q0, q1])[:, None], np.stack([k0, k1])[:, None]  # (2, 1, n, d)
    basis = recover_conv_basis(*as_xp(xp, q, k), rank=5)
    assert basis.vectors.shape == (2, 1, 3, n)
    _check_recovered(basis, q, k, (0, 20, 45))


def test_recover_bidirectional(xp, rng):
    n, d = 31, 4
    q, k, _, starts = rotary_conv_instance(rng, n, d, (0,))
    lower, upper = recover_conv_basis(*as_xp(xp, q, k), rank=3, causal=False)
    _check_recovered(lower, q, k, starts)
    _check_recovered(upper, k, q, starts)
    # together they give the full logit matrix
    full = to_numpy(lower.to_dense()) + np.tril(to_numpy(upper.to_dense()), -1).T
    assert_close(full, logits_dense(q, k, causal=False), atol=1e-13)


@pytest.mark.parametrize("n", [1, 2, 3, 31, 64])
def test_recover_generic_full_rank_is_exact(xp, rng, n):
    # generic q, k: every aligned column differs, so rank n recovers the logits exactly
    q, k = rng.standard_normal((2, n, 5))
    basis = recover_conv_basis(*as_xp(xp, q, k), rank=n)
    assert basis.starts == tuple(range(n))
    assert_close(basis.to_dense(), logits_dense(q, k), atol=1e-13)


def test_recover_error_against_rank_on_generic_input(xp, rng, capsys):
    n, d = 64, 4
    q, k = rng.standard_normal((2, n, d))
    h = logits_dense(q, k)
    norm = float(np.linalg.norm(h))
    rows = []
    for rank in (1, 2, 4, 8, 16, 32, 63, 64):
        basis = recover_conv_basis(*as_xp(xp, q, k), rank=rank)
        assert basis.rank <= rank
        err = _frobenius_lower(basis, h) / norm
        best = _frobenius_lower(fit_conv_basis(h, rank), h) / norm
        rows.append((rank, basis.rank, err, best))
        # by design the columns at the starts are reproduced exactly
        dense = to_numpy(basis.to_dense())
        for s in basis.starts:
            assert_close(dense[s:, s], h[s:, s], atol=1e-13)
    with capsys.disabled():
        print("\nrecovery on generic q, k (n = 64): rank, segments, rel. error, fit error")
        for row in rows:
            print("  {:3d} {:3d}  {:.3e}  {:.3e}".format(*row))
    errors = [r[2] for r in rows]
    assert errors[-1] <= 1e-14  # rank n: exact
    assert errors[0] > 0.5  # rank 1: one column cannot represent generic logits
    # generic columns all differ: the search takes every column from the left
    assert rows[3][1] == 8


# --------------------------------------------------------------------------------------
# Attention and the attention operator
# --------------------------------------------------------------------------------------


def _fft_rows(op):
    """Rows kept on the FFT path and their predicted relative error ``noise / D_r``.

    Recomputed rows are exact (their own row maximum), so they carry no FFT term."""
    d = to_numpy(op.normaliser).astype(np.float64)
    d = d.reshape(-1, op.n) if d.ndim > 1 else d[None, :]
    noise = np.asarray(to_numpy(op.noise), dtype=np.float64).reshape(-1, 1)
    rel = noise / d
    rel[:, list(op.recomputed_rows)] = 0.0
    return np.max(rel, axis=0)  # (n,) worst over the batch


def basis_logit_error(op, q, k, causal, scale=None):
    """``ε = max |S_basis - S|`` over the attended entries, between the recovered basis and
    the exact logits of the (rounded) inputs.  An exact instance is exact only up to the
    rounding of ``q, k`` and of the computed dot products: assert ``ε`` is at that level."""
    exact_logits = logits_dense(q, k, scale, causal=False)
    n = exact_logits.shape[-1]
    lower = to_numpy(op.lower.to_dense()).astype(EXACT)
    diff = np.abs(np.tril(lower - exact_logits))
    if not causal:
        upper = np.swapaxes(np.tril(to_numpy(op.upper.to_dense()).astype(EXACT), -1), -1, -2)
        diff = diff + np.abs(np.triu(upper - exact_logits, 1))
    eps = float(np.finfo(q.dtype).eps)
    d = q.shape[-1]
    s = 1.0 / math.sqrt(d) if scale is None else scale
    qn = np.linalg.norm(q.astype(EXACT), axis=-1).max()
    kn = np.linalg.norm(k.astype(EXACT), axis=-1).max()
    err = float(np.max(diff, initial=0.0))
    assert err <= 4 * (d + 2) * eps * abs(s) * float(qn * kn), f"basis off by {err:.3e} (n={n})"
    return err


def assert_attention_close(
    actual, golden, baseline, op, vmax, *, logit_err=0.0, factor=3.0, err_msg=""
):
    """Row ``r`` of the result is within ``factor`` × the dense same-dtype error (plus
    ``8 eps`` of scale, as :func:`assert_within_reference_error`), plus the documented bounds
    of the method: ``2 (e^ε - 1) ‖V‖_∞`` for logits within ``ε`` of the basis, and, for rows on
    the FFT path, ``2 noise / D_r · ‖V‖_∞``."""
    a, g, b = (to_numpy(x).astype(np.float64) for x in (actual, golden, baseline))
    assert a.shape == g.shape, (a.shape, g.shape)
    assert np.all(np.isfinite(a)), "NaN or inf in the result"
    eps = float(np.finfo(to_numpy(actual).dtype).eps)
    base = float(np.max(np.abs(b - g), initial=0.0))
    bound = factor * base + 8 * eps * float(np.max(np.abs(g), initial=0.0))
    bound = bound + 2 * math.expm1(logit_err) * vmax
    bound = bound + 2 * _fft_rows(op) * vmax  # (n,)
    err = np.abs(a - g).reshape(-1, *a.shape[-2:]).max(axis=(0, 2))  # worst per row
    bad = np.nonzero(~(err <= bound))[0]
    if bad.size:
        r = int(bad[0])
        raise AssertionError(
            f"row {r}: error {err[r]:.3e} > bound {bound[r]:.3e} (dense error {base:.3e}, "
            f"{bad.size} rows fail, recomputed {len(op.recomputed_rows)}). {err_msg}"
        )


def assert_namespace_dtype(actual, xp, dtype, shape):
    """The result stays in the caller's library and dtype, with the expected shape."""
    got = array_api_compat.array_namespace(actual)
    want = array_api_compat.array_namespace(xp.asarray([0.0]))
    assert got is want, (got, want)
    assert actual.dtype == dtype, (actual.dtype, dtype)
    assert tuple(actual.shape) == tuple(shape), (actual.shape, shape)


def _instances(rng, n, dtype):
    """Exact instances ``(name, q, k, v, rank, causal_only)`` (docs/math.rst §4)."""
    out = []
    q, k, v, starts = rotary_conv_instance(rng, n, 8, (0,), dtype=dtype)
    out.append(("rotary-1", q, k, v, 1, False))
    if n >= 4:
        starts = random_starts(rng, n, 4)
        q, k, v, starts = rotary_conv_instance(rng, n, 8, starts, value_dim=3, dtype=dtype)
        out.append(("rotary-4", q, k, v, 4, True))  # exact only below the diagonal
        q, k, v, starts = alibi_conv_instance(
            rng, n, 4, slope=0.1, starts=starts, biases=(0.0, 1.0, -1.0, 0.5), dtype=dtype
        )
        out.append(("alibi-4", q, k, v, 4, True))
    q, k, v, _ = alibi_conv_instance(rng, n, 4, slope=0.1, value_dim=5, dtype=dtype)
    out.append(("alibi-1", q, k, v, 1, False))
    q, k, v = (rng.standard_normal((n, 4)).astype(dtype) for _ in range(3))
    out.append(("generic-full-rank", q, k, v, n, False))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 5, 31, 127])
def test_conv_attention_exact_instances(xp, rng, conv_route, n, dtype):
    for name, q, k, v, rank, causal_only in _instances(rng, n, dtype):
        if name == "generic-full-rank" and n > 31:
            continue  # rank n: n FFT segments; covered at small n
        for causal in (True,) if causal_only else (True, False):
            out = conv_attention(*as_xp(xp, q, k, v), rank=rank, causal=causal)
            assert_namespace_dtype(out, xp, xp.asarray(v).dtype, v.shape)
            op = conv_operator(*as_xp(xp, q, k), rank=rank, causal=causal)
            golden = golden_attention(q, k, v, causal)
            baseline = attention(q, k, v, causal=causal)
            vmax = float(np.max(np.abs(v)))
            msg = f"{name} causal={causal}"
            eps_s = basis_logit_error(op, q, k, causal)
            assert_attention_close(out, golden, baseline, op, vmax, logit_err=eps_s, err_msg=msg)


def _check_recomputed_rows(op, q, k, causal, scale=None):
    """``recomputed_rows`` holds every row whose exact normaliser ``D_r = Σ_j exp(S_rj - μ)``
    is under-resolved (``noise / D_r > min(tolerance, 1)`` by a factor 2 margin) and no row
    that is clearly resolved.  Returns the (must, must-not) row sets."""
    logits = logits_dense(q, k, scale, causal=False)
    n = logits.shape[-1]
    mask = np.tril(np.ones((n, n), dtype=bool)) if causal else np.ones((n, n), dtype=bool)
    shift = np.asarray(to_numpy(op.shift), dtype=EXACT)[..., None, None]
    d = np.sum(np.where(mask, np.exp(logits - shift), 0.0), axis=-1).reshape(-1, n)
    noise = np.asarray(to_numpy(op.noise), dtype=EXACT).reshape(-1, 1)
    t = min(op.tolerance, 1.0)
    must = set(np.nonzero(np.any(d * t < noise / 2, axis=0))[0].tolist())
    must_not = set(np.nonzero(np.all(d * t > 2 * noise, axis=0))[0].tolist())
    rows = set(op.recomputed_rows)
    assert must <= rows, f"rows {sorted(must - rows)} are under-resolved but not recomputed"
    assert not rows & must_not, f"rows {sorted(rows & must_not)} were recomputed needlessly"
    assert list(op.recomputed_rows) == sorted(rows)
    return must, must_not


def _dense_products(f, g, y, z):
    """The four operator products with a dense ``f`` (NumPy, any dtype)."""
    ft = np.swapaxes(f, -1, -2)
    h = f * (g @ np.swapaxes(y, -1, -2))
    return {
        "matmul": f @ z,
        "rmatmul": ft @ z,
        "hadamard_matmul": h @ z,
        "hadamard_rmatmul": np.swapaxes(h, -1, -2) @ z,
    }


def _check_operator(xp, rng, q, k, rank, causal, *, tolerance=None, expect_rows=None):
    n, dtype = q.shape[-2], q.dtype
    op = conv_operator(*as_xp(xp, q, k), rank=rank, causal=causal, tolerance=tolerance)
    assert isinstance(op, ConvAttentionOperator) and op.n == n
    if expect_rows is not None:
        assert op.recomputed_rows == expect_rows
    else:
        _check_recomputed_rows(op, q, k, causal)
    golden_f = softmax_dense(logits_dense(q, k, causal=False), causal)
    baseline_f = to_numpy(attention_weights(q, k, causal=causal))
    # f itself (Z = I): rows on the FFT path within 2 noise / D_r, recomputed rows exact
    f = op.to_dense()
    assert_namespace_dtype(f, xp, xp.asarray(q).dtype, (*q.shape[:-2], n, n))
    eps_s = basis_logit_error(op, q, k, causal)
    msg = f"to_dense causal={causal}"
    assert_attention_close(f, golden_f, baseline_f, op, 1.0, logit_err=eps_s, err_msg=msg)
    r, p = 3, 2
    g, y = rng.standard_normal((2, n, r)).astype(dtype)
    z = rng.standard_normal((n, p)).astype(dtype)
    golden = _dense_products(golden_f, *exact(g, y, z))
    baseline = _dense_products(baseline_f, g, y, z)
    # FFT budget: every product is linear in f, whose entries on the FFT path are off by at
    # most noise / D_r; a column of fᵀ Z sums up to n of them.
    fft = float(np.max(_fft_rows(op)))
    gy = float(np.max(np.abs(g))) * float(np.max(np.abs(y))) * r
    zmax = float(np.max(np.abs(z)))
    for name, args, extra in (
        ("matmul", (z,), zmax),
        ("rmatmul", (z,), n * zmax),
        ("hadamard_matmul", (g, y, z), gy * zmax),
        ("hadamard_rmatmul", (g, y, z), n * gy * zmax),
    ):
        out = getattr(op, name)(*as_xp(xp, *args))
        assert_namespace_dtype(out, xp, xp.asarray(q).dtype, (*q.shape[:-2], n, p))
        a, gd, b = (to_numpy(x).astype(np.float64) for x in (out, golden[name], baseline[name]))
        assert np.all(np.isfinite(a))
        eps = float(np.finfo(dtype).eps)
        bound = 3 * np.max(np.abs(b - gd)) + 8 * eps * np.max(np.abs(gd))
        bound += 2 * (fft + math.expm1(eps_s)) * extra
        err = float(np.max(np.abs(a - gd)))
        assert err <= bound, (
            f"{name} causal={causal}: error {err:.3e} > {bound:.3e}, rows {op.recomputed_rows}"
        )
    return op


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 5, 31, 64])
def test_operator_matches_dense(xp, rng, conv_route, n, dtype):
    for name, q, k, _, rank, causal_only in _instances(rng, n, dtype):
        if name == "generic-full-rank" and n > 31:
            continue  # rank n: n FFT segments; covered at small n
        for causal in (True,) if causal_only else (True, False):
            op = _check_operator(xp, rng, q, k, rank, causal)
            # recomputation of every row (a tolerance no FFT row meets) is exact
            everything = tuple(range(n))
            _check_operator(xp, rng, q, k, rank, causal, tolerance=1e-300, expect_rows=everything)
            assert op.tolerance == math.sqrt(float(np.finfo(dtype).eps))


@pytest.mark.parametrize("causal", [True, False])
def test_operator_batch_axes(xp, rng, conv_route, causal):
    n = 31
    if causal:
        # batch element 1: a segment bias of 40 puts the first rows e^-40 below its maximum
        instances = [
            alibi_conv_instance(rng, n, 4, slope=0.1, starts=(0, 10), biases=b)
            for b in ((0.0, 1.0), (0.0, 40.0))
        ]
    else:
        instances = [rotary_conv_instance(rng, n, 4, (0,), logit_scale=s) for s in (1.0, 3.0)]
    q = np.stack([i[0] for i in instances])[:, None]  # (2, 1, n, d)
    k = np.stack([i[1] for i in instances])[:, None]
    op = _check_operator(xp, rng, q, k, len(instances[0][3]), causal)
    assert op.normaliser.shape == (2, 1, n) and op.shift.shape == (2, 1)
    must, _ = _check_recomputed_rows(op, q, k, causal)
    assert bool(must) == causal
    if causal:
        assert op.recomputed_rows == tuple(range(10))
    v = rng.standard_normal((n, 3))  # broadcast against the batch axes
    out = conv_attention(*as_xp(xp, q, k, v), rank=2, causal=causal)
    assert out.shape == (2, 1, n, 3)
    golden = golden_attention(q, k, v, causal)
    baseline = attention(q, k, v, causal=causal)
    eps_s = basis_logit_error(op, q, k, causal)
    assert_attention_close(out, golden, baseline, op, float(np.max(np.abs(v))), logit_err=eps_s)


@settings(deadline=None)
@given(
    n=st.sampled_from([2, 3, 5, 31, 64, 127]),
    count=st.integers(1, 5),
    batch=st.lists(st.integers(1, 2), max_size=2).map(tuple),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_rotary_recovery_and_attention_property(xp, n, count, batch, dtype, seed):
    rng = np.random.default_rng(seed)
    starts = random_starts(rng, n, count)
    size = math.prod(batch)
    parts = [rotary_conv_instance(rng, n, 6, starts, dtype=dtype) for _ in range(size)]
    q, k, v = (np.stack([p[i] for p in parts]).reshape(*batch, n, -1) for i in range(3))
    basis = recover_conv_basis(*as_xp(xp, q, k), rank=count + 1)
    _check_recovered(basis, q, k, starts)
    op = conv_operator(*as_xp(xp, q, k), rank=count)
    _check_recomputed_rows(op, q, k, True)
    out = conv_attention(*as_xp(xp, q, k, v), rank=count)
    assert_namespace_dtype(out, xp, xp.asarray(v).dtype, v.shape)
    eps_s = basis_logit_error(op, q, k, True)
    golden, baseline = golden_attention(q, k, v, True), attention(q, k, v)
    vmax = float(np.max(np.abs(v)))
    assert_attention_close(out, golden, baseline, op, vmax, logit_err=eps_s)


# --------------------------------------------------------------------------------------
# Dynamic range: the safeguard (docs/math.rst §4)
# --------------------------------------------------------------------------------------


def _large_logit_cases(rng, n, dtype):
    """Instances whose logits reach ``1e4`` (well conditioned: the rotary construction has
    no cancellation in ``q · k``), plus ALiBi with large biases between segments."""
    q, k, v, _ = rotary_conv_instance(rng, n, 8, (0, n // 3, n // 2), logit_scale=1e4, dtype=dtype)
    yield "rotary-3 1e4", q, k, v, 3, True
    q, k, v, _ = rotary_conv_instance(rng, n, 8, (0,), logit_scale=1e4, dtype=dtype)
    yield "rotary-1 1e4", q, k, v, 1, False
    q, k, v, _ = rotary_conv_instance(rng, n, 8, (0, 7, n // 2), logit_scale=30.0, dtype=dtype)
    yield "rotary-3 30", q, k, v, 3, True
    q, k, v, _ = alibi_conv_instance(
        rng, n, 4, slope=0.1, starts=(0, n // 4, n // 2), biases=(0.0, 60.0, -60.0), dtype=dtype
    )
    yield "alibi-3 bias 60", q, k, v, 3, True


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [31, 257])
def test_large_logits(xp, rng, conv_route, n, dtype):
    for name, q, k, v, rank, causal_only in _large_logit_cases(rng, n, dtype):
        golden = None
        for causal in (True,) if causal_only else (True, False):
            golden = golden_attention(q, k, v, causal)
            baseline = attention(q, k, v, causal=causal)
            vmax = float(np.max(np.abs(v)))
            msg = f"{name} causal={causal}"
            op = conv_operator(*as_xp(xp, q, k), rank=rank, causal=causal)
            must, _ = _check_recomputed_rows(op, q, k, causal)
            assert must, msg  # these instances need the safeguard
            out = conv_attention(*as_xp(xp, q, k, v), rank=rank, causal=causal)
            assert_namespace_dtype(out, xp, xp.asarray(v).dtype, v.shape)
            eps_s = basis_logit_error(op, q, k, causal)
            assert_attention_close(out, golden, baseline, op, vmax, logit_err=eps_s, err_msg=msg)
            # no recomputation by tolerance: still finite, rows within the noise floor are
            # recomputed, and every kept row is a near-convex combination of the values
            op = conv_operator(*as_xp(xp, q, k), rank=rank, causal=causal, tolerance=math.inf)
            _check_recomputed_rows(op, q, k, causal)
            out = conv_attention(*as_xp(xp, q, k, v), rank=rank, causal=causal, tolerance=math.inf)
            a = to_numpy(out)
            assert np.all(np.isfinite(a)), msg
            assert np.max(np.abs(a)) <= 3 * vmax, msg
            msg += " tol=inf"
            assert_attention_close(out, golden, baseline, op, vmax, logit_err=eps_s, err_msg=msg)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_recomputation_when_well_conditioned(xp, rng, dtype):
    n = 127
    q, k, _, _ = rotary_conv_instance(rng, n, 8, (0, 40, 90), logit_scale=0.5, dtype=dtype)
    op = conv_operator(*as_xp(xp, q, k), rank=3)
    assert op.recomputed_rows == ()
    must, must_not = _check_recomputed_rows(op, q, k, True)
    assert not must and len(must_not) >= n - 2  # all rows resolved, nearly all by far


def test_recomputed_rows_follow_tolerance(xp, rng, conv_route):
    # the recomputed set grows as the tolerance shrinks, and matches the exact normalisers
    n = 64
    q, k, _, _ = rotary_conv_instance(rng, n, 8, (0, 20, 41), logit_scale=8.0)
    previous = None
    for tolerance in (math.inf, 1.0, 1e-6, 1e-9, 1e-12, 1e-300):
        op = conv_operator(*as_xp(xp, q, k), rank=3, tolerance=tolerance)
        assert op.tolerance == tolerance
        _check_recomputed_rows(op, q, k, True)
        rows = set(op.recomputed_rows)
        assert previous is None or previous <= rows
        previous = rows
    assert previous == set(range(n))


# --------------------------------------------------------------------------------------
# Bad input: exception type and message
# --------------------------------------------------------------------------------------


def _qkv(xp, rng, n=5, d=4, e=3):
    q, k = rng.standard_normal((2, n, d))
    return xp.asarray(q), xp.asarray(k), xp.asarray(rng.standard_normal((n, e)))


def test_bad_rank_probe_and_options(xp, rng):
    q, k, v = _qkv(xp, rng)
    calls = (
        lambda **kw: recover_conv_basis(q, k, **kw),
        lambda **kw: conv_attention(q, k, v, **kw),
        lambda **kw: conv_operator(q, k, **kw),
    )
    for call in calls:
        for rank in (0, -2, 2.0, True, None, "3"):
            with pytest.raises(ValueError, match=f"rank must be a positive integer, got {rank!r}"):
                call(rank=rank)
        for probe in (0, 6, 1.0, False):
            msg = rf"probe must be an integer in \[1, n = 5\], got {probe!r}"
            with pytest.raises(ValueError, match=msg):
                call(rank=2, probe=probe)
        for delta in (0.0, -1.0):
            with pytest.raises(ValueError, match=r"delta must exceed 4 \* probe \* eps = 0.0"):
                call(rank=2, delta=delta)
        with pytest.raises(ValueError, match="scale must be finite, got inf"):
            call(rank=2, scale=math.inf)
    # NumPy-style integers are integers
    assert recover_conv_basis(q, k, rank=np.int64(2), probe=np.int32(2)).rank <= 2
    # delta must exceed 4 T eps (docs/math.rst §4)
    msg = r"delta must exceed 4 \* probe \* eps = 0.8 \(docs/math.rst §4\), got 0.8"
    with pytest.raises(ValueError, match=msg):
        recover_conv_basis(q, k, rank=2, probe=2, eps=0.1, delta=0.8)
    assert recover_conv_basis(q, k, rank=2, probe=2, eps=0.1, delta=0.81).rank >= 1
    for eps in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            recover_conv_basis(q, k, rank=2, eps=eps)
    for call in calls[1:]:
        for tol in (0, -1.0, math.nan):
            with pytest.raises(ValueError, match=r"tolerance must be > 0 \(math.inf"):
                call(rank=2, tolerance=tol)
        with pytest.raises(ValueError, match="tolerance must be a number > 0, got 'x'"):
            call(rank=2, tolerance="x")


def test_bad_shapes(xp, rng):
    q, k, v = _qkv(xp, rng)
    msg = r"k must have last dimension 4 \(the head dimension of q\), got shape \(5, 3\)"
    for call in (recover_conv_basis, conv_operator):
        with pytest.raises(ValueError, match=msg):
            call(q, k[:, :3], rank=2)
    with pytest.raises(ValueError, match=msg):
        conv_attention(q, k[:, :3], v, rank=2)
    with pytest.raises(
        ValueError, match=r"v must have as many rows as k \(5\), got shape \(4, 3\)"
    ):
        conv_attention(q, k, v[:4, :], rank=2)
    # q and k with different n, in both directions of attention
    msg = r"needs as many queries as keys, got q shape \(5, 4\) and k shape \(4, 4\)"
    msg = "the k-conv basis " + msg
    for causal in (True, False):
        with pytest.raises(ValueError, match=msg):
            recover_conv_basis(q, k[:4, :], rank=2, causal=causal)
        with pytest.raises(ValueError, match=msg):
            conv_operator(q, k[:4, :], rank=2, causal=causal)
        with pytest.raises(ValueError, match=msg):
            conv_attention(q, k[:4, :], v[:4, :], rank=2, causal=causal)
    # leading axes that do not broadcast
    qb = xp.asarray(rng.standard_normal((2, 5, 4)))
    kb = xp.asarray(rng.standard_normal((3, 5, 4)))
    with pytest.raises(ValueError, match=r"leading \(batch/head\) axes must broadcast"):
        conv_attention(qb, kb, v, rank=2)
    with pytest.raises(ValueError, match=r"leading \(batch/head\) axes must broadcast"):
        recover_conv_basis(qb, kb, rank=2)
    # n = 0 and missing axes
    empty = xp.asarray(np.zeros((0, 4)))
    with pytest.raises(ValueError, match=r"q must have a non-empty sequence axis \(n >= 1\)"):
        conv_attention(empty, empty, xp.asarray(np.zeros((0, 3))), rank=1)
    with pytest.raises(ValueError, match=r"q must have a non-empty sequence axis \(n >= 1\)"):
        recover_conv_basis(empty, empty, rank=1)
    with pytest.raises(ValueError, match=r"q must have at least 2 dimensions"):
        conv_operator(xp.asarray(np.ones(4)), k, rank=1)


# random inputs: only the input checks are under test, not the (approximate) result
@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
def test_bad_dtypes_and_namespaces(xp, rng):
    q, k, v = _qkv(xp, rng)
    ints = xp.asarray(np.ones((5, 4), dtype=np.int64))
    with pytest.raises(TypeError, match="q must have a real floating dtype, got .*int64"):
        conv_attention(ints, k, v, rank=2)
    with pytest.raises(TypeError, match="k must have a real floating dtype, got .*int64"):
        recover_conv_basis(q, ints, rank=2)
    with pytest.raises(TypeError, match="v must have a real floating dtype"):
        conv_attention(q, k, xp.asarray(np.ones((5, 3), dtype=np.int32)), rank=2)
    with pytest.raises(TypeError, match="k must have a real floating dtype"):
        conv_operator(q, xp.asarray(np.ones((5, 4), dtype=bool)), rank=2)
    a, z = xp.asarray(np.ones(5, dtype=np.int64)), xp.asarray(np.ones((5, 2)))
    with pytest.raises(TypeError, match="a must have a real floating dtype, got .*int64"):
        conv_matmul(a, z)
    with pytest.raises(TypeError, match="z must have a real floating dtype, got .*int64"):
        conv_rmatmul(z[:, 0], xp.asarray(np.ones((5, 2), dtype=np.int64)))
    basis = ConvBasis((0, 2), xp.asarray(np.ones((2, 5))), 5)
    with pytest.raises(TypeError, match="z must have a real floating dtype, got .*int64"):
        basis.matmul(xp.asarray(np.ones((5, 1), dtype=np.int64)))
    op = conv_operator(q, k, rank=2)
    with pytest.raises(TypeError, match="z must have a real floating dtype, got .*int64"):
        op.rmatmul(xp.asarray(np.ones((5, 1), dtype=np.int64)))


# random inputs: only the input checks are under test, not the (approximate) result
@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
def test_mixed_namespaces(xp, rng):
    strict = pytest.importorskip("array_api_strict")
    other = strict if array_api_compat.array_namespace(xp.asarray([0.0])) is not strict else np
    q, k, _ = _qkv(xp, rng)
    foreign = other.asarray(rng.standard_normal((5, 4)))
    msg = "all arrays must come from one array library"
    with pytest.raises(TypeError, match=msg):
        recover_conv_basis(q, foreign, rank=2)
    with pytest.raises(TypeError, match=msg):
        conv_attention(q, k, other.asarray(rng.standard_normal((5, 3))), rank=2)
    with pytest.raises(TypeError, match=msg):
        conv_matmul(q[:, 0], foreign)
    basis = ConvBasis((0,), xp.asarray(np.ones((1, 5))), 5)
    with pytest.raises(TypeError, match=msg):
        basis.rmatmul(foreign)
    with pytest.raises(TypeError, match=msg):
        conv_operator(q, k, rank=2).matmul(foreign)


def test_bad_conv_product_input(xp):
    a, z = xp.asarray(np.ones(3)), xp.asarray(np.ones((3, 2)))
    for m in (0, 4, -1, 2.0, True, "2"):
        with pytest.raises(ValueError, match=rf"m must be an integer in \[1, n = 3\], got {m!r}"):
            conv_matmul(a, z, m=m)
        with pytest.raises(ValueError, match=rf"m must be an integer in \[1, n = 3\], got {m!r}"):
            conv_rmatmul(a, z, m=m)
    with pytest.raises(
        ValueError, match=r"z must have shape \(\.\.\., n, p\) with n = 3 \(len\(a\)\)"
    ):
        conv_matmul(a, xp.asarray(np.ones((4, 2))))
    with pytest.raises(ValueError, match=r"z must have at least 2 dimensions"):
        conv_matmul(a, xp.asarray(np.ones(3)))
    with pytest.raises(ValueError, match=r"a must have shape \(\.\.\., n\), got \(\)"):
        conv_matmul(xp.asarray(1.0), xp.asarray(np.ones((1, 2))))
    with pytest.raises(ValueError, match=r"z must have a non-empty sequence axis \(n >= 1\)"):
        conv_rmatmul(xp.asarray(np.ones(0)), xp.asarray(np.ones((0, 2))))
    msg = r"leading \(batch\) axes of a \(2, 3\) and z \(3, 3, 2\) must broadcast"
    with pytest.raises(ValueError, match=msg):
        conv_matmul(xp.asarray(np.ones((2, 3))), xp.asarray(np.ones((3, 3, 2))))


def test_bad_basis(xp):
    vec = xp.asarray(np.ones((2, 5)))
    with pytest.raises(ValueError, match=r"starts must begin with 0, got \(\)"):
        ConvBasis((), xp.asarray(np.ones((0, 5))), 5)
    with pytest.raises(ValueError, match=r"starts must begin with 0, got \(1, 2\)"):
        ConvBasis((1, 2), vec, 5)
    msg = r"starts must increase strictly and stay below n = 5, got \(0, 3, 3\)"
    with pytest.raises(ValueError, match=msg):
        ConvBasis((0, 3, 3), xp.asarray(np.ones((3, 5))), 5)
    with pytest.raises(ValueError, match=r"stay below n = 5, got \(0, 5\)"):
        ConvBasis((0, 5), vec, 5)
    with pytest.raises(ValueError, match=r"starts must increase strictly"):
        ConvBasis((0, 3, 2), xp.asarray(np.ones((3, 5))), 5)
    for starts in ((0, 1.5), (0, True), 3):
        with pytest.raises(ValueError, match="starts must be integers"):
            ConvBasis(starts, vec, 5)
    for n in (0, 2.0, -1):
        with pytest.raises(ValueError, match=f"n must be a positive integer, got {n!r}"):
            ConvBasis((0,), xp.asarray(np.ones((1, 2))), n)
    msg = r"vectors must have shape \(\.\.\., k, n\) = \(\.\.\., 2, 5\), got \(3, 5\)"
    with pytest.raises(ValueError, match=msg):
        ConvBasis((0, 1), xp.asarray(np.ones((3, 5))), 5)
    with pytest.raises(ValueError, match=r"vectors must have shape"):
        ConvBasis((0, 1), xp.asarray(np.ones((2, 4))), 5)
    basis = ConvBasis((0, 1), vec, 5)
    assert basis.starts == (0, 1) and type(basis.starts[1]) is int
    with pytest.raises(
        ValueError, match=r"z must have shape \(\.\.\., n, p\) with n = 5, got \(4, 1\)"
    ):
        basis.matmul(xp.asarray(np.ones((4, 1))))
    with pytest.raises(ValueError, match=r"z must have at least 2 dimensions"):
        basis.rmatmul(xp.asarray(np.ones(5)))


# random inputs: only the input checks are under test, not the (approximate) result
@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
def test_bad_operator_products(xp, rng):
    q, k, _ = _qkv(xp, rng)
    op = conv_operator(q, k, rank=2)
    ones = xp.asarray(np.ones((5, 2)))
    with pytest.raises(ValueError, match=r"z must have 5 rows \(\.\.\., 5, p\)"):
        op.matmul(xp.asarray(np.ones((4, 1))))
    with pytest.raises(ValueError, match=r"y must have last dimension 2 \(the width of g\)"):
        op.hadamard_matmul(ones, xp.asarray(np.ones((5, 3))), ones)
    with pytest.raises(ValueError, match=r"y must have 5 rows"):
        op.hadamard_rmatmul(ones, xp.asarray(np.ones((4, 2))), ones)
    with pytest.raises(ValueError, match=r"g must have 5 rows"):
        op.hadamard_matmul(xp.asarray(np.ones((6, 2))), ones, ones)


# --------------------------------------------------------------------------------------
# No silent approximations: the sampled logit residual and ConvBasisWarning
# --------------------------------------------------------------------------------------


def _dense_residual(op, q, k, scale, causal):
    """``max |basis − s Q Kᵀ|`` over the whole lower triangle (and the ``K Qᵀ`` basis)."""
    q, k = (to_numpy(a).astype(np.float64) for a in (q, k))
    lower = np.tril(to_numpy(op.lower.to_dense()) - scale * q @ k.T)
    if causal:
        return float(np.abs(lower).max())
    upper = np.tril(to_numpy(op.upper.to_dense()) - scale * k @ q.T)
    return float(max(np.abs(lower).max(), np.abs(upper).max()))


@pytest.mark.parametrize("causal", [True, False])
def test_residual_is_exact_for_small_n_and_warns_on_unstructured_logits(xp, rng, causal):
    # n = 20: every lower-triangle entry is sampled, so the estimate is the true residual.
    q, k, v = (rng.standard_normal((20, 4)) for _ in range(3))
    with pytest.warns(ConvBasisWarning, match=r"rank-3 conv basis misses sampled logits"):
        op = conv_operator(xp.asarray(q), xp.asarray(k), rank=3, causal=causal)
    true = _dense_residual(op, q, k, 0.5, causal)
    assert true > 0.5  # random logits have no 3-segment structure
    assert op.logit_residual == pytest.approx(true, rel=1e-12)
    with pytest.warns(ConvBasisWarning, match=r"off by up to about 2 x max\|V\|"):
        conv_attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), rank=3, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_on_exact_instances_is_round_off_and_silent(xp, rng, dtype):
    # filterwarnings=error (pyproject) turns any ConvBasisWarning into a failure here.
    q, k, _, starts = rotary_conv_instance(rng, 300, 8, (0, 40, 170), dtype=dtype)
    op = conv_operator(xp.asarray(q), xp.asarray(k), rank=3)
    unit = float(np.finfo(dtype).eps)
    scale = 1 / math.sqrt(8)
    assert op.lower.starts == starts
    # The estimate falls short of the true residual up to its own rounding: the sampled
    # logits are evaluated in the input's precision (|fl(x·y) − x·y| <= γ_d Σ|x_l y_l|).
    rounding = (8 + 2) * unit * scale * float((np.abs(q) @ np.abs(k).T).max())
    assert 0 <= op.logit_residual <= _dense_residual(op, q, k, scale, True) + rounding
    assert op.logit_residual <= 64 * unit * max(1.0, float(np.abs(scale * q @ k.T).max()))


def test_residual_sampling_is_bounded_and_catches_large_mismatch(xp, rng):
    # n = 2000: 512 of the ~2e6 lower-triangle entries are sampled (O(512 d) work).  The
    # estimate can only fall short of the true residual; on random logits it is still large.
    q, k = (rng.standard_normal((2000, 4)) for _ in range(2))
    with pytest.warns(ConvBasisWarning):
        op = conv_operator(xp.asarray(q), xp.asarray(k), rank=4)
    assert 0.5 < op.logit_residual <= _dense_residual(op, q, k, 0.5, True)


def test_products_return_writeable_arrays(rng):
    # One segment, one column block: no read-only broadcast view may reach the caller.
    z = rng.standard_normal((16, 2))
    basis = ConvBasis((0,), rng.standard_normal((1, 16)), 16)
    for out in (basis.rmatmul(z), basis.matmul(z), conv_rmatmul(rng.standard_normal(16), z)):
        assert out.flags.writeable
        out += 1.0


def test_attention_recovers_in_the_precision_of_q_and_k(xp, rng):
    # float32 q, k with float64 v: recovery must see float32 round-off as round-off, not as
    # segment changes (the output follows the common dtype).
    q, k, v, starts = alibi_conv_instance(rng, 100, 4, slope=0.1, starts=(0, 30), biases=(0, 1))
    q32, k32 = (xp.asarray(a.astype(np.float32)) for a in (q, k))
    out = conv_attention(q32, k32, xp.asarray(v), rank=2)
    assert out.dtype == xp.float64
    golden = attention(*(a.astype(np.float32).astype(np.float64) for a in (q, k)), v)
    assert np.abs(to_numpy(out) - golden).max() < 1e-5
    assert conv_operator(q32, k32, rank=2).lower.starts == starts


def test_a_missed_late_segment_warns(rng):
    # The last 128 of 4096 columns form their own segment; rank 1 cannot represent it.  Few
    # random samples land there, but the diagonal check sees it.
    q, k, *_ = rotary_conv_instance(rng, 4096, 8, (0, 3968), logit_scale=10.0)
    with pytest.warns(ConvBasisWarning, match="rank-1 conv basis"):
        op = conv_operator(q, k, rank=1)
    assert op.logit_residual > 1.0
