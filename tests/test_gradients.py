"""Gradients through attention operators against the dense reference (MATH.md §3)."""

from __future__ import annotations

import numpy as np
import pytest

from convbasis import reference
from convbasis.gradients import attention_gradients, self_attention_gradients
from convbasis.operators import AttentionOperator, attention_operator
from convbasis.testing import assert_close, to_numpy

FIELDS = ("dx", "dw", "dw_q", "dw_k", "dw_v")


def _layer(rng, heads=(), n=13, d_model=6, d_head=4, d_v=3):
    x = rng.standard_normal((n, d_model))
    w_q, w_k = rng.standard_normal((2, *heads, d_model, d_head)) / np.sqrt(d_model)
    w_v = rng.standard_normal((*heads, d_model, d_v))
    g = rng.standard_normal((*heads, n, d_v))
    return x, w_q, w_k, w_v, g


def _close_to_reference(fast, ref, rtol, atol_scale):
    for i, (a, b) in enumerate(zip(fast.terms, ref.terms, strict=True)):
        b = to_numpy(b)
        assert_close(a, b, rtol=rtol, atol=atol_scale * np.abs(b).max(), err_msg=f"T{i + 1}")
    for name in FIELDS:
        b = to_numpy(getattr(ref, name))
        assert_close(
            getattr(fast, name), b, rtol=rtol, atol=atol_scale * np.abs(b).max(), err_msg=name
        )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(), (2,)])
def test_dense_method_equals_reference(xp, rng, causal, heads):
    arrays = [xp.asarray(a) for a in _layer(rng, heads)]
    fast = self_attention_gradients(*arrays, causal=causal)
    ref = reference.self_attention_gradients(*arrays, causal=causal)
    _close_to_reference(fast, ref, rtol=1e-12, atol_scale=1e-13)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_attention_gradients_dense(xp, rng, causal, dtype):
    q, k, v, g = (xp.asarray(rng.standard_normal((2, 11, 3)).astype(dtype)) for _ in range(4))
    fast = attention_gradients(q, k, v, g, causal=causal)
    ref = reference.attention_backward(q, k, v, g, causal=causal)
    tol = 1e-5 if dtype == "float32" else 1e-12
    for a, b in zip(fast, ref, strict=True):
        assert a.dtype == getattr(xp, dtype)
        assert_close(a, b, atol=tol)


def test_operator_registry(xp, rng):
    q = xp.asarray(rng.standard_normal((5, 2)))
    op = attention_operator(q, q)
    assert isinstance(op, AttentionOperator)
    with pytest.raises(ValueError, match="unknown attention method 'sparse'; valid methods"):
        attention_operator(q, q, method="sparse")
    with pytest.raises(TypeError, match="the dense method takes no options"):
        attention_operator(q, q, rank=3)


# --- low-rank (polynomial) method: the propagated bound of the docstring ----------------------


def lowrank_bounds(q, k, v, g, f, scale, eps):
    """Entrywise bounds on |fast − dense| for (dq, dk, dv) from ``attention_gradients``."""
    eta = 2 * eps / (1 - eps)
    dp = eta * (3 + eta) * np.abs(v).max() * np.abs(g).sum(-1, keepdims=True) * f
    return (
        scale * dp @ np.abs(k),
        scale * np.swapaxes(dp, -1, -2) @ np.abs(q),
        eta * np.swapaxes(f, -1, -2) @ np.abs(g),
    )


def _bounded_problem(rng, n=40, d=3, heads=2):
    q, k, v, g = (rng.uniform(-1, 1, (heads, n, d)) for _ in range(4))
    return q, k, v, g


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lowrank_gradients_within_propagated_bound(xp, rng, causal, dtype):
    q, k, v, g = _bounded_problem(rng)
    scale = 1 / 3
    f = to_numpy(reference.attention_weights(q, k, causal=causal, scale=scale))
    dense = reference.attention_backward(q, k, v, g, causal=causal, scale=scale)
    dense_tau = reference.attention_backward(
        *(xp.asarray(a.astype(dtype)) for a in (q, k, v, g)), causal=causal, scale=scale
    )
    errors = []
    for eps in (1e-2, 1e-4):
        op = attention_operator(
            xp.asarray(q), xp.asarray(k), method="lowrank", eps=eps, causal=causal, scale=scale
        )
        fast = attention_gradients(
            *(xp.asarray(a.astype(dtype)) for a in (q, k, v, g)),
            method="lowrank",
            eps=eps,
            causal=causal,
            scale=scale,
        )
        bounds = lowrank_bounds(q, k, v, g, f, scale, op.rel_error_bound)
        worst = 0.0
        for name, a, b, bound, b_tau in zip("qkv", fast, dense, bounds, dense_tau, strict=True):
            assert a.dtype == getattr(xp, dtype)
            err = np.abs(to_numpy(a) - b)
            # Round-off allowance: 4x the dense computation's own error in this dtype.
            allowance = 4 * np.abs(to_numpy(b_tau) - b).max() + 1e-13
            assert np.all(err <= bound + allowance), f"d{name}: {np.max(err - bound):.2e}"
            worst = max(worst, float(err.max()))
        errors.append(worst)
    if dtype == "float64":
        assert errors[1] < errors[0] / 10  # shrinks with eps


@pytest.mark.parametrize("causal", [True, False])
def test_lowrank_self_attention_terms_shrink_with_eps(xp, rng, causal):
    x, w_q, w_k, w_v, g = _layer(rng, heads=(2,), n=24, d_model=3, d_head=3)
    ref = reference.self_attention_gradients(x, w_q, w_k, w_v, g, causal=causal)
    previous = None
    for eps in (1e-2, 1e-4, 1e-6):
        fast = self_attention_gradients(
            *(xp.asarray(a) for a in (x, w_q, w_k, w_v, g)),
            method="lowrank",
            eps=eps,
            causal=causal,
        )
        errs = [
            np.abs(to_numpy(a) - b).max() / np.abs(b).max()
            for a, b in zip(fast.terms, ref.terms, strict=True)
        ]
        errs += [
            np.abs(to_numpy(getattr(fast, n)) - getattr(ref, n)).max()
            / np.abs(getattr(ref, n)).max()
            for n in FIELDS
        ]
        # Envelope, relative to each output's largest entry; the rigorous entrywise bound is
        # checked for (dq, dk, dv) above, and every output here is linear in those.
        eta = 2 * eps / (1 - eps)
        assert max(errs) <= 8 * eta
        if previous is not None:
            assert max(errs) < max(previous) / 10
        previous = errs
