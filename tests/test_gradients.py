"""Gradients through attention operators against the dense reference (docs/math.rst §3)."""

from __future__ import annotations

import numpy as np
import pytest

from convbasis import reference
from convbasis.gradients import attention_gradients, self_attention_gradients
from convbasis.operators import AttentionOperator, attention_operator
from convbasis.testing import (
    alibi_conv_instance,
    assert_close,
    assert_within_reference_error,
    rotary_conv_instance,
    to_numpy,
)

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


def _outputs(res):
    return [*res.terms, *(getattr(res, name) for name in FIELDS)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lowrank_self_attention_terms_shrink_with_eps(xp, rng, causal, dtype):
    """Each of T1..T5, dx, dw, dw_q, dw_k, dw_v, per head, in both dtypes."""
    layer = [a.astype(dtype) for a in _layer(rng, heads=(2,), n=24, d_model=3, d_head=3)]
    golden = _outputs(
        reference.self_attention_gradients(*(a.astype(np.float64) for a in layer), causal=causal)
    )
    arrays = [xp.asarray(a) for a in layer]
    baseline = _outputs(reference.self_attention_gradients(*arrays, causal=causal))
    # Round-off allowance: 4x the dense computation's own (relative) error in this dtype.
    allowance = [
        4 * np.abs(to_numpy(b) - gold).max() / np.abs(gold).max()
        for b, gold in zip(baseline, golden, strict=True)
    ]
    previous = None
    for eps in (1e-2, 1e-4, 1e-6) if dtype == "float64" else (1e-2, 1e-4):
        fast = _outputs(self_attention_gradients(*arrays, method="lowrank", eps=eps, causal=causal))
        errs = []
        for a, gold in zip(fast, golden, strict=True):
            assert a.dtype == getattr(xp, dtype)
            errs.append(np.abs(to_numpy(a) - gold).max() / np.abs(gold).max())
        # Envelope, relative to each output's largest entry; the rigorous entrywise bound is
        # checked for (dq, dk, dv) above, and every output here is linear in those.
        eta = 2 * eps / (1 - eps)
        for name, err, extra in zip(
            [f"T{i}" for i in range(1, 6)] + list(FIELDS), errs, allowance, strict=True
        ):
            assert err <= 8 * eta + extra, f"{name}: {err:.2e} > {8 * eta:.2e} + {extra:.2e}"
        if previous is not None and dtype == "float64":  # float32 reaches round-off first
            assert max(errs) < max(previous) / 10
        previous = errs


# --- k-conv basis method: exact instances give the dense gradients to round-off -------------

# FlashAttention-style check (tests/ARCHITECTURE): the error of the fast path in dtype τ against
# an extended-precision golden is at most CONV_FACTOR times the dense reference's own error in
# τ (+ 8 eps max|golden|, see ``assert_within_reference_error``).  The operator is asked for
# round-off accuracy: rows whose predicted relative FFT error exceeds CONV_TOLERANCE · eps are
# recomputed exactly (the FFT's error is absolute, so rows with little attention mass would
# otherwise carry up to ``sqrt(eps)`` relative error by design; docs/math.rst §4).
CONV_FACTOR = 5.0
CONV_TOLERANCE = 16
CONV_KINDS = ("rotary", "alibi", "generic")
GOLDEN = np.longdouble

needs_longdouble = pytest.mark.skipif(
    np.finfo(np.longdouble).eps > 1e-18, reason="needs an extended-precision long double golden"
)


def _conv_instance(rng, kind, causal, n=64, d=4, heads=2):
    """Exact k-conv logits ``s Q Kᵀ`` (default scale) for every head, with shared starts.

    A multi-segment rotary or ALiBi instance is exact only for causal logits; bidirectional
    ones use one segment (both ``Q Kᵀ`` and ``K Qᵀ`` then depend on ``i - j`` only), and
    ``generic`` random ``q, k`` with ``rank = n`` start a segment at every column.
    Returns float64 ``q, k (heads, n, d)``, the expected starts and ``n``.
    """
    if kind == "generic":
        n = 24
        q, k = rng.standard_normal((2, heads, n, d))
        return q, k, tuple(range(n)), n
    qs, ks = [], []
    for _ in range(heads):
        if kind == "rotary":
            starts = (0, 13, 30, 51) if causal else (0,)
            q, k, _, starts = rotary_conv_instance(rng, n, d, starts)
        else:
            starts = (0, 21, 44) if causal else (0,)
            biases = rng.uniform(-1, 1, len(starts)) if causal else None
            q, k, _, starts = alibi_conv_instance(
                rng, n, d, slope=0.05, starts=starts, biases=biases
            )
        qs.append(q)
        ks.append(k)
    return np.stack(qs), np.stack(ks), starts, n


def _conv_options(dtype):
    return {"tolerance": CONV_TOLERANCE * float(np.finfo(dtype).eps)}


@needs_longdouble
@pytest.mark.parametrize("kind", CONV_KINDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_conv_attention_gradients_exact_instances(xp, rng, kind, causal, dtype):
    q, k, starts, n = _conv_instance(rng, kind, causal)
    v, g = rng.standard_normal((2, 2, n, 3))
    inputs = [a.astype(dtype) for a in (q, k, v, g)]
    golden = reference.attention_backward(*(a.astype(GOLDEN) for a in inputs), causal=causal)
    arrays = [xp.asarray(a) for a in inputs]
    baseline = reference.attention_backward(*arrays, causal=causal)
    op = attention_operator(
        arrays[0], arrays[1], method="conv", rank=len(starts), causal=causal, **_conv_options(dtype)
    )
    assert op.lower.starts == starts  # the basis is the exact one, not a truncation
    fast = attention_gradients(
        *arrays, method="conv", rank=len(starts), causal=causal, **_conv_options(dtype)
    )
    for name, a, gold, base in zip(("dq", "dk", "dv"), fast, golden, baseline, strict=True):
        assert_close(a, a, xp=xp, dtype=getattr(xp, dtype))
        assert_within_reference_error(a, gold, base, factor=CONV_FACTOR, err_msg=name)


def _conv_layer(rng, kind, causal, d_v=3):
    """A self-attention layer whose logits ``s X W_Q (X W_K)ᵀ`` are an exact instance per head.

    ``X = [Q_0, K_0, Q_1, K_1, R]`` (``R`` extra random features that only reach the values)
    and ``W_Q[h]``, ``W_K[h]`` select head ``h``'s blocks, so ``X W_Q[h] = Q_h`` exactly.
    """
    q, k, starts, n = _conv_instance(rng, kind, causal)
    heads, _, d = q.shape
    extra = 2
    x = np.concatenate(
        [*(b for h in range(heads) for b in (q[h], k[h])), rng.standard_normal((n, extra))], axis=-1
    )
    d_model = x.shape[-1]
    w_q = np.zeros((heads, d_model, d))
    w_k = np.zeros((heads, d_model, d))
    for h in range(heads):
        w_q[h, 2 * h * d : (2 * h + 1) * d] = np.eye(d)
        w_k[h, (2 * h + 1) * d : (2 * h + 2) * d] = np.eye(d)
    w_v = rng.standard_normal((heads, d_model, d_v)) / np.sqrt(d_model)
    g = rng.standard_normal((heads, n, d_v))
    return (x, w_q, w_k, w_v, g), starts


def _assert_all_outputs(fast, golden, baseline, factor):
    for i, (a, gold, base) in enumerate(zip(fast.terms, golden.terms, baseline.terms, strict=True)):
        assert_within_reference_error(a, gold, base, factor=factor, err_msg=f"T{i + 1}")
    for name in FIELDS:
        assert_within_reference_error(
            getattr(fast, name),
            getattr(golden, name),
            getattr(baseline, name),
            factor=factor,
            err_msg=name,
        )


@needs_longdouble
@pytest.mark.parametrize("kind", CONV_KINDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_conv_self_attention_gradients_exact_instances(xp, rng, kind, causal, dtype):
    layer, starts = _conv_layer(rng, kind, causal)
    inputs = [a.astype(dtype) for a in layer]
    golden = reference.self_attention_gradients(*(a.astype(GOLDEN) for a in inputs), causal=causal)
    arrays = [xp.asarray(a) for a in inputs]
    baseline = reference.self_attention_gradients(*arrays, causal=causal)
    fast = self_attention_gradients(
        *arrays, method="conv", rank=len(starts), causal=causal, **_conv_options(dtype)
    )
    assert fast.dx.dtype == getattr(xp, dtype)
    assert_close(fast.dw_v, fast.dw_v, xp=xp)
    _assert_all_outputs(fast, golden, baseline, CONV_FACTOR)


# a truncated basis is the point here (its ConvBasisWarning is expected)
@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
@needs_longdouble
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_conv_gradients_check_fails_on_a_truncated_basis(rng, dtype):
    """The round-off check above is not vacuous: one segment short, it fails on every output."""
    layer, starts = _conv_layer(rng, "rotary", True)
    inputs = [a.astype(dtype) for a in layer]
    golden = reference.self_attention_gradients(*(a.astype(GOLDEN) for a in inputs))
    baseline = reference.self_attention_gradients(*inputs)
    fast = self_attention_gradients(
        *inputs, method="conv", rank=len(starts) - 1, **_conv_options(dtype)
    )
    outputs = [*zip(fast.terms, golden.terms, baseline.terms, strict=True)]
    outputs += [(getattr(fast, n), getattr(golden, n), getattr(baseline, n)) for n in FIELDS]
    for a, gold, base in outputs:
        with pytest.raises(AssertionError, match="exceeds"):
            assert_within_reference_error(a, gold, base, factor=CONV_FACTOR)


def _central_differences(forward, arrays, g, h=1e-6):
    """``∂⟨g, forward()⟩/∂a`` for every entry of every array in ``arrays`` (mutated, restored)."""
    out = []
    for a in arrays:
        grad = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            old = a[idx]
            a[idx] = old + h
            up = np.sum(g * to_numpy(forward()))
            a[idx] = old - h
            down = np.sum(g * to_numpy(forward()))
            a[idx] = old
            grad[idx] = (up - down) / (2 * h)
        out.append(grad)
    return out


def _check_model_gradient(xp, q, k, v, g, forward, method, causal, options, rtol=1e-6):
    """``gradient="model"`` on backend ``xp`` against central differences of ``forward``."""
    numeric = _central_differences(lambda: forward(q, k, v), [q, k, v], g)
    arrays = (xp.asarray(a) for a in (q, k, v, g))
    grads = attention_gradients(*arrays, method=method, gradient="model", causal=causal, **options)
    for name, got, want in zip(("dq", "dk", "dv"), grads, numeric, strict=True):
        assert_close(got, want, atol=rtol * max(np.abs(want).max(), 1.0), xp=xp, err_msg=name)


LOWRANK_OPTIONS = (
    {"eps": 1e-3, "scale": 0.5},  # Chebyshev: the radius moves the nodes (a tested term)
    {"degree": 3, "scale": -0.7},  # odd Chebyshev degree, negative scale
    {"degree": 4, "kind": "taylor", "scale": 0.5},
)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("options", LOWRANK_OPTIONS)
@pytest.mark.parametrize("n", [1, 2, 13])
def test_lowrank_model_gradient_is_that_of_its_forward(xp, rng, causal, options, n):
    from convbasis import lowrank_attention

    q, k, v, g = (rng.uniform(-1, 1, (2, n, 3)) for _ in range(4))
    v, g = v[..., :2], g[..., :2]

    def forward(q, k, v):
        return lowrank_attention(q, k, v, causal=causal, **options)

    _check_model_gradient(xp, q, k, v, g, forward, "lowrank", causal, options)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("n", "block", "basis"), [(1, 2, 1), (13, 2, 1), (33, 4, 2)])
def test_multipole_model_gradient_is_its_backward(xp, rng, causal, n, block, basis):
    from convbasis import multipole_attention

    q, k, v, g = (rng.standard_normal((n, 3)) for _ in range(4))
    options = {"block": block, "basis": basis}

    def forward(q, k, v):
        return multipole_attention(q, k, v, causal=causal, **options)

    _check_model_gradient(xp, q, k, v, g, forward, "multipole", causal, options)


# delta holds the segment starts fixed under the differences' perturbations (at the default,
# round-off level, every perturbed column would start a new segment).  Random logits have no
# few-segment basis: the model is an approximation (warned), and its gradient is still exact.
@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
@pytest.mark.parametrize(
    ("n", "rank", "causal", "logit_scale"),
    [
        (1, 1, True, 1.0),
        (2, 2, False, 1.0),
        (17, 4, True, 1.0),
        (11, 3, False, 1.0),
        (40, 3, True, 2.0),
        (37, 3, False, 2.0),
        (40, 3, True, 60.0),  # large logits: the safeguard recomputes rows exactly
        (37, 3, False, 400.0),  # ... bidirectional: the upper basis's exact rows too
    ],
)
def test_conv_model_gradient_is_that_of_its_forward(xp, rng, n, rank, causal, logit_scale):
    from convbasis import conv_attention, conv_operator

    if n >= 30:  # long segments: every correlation runs by FFT
        starts = (0, n // 4 + 1, (2 * n) // 3)
        q, k, v, _ = rotary_conv_instance(rng, n, 4, starts, logit_scale=logit_scale, value_dim=3)
    else:  # generic logits: short segments run directly, the last (long) one by FFT
        q, k, v = (rng.standard_normal((n, 3)) for _ in range(3))
    g = rng.standard_normal(v.shape)
    options = {"rank": rank, "delta": 1e-2}
    if logit_scale > 10:
        assert conv_operator(q, k, causal=causal, **options).recomputed_rows

    def forward(q, k, v):
        return conv_attention(q, k, v, causal=causal, **options)

    _check_model_gradient(xp, q, k, v, g, forward, "conv", causal, options, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_conv_gradients_agree_along_directions_that_keep_the_instance_exact(rng, dtype):
    """On an exact k-conv instance the model equals exact attention on every nearby exact
    instance with the same starts, so the two gradients agree along such directions — and
    only there: the model sees K only at the segment starts (docs/math.rst §7)."""
    n, starts = 48, (0, 13, 30)
    q0, k0, v, _ = rotary_conv_instance(rng, n, 4, starts, logit_scale=2.0)
    q1, k1, _, _ = rotary_conv_instance(rng, n, 4, starts, logit_scale=2.0)
    dq_dir, dk_dir = q1 - q0, k1 - k0  # rotary instances are linear in (q̄, κ)
    g = rng.standard_normal(v.shape)
    arrays = [a.astype(dtype) for a in (q0, k0, v, g)]
    model = attention_gradients(*arrays, method="conv", gradient="model", rank=3)
    exact = attention_gradients(*arrays, method="conv", gradient="exact-formula", rank=3)
    along = [float(np.sum(a[0] * dq_dir) + np.sum(a[1] * dk_dir)) for a in (model, exact)]
    tol = 1e-3 if dtype == "float32" else 1e-9
    assert abs(along[0] - along[1]) <= tol * abs(along[1])
    assert_close(model[2], exact[2], atol=tol * np.abs(exact[2]).max())
    assert np.abs(model[1] - exact[1]).max() > 0.1 * np.abs(exact[1]).max()


@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("lowrank", {"eps": 1e-3, "scale": 0.5}),
        ("conv", {"rank": 3, "delta": 1e-2}),
        ("multipole", {"block": 4, "basis": 2}),
    ],
)
def test_model_gradient_broadcasts_and_keeps_float32(xp, rng, method, options):
    """Batch axes of q, k and of v, grad_out broadcast (each gradient summed back to its input's
    shape), and float32 stays float32 within float32 round-off of the float64 result.  The
    batch elements share one model (one polynomial, one set of segment starts), so the check
    is against central differences of the batched forward."""
    import convbasis as cb

    forwards = {"lowrank": cb.lowrank_attention, "conv": cb.conv_attention}
    forward = forwards.get(method, cb.multipole_attention)
    q, k = rng.uniform(-1, 1, (2, 2, 1, 12, 3))
    v, g = rng.uniform(-1, 1, (2, 1, 3, 12, 2))
    _check_model_gradient(
        np, q, k, v, g, lambda *a: forward(*a, **options), method, True, options, rtol=1e-5
    )
    ref = attention_gradients(q, k, v, g, method=method, gradient="model", **options)
    arrays = [xp.asarray(a.astype("float32")) for a in (q, k, v, g)]
    got = attention_gradients(*arrays, method=method, gradient="model", **options)
    for a, b in zip(got, ref, strict=True):
        assert_close(a, b, atol=2e-4 * np.abs(b).max(), xp=xp, dtype=arrays[0].dtype)


def test_multipole_model_gradient_with_supplied_kernels(rng):
    from convbasis import multipole_attention
    from convbasis.multipole import kernel_shapes

    n = 24
    kernels = tuple(rng.uniform(0.2, 1.5, s) for s in kernel_shapes(n, block=4, basis=2))
    options = {"block": 4, "basis": 2, "downsample": kernels}
    q, k, v, g = (rng.standard_normal((n, 3)) for _ in range(4))

    def forward(q, k, v):
        return multipole_attention(q, k, v, **options)

    _check_model_gradient(np, q, k, v, g, forward, "multipole", True, options)


def test_model_gradients_on_a_non_default_device(rng):
    xs = pytest.importorskip("array_api_strict")
    dev, cpu = xs.Device("device1"), xs.Device("CPU_DEVICE")
    q, k, v, g = (rng.uniform(-1, 1, (11, 3)) for _ in range(4))
    for method, options in (("lowrank", {"eps": 1e-2}), ("multipole", {"block": 2, "basis": 1})):
        for causal in (True, False):
            on_dev = [xs.asarray(a, device=dev) for a in (q, k, v, g)]
            got = attention_gradients(
                *on_dev, method=method, gradient="model", causal=causal, **options
            )
            want = attention_gradients(
                q, k, v, g, method=method, gradient="model", causal=causal, **options
            )
            for a, b in zip(got, want, strict=True):
                assert a.device == dev
                assert_close(xs.asarray(a, device=cpu), b, atol=1e-13)


@pytest.mark.parametrize("causal", [True, False])
def test_dense_model_gradient_is_the_exact_one(xp, rng, causal):
    q, k, v, g = (xp.asarray(rng.standard_normal((2, 9, 3))) for _ in range(4))
    model = attention_gradients(q, k, v, g, gradient="model", causal=causal)
    ref = reference.attention_backward(q, k, v, g, causal=causal)
    for a, b in zip(model, ref, strict=True):
        assert_close(a, b, atol=1e-12, xp=xp)


def test_exact_formula_is_the_default(rng):
    q, k, v, g = (rng.uniform(-1, 1, (11, 3)) for _ in range(4))
    options = {"method": "lowrank", "eps": 1e-2}
    default = attention_gradients(q, k, v, g, **options)
    named = attention_gradients(q, k, v, g, gradient="exact-formula", **options)
    model = attention_gradients(q, k, v, g, gradient="model", **options)
    for a, b in zip(default, named, strict=True):
        assert np.array_equal(a, b)
    assert not np.allclose(default[0], model[0], rtol=1e-6, atol=0)


def test_self_attention_gradients_names_its_meaning(rng):
    x, w_q, w_k, w_v, g = _layer(rng)
    with pytest.raises(TypeError, match="evaluates the five terms of the exact formulas"):
        self_attention_gradients(x, w_q, w_k, w_v, g, method="lowrank", gradient="model")


def test_gradient_bad_input(rng):
    q, k, v, g = (rng.standard_normal((7, 3)) for _ in range(4))
    with pytest.raises(ValueError, match=r"gradient must be one of \('exact-formula', 'model'\)"):
        attention_gradients(q, k, v, g, gradient="approximate")
    with pytest.raises(ValueError, match="unknown attention method 'sparse'"):
        attention_gradients(q, k, v, g, method="sparse", gradient="model")
    with pytest.raises(ValueError, match=r"grad_out must have as many rows as q \(7\)"):
        attention_gradients(q, k, v, g[:5], method="lowrank", eps=1e-2)
