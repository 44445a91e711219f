"""Dense oracles against explicit NumPy computations, finite differences and each other."""

from __future__ import annotations

import array_api_strict
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from convbasis import attention, attention_backward, attention_weights
from convbasis.reference import self_attention_gradients
from convbasis.testing import assert_close, assert_within_reference_error, to_numpy

N_VALUES = (1, 2, 3, 17, 64, 127, 257)
DTYPES = ("float32", "float64")


def naive_attention(q, k, v, causal, scale, dtype):
    """The plain textbook computation in ``dtype`` (NumPy), the tolerance baseline."""
    q, k, v = (np.asarray(a, dtype=dtype) for a in (q, k, v))
    logits = scale * (q @ np.swapaxes(k, -1, -2))
    if causal:
        n = q.shape[-2]
        logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
    logits = logits - logits.max(axis=-1, keepdims=True)
    w = np.exp(logits)
    return (w / w.sum(axis=-1, keepdims=True)) @ v


def _problem(rng, batch, n, d, e, spread=1.0):
    q = spread * rng.standard_normal((*batch, n, d))
    k = rng.standard_normal((*batch, n, d))
    v = rng.standard_normal((*batch, n, e))
    return q, k, v


@given(
    n=st.sampled_from(N_VALUES),
    d=st.integers(1, 8),
    batch=st.lists(st.integers(1, 3), max_size=2),
    causal=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_attention_matches_naive(xp, n, d, batch, causal, dtype, seed):
    rng = np.random.default_rng(seed)
    q, k, v = _problem(rng, batch, n, d, d + 1, spread=3.0)
    scale = 1 / np.sqrt(d)
    golden = naive_attention(q, k, v, causal, scale, "float64")
    baseline = naive_attention(q, k, v, causal, scale, dtype)
    args = [xp.asarray(a.astype(dtype)) for a in (q, k, v)]
    out = attention(*args, causal=causal, block=None if seed % 2 else 16)
    assert out.dtype == getattr(xp, dtype)
    assert_within_reference_error(out, golden, baseline, factor=3)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_logits_stay_finite_and_correct(xp, rng, causal, dtype):
    n, d = 33, 4
    q, k, v = _problem(rng, (), n, d, 3)
    q = 1e4 * q / np.linalg.norm(q, axis=-1, keepdims=True)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    out = attention(*(xp.asarray(a.astype(dtype)) for a in (q, k, v)), causal=causal, scale=1.0)
    golden = naive_attention(q, k, v, causal, 1.0, "float64")
    assert np.all(np.isfinite(to_numpy(out)))
    # Logits of size 1e4 carry float32 rounding of ~1e-3 absolute: weights move by that much.
    tol = 2e-2 if dtype == "float32" else 1e-9
    assert_close(out, golden, atol=tol * np.abs(v).max())


def test_blocks_agree_and_weights_are_stochastic(xp, rng):
    q, k, v = _problem(rng, (2,), 37, 5, 2)
    args = [xp.asarray(a) for a in (q, k, v)]
    whole = attention(*args)
    for block in (1, 5, 36, 37, 100):
        assert_close(attention(*args, block=block), whole, atol=1e-14)
    f = to_numpy(attention_weights(args[0], args[1]))
    np.testing.assert_allclose(f.sum(-1), 1.0, atol=1e-14)
    assert np.all(np.triu(f, 1) == 0.0)


def test_cross_attention_lengths(xp, rng):
    q, k, v = rng.standard_normal((5, 3)), rng.standard_normal((9, 3)), rng.standard_normal((9, 2))
    out = attention(*(xp.asarray(a) for a in (q, k, v)), causal=False, scale=0.5)
    assert_close(out, naive_attention(q, k, v, False, 0.5, "float64"), atol=1e-13)


def _fd_directional(func, arrays, index, direction, h=1e-6):
    plus = [a.copy() for a in arrays]
    minus = [a.copy() for a in arrays]
    plus[index] = plus[index] + h * direction
    minus[index] = minus[index] - h * direction
    return (func(*plus) - func(*minus)) / (2 * h)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block", [None, 3])
def test_attention_backward_finite_differences(xp, rng, causal, block):
    n, d, e = 7, 3, 2
    q, k, v = _problem(rng, (2,), n, d, e)
    g = rng.standard_normal((2, n, e))
    scale = 0.7

    def loss(q, k, v):
        return float(np.sum(g * naive_attention(q, k, v, causal, scale, "float64")))

    grads = attention_backward(
        *(xp.asarray(a) for a in (q, k, v, g)), causal=causal, scale=scale, block=block
    )
    for index, grad in enumerate(grads):
        t = rng.standard_normal((q, k, v)[index].shape)
        expected = _fd_directional(loss, [q, k, v], index, t)
        # Adjoint identity <t, J^T g> = <J t, g>, with J t from central differences.
        assert float(np.sum(t * to_numpy(grad))) == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_attention_backward_broadcast_batch(xp, rng):
    n, d = 6, 3
    q = rng.standard_normal((2, 3, n, d))
    k = rng.standard_normal((1, 3, n, d))
    v = rng.standard_normal((n, d))
    g = rng.standard_normal((2, 3, n, d))
    dq, dk, dv = attention_backward(*(xp.asarray(a) for a in (q, k, v, g)))
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    full = attention_backward(
        *(xp.asarray(np.broadcast_to(a, (2, 3, n, d)).copy()) for a in (q, k, v, g))
    )
    assert_close(dk, to_numpy(full[1]).sum(0, keepdims=True), atol=1e-13)
    assert_close(dv, to_numpy(full[2]).sum((0, 1)), atol=1e-13)


@pytest.mark.parametrize("block", [None, 2])
def test_backward_one_hot_rows_give_exact_zeros(xp, rng, block):
    # causal row 0 (and every row at n = 1) has weights (1, 0, ...): its P row, hence its dq row
    # and its share of dk, is zero in exact arithmetic, so it must come out as 0, not rounding
    q, k, v = _problem(rng, (16,), 5, 3, 37)
    g = rng.standard_normal((16, 5, 37))
    dq, dk, _ = attention_backward(*(xp.asarray(a) for a in (q, k, v, g)), block=block)
    assert np.all(to_numpy(dq)[:, 0] == 0)
    one = [xp.asarray(a[:, :1]) for a in (q, k, v, g)]
    for causal in (True, False):
        dq, dk, _ = attention_backward(*one, causal=causal, block=block)
        assert np.all(to_numpy(dq) == 0) and np.all(to_numpy(dk) == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_keeps_dtype(xp, rng, dtype):
    arrays = [xp.asarray(a.astype(dtype)) for a in _problem(rng, (), 9, 2, 2)]
    grads = attention_backward(*arrays, xp.asarray(rng.standard_normal((9, 2)).astype(dtype)))
    assert all(grad.dtype == getattr(xp, dtype) for grad in grads)


# --- self-attention gradients (docs/math.rst §3) ---------------------------------------------


def self_attention_loss(x, w_q, w_k, w_v, g, causal, scale):
    return float(np.sum(g * naive_attention(x @ w_q, x @ w_k, x @ w_v, causal, scale, "float64")))


def _layer(rng, n=6, d_model=4, d_head=3, d_v=2, batch=()):
    x = rng.standard_normal((*batch, n, d_model))
    w_q, w_k = rng.standard_normal((2, d_model, d_head))
    w_v = rng.standard_normal((d_model, d_v))
    g = rng.standard_normal((*batch, n, d_v))
    return x, w_q, w_k, w_v, g


@pytest.mark.parametrize("causal", [True, False])
def test_self_attention_gradients_finite_differences(xp, rng, causal):
    arrays = _layer(rng, batch=(2,))
    scale = 0.6
    res = self_attention_gradients(*(xp.asarray(a) for a in arrays), causal=causal, scale=scale)

    def loss(*a):
        return self_attention_loss(*a, arrays[4], causal, scale)

    for index, grad in enumerate((res.dx, res.dw_q, res.dw_k, res.dw_v)):
        assert grad.shape == arrays[index].shape
        t = rng.standard_normal(arrays[index].shape)
        expected = _fd_directional(loss, list(arrays[:4]), index, t)
        assert float(np.sum(t * to_numpy(grad))) == pytest.approx(expected, rel=1e-7, abs=1e-9)

    # dW: differentiate through W = W_Q W_K^T directly.
    x, _, _, w_v, g = arrays
    w = arrays[1] @ arrays[2].T

    def loss_w(w):
        return float(np.sum(g * naive_attention(x @ w, x, x @ w_v, causal, scale, "float64")))

    t = rng.standard_normal(w.shape)
    expected = (loss_w(w + 1e-6 * t) - loss_w(w - 1e-6 * t)) / 2e-6
    assert float(np.sum(t * to_numpy(res.dw))) == pytest.approx(expected, rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("causal", [True, False])
def test_five_terms_separately(xp, rng, causal):
    x, w_q, w_k, w_v, g = _layer(rng, n=8, d_model=5, d_head=2, d_v=3)
    scale = 0.8
    res = self_attention_gradients(
        *(xp.asarray(a) for a in (x, w_q, w_k, w_v, g)), causal=causal, scale=scale
    )
    t1, t2, t3, t4, t5 = (to_numpy(t) for t in res.terms)
    assert_close(res.dx, t1 + t2 + t3 + t4 + t5, atol=1e-13)
    # Independent NumPy evaluation of each term from f, delta and X.
    f = to_numpy(
        attention_weights(xp.asarray(x @ w_q), xp.asarray(x @ w_k), causal=causal, scale=scale)
    )
    y = x @ w_v
    delta = np.sum(g * (f @ y), axis=-1)
    w = w_q @ w_k.T
    np.testing.assert_allclose(t1, scale * (f * (g @ y.T)) @ x @ w.T, atol=1e-12)
    np.testing.assert_allclose(t2, -scale * (delta[:, None] * f) @ x @ w.T, atol=1e-12)
    np.testing.assert_allclose(t3, scale * (f * (g @ y.T)).T @ x @ w, atol=1e-12)
    np.testing.assert_allclose(t4, -scale * f.T @ (delta[:, None] * (x @ w)), atol=1e-12)
    np.testing.assert_allclose(t5, f.T @ g @ w_v.T, atol=1e-12)
    # And against the (q, k, v) backward through the chain rule.
    dq, dk, dv = (
        to_numpy(a)
        for a in attention_backward(
            *(xp.asarray(a) for a in (x @ w_q, x @ w_k, y, g)), causal=causal, scale=scale
        )
    )
    np.testing.assert_allclose(t1 + t2, dq @ w_q.T, atol=1e-12)
    np.testing.assert_allclose(t3 + t4, dk @ w_k.T, atol=1e-12)
    np.testing.assert_allclose(t5, dv @ w_v.T, atol=1e-12)


def test_printed_misprint_is_wrong(rng):
    """arXiv 2408.13233 prints T5 as f G W_Vᵀ and dW_V as Xᵀ f G: finite differences reject both."""
    x, w_q, w_k, w_v, g = _layer(rng, n=7)
    res = self_attention_gradients(x, w_q, w_k, w_v, g)
    f = attention_weights(x @ w_q, x @ w_k)
    assert not np.allclose(res.terms[4], f @ g @ w_v.T, atol=1e-3)
    assert not np.allclose(res.dw_v, x.T @ f @ g, atol=1e-3)


def test_heads_axis_on_weights(xp, rng):
    heads, n, d_model, d_head = 3, 5, 4, 2
    x = rng.standard_normal((n, d_model))
    w_q, w_k, w_v = rng.standard_normal((3, heads, d_model, d_head))
    g = rng.standard_normal((heads, n, d_head))
    res = self_attention_gradients(*(xp.asarray(a) for a in (x, w_q, w_k, w_v, g)))
    assert res.dx.shape == x.shape and res.dw_q.shape == w_q.shape
    per_head = [self_attention_gradients(x, w_q[h], w_k[h], w_v[h], g[h]) for h in range(heads)]
    assert_close(res.dx, sum(p.dx for p in per_head), atol=1e-12)
    assert_close(res.dw_k, np.stack([p.dw_k for p in per_head]), atol=1e-12)


# --- bad input ------------------------------------------------------------------------------


def test_bad_input_messages(xp):
    q = xp.asarray(np.ones((4, 3)))
    with pytest.raises(ValueError, match="k must have last dimension 3"):
        attention(q, xp.asarray(np.ones((4, 2))), q)
    with pytest.raises(ValueError, match="v must have as many rows as k"):
        attention(q, q, xp.asarray(np.ones((5, 3))))
    with pytest.raises(ValueError, match="q must have a non-empty sequence axis"):
        attention(xp.asarray(np.ones((0, 3))), q, q, causal=False)
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys"):
        attention(xp.asarray(np.ones((2, 3))), q, q)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        attention(xp.asarray(np.ones(3)), q, q)
    with pytest.raises(TypeError, match="k must have a real floating dtype"):
        attention(q, xp.asarray(np.ones((4, 3), dtype=np.int64)), q)
    with pytest.raises(TypeError, match="q must have a real floating dtype"):
        attention(xp.asarray(np.ones((4, 3), dtype=bool)), q, q)
    with pytest.raises(ValueError, match="block must be a positive integer"):
        attention(q, q, q, block=0)
    with pytest.raises(ValueError, match="grad_out must have last dimension 3"):
        attention_backward(q, q, q, xp.asarray(np.ones((4, 2))))
    with pytest.raises(ValueError, match="leading .* axes must broadcast"):
        attention(xp.asarray(np.ones((2, 4, 3))), xp.asarray(np.ones((3, 4, 3))), q)


def test_bad_weights(xp):
    x = xp.asarray(np.ones((4, 3)))
    w = xp.asarray(np.ones((3, 2)))
    g = xp.asarray(np.ones((4, 2)))
    with pytest.raises(ValueError, match="w_q must have at least 2 dimensions"):
        self_attention_gradients(x, xp.asarray(np.ones(3)), w, w, g)
    with pytest.raises(ValueError, match="w_v must have 3 rows"):
        self_attention_gradients(x, w, w, xp.asarray(np.ones((2, 2))), g)
    with pytest.raises(ValueError, match="w_k must have last dimension 2"):
        self_attention_gradients(x, w, xp.asarray(np.ones((3, 1))), w, g)
    with pytest.raises(ValueError, match="grad_out must have as many rows as x"):
        self_attention_gradients(x, w, w, w, xp.asarray(np.ones((5, 2))))


def test_mixed_namespaces_rejected():
    a = np.ones((4, 3))
    with pytest.raises(TypeError, match="one array library"):
        attention(a, array_api_strict.asarray(a), a)


def test_nan_propagates(xp):
    q = np.ones((3, 2))
    q[1, 0] = np.nan
    out = to_numpy(attention(xp.asarray(q), xp.asarray(np.ones((3, 2))), xp.asarray(q)))
    # Row 1 has NaN logits; row 2 sees v[1], whose first column is NaN; row 0 sees neither.
    assert np.isnan(out[1]).all() and np.isnan(out[2, 0]) and np.isfinite(out[[0, 2], 1]).all()
