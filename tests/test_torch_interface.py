"""convbasis.torch: autograd through the library's own gradients, and the refusal elsewhere."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import convbasis  # noqa: E402
import convbasis.reference  # noqa: E402
import convbasis.torch as cbt  # noqa: E402
from convbasis.operators import METHODS, dense_operator  # noqa: E402

# Options that make each method differ from dense attention on the small inputs below (the
# test checks that it does), so gradcheck checks a structured model's own gradient.
CASES = {
    "dense": {},
    "lowrank": {"eps": 1e-3},
    "lowrank-taylor": {"degree": 4, "kind": "taylor"},
    "conv": {"rank": 3},
    "conv-exact-rows": {"rank": 3, "tolerance": 1e-300},  # every row recomputed exactly
    "multipole": {"block": 2, "basis": 1},
    "composite": {"block": 1, "budget": 3, "heavy": 0},
}
METHOD_OF = {case: case.partition("-")[0] for case in CASES}

# Random q, k have no few-segment conv structure: the conv tests check the model, whatever
# its distance from exact attention.
approximate_conv = pytest.mark.filterwarnings("ignore::convbasis.ConvBasisWarning")


def inputs(shape=(2, 8, 4), dtype=torch.float64, seed=0, requires_grad=True):
    """``q, k, v`` uniform in [-1, 1] (bounded entries keep the polynomial's degree small)."""
    rng = np.random.default_rng(seed)
    return tuple(
        torch.tensor(rng.uniform(-1, 1, shape), dtype=dtype).requires_grad_(requires_grad)
        for _ in range(3)
    )


def detached(*tensors):
    return tuple(t.detach() for t in tensors)


@approximate_conv
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("case", CASES)
def test_gradcheck_model_gradient(case, causal):
    method, options = METHOD_OF[case], CASES[case]
    q, k, v = inputs()

    def attend(q, k, v):
        return cbt.attention(q, k, v, method=method, causal=causal, **options)

    if method != "dense":
        dense = convbasis.reference.attention(*detached(q, k, v), causal=causal)
        assert not torch.allclose(attend(q, k, v).detach(), dense, atol=1e-6)
    assert torch.autograd.gradcheck(attend, (q, k, v), fast_mode=True)


def test_gradcheck_dense_full_jacobian():
    q, k, v = inputs(shape=(5, 3))
    assert torch.autograd.gradcheck(lambda *a: cbt.attention(*a, scale=0.7), (q, k, v))


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_dense_matches_sdpa_autograd(causal, scale):
    q, k, v = inputs(shape=(2, 3, 8, 4))
    g = torch.randn(2, 3, 8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = cbt.attention(q, k, v, causal=causal, scale=scale)
    grads = torch.autograd.grad(out, (q, k, v), g)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    expected = torch.autograd.grad(sdpa, (q, k, v), g)
    torch.testing.assert_close(out, sdpa, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


@approximate_conv
@pytest.mark.parametrize("case", ["lowrank", "conv", "multipole"])
def test_exact_formula_backward_is_the_librarys(case):
    method, options = METHOD_OF[case], CASES[case]
    q, k, v = inputs()
    g = torch.ones(2, 8, 4, dtype=torch.float64)
    out = cbt.attention(q, k, v, method=method, gradient="exact-formula", **options)
    grads = torch.autograd.grad(out, (q, k, v), g)
    expected = convbasis.attention_gradients(
        *detached(q, k, v), g, method=method, gradient="exact-formula", **options
    )
    model = convbasis.attention_gradients(
        *detached(q, k, v), g, method=method, gradient="model", **options
    )
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the two meanings differ for a structured method: the test would notice a mix-up
    assert not torch.allclose(grads[0], model[0], atol=1e-8)


def test_batch_heads_and_broadcast_key_heads():
    # one key/value head shared by three query heads: gradients sum over the shared axis
    rng = np.random.default_rng(2)
    q = torch.tensor(rng.standard_normal((2, 3, 8, 4)), requires_grad=True)
    k, v = (torch.tensor(rng.standard_normal((2, 1, 8, 4)), requires_grad=True) for _ in "kv")
    out = cbt.attention(q, k, v, method="multipole", block=2, basis=1)
    assert out.shape == (2, 3, 8, 4)
    out.square().sum().backward()
    assert (q.grad.shape, k.grad.shape, v.grad.shape) == (q.shape, k.shape, v.shape)
    expanded = [t.detach().expand(2, 3, 8, 4).clone().requires_grad_() for t in (k, v)]
    cbt.attention(
        q.detach(), *expanded, method="multipole", block=2, basis=1
    ).square().sum().backward()
    torch.testing.assert_close(k.grad, expanded[0].grad.sum(1, keepdim=True))
    torch.testing.assert_close(v.grad, expanded[1].grad.sum(1, keepdim=True))


@approximate_conv
@pytest.mark.parametrize("case", ["dense", "lowrank", "conv", "multipole"])
def test_float32_stays_float32(case):
    method, options = METHOD_OF[case], CASES[case]
    q, k, v = inputs(dtype=torch.float32)
    out = cbt.attention(q, k, v, method=method, **options)
    out.sum().backward()
    assert out.dtype == torch.float32 and out.device == q.device
    assert all(t.grad.dtype == torch.float32 for t in (q, k, v))


def test_mixed_dtypes_give_each_input_its_own_gradient_dtype():
    q, k = inputs(dtype=torch.float32)[:2]
    v = inputs(seed=1)[2]
    out = cbt.attention(q, k, v)
    out.sum().backward()
    assert out.dtype == torch.float64
    assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.float32,) * 2 + (torch.float64,)


def test_only_requested_gradients():
    q, k, v = inputs()
    q, k = detached(q, k)
    out = cbt.attention(q, k, v)
    out.sum().backward()
    assert q.grad is None and k.grad is None
    expected = convbasis.attention_gradients(q, k, v.detach(), torch.ones_like(out))[2]
    torch.testing.assert_close(v.grad, expected)


def test_double_backward_raises():
    q, k, v = inputs(shape=(4, 2))
    # a loss whose output gradient itself requires grad, so a second backward is asked for
    loss = cbt.attention(q, k, v).square().sum()
    (dq,) = torch.autograd.grad(loss, q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        dq.sum().backward()


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
        cbt.attention(*inputs(), **kwargs)


def test_refuses_non_tensors():
    q, k, v = (np.ones((4, 2)) for _ in range(3))
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        cbt.attention(q, k, v)


def test_a_method_registered_later_needs_no_change(monkeypatch):
    # under a new name, through the operator protocol (the exact-formula gradient)
    monkeypatch.setitem(METHODS, "dense-again", dense_operator)
    q, k, v = inputs()

    def attend(q, k, v):
        return cbt.attention(q, k, v, method="dense-again", gradient="exact-formula")

    torch.testing.assert_close(attend(q, k, v), cbt.attention(q, k, v))
    assert torch.autograd.gradcheck(attend, (q, k, v), fast_mode=True)


# Plain library calls with tensors that autograd tracks (issue 15, item 1).
def _operator_matmul(q, k, v):
    return convbasis.attention_operator(q, k, method="conv", rank=2).matmul(v)


PLAIN_CALLS = {
    "attention": lambda q, k, v: convbasis.attention(q, k, v),
    "reference.attention": lambda q, k, v: convbasis.reference.attention(q, k, v),
    "attention_backward": lambda q, k, v: convbasis.attention_backward(q, k, v, v),
    "conv_attention": lambda q, k, v: convbasis.conv_attention(q, k, v, rank=2),
    "lowrank_attention": lambda q, k, v: convbasis.lowrank_attention(q, k, v, eps=1e-2),
    "multipole_attention": lambda q, k, v: convbasis.multipole_attention(q, k, v, block=2, basis=1),
    "conv_operator": lambda q, k, v: convbasis.conv_operator(q, k, rank=2),
    "attention_operator.matmul": _operator_matmul,
    "attention_gradients": lambda q, k, v: convbasis.attention_gradients(q, k, v, v),
}


@approximate_conv
@pytest.mark.parametrize("call", PLAIN_CALLS)
def test_plain_calls_refuse_tensors_that_require_grad(call):
    q, k, v = inputs(requires_grad=False)
    PLAIN_CALLS[call](q, k, v)
    with torch.no_grad():
        PLAIN_CALLS[call](*inputs())
    PLAIN_CALLS[call](*detached(*inputs()))
    with pytest.raises(TypeError, match=r"convbasis\.torch\.attention"):
        PLAIN_CALLS[call](q.requires_grad_(), k, v)


def test_operator_products_refuse_tracked_operands():
    q, k, v = inputs()
    op = convbasis.attention_operator(*detached(q, k))
    with pytest.raises(TypeError, match="requires_grad=True"):
        op.matmul(v)
    torch.testing.assert_close(op.matmul(v.detach()), convbasis.attention(*detached(q, k, v)))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_grouped_heads_and_lengths_match_sdpa(causal):
    """GQA as SDPA's ``enable_gqa``; lengths as a key-padding mask with padded rows zeroed."""
    rng = np.random.default_rng(3)
    q, k, v = (
        torch.tensor(rng.uniform(-1, 1, (2, h, 8, 4)), dtype=torch.float64).requires_grad_()
        for h in (6, 2, 2)
    )
    lengths = torch.tensor([8, 5])
    g = torch.tensor(rng.standard_normal((2, 6, 8, 4)))
    out = cbt.attention(q, k, v, causal=causal, lengths=lengths)
    grads = torch.autograd.grad(out, (q, k, v), g)
    valid = torch.arange(8)[None, :] < lengths[:, None]  # (B, n)
    mask = valid[:, None, None, :]
    if causal:
        mask = mask & torch.ones(8, 8, dtype=torch.bool).tril()
    # padded query rows keep their diagonal key (SDPA needs a finite row); they are zeroed
    mask = mask | torch.eye(8, dtype=torch.bool)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True
    )
    sdpa = sdpa * valid[:, None, :, None]
    expected = torch.autograd.grad(sdpa, (q, k, v), g)
    torch.testing.assert_close(out, sdpa, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


@approximate_conv
@pytest.mark.parametrize("case", ["lowrank", "conv", "multipole", "composite"])
def test_gradcheck_grouped_heads_and_lengths(case):
    method, options = METHOD_OF[case], CASES[case]
    rng = np.random.default_rng(4)
    q, k, v = (
        torch.tensor(rng.uniform(-1, 1, (2, h, 8, 4)), dtype=torch.float64).requires_grad_()
        for h in (4, 2, 2)
    )

    def attend(q, k, v):
        return cbt.attention(q, k, v, method=method, lengths=(8, 3), **options)

    assert torch.autograd.gradcheck(attend, (q, k, v), fast_mode=True)


@approximate_conv
def test_mixed_float32_float64_conv_gradients():
    q, k = inputs(dtype=torch.float32)[:2]
    v = inputs(dtype=torch.float64)[2]
    out = cbt.attention(q, k, v, method="conv", rank=2)
    out.sum().backward()
    assert out.dtype == torch.float64
    assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.float32,) * 2 + (torch.float64,)
