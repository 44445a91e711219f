"""Capability declarations (:mod:`convbasis._capabilities`): every public name declared, the
docs table in step, every declared function run on every backend and device with NumPy's
result, and the declared ``jax.jit`` behaviour true (a result, or the eager-only error)."""

from __future__ import annotations

import pathlib

import array_api_compat
import numpy as np
import pytest

import convbasis as cb
import convbasis.dask
import convbasis.jax
import convbasis.torch
from convbasis import _capabilities as caps
from convbasis import transformer as T
from convbasis.testing import assert_close, to_numpy

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
MODULES = {
    "": cb,
    "transformer.": T,
    "dask.": convbasis.dask,
    "torch.": convbasis.torch,
    "jax.": convbasis.jax,
}
# Public names that compute nothing themselves: errors, warnings, the protocol, result and
# parameter containers, option tables.
UNDECLARED = {
    "AttentionGradients",
    "AttentionOperator",
    "CompositeReport",
    "CompositeWarning",
    "ConvBasisWarning",
    "ExpApproximationError",
    "MultipoleGradients",
    "SelfAttentionGradients",
    "transformer.ACTIVATIONS",
    "transformer.NORMS",
    "transformer.CrossEntropyLoss",
    "transformer.ForwardCache",
    "transformer.LayerCache",
    "transformer.LayerParams",
    "transformer.TransformerGradients",
    "transformer.TransformerParams",
}
OPTIONS = {
    "dense": {},
    "lowrank": {"eps": 1e-2},
    "conv": {"rank": 3},
    "multipole": {"block": 4},
    "composite": {"block": 4, "budget": 8},
}
N, D = 16, 4


def _public():
    return {prefix + name for prefix, module in MODULES.items() for name in module.__all__}


def test_every_public_name_is_declared_once():
    public = _public()
    missing = sorted(public - set(caps.DECLARATIONS) - UNDECLARED)
    assert not missing, f"public names without a capability declaration: {missing}"
    stale = sorted(set(caps.DECLARATIONS) - public)
    assert not stale, f"declarations of names that are not public: {stale}"
    assert not UNDECLARED & set(caps.DECLARATIONS)
    for name, declared in caps.DECLARATIONS.items():
        assert set(declared.backends) <= set(caps.LIBRARIES), name
        if declared.jit is not True or not declared.device:
            assert declared.reason, f"{name}: an exclusion needs its reason"


def test_docs_page_holds_the_table():
    """docs/capabilities.rst shows the declarations (``write_page`` rewrites it)."""
    page = (DOCS / "capabilities.rst").read_text(encoding="utf-8")
    fix = "run: python -c 'import convbasis._capabilities as c; c.write_page()'"
    assert caps.page_with_table(page) == page, fix
    for name in caps.DECLARATIONS:
        assert f'"``{name}``"' in page


def test_unknown_name_lists_the_declared_ones():
    with pytest.raises(KeyError, match="no capability declaration for 'softmax'"):
        caps.capabilities("softmax")


# --------------------------------------------------------------------------------------
# One call per declared function: ``call(built, q, k, v, g)`` with ``built`` the objects made
# eagerly from concrete inputs (operators, parameters), so that under ``jax.jit`` only the
# function under test sees tracers.
# --------------------------------------------------------------------------------------


def _build(xp, q, k, dev):
    params = T.init_params(D, layers=1, heads=2, xp=xp, norm="layer", dtype=q.dtype, device=dev)
    built = {m: cb.attention_operator(q, k, method=m, **o) for m, o in OPTIONS.items()}
    labels = xp.asarray(np.arange(N) % D, device=dev)
    return {
        **built,
        "factors": cb.lowrank_factors(q, k, degree=3),
        "params": params,
        "labels": labels,
        "tril": xp.asarray(np.tri(N), device=dev),
        "xp": xp,
    }


def _framework(library, q, k, v):
    """``convbasis.<library>.attention`` on that library's arrays (composite attention, which
    traces under jit); on NumPy's, the plain function it must agree with."""
    own = {"torch": array_api_compat.is_torch_array, "jax": array_api_compat.is_jax_array}
    options = OPTIONS["composite"]
    if own[library](q):
        return getattr(convbasis, library).attention(q, k, v, method="composite", **options)
    return cb.composite_attention(q, k, v, **options)


def _self(b, q, k, v, g, method):
    w = [q[0, :D, :], k[0, :D, :], v[0, :D, :]]
    out = cb.self_attention_gradients(q, *w, g, method=method, **OPTIONS[method])
    return (out.dx, out.dw_q, out.dw_k, out.dw_v)


CALLS = {
    "attention": lambda b, q, k, v, g: cb.attention(q, k, v),
    "attention_backward": lambda b, q, k, v, g: cb.attention_backward(q, k, v, g),
    "attention_weights": lambda b, q, k, v, g: cb.attention_weights(q, k, causal=False),
    "multipole_weights": lambda b, q, k, v, g: cb.multipole_weights(q, k, block=4, basis=2),
    "multipole_reference": lambda b, q, k, v, g: cb.multipole_reference(q, k, v, block=4),
    "masked_lowrank_matmul": lambda b, q, k, v, g: cb.masked_lowrank_matmul(q, k, v),
    "masked_hadamard_matmul": lambda b, q, k, v, g: cb.masked_hadamard_matmul(q, k, g, v, v),
    "face_splitting_product": lambda b, q, k, v, g: cb.face_splitting_product(q, k),
    "lowrank_attention": lambda b, q, k, v, g: cb.lowrank_attention(q, k, v, degree=3),
    "lowrank_operator": lambda b, q, k, v, g: cb.lowrank_operator(q, k, degree=3).matmul(v),
    "lowrank_factors": lambda b, q, k, v, g: cb.lowrank_factors(q, k, degree=3).u,
    "LowRankFactors": lambda b, q, k, v, g: b["factors"].to_dense() @ v,
    "LowRankAttentionOperator": lambda b, q, k, v, g: b["lowrank"].hadamard_rmatmul(g, v, v),
    "conv_matmul": lambda b, q, k, v, g: cb.conv_matmul(q[..., 0], v),
    "conv_rmatmul": lambda b, q, k, v, g: cb.conv_rmatmul(q[..., 0], v, m=N - 3),
    "ConvBasis": lambda b, q, k, v, g: cb.ConvBasis(
        (0, 5), b["xp"].matrix_transpose(q)[..., :2, :], N
    ).rmatmul(v),
    "decompose_conv_basis": lambda b, q, k, v, g: (
        cb.decompose_conv_basis(b["tril"] * (q @ b["xp"].matrix_transpose(k))).vectors
    ),
    "fit_conv_basis": lambda b, q, k, v, g: (
        cb.fit_conv_basis(q @ b["xp"].matrix_transpose(k), 3).vectors
    ),
    "recover_conv_basis": lambda b, q, k, v, g: cb.recover_conv_basis(q, k, rank=3).vectors,
    "conv_operator": lambda b, q, k, v, g: cb.conv_operator(q, k, rank=3).rmatmul(v),
    "conv_attention": lambda b, q, k, v, g: cb.conv_attention(q, k, v, rank=3),
    "ConvAttentionOperator": lambda b, q, k, v, g: b["conv"].hadamard_matmul(g, v, v),
    "multipole_attention": lambda b, q, k, v, g: cb.multipole_attention(q, k, v, block=4),
    "multipole_attention_backward": lambda b, q, k, v, g: (
        cb.multipole_attention_backward(q, k, v, g, block=4).dq
    ),
    "multipole_operator": lambda b, q, k, v, g: cb.multipole_operator(q, k, block=4).matmul(v),
    "MultipoleAttentionOperator": lambda b, q, k, v, g: b["multipole"].rmatmul(v),
    "DenseAttentionOperator": lambda b, q, k, v, g: b["dense"].hadamard_rmatmul(g, v, v),
    "composite_operator": lambda b, q, k, v, g: cb.composite_operator(
        q, k, **OPTIONS["composite"]
    ).rmatmul(v),
    "composite_attention": lambda b, q, k, v, g: cb.composite_attention(
        q, k, v, **OPTIONS["composite"]
    ),
    "CompositeAttentionOperator": lambda b, q, k, v, g: b["composite"].hadamard_matmul(g, v, v),
    # the framework wrappers on their own library; NumPy's reference is the dense oracle
    "torch.attention": lambda b, q, k, v, g: _framework("torch", q, k, v),
    "jax.attention": lambda b, q, k, v, g: _framework("jax", q, k, v),
    "transformer.init_params": lambda b, q, k, v, g: tuple(b["params"].leaves().values()),
    "transformer.squared_error_loss": lambda b, q, k, v, g: T.squared_error_loss(v)(q),
    "transformer.cross_entropy_loss": lambda b, q, k, v, g: T.cross_entropy_loss(
        k[0, :D, :], b["labels"]
    )(q[0, ...]),
    "transformer.gradient_errors": lambda b, q, k, v, g: T.gradient_errors(
        *(T.loss_and_gradients(b["params"], x, T.squared_error_loss(v)) for x in (q, k))
    ),
}
BY_METHOD = {
    "attention_operator": lambda b, q, k, v, g, m: cb.attention_operator(
        q, k, method=m, **OPTIONS[m]
    ).matmul(v),
    "attention_gradients": lambda b, q, k, v, g, m: cb.attention_gradients(
        q, k, v, g, method=m, gradient="model", **OPTIONS[m]
    ),
    "self_attention_gradients": _self,
    "transformer.forward": lambda b, q, k, v, g, m: T.forward(
        b["params"], q, attention=m, **OPTIONS[m]
    )[0],
    "transformer.loss_and_gradients": lambda b, q, k, v, g, m: (
        T.loss_and_gradients(b["params"], q, T.squared_error_loss(v), attention=m, **OPTIONS[m]).x
    ),
}


def _cases(*, jit):
    """``(name, method)`` for every declared function that takes in-memory arrays."""
    cases = [(name, None) for name in CALLS]
    cases += [(name, m) for name in BY_METHOD for m in OPTIONS]
    declared = {name for name, d in caps.DECLARATIONS.items() if set(d.backends) - {"dask"}}
    assert {name for name, _ in cases} == declared, "every declared function needs a call"
    return [
        pytest.param(
            name,
            method,
            id=name if method is None else f"{name}-{method}",
            marks=pytest.mark.capabilities(name, jit=jit, method=method),
        )
        for name, method in cases
    ]


def _run(name, method, built, arrays):
    if method is None:
        return CALLS[name](built, *arrays)
    return BY_METHOD[name](built, *arrays, method)


def _leaves(out):
    if isinstance(out, cb.AttentionGradients):
        return list(out)
    if isinstance(out, dict):
        return [v for value in out.values() for v in _leaves(value)]
    if isinstance(out, (tuple, list)):
        return [v for value in out for v in _leaves(value)]
    return [out]


def _inputs(xp, rng, dev):
    arrays = [rng.uniform(-1, 1, (2, N, D)) for _ in range(4)]
    return arrays, [xp.asarray(a, device=dev) for a in arrays]


@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
@pytest.mark.parametrize(("name", "method"), _cases(jit=False))
def test_every_function_gives_numpys_result_on_the_device(xp, device, rng, name, method):
    """Results stay in the caller's library and on the input's device, and equal NumPy's."""
    host, arrays = _inputs(xp, rng, device)
    real = array_api_compat.array_namespace(arrays[0])
    got = _leaves(_run(name, method, _build(real, *arrays[:2], device), arrays))
    want = _leaves(_run(name, method, _build(np, *host[:2], "cpu"), host))
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        if type(b) is float:  # gradient_errors: Python numbers
            assert a == pytest.approx(b, rel=1e-10, abs=1e-12), name
            continue
        assert array_api_compat.array_namespace(a) is real, name
        assert str(array_api_compat.device(a)) == str(device), name
        assert_close(a, b, atol=1e-10, rtol=1e-10, err_msg=name)


@pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
@pytest.mark.parametrize(("name", "method"), _cases(jit=True))
def test_jit_as_declared(backend, rng, name, method):
    """Under ``jax.jit`` a jit-safe function gives its eager result; an eager-only one raises
    EagerOnlyError (the capabilities mark makes that a strict xfail)."""
    if backend.library != "jax":
        pytest.skip("jax.jit needs JAX arrays")
    import jax

    xp = backend.namespace()
    dev = array_api_compat.device(xp.asarray([0.0]))
    _, arrays = _inputs(xp, rng, dev)
    built = _build(xp, *arrays[:2], dev)
    eager = _leaves(_run(name, method, built, arrays))
    traced = _leaves(jax.jit(lambda *a: _run(name, method, built, a))(*arrays))
    for a, b in zip(traced, eager, strict=True):
        assert_close(a, to_numpy(b), atol=1e-12, rtol=1e-12, err_msg=name)


def test_eager_only_message_under_jit(backend, rng):
    if backend.library != "jax":
        pytest.skip("jax.jit needs JAX arrays")
    import jax

    xp = backend.namespace()
    q, k, v = (xp.asarray(rng.standard_normal((8, 2))) for _ in range(3))
    with pytest.raises(caps.EagerOnlyError, match=r"conv_attention is eager only: it reads"):
        jax.jit(lambda q, k, v: cb.conv_attention(q, k, v, rank=2))(q, k, v)
    with pytest.raises(caps.EagerOnlyError, match=r"attention_gradients\(method='lowrank'\)"):
        jax.jit(lambda q: cb.attention_gradients(q, k, v, v, method="lowrank", degree=2))(q)
    with pytest.raises(caps.EagerOnlyError, match=r"transformer.forward\(attention='conv'\)"):
        params = T.init_params(2, layers=1, heads=1, xp=xp)
        jax.jit(lambda x: T.forward(params, x, attention="conv", rank=2))(q)


def test_traced_labels_outside_the_vocabulary_give_nan(backend, rng):
    """Traced labels cannot be range-checked: the loss says NaN rather than a wrong number."""
    if backend.library != "jax":
        pytest.skip("jax.jit needs JAX arrays")
    import jax

    xp = backend.namespace()
    w, out = xp.asarray(rng.standard_normal((3, 4))), xp.asarray(rng.standard_normal((5, 3)))
    labels = xp.asarray([0, 1, 2, 3, 4])  # 4 is outside vocab = 4

    def loss(labels):
        return T.cross_entropy_loss(w, labels)(out)

    value, grad = jax.jit(loss)(labels)
    assert np.isnan(float(value)) and np.all(np.isnan(to_numpy(grad)[4]))
    assert np.all(np.isfinite(to_numpy(grad)[:4]))
    good = xp.asarray([0, 1, 2, 3, 0])
    assert_close(jax.jit(loss)(good)[0], to_numpy(loss(good)[0]), atol=1e-14)


def test_no_tracer_without_jax(monkeypatch):
    monkeypatch.delitem(__import__("sys").modules, "jax", raising=False)
    assert not caps.traced(np.ones(3))
    caps.check_eager("conv_attention", np.ones(3))
