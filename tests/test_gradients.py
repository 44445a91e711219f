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
