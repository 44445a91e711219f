"""Shared set-up for the asv suite (SciPy's XPBenchmark pattern).

Each benchmark class takes ``backend`` as its first parameter; ``setup`` raises
``NotImplementedError`` (asv's "skip") when that backend is not installed.  Every module
compares a fast path with the dense reference on the same inputs, so ratios come from one run.
"""

from __future__ import annotations

import importlib
import math
import time
import tracemalloc

import numpy as np

BACKENDS = ["numpy", "array_api_strict"]


def namespace(backend):
    """The array namespace for ``backend``, or ``NotImplementedError`` if unavailable."""
    try:
        xp = importlib.import_module(backend)
    except ImportError as exc:
        raise NotImplementedError(f"{backend} not installed") from exc
    if backend == "cupy" and xp.cuda.runtime.getDeviceCount() == 0:
        raise NotImplementedError("no GPU")
    return xp


def best_time(func, repeat=3):
    """Minimum wall time of ``func()`` over ``repeat`` calls (seconds)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved(first, second, rounds=2):
    """Best times of two callables, alternated ``rounds`` times (one process, same load)."""
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, func in enumerate((first, second)):
            start = time.perf_counter()
            func()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def torch_or_skip():
    """torch, or ``NotImplementedError`` (asv's skip) when it is not installed."""
    try:
        import torch
    except ImportError:
        raise NotImplementedError("torch is not installed") from None
    return torch


def traced_peak(func):
    """Peak bytes allocated through Python/NumPy allocators while ``func()`` runs."""
    tracemalloc.start()
    try:
        func()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def uniform(shape, low=-1.0, high=1.0, dtype="float32", seed=0):
    return np.random.default_rng(seed).uniform(low, high, size=shape).astype(dtype)


def exact_last_rows(q, k, v, rows=64):
    """Causal attention of the last ``rows`` queries in float64 (NumPy): the golden result
    for benchmarks whose dense reference is too large to keep in float64."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    n = q.shape[0]
    logits = (q[-rows:] @ k.T) / math.sqrt(q.shape[1])
    mask = np.arange(n)[None, :] <= np.arange(n - rows, n)[:, None]
    logits = np.where(mask, logits, -np.inf)
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (w / w.sum(axis=1, keepdims=True)) @ v
