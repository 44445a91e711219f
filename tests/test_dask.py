"""convbasis.dask: every method over batch/head chunks, on threads and on a LocalCluster.

One chunk is one single-process call, so the reference below is the library function applied
to the same chunks (bitwise equal on NumPy); with one chunk that is the whole-array call.
The tests use NumPy chunks only; with ``CONVBASIS_BACKEND`` set they run in the session that
includes ``numpy``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import time

import numpy as np
import pytest
import threadpoolctl

import convbasis as cb
from convbasis.operators import METHODS as METHODS_REGISTRY
from convbasis.testing import rotary_conv_instance

_BACKENDS = os.environ.get("CONVBASIS_BACKEND")
if _BACKENDS and "numpy" not in _BACKENDS.split(","):
    pytest.skip("Dask tests use NumPy chunks (numpy session)", allow_module_level=True)

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")
cbd = pytest.importorskip("convbasis.dask")

BATCH, HEADS, N, D = 3, 2, 64, 8
STARTS = (0, 20, 40)
# Leading chunks of the (BATCH, HEADS) axes: one chunk, uneven chunks, one per head.
CHUNKINGS = {
    "single": ((3,), (2,)),
    "uneven": ((2, 1), (1, 1)),
    "per-head": ((1, 1, 1), (1, 1)),
}
FORWARD_OPTIONS = {
    "dense": {"block": 16},
    "lowrank": {"eps": 0.1},  # degree 3, rank 165: cheap
    "conv": {"rank": 4},
    "multipole": {"block": 8, "basis": 2},
    "composite": {"block": 4, "budget": 16},
}
GRADIENT_OPTIONS = {**FORWARD_OPTIONS, "dense": {}}  # the dense gradients take no options
FORWARD = {
    "dense": cb.attention,
    "lowrank": cb.lowrank_attention,
    "conv": cb.conv_attention,
    "multipole": cb.multipole_attention,
    "composite": cb.composite_attention,
}
# The bidirectional conv basis of a rotary instance is approximate (the transposed logits
# have no few-segment structure): its warning is expected there.
_CONV_WARNING = pytest.mark.filterwarnings("ignore::convbasis.conv.ConvBasisWarning")
METHODS = [pytest.param(m, marks=_CONV_WARNING) if m == "conv" else m for m in FORWARD]
WORKER_ENV = {"CONVBASIS_NUM_THREADS": "1", "CONVBASIS_FFT_WORKERS": "1"}


def _instances(seed=0, dtype="float64", n=N):
    """``q, k, v, g (BATCH, HEADS, n, D)``, read-only: an exact rotary conv instance per head,
    all with the same segment starts (so the whole-array conv call is exact too)."""
    rng = np.random.default_rng(seed)
    heads = [rotary_conv_instance(rng, n, D, STARTS)[:3] for _ in range(BATCH * HEADS)]
    q, k, v = (np.stack([h[i] for h in heads]).reshape(BATCH, HEADS, n, D) for i in range(3))
    g = rng.standard_normal(v.shape)
    arrays = tuple(a.astype(dtype) for a in (q, k, v, g))
    for a in arrays:
        a.flags.writeable = False
    return arrays


def _lazy(arrays, chunks):
    return tuple(da.from_array(a, chunks=(*chunks, -1, -1)) for a in arrays)


def _per_chunk(func, arrays, chunks):
    """``func`` applied to each leading chunk of ``arrays``, reassembled; a tuple of outputs."""
    lead = tuple(len(c) for c in chunks)
    pieces = []
    for index in itertools.product(*(range(count) for count in lead)):
        sl = tuple(slice(sum(c[:i]), sum(c[: i + 1])) for c, i in zip(chunks, index, strict=True))
        res = func(*(a[sl] for a in arrays))
        pieces.append((sl, tuple(res) if isinstance(res, cb.AttentionGradients) else (res,)))
    first = pieces[0][1]
    shape = tuple(sum(c) for c in chunks)
    outs = tuple(np.empty((*shape, *r.shape[-2:]), dtype=r.dtype) for r in first)
    for sl, res in pieces:
        for out, r in zip(outs, res, strict=True):
            out[sl] = r
    return outs


def _assert_bitwise(actual, desired):
    assert len(actual) == len(desired)
    for a, b in zip(actual, desired, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------
# Equality with the single-process functions (threaded scheduler)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("method", METHODS)
def test_forward_equals_single_process_per_chunk(method, causal, chunking):
    chunks = CHUNKINGS[chunking]
    q, k, v, _ = _instances()
    options = FORWARD_OPTIONS[method]
    out = cbd.attention(*_lazy((q, k, v), chunks), method=method, causal=causal, **options)
    assert out.chunks == (*chunks, (N,), (D,))
    (got,) = dask.compute(out, scheduler="threads")

    def single(q, k, v):
        return FORWARD[method](q, k, v, causal=causal, **options)

    _assert_bitwise((got,), _per_chunk(single, (q, k, v), chunks))
    if chunking == "single":
        _assert_bitwise((got,), (single(q, k, v),))
    elif method in ("dense", "multipole"):  # no data-dependent choice across the batch
        np.testing.assert_allclose(got, single(q, k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("gradient", ["exact-formula", "model"])
@pytest.mark.parametrize("method", METHODS)
def test_gradients_equal_single_process_per_chunk(method, gradient, causal, chunking):
    chunks = CHUNKINGS[chunking]
    arrays = _instances(seed=1)
    options = GRADIENT_OPTIONS[method]
    grads = cbd.attention_gradients(
        *_lazy(arrays, chunks), method=method, gradient=gradient, causal=causal, **options
    )
    assert [x.chunks for x in grads] == [(*chunks, (N,), (D,))] * 3
    got = dask.compute(*grads, scheduler="threads")

    def single(q, k, v, g):
        return cb.attention_gradients(
            q, k, v, g, method=method, gradient=gradient, causal=causal, **options
        )

    _assert_bitwise(got, _per_chunk(single, arrays, chunks))
    if chunking == "single":
        _assert_bitwise(got, single(*arrays))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_multipole_model_gradient_is_multipole_attention_backward(causal):
    arrays = _instances(seed=2)
    chunks = CHUNKINGS["uneven"]
    options = GRADIENT_OPTIONS["multipole"]
    grads = cbd.attention_gradients(
        *_lazy(arrays, chunks), method="multipole", gradient="model", causal=causal, **options
    )

    def backward(q, k, v, g):
        return cb.multipole_attention_backward(q, k, v, g, causal=causal, **options)

    _assert_bitwise(dask.compute(*grads), _per_chunk(backward, arrays, chunks))


@pytest.mark.parametrize("method", ["dense", "lowrank"])
def test_bidirectional_cross_attention(method):
    """``m != n`` keys: bidirectional dense and low-rank attention."""
    q, _, _, g = _instances(seed=3)
    _, k, v, _ = _instances(seed=4, n=48)
    chunks = CHUNKINGS["uneven"]
    lazy = _lazy((q, k, v, g), chunks)
    out = cbd.attention(*lazy[:3], method=method, causal=False, **FORWARD_OPTIONS[method])
    assert out.shape == (BATCH, HEADS, N, D)
    single = FORWARD[method]
    want = _per_chunk(
        lambda q, k, v: single(q, k, v, causal=False, **FORWARD_OPTIONS[method]),
        (q, k, v),
        chunks,
    )
    _assert_bitwise((out.compute(),), want)
    grads = cbd.attention_gradients(*lazy, method=method, causal=False, **GRADIENT_OPTIONS[method])
    assert [x.shape for x in grads] == [q.shape, k.shape, v.shape]
    want = _per_chunk(
        lambda *a: cb.attention_gradients(
            *a, method=method, causal=False, **GRADIENT_OPTIONS[method]
        ),
        (q, k, v, g),
        chunks,
    )
    _assert_bitwise(dask.compute(*grads), want)


def test_every_registered_method_runs():
    assert set(cbd._FORWARD) == set(FORWARD) == set(METHODS_REGISTRY)


def test_two_dimensional_inputs_are_one_chunk():
    q, k, v, g = (a[0, 0] for a in _instances(seed=6))
    lazy = tuple(da.from_array(a) for a in (q, k, v, g))
    out = cbd.attention(*lazy[:3], method="multipole", block=8, basis=2)
    assert out.chunks == ((N,), (D,))
    _assert_bitwise((out.compute(),), (cb.multipole_attention(q, k, v, block=8, basis=2),))
    grads = dask.compute(*cbd.attention_gradients(*lazy, method="dense"))
    _assert_bitwise(grads, cb.attention_gradients(q, k, v, g, method="dense"))


# ----------------------------------------------------------------------------------------
# Laziness, chunks, dtypes
# ----------------------------------------------------------------------------------------


def _explode(block):
    raise AssertionError("computed while building the graph")


def test_results_are_lazy_with_the_right_chunks_and_dtype():
    q, k, v, g = _lazy(_instances(seed=7, dtype="float32"), CHUNKINGS["uneven"])
    q = q.map_blocks(_explode, dtype=q.dtype)  # computing any chunk of q fails the test
    out = cbd.attention(q, k, v, method="conv", rank=4)
    grads = cbd.attention_gradients(q, k, v, g, method="lowrank", gradient="model", eps=0.1)
    for x in (out, *grads):
        assert isinstance(x, da.Array)
        assert x.dtype == np.float32
        assert type(x._meta) is np.ndarray and x._meta.dtype == np.float32
        assert x.chunks == (*CHUNKINGS["uneven"], (N,), (D,))
    assert out.name.startswith("convbasis-attention-conv-")


def test_output_meta_follows_the_input_meta():
    """The outputs' chunk type is the inputs' (CuPy chunks give CuPy meta), never hard-wired:
    shown with a NumPy subclass, whose meta is kept (nothing is computed)."""
    arrays = [np.ma.masked_array(a) for a in _instances(seed=14, dtype="float32")]
    q, k, v, g = (da.from_array(a, chunks=(1, 1, -1, -1), asarray=False) for a in arrays)
    assert type(q._meta) is np.ma.MaskedArray
    outputs = (
        cbd.attention(q, k, v, method="dense"),
        *cbd.attention_gradients(q, k, v, g, method="dense"),
    )
    for x in outputs:
        assert type(x._meta) is np.ma.MaskedArray and x.dtype == np.float32


def test_float32_stays_float32_and_mixed_dtypes_promote():
    q, k, v, g = _lazy(_instances(seed=8, dtype="float32"), CHUNKINGS["uneven"])
    assert cbd.attention(q, k, v, method="multipole", block=8, basis=2).compute().dtype == (
        np.float32
    )
    grads = cbd.attention_gradients(q, k, v.astype(np.float64), g, method="dense")
    assert [x.dtype for x in grads] == [np.float64] * 3
    assert [x.dtype for x in dask.compute(*grads)] == [np.float64] * 3


def test_gradients_run_once_per_chunk(monkeypatch):
    """The three gradients share one task per chunk (computed together)."""
    calls = []
    single = cbd._attention_gradients

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return single(*args, **kwargs)

    monkeypatch.setattr(cbd, "_attention_gradients", counted)
    arrays = _lazy(_instances(seed=9), CHUNKINGS["uneven"])
    dask.compute(*cbd.attention_gradients(*arrays, method="dense"), scheduler="threads")
    assert sorted(calls) == sorted([(2, 1, N, D)] * 2 + [(1, 1, N, D)] * 2)


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


@pytest.fixture
def lazy_inputs():
    return _lazy(_instances(seed=10), CHUNKINGS["uneven"])


def test_chunked_sequence_axis_is_refused_with_the_fix(lazy_inputs):
    q, k, v, _ = lazy_inputs
    split = q.rechunk({2: 32})
    with pytest.raises(ValueError, match=r"q is chunked along its sequence axis.*rechunk\(\{2"):
        cbd.attention(split, k, v, method="dense")
    fixed = split.rechunk({2: -1, 3: -1})  # the call the message gives
    cbd.attention(fixed, k, v, method="dense")
    with pytest.raises(ValueError, match="v is chunked along its feature axis"):
        cbd.attention(q, k, v.rechunk({3: 4}), method="dense")
    with pytest.raises(ValueError, match="grad_out is chunked along its sequence axis"):
        cbd.attention_gradients(q, k, v, v.rechunk({2: 16}), method="dense")


def test_mismatched_leading_chunks_or_shapes_are_refused(lazy_inputs):
    q, k, v, g = lazy_inputs
    with pytest.raises(ValueError, match=r"leading chunks must be equal.*k = k\.rechunk"):
        cbd.attention(q, k.rechunk({0: 1}), v, method="dense")
    fixed = k.rechunk({0: 1}).rechunk((*q.chunks[:-2], -1, -1))  # the call the message gives
    cbd.attention(q, fixed, v, method="dense")
    with pytest.raises(ValueError, match="leading chunks must be equal"):
        cbd.attention_gradients(q, k, v, g.rechunk({1: 2}), method="dense")
    with pytest.raises(ValueError, match="leading .* axes must be equal.*broadcast_to"):
        cbd.attention(q, k[:1], v[:1], method="dense")
    with pytest.raises(ValueError, match="leading .* axes must be equal"):
        cbd.attention(q[0], k, v, method="dense")


def test_non_dask_input_is_refused(lazy_inputs):
    q, k, v, g = lazy_inputs
    v_np = np.zeros(v.shape)
    with pytest.raises(TypeError, match=r"q, k are Dask arrays but v \(numpy.ndarray\)"):
        cbd.attention(q, k, v_np, method="dense")
    with pytest.raises(TypeError, match="grad_out"):
        cbd.attention_gradients(q, k, v, np.zeros(g.shape), method="dense")
    with pytest.raises(TypeError, match="takes Dask arrays.*call convbasis.attention"):
        cbd.attention(*(np.zeros((2, N, D)) for _ in range(3)), method="dense")


def test_other_bad_input_is_refused_before_anything_runs(lazy_inputs):
    q, k, v, g = lazy_inputs
    with pytest.raises(TypeError, match="k must have a real floating dtype"):
        cbd.attention(q, k.astype(np.int64), v, method="dense")
    with pytest.raises(ValueError, match="unknown attention method 'sparse'"):
        cbd.attention(q, k, v, method="sparse")
    with pytest.raises(ValueError, match="gradient must be one of"):
        cbd.attention_gradients(q, k, v, g, method="dense", gradient="exact")
    with pytest.raises(ValueError, match="scale must be finite"):
        cbd.attention(q, k, v, method="dense", scale=float("inf"))
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys"):
        cbd.attention(q, k[:, :, :32], v[:, :, :32], method="dense")
    with pytest.raises(ValueError, match="the k-conv basis needs as many queries as keys"):
        cbd.attention(q, k[:, :, :32], v[:, :, :32], method="conv", causal=False, rank=2)
    with pytest.raises(ValueError, match="k must have last dimension"):
        cbd.attention(q, k[..., :4], v, method="dense")
    with pytest.raises(ValueError, match="grad_out must have as many rows as q"):
        cbd.attention_gradients(q, k, v, g[:, :, :32], method="dense")


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("lowrank", {"eps": 1e-6, "max_rank": 10}, "above max_rank=10"),
        ("conv", {"rank": 0}, "rank must be a positive integer"),
        ("multipole", {"block": 6, "basis": 2}, "block must be a power of two"),
    ],
)
def test_error_inside_a_chunk_is_the_library_error(lazy_inputs, method, options, message):
    q, k, v, _ = lazy_inputs
    out = cbd.attention(q, k, v, method=method, **options)  # options are checked per chunk
    with pytest.raises(ValueError, match=message):
        out.compute(scheduler="threads")


@pytest.mark.parametrize(
    ("func", "options"),
    [
        (cb.attention, {}),
        (cb.lowrank_attention, {"eps": 0.1}),
        (cb.conv_attention, {"rank": 2}),
        (cb.multipole_attention, {}),
        (cb.attention_operator, {}),
        (cb.attention_gradients, {}),
        (cb.masked_lowrank_matmul, {}),
    ],
)
def test_top_level_functions_point_to_convbasis_dask(lazy_inputs, func, options):
    q, k, v, g = lazy_inputs
    args = {"attention_operator": (q, k), "attention_gradients": (q, k, v, g)}
    with pytest.raises(TypeError, match=r"dask arrays: use convbasis\.dask\.attention"):
        func(*args.get(func.__name__, (q, k, v)), **options)


# ----------------------------------------------------------------------------------------
# A dask.distributed LocalCluster: two worker processes, one thread each
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # a free port: parallel clusters never clash
            env=WORKER_ENV,
            silence_logs=logging.CRITICAL,
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield client


def test_cluster_results_equal_single_process(client):
    """Every method, forward and both gradients, on two worker processes: bitwise equal."""
    chunks = CHUNKINGS["uneven"]
    arrays = _instances(seed=11)
    lazy = _lazy(arrays, chunks)
    graphs, wanted = [], []
    for method in FORWARD:
        graphs.append(cbd.attention(*lazy[:3], method=method, **FORWARD_OPTIONS[method]))
        for gradient in ("exact-formula", "model"):
            graphs += cbd.attention_gradients(
                *lazy, method=method, gradient=gradient, **GRADIENT_OPTIONS[method]
            )
    # The workers run OpenBLAS on one thread; a product split over more threads may round
    # differently, so the reference runs on one thread too.
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        for method in FORWARD:
            forward = functools.partial(FORWARD[method], **FORWARD_OPTIONS[method])
            wanted += _per_chunk(forward, arrays[:3], chunks)
            for gradient in ("exact-formula", "model"):
                grads = functools.partial(
                    cb.attention_gradients,
                    method=method,
                    gradient=gradient,
                    **GRADIENT_OPTIONS[method],
                )
                wanted += _per_chunk(grads, arrays, chunks)
    got = client.gather(client.compute(graphs), errors="raise")
    _assert_bitwise(tuple(got), tuple(wanted))


def test_worker_killed_mid_computation(client):
    """A worker process dies after finishing some chunks: Dask recomputes what it held and
    what it was running, the nanny restarts it, and the result is bitwise the same."""
    chunks = CHUNKINGS["per-head"]  # six chunks, each held up 0.5 s
    arrays = _instances(seed=12)
    q, k, v, _ = _lazy(arrays, chunks)

    def slow(block):
        time.sleep(0.5)
        return block

    out = cbd.attention(q.map_blocks(slow, dtype=q.dtype), k, v, method="conv", rank=4)
    want = _per_chunk(lambda q, k, v: cb.conv_attention(q, k, v, rank=4), arrays[:3], chunks)
    before = set(client.scheduler_info()["workers"])
    future = client.compute(out)
    deadline = time.monotonic() + 20
    victim = None
    while victim is None:
        assert time.monotonic() < deadline, "no chunk finished in 20 s"
        held = client.has_what()
        victim = next((w for w, keys in held.items() if any(out.name in k for k in keys)), None)
        time.sleep(0.01)
    assert not future.done()

    async def die():
        os._exit(1)  # the worker process ends at once, mid-task

    client.run(die, workers=[victim], wait=False)
    got = future.result(timeout=60)
    _assert_bitwise((got,), want)
    client.wait_for_workers(2, timeout=30)
    after = set(client.scheduler_info()["workers"])
    assert victim in before and victim not in after  # the worker really was replaced


def test_task_error_on_the_cluster_is_the_library_error(client):
    q, k, v, _ = _lazy(_instances(seed=13), CHUNKINGS["uneven"])
    future = client.compute(cbd.attention(q, k, v, method="lowrank", eps=1e-6, max_rank=10))
    with pytest.raises(ValueError, match=r"the polynomial features would need rank .* above"):
        future.result(timeout=60)
