"""Fast Multipole Attention against its dense-mask oracle, finite differences and exact attention.

docs/math.rst §6.  The oracle :func:`multipole_weights` builds the ``n × n`` weights per key
from the FMM definition (parent neighbours, not neighbours), independently of the fast path's
pair-shift gather.
"""

from __future__ import annotations

import array_api_strict
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from convbasis import attention, attention_backward
from convbasis.multipole import (
    MultipoleAttentionOperator,
    kernel_shapes,
    multipole_attention,
    multipole_attention_backward,
    multipole_operator,
)
from convbasis.reference import multipole_masks, multipole_reference, multipole_weights
from convbasis.testing import assert_close, assert_within_reference_error, to_numpy

N_VALUES = (1, 2, 3, 7, 17, 31, 32, 33, 64, 100)
GEOMETRY = ((1, 1), (2, 1), (2, 2), (4, 2), (8, 4), (8, 8))  # (block, basis)
DTYPES = ("float32", "float64")


def _problem(rng, batch, n, d, e, spread=1.0):
    q = spread * rng.standard_normal((*batch, n, d))
    k = rng.standard_normal((*batch, n, d))
    v = rng.standard_normal((*batch, n, e))
    return q, k, v


def _kernels(rng, n, block, basis):
    """Random positive pooling kernels (one per level), roughly mean-like."""
    return tuple(
        rng.uniform(0.5, 1.5, shape) / shape[0]
        for shape in kernel_shapes(n, block=block, basis=basis)
    )


def _on(xp, arrays, dtype):
    return [xp.asarray(np.asarray(a, dtype=dtype)) for a in arrays]


def _options(block, basis, causal, kernels=None, xp=None, dtype="float64"):
    down = "mean" if kernels is None else tuple(_on(xp or np, kernels, dtype))
    return {"block": block, "basis": basis, "causal": causal, "downsample": down}


@given(
    n=st.sampled_from(N_VALUES),
    geometry=st.sampled_from(GEOMETRY),
    d=st.integers(1, 5),
    batch=st.lists(st.integers(1, 3), max_size=2).map(tuple),
    causal=st.booleans(),
    learned=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_forward_matches_dense_reference(xp, n, geometry, d, batch, causal, learned, dtype, seed):
    rng = np.random.default_rng(seed)
    block, basis = geometry
    q, k, v = _problem(rng, batch, n, d, d + 1, spread=2.0)
    kernels = _kernels(rng, n, block, basis) if learned else None
    golden = multipole_reference(q, k, v, **_options(block, basis, causal, kernels))
    baseline = multipole_reference(
        *_on(np, (q, k, v), dtype), **_options(block, basis, causal, kernels, np, dtype)
    )
    out = multipole_attention(
        *_on(xp, (q, k, v), dtype), **_options(block, basis, causal, kernels, xp, dtype)
    )
    assert out.dtype == getattr(xp, dtype)
    assert_within_reference_error(out, golden, baseline, factor=3)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 5, 16, 37, 64])
@pytest.mark.parametrize("geometry", [(1, 1), (2, 1), (4, 2), (4, 4)])
def test_every_key_covered_exactly_once(xp, n, geometry, causal):
    block, basis = geometry
    masks = [
        to_numpy(m) for m in multipole_masks(n, xp=xp, block=block, basis=basis, causal=causal)
    ]
    padded = block * 2 ** int(np.ceil(np.log2(max(1, -(-n // block)))))
    assert len(masks) == max(int(np.log2(padded // block)) - 1, 0) + 1
    assert all(m.dtype == np.bool_ and m.shape == (n, n) for m in masks)
    coverage = np.sum(masks, axis=0)
    expected = np.tril(np.ones((n, n), int)) if causal else np.ones((n, n), int)
    np.testing.assert_array_equal(coverage, expected)
    # the near field is exactly the three neighbouring blocks (causal part)
    i, j = np.indices((n, n))
    near = np.abs(i // block - j // block) <= 1
    np.testing.assert_array_equal(masks[0], near & (j <= i) if causal else near)


def test_interaction_lists_of_one_level():
    """Level 1 with block 1: box i attends boxes i−2, i+2, i+3 (even) / i−3, i−2, i+2 (odd)."""
    masks = [np.asarray(m) for m in multipole_masks(16, xp=np, block=1, basis=1, causal=False)]
    level1 = masks[1]
    for i in range(16):
        offsets = (-2, 2, 3) if i % 2 == 0 else (-3, -2, 2)
        expected = {i + o for o in offsets if 0 <= i + o < 16}
        assert set(np.flatnonzero(level1[i])) == expected


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [3, 29, 64, 77])
def test_exact_when_pooled_chunks_are_constant(xp, rng, n, causal):
    """Mean pooling loses nothing when keys/values are constant per chunk: FMA = attention.

    Also checks the padding rule: partially padded chunks average only their real keys, and
    padded keys get no weight (else the result would differ from exact attention).
    """
    block, basis, d = 8, 2, 3
    shapes = kernel_shapes(n, block=block, basis=basis)
    run = shapes[-1][0] if shapes else 1
    reps = -(-n // run)
    k = np.repeat(rng.standard_normal((2, reps, d)), run, axis=1)[:, :n]
    v = np.repeat(rng.standard_normal((2, reps, 2)), run, axis=1)[:, :n]
    q = 2.0 * rng.standard_normal((2, n, d))
    args = _on(xp, (q, k, v), "float64")
    out = multipole_attention(*args, block=block, basis=basis, causal=causal)
    assert_close(out, attention(q, k, v, causal=causal), atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_exact_within_two_blocks(xp, rng, causal):
    """``n <= 2 block``: the near field is the whole sequence, FMA is exact attention."""
    q, k, v = _problem(rng, (3,), 13, 4, 2)
    out = multipole_attention(*_on(xp, (q, k, v), "float64"), block=8, basis=2, causal=causal)
    assert_close(out, attention(q, k, v, causal=causal), atol=1e-13)


def _finite_difference(loss, x, h=1e-6):
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        grad[idx] = (loss(up) - loss(down)) / (2 * h)
    return grad


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("n", "block", "basis", "learned"),
    [(11, 2, 1, False), (11, 2, 1, True), (24, 4, 2, True), (9, 4, 4, False)],
)
def test_gradients_match_finite_differences(xp, rng, n, block, basis, learned, causal):
    q, k, v = _problem(rng, (), n, 2, 2)
    g = rng.standard_normal((n, 2))
    kernels = _kernels(rng, n, block, basis) if learned else None
    options = _options(block, basis, causal, kernels)

    def loss(q_=q, k_=k, v_=v, kernels_=kernels):
        opts = _options(block, basis, causal, kernels_)
        return float(np.sum(g * multipole_reference(q_, k_, v_, **opts)))

    grads = multipole_attention_backward(
        *_on(xp, (q, k, v, g), "float64"), **_options(block, basis, causal, kernels, xp)
    )
    assert isinstance(grads.dq, type(xp.asarray(np.zeros(1))))
    # central differences of the dense oracle: truncation ~h², round-off ~1e-16/h
    tol = 1e-7
    assert_close(grads.dq, _finite_difference(lambda x: loss(q_=x), q), atol=tol)
    assert_close(grads.dk, _finite_difference(lambda x: loss(k_=x), k), atol=tol)
    assert_close(grads.dv, _finite_difference(lambda x: loss(v_=x), v), atol=tol)
    if kernels is None:
        assert grads.ddownsample is None
        return
    assert len(grads.ddownsample) == len(kernels)
    for i, kernel in enumerate(kernels):

        def loss_kernel(x, i=i):
            return loss(kernels_=(*kernels[:i], x, *kernels[i + 1 :]))

        assert_close(grads.ddownsample[i], _finite_difference(loss_kernel, kernel), atol=tol)
    assert options["downsample"] is not None


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [5, 37, 64])
def test_gradients_in_dtype(xp, rng, n, causal, dtype):
    """Gradients (float64 checked by finite differences above) in float32 and float64, with
    broadcast leading axes, against the float64 golden: the error may be a small multiple of
    exact attention's own backward error in that dtype."""
    block, basis = 4, 2
    q = rng.standard_normal((2, 1, n, 3))
    k = rng.standard_normal((1, 3, n, 3))
    v = rng.standard_normal((n, 2))
    g = rng.standard_normal((2, 3, n, 2))
    kernels = _kernels(rng, n, block, basis)
    golden = multipole_attention_backward(q, k, v, g, **_options(block, basis, causal, kernels))
    grads = multipole_attention_backward(
        *_on(xp, (q, k, v, g), dtype), **_options(block, basis, causal, kernels, xp, dtype)
    )
    exact64 = attention_backward(q, k, v, g, causal=causal)
    exact = attention_backward(*_on(np, (q, k, v, g), dtype), causal=causal)
    for got, want, base, base64 in zip(
        (grads.dq, grads.dk, grads.dv),
        (golden.dq, golden.dk, golden.dv),
        exact,
        exact64,
        strict=True,
    ):
        assert got.shape == want.shape and got.dtype == getattr(xp, dtype)
        # scale the baseline error to this gradient's magnitude
        rel = np.max(np.abs(base - base64)) / np.max(np.abs(base64))
        # + round-off of sums over n keys: in float64 the baseline is the golden result
        bound = (5 * rel + 8 * n * np.finfo(dtype).eps) * np.max(np.abs(want))
        assert np.max(np.abs(to_numpy(got) - want)) <= bound
    for got, want in zip(grads.ddownsample, golden.ddownsample, strict=True):
        assert got.shape == want.shape
        assert_close(got, want, atol=50 * np.finfo(dtype).eps * np.max(np.abs(want)) * n)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("n", [1, 19, 32])
def test_operator_products(xp, rng, n, causal, learned):
    block, basis = 2, 2
    q, k, _ = _problem(rng, (2,), n, 3, 1)
    z = rng.standard_normal((2, n, 4))
    kernels = _kernels(rng, n, block, basis) if learned else None
    f = multipole_weights(q, k, **_options(block, basis, causal, kernels))
    op = multipole_operator(
        *_on(xp, (q, k), "float64"), **_options(block, basis, causal, kernels, xp)
    )
    assert isinstance(op, MultipoleAttentionOperator)
    assert op.shape == (2, n, n)
    zx = xp.asarray(z)
    assert_close(op.to_dense(), f, atol=1e-13)
    assert_close(op.matmul(zx), f @ z, atol=1e-12)
    assert_close(op.rmatmul(zx), np.swapaxes(f, -1, -2) @ z, atol=1e-12)
    if not learned:
        np.testing.assert_allclose(f.sum(-1), 1.0, atol=1e-13)  # averaging: rows are stochastic
    if causal:
        assert np.all(np.triu(f, 1) == 0.0)
    with pytest.raises(ValueError, match=f"z must have {n} rows"):
        op.matmul(xp.asarray(np.zeros((2, n + 1, 4))))


def test_operator_keeps_float32(xp, rng):
    q, k, _ = _problem(rng, (), 40, 3, 1)
    z = rng.standard_normal((40, 2))
    op = multipole_operator(*_on(xp, (q, k), "float32"), block=4, basis=2)
    f = multipole_weights(q, k, block=4, basis=2)
    out = op.rmatmul(xp.asarray(z.astype("float32")))
    assert out.dtype == xp.float32
    assert_close(out, f.T @ z, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_logits_stay_finite(xp, rng, causal, dtype):
    n, d = 45, 4
    q, k, v = _problem(rng, (), n, d, 3)
    q = 1e4 * q / np.linalg.norm(q, axis=-1, keepdims=True)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    out = multipole_attention(
        *_on(xp, (q, k, v), dtype), block=4, basis=2, causal=causal, scale=1.0
    )
    golden = multipole_reference(q, k, v, block=4, basis=2, causal=causal, scale=1.0)
    assert np.all(np.isfinite(to_numpy(out)))
    # logits of size 1e4 carry float32 rounding of ~1e-3 absolute: weights move by that much
    tol = 2e-2 if dtype == "float32" else 1e-9
    assert_close(out, golden, atol=tol * np.abs(v).max())


def test_scale_and_approximation_is_sensible(xp, rng):
    """``scale`` is honoured, and FMA is close to attention when keys vary slowly."""
    n, d = 256, 4
    t = np.arange(n)[:, None] / n
    k = np.sin(2 * np.pi * t * np.arange(1, d + 1))
    q = rng.standard_normal((n, d))
    v = np.cos(3 * np.pi * t * np.arange(1, 3))
    args = _on(xp, (q, k, v), "float64")
    out = multipole_attention(*args, block=16, basis=4, causal=False, scale=1 / d)
    exact = attention(q, k, v, causal=False, scale=1 / d)
    golden = multipole_reference(q, k, v, block=16, basis=4, causal=False, scale=1 / d)
    assert_close(out, golden, atol=1e-13)
    err = np.max(np.abs(to_numpy(out) - exact))
    assert 0 < err < 2e-2


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block": 48}, "block must be a power of two, got 48"),
        ({"block": 0}, "block must be a positive integer, got 0"),
        ({"block": True}, "block must be a positive integer, got True"),
        ({"block": 2.0}, "block must be a positive integer, got 2.0"),
        ({"block": 8, "basis": 3}, r"basis must divide the box size block=8 .* got basis=3"),
        ({"block": 8, "basis": 16}, r"basis must divide the box size block=8 .* got basis=16"),
        ({"basis": 0}, "basis must be a positive integer, got 0"),
        ({"downsample": "max"}, "downsample must be 'mean' or a tuple of 1-D kernels"),
        ({"downsample": 3}, "downsample must be 'mean' or a tuple .* got int"),
        ({"scale": float("nan")}, "scale must be finite"),
    ],
)
def test_bad_options(xp, rng, options, message):
    q, k, v = _on(xp, _problem(rng, (), 40, 3, 2), "float64")
    with pytest.raises(ValueError, match=message):
        multipole_attention(q, k, v, **options)


def test_bad_shapes(xp, rng):
    q, k, v = _on(xp, _problem(rng, (2,), 40, 3, 2), "float64")
    short = xp.asarray(np.zeros((2, 39, 3)))
    with pytest.raises(ValueError, match=r"k must have as many rows as q \(40\)"):
        multipole_attention(q, short, v)
    with pytest.raises(ValueError, match=r"v must have as many rows as q \(40\)"):
        multipole_attention(q, k, short)
    with pytest.raises(ValueError, match=r"k must have last dimension 3 \(the head dimension"):
        multipole_attention(q, xp.asarray(np.zeros((2, 40, 4))), v)
    with pytest.raises(ValueError, match="leading .* axes must broadcast"):
        multipole_attention(q, k, xp.asarray(np.zeros((3, 40, 2))))
    with pytest.raises(ValueError, match="non-empty sequence axis"):
        multipole_attention(*(xp.asarray(np.zeros((0, 3))) for _ in range(3)))
    with pytest.raises(ValueError, match=r"q must have at least 2 dimensions"):
        multipole_attention(xp.asarray(np.zeros(3)), k, v)
    with pytest.raises(ValueError, match=r"grad_out must have last dimension 2 \(the value"):
        multipole_attention_backward(q, k, v, q)
    with pytest.raises(ValueError, match=r"grad_out must have as many rows as q"):
        multipole_attention_backward(q, k, v, xp.asarray(np.zeros((2, 3, 2))))


def test_bad_downsample_kernels(xp, rng):
    q, k, v = _on(xp, _problem(rng, (), 40, 3, 2), "float64")
    # n = 40, block 4 → padded 64 = 4 · 16: three levels with kernels (2,), (4,), (8,)
    assert kernel_shapes(40, block=4, basis=2) == ((2,), (4,), (8,))
    good = tuple(xp.asarray(np.ones(s)) for s in kernel_shapes(40, block=4, basis=2))
    options = {"block": 4, "basis": 2}
    with pytest.raises(ValueError, match=r"one kernel per far-field level: 3 arrays .* got 2"):
        multipole_attention(q, k, v, downsample=good[:2], **options)
    bad = (good[0], xp.asarray(np.ones(3)), good[2])
    with pytest.raises(ValueError, match=r"downsample\[1\] \(level 2\) must have shape \(4,\)"):
        multipole_attention(q, k, v, downsample=bad, **options)
    ints = (good[0], xp.asarray(np.ones(4, dtype=np.int64)), good[2])
    with pytest.raises(TypeError, match=r"downsample\[1\] must have a real floating dtype"):
        multipole_attention(q, k, v, downsample=ints, **options)


def test_bad_types(xp, rng):
    q, k, v = _on(xp, _problem(rng, (), 10, 3, 2), "float64")
    with pytest.raises(TypeError, match="q must have a real floating dtype"):
        multipole_attention(xp.asarray(np.ones((10, 3), dtype=np.int64)), k, v)
    if xp.__name__ != "array_api_strict":
        strict = array_api_strict.asarray(np.ones((10, 3)))
        with pytest.raises(TypeError, match="one array library"):
            multipole_attention(q, strict, v)


def test_masks_reject_bad_n():
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        multipole_masks(0, xp=np)
