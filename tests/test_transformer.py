"""Multi-layer transformer backward (docs/math.rst §5) against finite differences and dense."""

from __future__ import annotations

import dataclasses
import importlib.util

import array_api_compat
import numpy as np
import pytest

from convbasis import transformer as T
from convbasis.testing import assert_close, to_numpy

CONV_READY = importlib.util.find_spec("convbasis.conv") is not None
needs_conv = pytest.mark.skipif(
    not CONV_READY, reason="convbasis.conv (conv attention operator) is not available yet"
)


def _params(
    xp,
    *,
    norm="layer",
    layers=2,
    heads=2,
    d_model=6,
    d_head=3,
    d_ff=8,
    dtype="f8",
    activation="gelu",
    rng=None,
    seed=1,
):
    dt = xp.float64 if dtype == "f8" else xp.float32
    p = T.init_params(
        d_model,
        layers=layers,
        heads=heads,
        xp=xp,
        d_head=d_head,
        d_ff=d_ff,
        norm=norm,
        activation=activation,
        dtype=dt,
        device=array_api_compat.device(xp.asarray([0.0])),  # the fixture's device
        seed=seed,
    )
    if rng is None:
        return p
    # perturb gains/biases away from 1/0 so their gradients are generic
    return p.map(lambda a: xp.asarray(to_numpy(a) + 0.2 * rng.standard_normal(a.shape), dtype=dt))


def _replace_leaf(params, name, value):
    head, field = name.split(".")
    i = int(head[len("layers[") : -1])
    layers = list(params.layers)
    layers[i] = dataclasses.replace(layers[i], **{field: value})
    return dataclasses.replace(params, layers=tuple(layers))


def _loss_value(params, x, loss, causal):
    return float(loss(T.forward(params, x, causal=causal)[0])[0])


def _directional_check(xp, params, x, loss, causal, rng, h=1e-5):
    """Every leaf and x: <t, grad> against the central difference along t."""
    grads = T.loss_and_gradients(params, x, loss, causal=causal)
    gleaves = grads.params.leaves()
    leaves = dict(params.leaves(), x=x)
    assert set(gleaves) | {"x"} == set(leaves)
    for name, value in leaves.items():
        t = rng.standard_normal(value.shape)
        base = to_numpy(value)

        def at(sign, name=name, base=base, t=t):
            shifted = xp.asarray(base + sign * h * t)
            if name == "x":
                return _loss_value(params, shifted, loss, causal)
            return _loss_value(_replace_leaf(params, name, shifted), x, loss, causal)

        fd = (at(1) - at(-1)) / (2 * h)
        g = to_numpy(grads.x if name == "x" else gleaves[name])
        assert g.shape == value.shape, name
        an = float(np.sum(g * t))
        assert abs(fd - an) <= 1e-6 * max(abs(an), 1.0), (name, fd, an)


@pytest.mark.parametrize("norm", T.NORMS)
@pytest.mark.parametrize("causal", [True, False])
def test_dense_gradients_match_finite_differences(xp, rng, norm, causal):
    params = _params(xp, norm=norm, rng=rng)
    x = xp.asarray(rng.standard_normal((5, 6)))
    loss = T.squared_error_loss(xp.asarray(rng.standard_normal((5, 6))))
    _directional_check(xp, params, x, loss, causal, rng)


@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_activations_and_batch_axis(xp, rng, activation):
    params = _params(xp, norm="rms", activation=activation, rng=rng)
    x = xp.asarray(rng.standard_normal((2, 4, 6)))  # a batch of two sequences
    loss = T.squared_error_loss(xp.asarray(rng.standard_normal((2, 4, 6))))
    _directional_check(xp, params, x, loss, True, rng)


def test_cross_entropy_loss_and_vocab_gradient(xp, rng):
    params = _params(xp, norm="layer", rng=rng)
    x = xp.asarray(rng.standard_normal((5, 6)))
    w_vocab = rng.standard_normal((6, 7))
    labels = xp.asarray(rng.integers(0, 7, size=5))
    loss = T.cross_entropy_loss(xp.asarray(w_vocab), labels)
    _directional_check(xp, params, x, loss, True, rng)
    # value against a NumPy log-softmax, and the vocabulary gradient by central differences
    out = T.forward(params, x)[0]
    logits = to_numpy(out) @ w_vocab
    logp = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    expected = -np.mean(logp[np.arange(5), to_numpy(labels)])
    np.testing.assert_allclose(float(loss(out)[0]), expected, rtol=1e-12)
    t, h = rng.standard_normal(w_vocab.shape), 1e-6
    lp = float(T.cross_entropy_loss(xp.asarray(w_vocab + h * t), labels)(out)[0])
    lm = float(T.cross_entropy_loss(xp.asarray(w_vocab - h * t), labels)(out)[0])
    an = float(np.sum(to_numpy(loss.w_vocab_gradient(out)) * t))
    assert abs((lp - lm) / (2 * h) - an) <= 1e-7 * max(abs(an), 1.0)


def test_float32_dense_gradients_near_float64(xp, rng):
    x = rng.standard_normal((16, 8))
    target = rng.standard_normal((16, 8))
    grads = {}
    for dtype in ("f4", "f8"):
        p = _params(xp, norm="layer", layers=3, d_model=8, d_head=4, d_ff=16, dtype=dtype)
        dt = xp.float64 if dtype == "f8" else xp.float32
        loss = T.squared_error_loss(xp.asarray(target, dtype=dt))
        grads[dtype] = T.loss_and_gradients(p, xp.asarray(x, dtype=dt), loss)
    assert grads["f4"].x.dtype == xp.float32
    assert all(g.dtype == xp.float32 for g in grads["f4"].params.leaves().values())
    g32 = grads["f4"]
    as64 = T.TransformerGradients(
        xp.astype(g32.loss, xp.float64),
        g32.params.map(lambda a: xp.astype(a, xp.float64)),
        xp.astype(g32.x, xp.float64),
        xp.astype(g32.out, xp.float64),
    )
    errors = T.gradient_errors(as64, grads["f8"])
    # a few hundred float32 ulps through three layers of plain float32 arithmetic
    assert max(errors["layers"]) < 5e-5 and errors["x"] < 5e-5, errors


def _problem(xp, rng, *, n=24, layers=3, d_head=2, norm="layer", seed=3):
    params = _params(xp, norm=norm, layers=layers, d_model=8, d_head=d_head, d_ff=16, seed=seed)
    x = xp.asarray(rng.standard_normal((n, 8)))
    loss = T.squared_error_loss(xp.asarray(rng.standard_normal((n, 8))))
    return params, x, loss


@needs_conv
@pytest.mark.parametrize("causal", [True, False])
def test_conv_rank_n_equals_dense(xp, rng, causal):
    n = 16
    params, x, loss = _problem(xp, rng, n=n)
    assert len(params.layers) == 3
    dense = T.loss_and_gradients(params, x, loss, causal=causal)
    conv = T.loss_and_gradients(params, x, loss, attention="conv", rank=n, causal=causal)
    errors = T.gradient_errors(conv, dense)
    assert max(errors["layers"]) < 1e-9 and errors["x"] < 1e-9, errors
    assert abs(float(conv.loss) - float(dense.loss)) < 1e-9 * abs(float(dense.loss))


# small ranks on a random model are approximations by design (ConvBasisWarning expected)
@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
@needs_conv
def test_conv_small_rank_reports_error(xp, rng, record_property):
    params, x, loss = _problem(xp, rng, n=32)
    dense = T.loss_and_gradients(params, x, loss)
    errors = {
        r: T.gradient_errors(T.loss_and_gradients(params, x, loss, attention="conv", rank=r), dense)
        for r in (2, 8, 32)
    }
    for r, e in errors.items():
        record_property(f"conv_rank{r}_layer_errors", e["layers"])
        record_property(f"conv_rank{r}_x_error", e["x"])
    print("conv per-layer relative gradient error by rank:", errors)
    for r in (2, 8):
        # a truncated basis of generic logits is really an approximation, and stays finite
        assert all(0 < e < np.inf for e in errors[r]["layers"]), errors
    # the exact basis (rank n) is round-off accurate, far better than a truncated one
    assert max(errors[32]["layers"]) < 1e-9, errors


@pytest.mark.parametrize("causal", [True, False])
def test_lowrank_error_within_bound(xp, rng, record_property, causal):
    params, x, loss = _problem(xp, rng)
    dense = T.loss_and_gradients(params, x, loss, causal=causal)
    for eps in (1e-2, 1e-3):
        fast = T.loss_and_gradients(params, x, loss, attention="lowrank", eps=eps, causal=causal)
        errors = T.gradient_errors(fast, dense)
        record_property(f"lowrank_eps{eps}_layer_errors", errors["layers"])
        print(f"lowrank eps={eps}: per-layer relative gradient error {errors}")
        eta = 2 * eps / (1 - eps)
        # documented bound (see loss_and_gradients): per-layer relative error <= layers · η
        assert max(errors["layers"]) <= len(params.layers) * eta, errors
        assert errors["x"] <= len(params.layers) * eta, errors
        assert errors["x"] > 0  # the approximation is really used


# conv rank 4 on a random model is an approximation by design (ConvBasisWarning expected)
@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
@pytest.mark.parametrize(
    "method",
    ["dense", "lowrank", pytest.param("conv", marks=needs_conv), "multipole", "composite"],
)
def test_one_gradient_step_lowers_loss(xp, rng, method):
    params, x, loss = _problem(xp, rng, n=20, layers=2)
    options = {
        "lowrank": {"eps": 1e-3},
        "conv": {"rank": 4},
        "dense": {},
        "multipole": {"block": 4, "basis": 2},
        "composite": {"block": 2, "budget": 8},
    }[method]
    grads = T.loss_and_gradients(params, x, loss, attention=method, **options)
    lr = 1e-2
    stepped = params.map(lambda p, g: p - lr * g, grads.params)
    before = float(grads.loss)
    after = float(T.loss_and_gradients(stepped, x, loss, attention=method, **options).loss)
    assert after < before
    dense_after = _loss_value(stepped, x, loss, True)
    assert dense_after < before  # the fast step also lowers the exact (dense) loss


# delta keeps the conv segment starts fixed under the differences' perturbations.
MODEL_OPTIONS = {
    "lowrank": {"eps": 1e-3},
    "conv": {"rank": 3, "delta": 1e-2},
    "multipole": {"block": 2, "basis": 1},
    "composite": {"block": 1, "budget": 4},
}


@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
@pytest.mark.parametrize("method", list(MODEL_OPTIONS))
@pytest.mark.parametrize("causal", [True, False])
def test_model_gradients_are_those_of_the_loss(xp, rng, method, causal):
    """``gradient="model"``: the returned gradients are those of the returned loss."""
    options = MODEL_OPTIONS[method]
    params, x, loss = _problem(xp, rng, n=9, layers=2)
    grads = T.loss_and_gradients(
        params, x, loss, attention=method, gradient="model", causal=causal, **options
    )
    h = 1e-5
    for name, value in dict(params.leaves(), x=x).items():
        t = rng.standard_normal(value.shape)
        base = to_numpy(value)

        def at(sign, name=name, base=base, t=t):
            shifted = xp.asarray(base + sign * h * t)
            p, xx = (params, shifted) if name == "x" else (_replace_leaf(params, name, shifted), x)
            out, _ = T.forward(p, xx, attention=method, causal=causal, **options)
            return float(loss(out)[0])

        fd = (at(1) - at(-1)) / (2 * h)
        g = to_numpy(grads.x if name == "x" else grads.params.leaves()[name])
        an = float(np.sum(g * t))
        assert abs(fd - an) <= 1e-6 * max(abs(an), 1.0), (name, fd, an)


def test_dense_block_option_matches(xp, rng):
    params, x, loss = _problem(xp, rng, n=12, layers=2)
    full = T.loss_and_gradients(params, x, loss)
    blocked = T.loss_and_gradients(params, x, loss, block=5)
    errors = T.gradient_errors(blocked, full)
    assert max(errors["layers"]) < 1e-12 and errors["x"] < 1e-12


def test_bad_input(xp, rng):
    params = _params(xp)
    x = xp.asarray(rng.standard_normal((4, 6)))
    loss = T.squared_error_loss(x)
    with pytest.raises(ValueError, match=r"x must have last dimension 6 \(d_model of params\)"):
        T.forward(params, xp.asarray(rng.standard_normal((4, 5))))
    with pytest.raises(ValueError, match="x must have at least 2 dimensions"):
        T.forward(params, xp.asarray(rng.standard_normal(6)))
    with pytest.raises(ValueError, match="unknown attention method 'fast'"):
        T.loss_and_gradients(params, x, loss, attention="fast")
    with pytest.raises(TypeError, match="dense attention takes only the block option"):
        T.forward(params, x, rank=3)
    with pytest.raises(TypeError, match="x must have a real floating dtype"):
        T.forward(params, xp.asarray(np.ones((4, 6), dtype=np.int64)))
    with pytest.raises(TypeError, match="params must be TransformerParams"):
        T.forward({"layers": ()}, x)
    with pytest.raises(ValueError, match="unknown norm 'batch'"):
        T.init_params(6, layers=1, heads=2, xp=xp, norm="batch")
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        T.init_params(6, layers=1, heads=2, xp=xp, activation="tanh")
    with pytest.raises(ValueError, match="unknown norm 'batch'"):
        dataclasses.replace(params, norm="batch")
    with pytest.raises(ValueError, match="heads must be a positive integer"):
        T.init_params(6, layers=1, heads=0, xp=xp)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        T.cross_entropy_loss(xp.asarray(np.ones((6, 3))), xp.asarray(np.ones(4)))
    with pytest.raises(ValueError, match=r"dL/dout returned by loss must have the output's shape"):
        T.loss_and_gradients(params, x, lambda out: (out[0, 0], out[:, :3]))
    with pytest.raises(ValueError, match=r"must have the output's shape \(4, 6\), got \(1, 6\)"):
        T.loss_and_gradients(params, x, lambda out: (out[0, 0], out[:1, :]))
    with pytest.raises(TypeError, match="loss must be callable"):
        T.loss_and_gradients(params, x, x)
    with pytest.raises(ValueError, match="d_head must be a positive integer, got 0"):
        T.init_params(6, layers=1, heads=2, xp=xp, d_head=0)
    with pytest.raises(ValueError, match="d_ff must be a positive integer"):
        T.init_params(6, layers=1, heads=2, xp=xp, d_ff=2.5)
    # inconsistent parameter shapes and norm leaves are named
    bad = _replace_leaf(params, "layers[1].w_k", xp.asarray(np.ones((2, 6, 4))))
    with pytest.raises(ValueError, match=r"layers\[1\]\.w_k must have shape \(2, 6, 3\)"):
        T.forward(bad, x)
    bad = _replace_leaf(params, "layers[0].w2", xp.asarray(np.ones((8, 5))))
    with pytest.raises(ValueError, match=r"layers\[0\]\.w2 must have shape \(8, 6\)"):
        T.forward(bad, x)
    with pytest.raises(ValueError, match=r"layers\[0\]\.bias1 is missing"):
        T.forward(_replace_leaf(params, "layers[0].bias1", None), x)
    with pytest.raises(ValueError, match=r"layers\[0\]\.bias1 must be None with norm='rms'"):
        T.forward(dataclasses.replace(params, norm="rms"), x)
    with pytest.raises(ValueError, match="params must have at least one layer"):
        T.forward(dataclasses.replace(params, layers=()), x)
    # arrays positional-only, options keyword-only
    with pytest.raises(TypeError):
        T.forward(params=params, x=x)
    with pytest.raises(TypeError):
        T.forward(params, x, True)
    with pytest.raises(TypeError):
        T.loss_and_gradients(params, x, loss, "conv")


def test_cross_entropy_on_a_non_default_device(rng):
    """The one-hot and every other array the loss builds live on the labels' device."""
    xs = pytest.importorskip("array_api_strict")
    dev = xs.Device("device1")
    arrays = rng.standard_normal((6, 7)), rng.integers(0, 7, size=5), rng.standard_normal((5, 6))
    w_vocab, labels, out = (xs.asarray(a, device=dev) for a in arrays)
    value, grad = T.cross_entropy_loss(w_vocab, labels)(out)
    assert grad.device == dev and value.device == dev
    host_value, host_grad = T.cross_entropy_loss(arrays[0], arrays[1])(arrays[2])
    assert_close(xs.asarray(grad, device=xs.Device("CPU_DEVICE")), host_grad, atol=1e-14)
    assert abs(float(xs.asarray(value, device=xs.Device("CPU_DEVICE"))) - host_value) < 1e-14


def test_cross_entropy_rejects_labels_outside_the_vocabulary(xp, rng):
    w_vocab = xp.asarray(rng.standard_normal((6, 7)))
    for bad in ([0, 7], [-1, 3]):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, vocab = 7\)"):
            T.cross_entropy_loss(w_vocab, xp.asarray(bad))


def test_init_params_on_a_device(rng):
    """Every parameter lives on the device asked for, in the dtype asked for."""
    xs = pytest.importorskip("array_api_strict")
    dev = xs.Device("device1")
    params = T.init_params(6, layers=2, heads=2, xp=xs, norm="layer", device=dev)
    leaves = params.leaves().values()
    assert {a.device for a in leaves} == {dev} and {a.dtype for a in leaves} == {xs.float64}
    host = T.init_params(6, layers=2, heads=2, xp=np, norm="layer")
    for a, b in zip(leaves, host.leaves().values(), strict=True):
        assert_close(xs.asarray(a, device=xs.Device("CPU_DEVICE")), b)
    x = xs.asarray(rng.standard_normal((5, 6)), device=dev)
    out, _ = T.forward(params, x)
    assert out.device == dev
    f32 = T.init_params(6, layers=1, heads=2, xp=xs, dtype=xs.float32, device=dev)
    assert {a.dtype for a in f32.leaves().values()} == {xs.float32}


def test_x_and_params_must_share_a_dtype(xp, rng):
    """torch's matmul does not promote float32 against float64: one rule on every backend."""
    params = _params(xp, dtype="f4")
    x = xp.asarray(rng.standard_normal((5, 6)))
    with pytest.raises(TypeError, match=r"x and every parameter must share one floating dtype"):
        T.forward(params, x)
