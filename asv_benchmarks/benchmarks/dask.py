"""``convbasis.dask`` on a ``LocalCluster`` against the single-process call (docs/dask.rst).

Target (Dask issue): batch 4 × heads 8 × n = 2^14 × d = 64, float32, NumPy chunks of two
heads (16 chunks); causal conv attention (rank 16, an exact 16-segment rotary instance per
head, all with the same starts) and multipole attention (block 64, basis 4) on a
``LocalCluster`` of 1 and 2 worker processes with one thread each: 2 workers at least 1.6x
faster than 1 on a 2-core machine.  The scheduler overhead per chunk is the wall time of a
trivial ``map_blocks`` over the same 16 chunks, divided by 16.

Workers run with ``OPENBLAS_NUM_THREADS = CONVBASIS_NUM_THREADS = CONVBASIS_FFT_WORKERS = 1``
(one thread per worker is real); the single-process call runs with the library's defaults
(all cores).  Inputs are scattered to the workers before timing, every chunk's ``q, k, v`` on
one worker, chunks dealt round-robin; a timed run is ``persist`` + ``wait`` of the output,
which stays on the workers (fresh keys each run, so nothing comes from a cache; one untimed
run first).  Gathering the 128 MiB output to the client is timed separately.  Rounds of
single-process and cluster runs alternate (best of each, :func:`measure`), so a change in the
machine's background load hits every configuration alike.
``python -m benchmarks.dask`` from ``asv_benchmarks/`` runs :func:`measure`.

Nothing from this module runs on the workers (under asv it is not importable there): the
tasks are ``convbasis.dask``'s own, ``numpy.asarray`` and ``operator.itemgetter``.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import time
import uuid

import numpy as np

import convbasis
from convbasis.testing import rotary_conv_instance

from .common import best_time

try:
    import dask
    import dask.array as da
    import distributed

    import convbasis.dask as cbd
except ImportError:  # asv skips the benchmarks (setup raises NotImplementedError)
    dask = da = distributed = cbd = None

BATCH, HEADS, N, D = 4, 8, 2**14, 64
HEADS_PER_CHUNK = 2
SEGMENTS = 16
OPTIONS = {"conv": {"rank": 16}, "multipole": {"block": 64, "basis": 4}}
SINGLE_PROCESS = {"conv": convbasis.conv_attention, "multipole": convbasis.multipole_attention}
WORKER_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "CONVBASIS_NUM_THREADS": "1",
    "CONVBASIS_FFT_WORKERS": "1",
}
# distributed's MALLOC_TRIM_THRESHOLD_=65536 fixes glibc's mmap threshold at 128 KiB, so every
# large temporary is a fresh mmap and is paged in again on every call (measured on one conv
# chunk: 66 600 page faults and +50% time, against ~0 with these two settings).
MALLOC_ENV = {"MALLOC_TRIM_THRESHOLD_": str(2**30), "MALLOC_MMAP_THRESHOLD_": str(2**25)}


def _require_dask():
    if da is None:
        raise NotImplementedError("dask[array] and distributed are not installed")


def inputs(seed=0):
    """``q, k, v (BATCH, HEADS, N, D)`` float32: an exact rotary conv instance per head, all
    with the same ``SEGMENTS`` equal segments (so the whole-array conv call is exact too)."""
    starts = tuple(N * i // SEGMENTS for i in range(SEGMENTS))
    rng = np.random.default_rng(seed)
    heads = [
        rotary_conv_instance(rng, N, D, starts, dtype="float32")[:3] for _ in range(BATCH * HEADS)
    ]
    return tuple(np.stack([h[i] for h in heads]).reshape(BATCH, HEADS, N, D) for i in range(3))


def single_process(method, q, k, v):
    return SINGLE_PROCESS[method](q, k, v, **OPTIONS[method])


def _fresh(x):
    """``x`` under new keys, so no result comes from a cache: one identity task per chunk,
    timed with the run (about the per-chunk overhead below, ~1% of a run)."""
    return x.map_blocks(np.asarray, name=f"bench-{uuid.uuid4().hex}", dtype=x.dtype)


class LocalRun:
    """A ``LocalCluster`` of ``workers`` processes (one thread each, single-threaded
    libraries) holding ``q, k, v``: chunk ``i`` (two heads of one batch element) of each on
    worker ``i mod workers``.

    :data:`WORKER_ENV` and ``malloc`` go to ``distributed.nanny.pre-spawn-environ``: the
    nanny's ``env=`` is applied only after a spawned worker has imported this script's main
    module, hence convbasis, which reads its thread counts at import (with ``env=`` alone the
    workers ran 2 threads and all-core FFTs), and glibc reads ``malloc`` at process start.
    ``malloc=None`` keeps distributed's default ``MALLOC_TRIM_THRESHOLD_=65536``.  The nanny
    also writes these into this process's ``os.environ``, restored once the workers run.
    """

    def __init__(self, workers, arrays, malloc=MALLOC_ENV):
        saved = dict(os.environ)
        settings = {
            f"distributed.nanny.pre-spawn-environ.{k}": v
            for k, v in {**WORKER_ENV, **(malloc or {})}.items()
        }
        try:
            with dask.config.set(settings):
                self.cluster = distributed.LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=":0",  # a free port: parallel clusters never clash
                    silence_logs=logging.ERROR,
                )
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.client = distributed.Client(self.cluster, set_as_default=False)
        self.q, self.k, self.v = self._scatter(arrays)

    def _scatter(self, arrays):
        addresses = sorted(self.client.scheduler_info()["workers"])
        grids = [[[] for _ in range(BATCH)] for _ in arrays]
        chunks = ((b, h) for b in range(BATCH) for h in range(0, HEADS, HEADS_PER_CHUNK))
        for index, (b, h) in enumerate(chunks):
            blocks = [a[b : b + 1, h : h + HEADS_PER_CHUNK] for a in arrays]
            target = [addresses[index % len(addresses)]]
            futures = self.client.scatter(blocks, workers=target, hash=False)
            for grid, f, block in zip(grids, futures, blocks, strict=True):
                array = da.from_delayed(f, block.shape, dtype=block.dtype, meta=block[:0])
                grid[b].append([[array]])
        return self._persist([da.block(grid) for grid in grids])

    def _persist(self, collections):
        out = self.client.persist(collections)
        with self.client.as_current():  # distributed.wait syncs through the current client
            distributed.wait(distributed.futures_of(out))
        return out

    def run(self, method):
        """``persist`` + ``wait`` of the attention output (released afterwards)."""
        out = cbd.attention(_fresh(self.q), self.k, self.v, method=method, **OPTIONS[method])
        self._persist(out)

    def trivial(self):
        """A ``map_blocks`` over the same chunks returning one entry each."""
        corner = operator.itemgetter((Ellipsis, slice(0, 1), slice(0, 1)))
        chunks = (*self.q.chunks[:-2], (1,), (1,))
        self._persist(_fresh(self.q).map_blocks(corner, chunks=chunks, dtype=self.q.dtype))

    def overhead_per_chunk(self, repeat=5):
        """Seconds per chunk of :meth:`trivial`, best of ``repeat``."""
        return best_time(self.trivial, repeat=repeat) / int(np.prod(self.q.numblocks))

    def gathered(self, method):
        """``(seconds, result)`` of ``compute`` with the output gathered to the client."""
        start = time.perf_counter()
        out = cbd.attention(_fresh(self.q), self.k, self.v, method=method, **OPTIONS[method])
        result = self.client.compute(out).result()
        return time.perf_counter() - start, result

    def close(self):
        self.client.close()
        self.cluster.close()


def cluster_best(method, arrays, workers, repeat=2, malloc=MALLOC_ENV):
    """Best wall time of ``repeat`` runs on a fresh :class:`LocalRun` (after one untimed run)."""
    local = LocalRun(workers, arrays, malloc)
    try:
        local.run(method)
        return best_time(lambda: local.run(method), repeat=repeat)
    finally:
        local.close()


class DaskAttention:
    """Causal attention on a LocalCluster of 1 or 2 worker processes (one thread each);
    ``persist`` + ``wait`` of the output, inputs already on the workers."""

    params = (["conv", "multipole"], [1, 2])
    param_names = ["method", "workers"]
    timeout = 900
    number = 1
    repeat = 3

    def setup(self, method, workers):
        _require_dask()
        self.local = LocalRun(workers, inputs())
        self.local.run(method)  # first touch of the workers' memory

    def teardown(self, method, workers):
        self.local.close()

    def time_attention(self, method, workers):
        self.local.run(method)

    def track_scheduler_overhead_per_chunk(self, method, workers):
        """Wall time of a trivial map_blocks over the same chunks, per chunk (ms)."""
        return self.local.overhead_per_chunk() * 1e3

    track_scheduler_overhead_per_chunk.unit = "ms"


class DaskScaling:
    """Speed-ups measured in one run: 2 workers over 1, and 2 workers over the single-process
    call on the whole array (library threads on all cores)."""

    params = (["conv", "multipole"],)
    param_names = ["method"]
    timeout = 1800

    def setup(self, method):
        _require_dask()
        self.arrays = inputs()

    def track_speedup_2_over_1_workers(self, method):
        one, two = (cluster_best(method, self.arrays, w) for w in (1, 2))
        return one / two

    track_speedup_2_over_1_workers.unit = "x"

    def track_speedup_2_workers_over_single_process(self, method):
        single_process(method, *self.arrays)  # first touch of the memory
        single = best_time(lambda: single_process(method, *self.arrays), repeat=2)
        return single / cluster_best(method, self.arrays, 2)

    track_speedup_2_workers_over_single_process.unit = "x"


CONFIGURATIONS = (
    ("1 worker", 1, MALLOC_ENV),
    ("2 workers", 2, MALLOC_ENV),
    ("2 workers, default malloc", 2, None),
)


def measure(repeat=3):
    """The target measurement, printed at the end; returns a dict per method.

    ``repeat`` rounds, each timing the single-process call and then every configuration of
    :data:`CONFIGURATIONS` on a fresh cluster (one untimed run per method first; one cluster
    alive at a time: an idle one costs ~4% of a core per worker); best of the rounds, so a
    change in the machine's background load hits every configuration alike.
    """
    _require_dask()
    arrays = inputs()
    chunks = BATCH * HEADS // HEADS_PER_CHUNK
    print(
        f"batch {BATCH} x heads {HEADS} x n {N} x d {D}, float32, causal; {chunks} chunks of "
        f"{HEADS_PER_CHUNK} heads; workers: 1 thread each, {WORKER_ENV}, {MALLOC_ENV}",
        flush=True,
    )
    # Other processes on the machine distort the scaling figures: say how busy it was.
    print(f"load average before: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})", flush=True)
    names = ["single process", *(name for name, _, _ in CONFIGURATIONS)]
    times = {method: dict.fromkeys(names, float("inf")) for method in OPTIONS}
    overhead, extra = {}, {}
    for method in OPTIONS:
        single_process(method, *arrays)  # first touch of the memory
    for round_ in range(repeat):
        last = round_ == repeat - 1
        for method in OPTIONS:
            t = best_time(lambda method=method: single_process(method, *arrays), repeat=1)
            times[method]["single process"] = min(times[method]["single process"], t)
        for name, workers, malloc in CONFIGURATIONS:
            local = LocalRun(workers, arrays, malloc)
            try:
                for method in OPTIONS:
                    local.run(method)  # first touch of the workers' memory
                    t = best_time(functools.partial(local.run, method), repeat=1)
                    times[method][name] = min(times[method][name], t)
                    if last and malloc is not None:
                        overhead[method, workers] = local.overhead_per_chunk()
                    if last and name == "2 workers":
                        extra[method] = local.gathered(method)
            finally:
                local.close()
    figures = {}
    for method in OPTIONS:
        best = times[method]
        one, two = best["1 worker"], best["2 workers"]
        gather, result = extra[method]
        error = float(np.max(np.abs(result - single_process(method, *arrays))))
        per_chunk = (overhead[method, 1], overhead[method, 2])
        figures[method] = {
            **{f"{name} s": t for name, t in best.items()},
            "scaling 1 -> 2 workers": one / two,
            "2 workers over single process": best["single process"] / two,
            "overhead per chunk s (1 worker, 2 workers)": per_chunk,
            "2 workers with gather s": gather,
            "max abs diff vs single process": error,
        }
        print(
            f"{method:9s} {OPTIONS[method]}: "
            + " | ".join(f"{name} {t:.2f} s" for name, t in best.items())
            + f"\n{'':9s} scaling 1 -> 2 workers {one / two:.2f}x; 2 workers vs single "
            f"process {best['single process'] / two:.2f}x; scheduler overhead per chunk "
            f"(trivial map_blocks, {chunks} chunks) {per_chunk[0] * 1e3:.2f} ms (1 worker), "
            f"{per_chunk[1] * 1e3:.2f} ms (2 workers) = {per_chunk[1] * chunks / two:.2%} of "
            f"the 2-worker run; 2 workers with the result gathered to the client {gather:.2f} "
            f"s; max |cluster - single process| {error:.2e}",
            flush=True,
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}", flush=True)
    return figures


if __name__ == "__main__":
    measure()
