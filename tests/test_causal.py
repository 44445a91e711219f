"""Prefix products against the explicit masked n x n matrices (docs/math.rst §1)."""

from __future__ import annotations

import array_api_strict
import numpy as np
import pytest
from array_api_compat import array_namespace, is_numpy_namespace
from hypothesis import given
from hypothesis import strategies as st

from convbasis import face_splitting_product, masked_hadamard_matmul, masked_lowrank_matmul
from convbasis.testing import assert_within_reference_error

N_VALUES = (1, 2, 3, 17, 64, 127, 257)


def dense_mask(n, transpose, strict):
    mask = np.tril(np.ones((n, n)), -1 if strict else 0)
    return mask.T if transpose else mask


def explicit(u, v, z, transpose, strict, dtype, g=None, y=None):
    """The dense computation the fast path replaces, in ``dtype``."""
    u, v, z = (np.asarray(a, dtype=dtype) for a in (u, v, z))
    mat = np.tril(u @ np.swapaxes(v, -1, -2), -1 if strict else 0)
    if g is not None:
        mat = mat * (np.asarray(g, dtype=dtype) @ np.swapaxes(np.asarray(y, dtype=dtype), -1, -2))
    if transpose:
        mat = np.swapaxes(mat, -1, -2)
    return mat @ z


shapes = st.fixed_dictionaries(
    {
        "n": st.sampled_from(N_VALUES),
        "r": st.integers(1, 9),
        "p": st.integers(1, 5),
        "batch": st.lists(st.integers(1, 3), max_size=2).map(tuple),
        "chunk": st.sampled_from([None, 1, 4, 16, 300]),
        "transpose": st.booleans(),
        "strict": st.booleans(),
        "dtype": st.sampled_from(["float32", "float64"]),
        "seed": st.integers(0, 2**16),
    }
)


@given(case=shapes)
def test_masked_lowrank_matmul(xp, case):
    rng = np.random.default_rng(case["seed"])
    n, r, p, batch = case["n"], case["r"], case["p"], case["batch"]
    u, v = rng.standard_normal((2, *batch, n, r))
    z = rng.standard_normal((n, p))  # broadcast against the batch axes
    t, s, dtype = case["transpose"], case["strict"], case["dtype"]
    out = masked_lowrank_matmul(
        *(xp.asarray(a.astype(dtype)) for a in (u, v, z)),
        transpose=t,
        strict=s,
        chunk=case["chunk"],
    )
    assert out.dtype == getattr(xp, dtype)
    assert out.shape == (*batch, n, p)
    terms = explicit(np.abs(u), np.abs(v), np.abs(z), t, s, "float64")
    assert_within_reference_error(
        out,
        explicit(u, v, z, t, s, "float64"),
        explicit(u, v, z, t, s, dtype),
        factor=4,
        magnitude=np.max(np.abs(terms), initial=0.0),
    )


@given(case=shapes, s=st.integers(1, 4))
def test_masked_hadamard_matmul(xp, case, s):
    rng = np.random.default_rng(case["seed"])
    n, r, p, batch = case["n"], case["r"], case["p"], case["batch"]
    u, v = rng.standard_normal((2, *batch, n, r))
    g, y = rng.standard_normal((2, n, s))
    z = rng.standard_normal((*batch, n, p))
    t, st_, dtype = case["transpose"], case["strict"], case["dtype"]
    out = masked_hadamard_matmul(
        *(xp.asarray(a.astype(dtype)) for a in (u, v, g, y, z)),
        transpose=t,
        strict=st_,
        chunk=case["chunk"],
    )
    assert out.dtype == getattr(xp, dtype)
    golden = explicit(u, v, z, t, st_, "float64", g, y)
    assert_within_reference_error(out, golden, explicit(u, v, z, t, st_, dtype, g, y), factor=4)


def test_face_splitting_identity(xp, rng):
    n = 11
    u, v = rng.standard_normal((2, n, 3))
    g, y = rng.standard_normal((2, n, 2))
    uf = np.asarray(face_splitting_product(xp.asarray(u), xp.asarray(g)))
    vf = np.asarray(face_splitting_product(xp.asarray(v), xp.asarray(y)))
    assert uf.shape == (n, 6)
    np.testing.assert_allclose(uf[:, 1 * 2 + 1], u[:, 1] * g[:, 1])
    np.testing.assert_allclose(uf @ vf.T, (u @ v.T) * (g @ y.T), atol=1e-12)


def test_known_values(xp):
    ones = xp.asarray(np.ones((4, 1)))
    np.testing.assert_array_equal(
        np.asarray(masked_lowrank_matmul(ones, ones, ones))[:, 0], [1, 2, 3, 4]
    )
    np.testing.assert_array_equal(
        np.asarray(masked_lowrank_matmul(ones, ones, ones, transpose=True, strict=True))[:, 0],
        [3, 2, 1, 0],
    )


def test_bad_input(xp):
    a = xp.asarray(np.ones((5, 2)))
    with pytest.raises(ValueError, match="v must have n = 5 rows like u"):
        masked_lowrank_matmul(a, xp.asarray(np.ones((4, 2))), a)
    with pytest.raises(ValueError, match="v must have the same rank"):
        masked_lowrank_matmul(a, xp.asarray(np.ones((5, 3))), a)
    with pytest.raises(ValueError, match="u must have a non-empty sequence axis"):
        empty = xp.asarray(np.ones((0, 2)))
        masked_lowrank_matmul(empty, empty, empty)
    with pytest.raises(TypeError, match="z must have a real floating dtype"):
        masked_lowrank_matmul(a, a, xp.asarray(np.ones((5, 2), dtype=np.int32)))
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        masked_lowrank_matmul(a, a, a, chunk=0)
    with pytest.raises(ValueError, match="y must have the same rank"):
        masked_hadamard_matmul(a, a, a, xp.asarray(np.ones((5, 1))), a)
    with pytest.raises(ValueError, match="g must have at least one column"):
        masked_hadamard_matmul(a, a, xp.asarray(np.ones((5, 0))), xp.asarray(np.ones((5, 0))), a)
    with pytest.raises(TypeError, match="one array library"):
        masked_lowrank_matmul(np.ones((5, 2)), array_api_strict.asarray(np.ones((5, 2))), a)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize(("transpose", "strict"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_pipelined_blocks_match_dense(xp, rng, monkeypatch, threads, transpose, strict, dtype):
    """Inputs large enough for NumPy's pipelined path (other backends: the one-call path).

    The one-call path's running sum is disabled, so NumPy input must take the pipeline;
    ``n`` is odd (padded last chunk) and a batch axis broadcasts against ``z``.
    """
    import convbasis._array as array_module
    import convbasis._numpy as numpy_backend

    if is_numpy_namespace(array_namespace(xp.asarray([0.0]))):
        monkeypatch.setattr(numpy_backend, "_THREADS", threads)
        monkeypatch.setattr(array_module, "exclusive_cumsum", None)  # one-call path unusable
        numpy_backend._thread_pool.cache_clear()
    n, r, p = 2051, 24, 48
    u, v = rng.standard_normal((2, 2, n, r))
    z = rng.standard_normal((n, p))
    try:
        out = masked_lowrank_matmul(
            *(xp.asarray(a.astype(dtype)) for a in (u, v, z)),
            transpose=transpose,
            strict=strict,
            chunk=8,
        )
    finally:
        numpy_backend._thread_pool.cache_clear()
    assert out.shape == (2, n, p)
    assert out.dtype == getattr(xp, dtype)
    golden = explicit(u, v, z, transpose, strict, "float64")
    reference = explicit(u, v, z, transpose, strict, dtype)
    assert_within_reference_error(out, golden, reference, factor=4)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_block_scan_sums_in_order_and_reraises(xp, monkeypatch, threads):
    """``scan_blocks`` (NumPy: the thread pipeline) hands every block the sum of the states
    before it, and an error in any block reaches the caller."""
    import convbasis._numpy as numpy_backend
    from convbasis._array import scan_blocks

    monkeypatch.setattr(numpy_backend, "_THREADS", threads)
    numpy_backend._thread_pool.cache_clear()
    space = array_namespace(xp.asarray([0.0]))
    try:
        outs, total = scan_blocks(
            space,
            9,
            lambda i: None if i == 4 else xp.asarray([float(i)]),
            lambda i, seen: None if seen is None else float(seen[0]),
        )
        assert outs == [None, 0, 1, 3, 6, 6, 11, 17, 24]
        assert float(total[0]) == 32

        def fail(i, seen):
            if i == 5:
                raise RuntimeError("block 5")

        with pytest.raises(RuntimeError, match="block 5"):
            scan_blocks(space, 9, lambda i: xp.asarray([1.0]), fail)
    finally:
        numpy_backend._thread_pool.cache_clear()
