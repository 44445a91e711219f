"""convbasis.jax: a custom VJP through the library's own gradients, eager and under jit/vmap.

Eager JAX compiles every operation on its first use with a new shape or dtype (about 150
for one conv forward and backward, tens of seconds on a loaded two-core machine), so eager
runs are few: dense checks the wiring (every method takes the same route eagerly, and the
library's own suite runs every method on JAX arrays).  Every method runs under jit: dense and
multipole trace the library code eager runs, lowrank and conv run as host callbacks on NumPy.
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import convbasis  # noqa: E402
import convbasis.jax as cbj  # noqa: E402
from convbasis.operators import METHODS, dense_operator  # noqa: E402

# Options that make each method differ from dense attention on the inputs below (checked).
CASES = {
    "dense": {},
    "lowrank": {"eps": 1e-3},
    "conv": {"rank": 3},
    "multipole": {"block": 2, "basis": 1},
    "composite": {"block": 1, "budget": 3, "heavy": 0},
}
NATIVE_UNDER_JIT = {"dense", "multipole", "composite"}  # the others read values back into Python
SHAPE = (2, 8, 4)

# Random q, k have no few-segment conv structure: the conv tests check the model, whatever
# its distance from exact attention.
pytestmark = pytest.mark.filterwarnings("ignore::convbasis.ConvBasisWarning")


@pytest.fixture(scope="module", autouse=True)
def float64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def inputs(shape=SHAPE, dtype=np.float64, seed=0):
    """``q, k, v`` uniform in [-1, 1] (bounded entries keep the polynomial's degree small)."""
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.uniform(-1, 1, shape).astype(dtype)) for _ in range(3))


def numpy_gradients(q, k, v, g, **kwargs):
    """The library's gradients on NumPy copies: the reference for the wrapper's VJP."""
    return convbasis.attention_gradients(*(np.asarray(a) for a in (q, k, v, g)), **kwargs)


def assert_all_close(actual, desired, **tolerances):
    for a, d in zip(actual, desired, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(d), **tolerances)


def test_check_grads_eager():
    q, k, v = inputs()
    check_grads(cbj.attention, (q, k, v), order=1, modes=["rev"])
    out, vjp = jax.vjp(cbj.attention, q, k, v)
    assert_all_close(vjp(out), numpy_gradients(q, k, v, out), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("method", CASES)
def test_check_grads_under_jit(method, causal):
    options = CASES[method]
    q, k, v = inputs(shape=(2, 6, 4))
    attend = jax.jit(
        lambda q, k, v: cbj.attention(q, k, v, method=method, causal=causal, **options)
    )
    if method != "dense":
        dense = convbasis.attention(*(np.asarray(a) for a in (q, k, v)), causal=causal)
        assert not np.allclose(np.asarray(attend(q, k, v)), dense, atol=1e-6)
    check_grads(attend, (q, k, v), order=1, modes=["rev"])
    out, vjp = jax.vjp(attend, q, k, v)
    expected = numpy_gradients(
        q, k, v, out, method=method, causal=causal, gradient="model", **options
    )
    assert_all_close(vjp(out), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", CASES)
def test_jit_traces_natively_where_it_can(method):
    q, k, v = inputs(shape=(6, 4))
    jaxpr = str(
        jax.make_jaxpr(lambda *a: cbj.attention(*a, method=method, **CASES[method]))(q, k, v)
    )
    assert ("callback" not in jaxpr) == (method in NATIVE_UNDER_JIT)


@pytest.mark.parametrize("method", ["dense", "conv"])
def test_vmap_calls_each_element_alone(method):
    q, k, v = inputs(shape=(3, 6, 4))
    options = CASES[method]
    vmapped = jax.vmap(lambda *a: cbj.attention(*a, method=method, **options))(q, k, v)
    for i in range(3):
        alone = convbasis.attention_operator(
            np.asarray(q[i]), np.asarray(k[i]), method=method, **options
        ).matmul(np.asarray(v[i]))
        np.testing.assert_allclose(np.asarray(vmapped[i]), alone, rtol=1e-12, atol=1e-13)


def softmax_attention(q, k, v, *, causal, scale):
    """Dense attention in plain ``jax.numpy``: differentiated by JAX itself."""
    logits = scale * q @ jnp.swapaxes(k, -1, -2)
    if causal:
        n = q.shape[-2]
        logits = jnp.where(jnp.tril(jnp.ones((n, n), dtype=bool)), logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1) @ v


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_dense_matches_jax_autodiff(causal):
    # jax.nn.dot_product_attention would do, but its softmax runs in float32 (5e-8 off)
    q, k, v = inputs(shape=(2, 3, 8, 4))
    g = inputs(shape=(2, 3, 8, 4), seed=1)[0]

    def output_and_vjp(attend):
        def run(q, k, v, g):
            out, vjp = jax.vjp(lambda *a: attend(*a, causal=causal, scale=0.3), q, k, v)
            return out, vjp(g)

        return jax.jit(run)(q, k, v, g)

    (out, grads), (want, want_grads) = map(output_and_vjp, (cbj.attention, softmax_attention))
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-12, atol=1e-13)
    assert_all_close(grads, want_grads, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["lowrank", "conv", "multipole"])
def test_exact_formula_vjp_is_the_librarys(method):
    options = CASES[method]
    q, k, v = inputs(shape=(2, 6, 4))
    attend = jax.jit(
        lambda *a: cbj.attention(*a, method=method, gradient="exact-formula", **options)
    )
    out, vjp = jax.vjp(attend, q, k, v)
    kwargs = {"method": method, **options}
    expected = numpy_gradients(q, k, v, out, gradient="exact-formula", **kwargs)
    assert_all_close(vjp(out), expected, rtol=1e-10, atol=1e-12)
    model = numpy_gradients(q, k, v, out, gradient="model", **kwargs)
    assert not np.allclose(np.asarray(vjp(out)[0]), model[0], atol=1e-8)


def test_batch_heads_and_broadcast_key_heads():
    # one key/value head shared by three query heads: gradients sum over the shared axis
    q = inputs(shape=(2, 3, 8, 4))[0]
    k, v = inputs(shape=(2, 1, 8, 4), seed=1)[:2]

    def loss(q, k, v):
        return jnp.sum(cbj.attention(q, k, v, method="multipole", block=2, basis=1) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    expanded = [jnp.broadcast_to(a, q.shape) for a in (k, v)]
    full = jax.jit(jax.grad(loss, argnums=(1, 2)))(q, *expanded)
    assert_all_close(grads[1:], [g.sum(axis=1, keepdims=True) for g in full], rtol=1e-12)


@pytest.mark.parametrize(
    ("method", "jit"), [("dense", False), ("dense", True), ("conv", True), ("lowrank", True)]
)
def test_float32_stays_float32(method, jit):
    q, k, v = inputs(dtype=np.float32)

    def loss(q, k, v):
        return jnp.sum(cbj.attention(q, k, v, method=method, **CASES[method]))

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    value, grads = (jax.jit(grad) if jit else grad)(q, k, v)
    assert value.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in grads)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "nope"}, ValueError, "unknown attention method 'nope'"),
        ({"gradient": "exact"}, ValueError, "gradient must be one of"),
        ({"method": "conv", "ranks": 2}, TypeError, "takes the options"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        cbj.attention(*inputs(), **kwargs)


def test_a_method_registered_later_needs_no_change(monkeypatch):
    # under a new name, through the operator protocol (the exact-formula gradient)
    monkeypatch.setitem(METHODS, "dense-again", dense_operator)
    q, k, v = inputs()

    def attend(q, k, v):
        return cbj.attention(q, k, v, method="dense-again", gradient="exact-formula")

    np.testing.assert_allclose(np.asarray(attend(q, k, v)), np.asarray(cbj.attention(q, k, v)))
    check_grads(attend, (q, k, v), order=1, modes=["rev"])


def test_forward_mode_is_refused():
    q, k, v = inputs()
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(cbj.attention, (q, k, v), (q, k, v))


PLAIN_FORWARD = {
    "dense": lambda q, k, v: convbasis.attention(q, k, v),
    "multipole": lambda q, k, v: convbasis.multipole_attention(q, k, v, block=2, basis=1),
    "lowrank": lambda q, k, v: convbasis.lowrank_attention(q, k, v, eps=1e-3),
    "conv": lambda q, k, v: convbasis.conv_attention(q, k, v, rank=3),
}


@pytest.mark.parametrize("method", PLAIN_FORWARD)
def test_plain_calls_under_jax_grad_are_exact_or_refused(method):
    # what makes a torch refusal unnecessary for JAX (docs: "torch and JAX autograd")
    q, k, v = inputs(shape=(2, 6, 4))
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(PLAIN_FORWARD[method](*a) ** 2), argnums=(0, 1, 2)))
    if method in NATIVE_UNDER_JIT:
        out = jax.jit(PLAIN_FORWARD[method])(q, k, v)
        expected = numpy_gradients(
            q, k, v, 2 * out, method=method, gradient="model", **CASES[method]
        )
        assert_all_close(grad(q, k, v), expected, rtol=1e-10, atol=1e-12)
    else:
        for transformed in (grad, jax.grad(lambda *a: jnp.sum(PLAIN_FORWARD[method](*a)))):
            with pytest.raises(TypeError):
                transformed(q, k, v)


# multipole passes too (15 s to compile its second derivative, so not run here)
@pytest.mark.parametrize("method", ["dense", "conv"])
def test_second_derivatives_where_the_backward_traces(method):
    q, k, v = inputs(shape=(2, 6, 4))
    attend = jax.jit(lambda *a: cbj.attention(*a, method=method, **CASES[method]))
    if method in NATIVE_UNDER_JIT:
        check_grads(attend, (q, k, v), order=2, modes=["rev"])
    else:
        with pytest.raises(ValueError, match="callbacks do not support JVP"):
            check_grads(attend, (q, k, v), order=2, modes=["rev"])


@pytest.mark.parametrize("method", ["dense", "composite", "conv"])
def test_grouped_heads_and_lengths_under_jit(method):
    """Grouped-query heads and static lengths: each sequence alone, heads repeated."""
    options = CASES[method]
    q = inputs(shape=(2, 4, 8, 4))[0]
    k, v = inputs(shape=(2, 2, 8, 4), seed=1)[:2]
    lengths = (8, 3)

    def attend(q, k, v):
        return cbj.attention(q, k, v, method=method, lengths=lengths, **options)

    out = jax.jit(attend)(q, k, v)
    rep = [np.repeat(np.asarray(a), 2, axis=1) for a in (k, v)]
    for b, size in enumerate(lengths):
        alone = convbasis.attention_operator(
            np.asarray(q)[b, :, :size], rep[0][b, :, :size], method=method, **options
        ).matmul(rep[1][b, :, :size])
        np.testing.assert_allclose(np.asarray(out)[b, :, :size], alone, rtol=1e-12, atol=1e-13)
        assert np.all(np.asarray(out)[b, :, size:] == 0)
    check_grads(jax.jit(attend), (q, k, v), order=1, modes=("rev",))


def test_traced_lengths_are_refused():
    q, k, v = inputs(shape=(2, 1, 8, 4))
    with pytest.raises(TypeError, match="lengths must be concrete"):
        jax.jit(lambda q, k, v, n: cbj.attention(q, k, v, lengths=n))(q, k, v, jnp.array([8, 3]))


def test_gradient_results_are_pytrees_under_jit():
    q = inputs(shape=(2, 8, 4))[0]
    grads = jax.jit(lambda q: convbasis.attention_backward(q, q, q, q))(q)
    assert isinstance(grads, convbasis.AttentionGradients)
    assert_all_close(grads, convbasis.attention_backward(*(np.asarray(q),) * 4), rtol=1e-12)


def test_eager_half_precision_keeps_its_dtype():
    q = inputs(shape=(2, 16, 4), dtype=np.float16)[0]
    assert cbj.attention(q, q, q, method="conv", rank=2).dtype == jnp.float16
