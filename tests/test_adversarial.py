"""Adversarial property tests: every method, through :func:`convbasis.attention_operator`
and its top-level function, on awkward shapes (n = 1, 2, odd, prime; d = 1; empty and
broadcast batches), logits up to 1e4, NaN inputs, float32 and float64.

Each draw gives the answer of the dense oracle (in extended precision) within the dtype's
tolerance, or the declared typed error (the polynomial method refuses NaN logits and logits
too large for its polynomials with a ``ValueError``); never a raw backend error, never a
NaN-free answer from NaN input, and always the input's dtype.  Options make every method
exact on any input (conv: rank n, multipole: one block) or bounded (low-rank: eps 1e-6,
with its documented error bounds), so the oracle is the answer.

Tolerance, FlashAttention style: at most 5x the error of the dense reference computed in the
same dtype, plus ``8 eps (L + n)`` of the result's scale (a reference exact by luck), plus
the method's bound.
"""

from __future__ import annotations

import math
import re

import array_api_compat
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

import convbasis as cb
from convbasis.testing import to_numpy

GOLDEN = np.longdouble
LOWRANK_EPS = 1e-6
ETA = 2 * LOWRANK_EPS / (1 - LOWRANK_EPS)  # |f̃ - f| <= η f (docs: "Fast gradients")
FORWARD = {
    "dense": cb.attention,
    "lowrank": cb.lowrank_attention,
    "conv": cb.conv_attention,
    "multipole": cb.multipole_attention,
}
REFUSAL = r"must be finite|too large for the polynomial method"
# NaN input makes conv warn of a NaN logit residual; on finite input the accuracy checks
# below are stricter than its warning.
pytestmark = pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")


def _options(method, n):
    return {
        "dense": {},
        "lowrank": {"eps": LOWRANK_EPS},
        "conv": {"rank": n},
        "multipole": {"block": 1 << max(n - 1, 1).bit_length(), "basis": 2},
    }[method]


def _lengths(xp):
    """Sequence lengths to draw: JAX compiles every operation for every new shape, and conv
    at rank n has n segments of different lengths, so JAX draws the short awkward ones."""
    if array_api_compat.is_jax_namespace(array_api_compat.array_namespace(xp.asarray([0.0]))):
        return [1, 2, 3, 5, 7]
    return [1, 2, 3, 5, 7, 13, 17, 31]


@st.composite
def cases(draw, lengths):
    """Shapes, dtype, logit scale and an optional NaN entry of one problem."""
    n = draw(st.sampled_from(lengths))
    d, e = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2]))
    batches = draw(mutually_broadcastable_shapes(num_shapes=4, max_dims=2, min_side=0, max_side=3))
    shapes = [(*b, n, w) for b, w in zip(batches.input_shapes, (d, d, e, e), strict=True)]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    arrays = dict(zip("qkvg", (rng.uniform(-1, 1, shape) for shape in shapes), strict=True))
    scale = draw(st.sampled_from([1.0, 30.0, 1e4]))
    arrays["q"] *= scale * math.sqrt(d)  # logits up to about ±scale (s = 1/sqrt(d))
    nan = draw(st.sampled_from([None, "q", "k", "v"]))
    if nan is not None and arrays[nan].size:
        arrays[nan].flat[draw(st.integers(0, arrays[nan].size - 1))] = np.nan
    else:
        nan = None
    dtype = draw(st.sampled_from(["float32", "float64"]))
    causal = draw(st.booleans())
    # An empty broadcast batch has no logits: nothing to refuse, no NaN to show.
    empty = math.prod(batches.result_shape) == 0 or not (arrays["q"].size and arrays["k"].size)
    return {
        **arrays,
        "n": n,
        "scale": scale,
        "nan": nan,
        "dtype": dtype,
        "causal": causal,
        "empty": empty,
    }


def _as(case, names, dtype):
    return [case[name].astype(dtype) for name in names]


def _largest(*names, case):
    """The product of the largest magnitudes of the named inputs (NaN ignored)."""
    return math.prod(float(np.nanmax(np.abs(case[name]), initial=0.0)) for name in names)


def _check(got, golden, baseline, case, name, size=0.0, bound=0.0, *, compare=True):
    """dtype, shape, finiteness and (``compare``) the error of ``got`` against ``golden``;
    with NaN input, only dtype and shape (:func:`_nan_shows` checks the NaN).

    ``size`` is the magnitude of the terms summed into the result (which cancellation can
    make much smaller than they are).
    """
    got = to_numpy(got)
    assert got.dtype == np.dtype(case["dtype"]), f"{name}: dtype {got.dtype}"
    assert got.shape == golden.shape, f"{name}: shape {got.shape} != {golden.shape}"
    if case["nan"] is not None:
        return
    assert np.all(np.isfinite(got)), f"{name}: non-finite answer from finite input"
    if not compare:
        return
    eps = float(np.finfo(case["dtype"]).eps)
    size = max(size, float(np.max(np.abs(golden), initial=0.0)))
    base = float(np.max(np.abs(baseline.astype(GOLDEN) - golden), initial=0.0))
    tol = 5 * base + 8 * eps * (case["scale"] + case["n"]) * size + bound
    err = float(np.max(np.abs(got.astype(GOLDEN) - golden), initial=0.0))
    assert err <= tol, f"{name}: error {err:.3g} above {tol:.3g} ({case['dtype']})"


def _nan_shows(case, name, *results):
    """With NaN input and a non-empty result, some entry of ``results`` is NaN (each one
    alone need not be: ``dv = fᵀ G`` does not depend on ``v``)."""
    arrays = [to_numpy(a) for a in results]
    if case["nan"] is not None and not case["empty"]:
        assert any(np.isnan(a).any() for a in arrays), f"{name}: NaN input, NaN-free answer"


def _refuses(method, case, call):
    """``call()``, or ``None`` when the method refuses ``case`` as declared."""
    # An empty problem may still be refused (its NaN cannot matter, but it is there).
    may = method == "lowrank" and (case["nan"] in ("q", "k") or case["scale"] > 1)
    must = may and not case["empty"] and (case["nan"] in ("q", "k") or case["scale"] > 1e3)
    try:
        out = call()
    except ValueError as exc:
        if not may or not re.search(REFUSAL, str(exc)):
            raise
        return None
    assert not must, f"{method} accepted logits it cannot approximate"
    return out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy oracles on NaN input
@pytest.mark.parametrize("method", list(FORWARD))
@given(data=st.data())
def test_forward(xp, method, data):
    case = data.draw(cases(_lengths(xp)))
    q, k, v = (xp.asarray(a) for a in _as(case, "qkv", case["dtype"]))
    golden = cb.attention(*_as(case, "qkv", GOLDEN), causal=case["causal"])
    baseline = cb.attention(*_as(case, "qkv", case["dtype"]), causal=case["causal"])
    options = {"causal": case["causal"], **_options(method, case["n"])}
    op = _refuses(method, case, lambda: cb.attention_operator(q, k, method=method, **options))
    if op is None:
        return
    bound = ETA * _largest("v", case=case) if method == "lowrank" else 0
    for name, out in (("operator", op.matmul(v)), ("", FORWARD[method](q, k, v, **options))):
        _check(out, golden, baseline, case, f"{method} {name}", _largest("v", case=case), bound)
        _nan_shows(case, f"{method} {name}", out)


def _lowrank_bounds(case):
    """Entrywise bounds of the low-rank exact-formula gradients (docs: "Fast gradients"):
    ``|Δdq| <= s |ΔP| |K|``, ``|Δdk| <= s |ΔP|ᵀ |Q|``, ``|Δdv| <= η fᵀ |G|`` with
    ``|ΔP| <= η (3 + η) ‖V‖_max diag(‖G_i‖₁) f``."""
    q, k, v, g = (np.abs(case[name]) for name in "qkvg")
    s, n = 1 / math.sqrt(q.shape[-1]), case["n"]
    delta_p = ETA * (3 + ETA) * v.max(initial=0) * g.sum(-1).max(initial=0)
    return (
        s * delta_p * k.max(initial=0),
        s * delta_p * n * q.max(initial=0),
        ETA * n * g.max(initial=0),
    )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("method", list(FORWARD))
@given(data=st.data())
def test_gradients(xp, method, data):
    """Exact-formula gradients against the dense backward; the model gradient keeps the
    dtype and shape and shows NaN input."""
    case = data.draw(cases(_lengths(xp)))
    q, k, v, g = (xp.asarray(a) for a in _as(case, "qkvg", case["dtype"]))
    golden = cb.attention_backward(*_as(case, "qkvg", GOLDEN), causal=case["causal"])
    baseline = cb.attention_backward(*_as(case, "qkvg", case["dtype"]), causal=case["causal"])
    options = {"causal": case["causal"], **_options(method, case["n"])}
    grads = _refuses(
        method, case, lambda: cb.attention_gradients(q, k, v, g, method=method, **options)
    )
    if grads is None:
        return
    bounds = _lowrank_bounds(case) if method == "lowrank" else (0, 0, 0)
    s = 1 / math.sqrt(case["q"].shape[-1])
    sizes = (
        s * _largest("g", "v", "k", case=case),
        s * _largest("g", "v", "q", case=case),
        _largest("g", case=case),
    )
    for name, got, want, base, size, bound in zip(
        "qkv", grads, golden, baseline, sizes, bounds, strict=True
    ):
        _check(got, want, base, case, f"{method} d{name}", size, bound)
    _nan_shows(case, f"{method} gradients", *grads)
    model = cb.attention_gradients(q, k, v, g, method=method, gradient="model", **options)
    for name, got, want, base in zip("qkv", model, golden, baseline, strict=True):
        _check(got, want, base, case, f"{method} model d{name}", compare=False)
    _nan_shows(case, f"{method} model gradients", *model)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@given(data=st.data(), transpose=st.booleans())
def test_masked_products(xp, data, transpose):
    """``(M ∘ U Vᵀ) Z`` and ``(M ∘ U Vᵀ ∘ G Yᵀ) Z`` against the explicit products."""
    case = data.draw(cases(_lengths(xp)))
    u, w, z, y = (xp.asarray(a) for a in _as(case, "qkvg", case["dtype"]))

    def explicit(a, b, c, h):
        f = np.tril(np.ones((case["n"], case["n"]), dtype=a.dtype)) * (a @ np.swapaxes(b, -1, -2))
        f2 = f * (h @ np.swapaxes(c, -1, -2))
        if transpose:
            f, f2 = np.swapaxes(f, -1, -2), np.swapaxes(f2, -1, -2)
        return f @ c, f2 @ c

    golden = explicit(*_as(case, "qkvg", GOLDEN))
    baseline = explicit(*_as(case, "qkvg", case["dtype"]))
    sums = {**case, "scale": 0.0}  # no logits: round-off of sums of n terms of ``size``
    out = cb.masked_lowrank_matmul(u, w, z, transpose=transpose)
    _check(
        out,
        golden[0],
        baseline[0],
        sums,
        "masked_lowrank_matmul",
        _largest("q", "k", "v", case=case),
    )
    _nan_shows(case, "masked_lowrank_matmul", out)
    out = cb.masked_hadamard_matmul(u, w, y, z, z, transpose=transpose)
    size = _largest("q", "k", "g", "v", "v", case=case)
    _check(out, golden[1], baseline[1], sums, "masked_hadamard_matmul", size)
    _nan_shows(case, "masked_hadamard_matmul", out)
