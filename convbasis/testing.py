"""Helpers for tests and benchmarks: conversion to NumPy and closeness checks.

This module may use NumPy directly: it compares results, it computes nothing the library
returns.  Instance generators for the structured methods live here too.
"""

from __future__ import annotations

import array_api_compat
import numpy as np

__all__ = ["assert_close", "assert_within_reference_error", "to_numpy"]


def to_numpy(x):
    """A NumPy copy of ``x`` from any supported library (CuPy copies to the host)."""
    if array_api_compat.is_cupy_array(x):
        return x.get()
    if isinstance(x, np.ndarray):
        return x
    return np.from_dlpack(x)


def assert_close(actual, desired, *, rtol=0.0, atol=0.0, xp=None, dtype=None, err_msg=""):
    """Assert ``|actual - desired| <= atol + rtol |desired|`` entrywise.

    When ``xp`` / ``dtype`` are given, also check that ``actual`` belongs to that namespace
    and has that dtype (results must stay in the caller's library and precision).
    """
    if xp is not None:
        # Compare namespaces of real arrays, so wrappers (a read-only NumPy) count as theirs.
        got = array_api_compat.array_namespace(actual)
        want = array_api_compat.array_namespace(xp.asarray([0.0]))
        if got is not want:
            raise AssertionError(f"result is a {got.__name__} array, expected {want.__name__}")
    if dtype is not None and actual.dtype != dtype:
        raise AssertionError(f"result has dtype {actual.dtype}, expected {dtype}")
    a = to_numpy(actual).astype(np.float64)
    d = to_numpy(desired).astype(np.float64)
    if a.shape != d.shape:
        raise AssertionError(f"shape {a.shape} != expected {d.shape}. {err_msg}")
    np.testing.assert_allclose(a, d, rtol=rtol, atol=atol, err_msg=err_msg)


def assert_within_reference_error(actual, golden, baseline, *, factor=3.0, err_msg=""):
    """FlashAttention-style check: ``actual``'s error is a small multiple of a baseline's.

    ``golden`` is a float64 result; ``baseline`` is the plain dense computation in the same
    dtype as ``actual``.  Passes when ``max|actual - golden| <= factor · max|baseline -
    golden| + 8 eps max|golden|`` (the last term covers a baseline that is exact by luck).
    """
    a, g, b = (to_numpy(x).astype(np.float64) for x in (actual, golden, baseline))
    if a.shape != g.shape:
        raise AssertionError(f"shape {a.shape} != expected {g.shape}. {err_msg}")
    eps = float(np.finfo(to_numpy(actual).dtype).eps)
    scale = float(np.max(np.abs(g), initial=0.0))
    err, base = float(np.max(np.abs(a - g), initial=0.0)), float(np.max(np.abs(b - g), initial=0.0))
    bound = factor * base + 8 * eps * scale
    if not err <= bound:
        raise AssertionError(
            f"error {err:.3e} exceeds {factor} x baseline error {base:.3e} + 8 eps "
            f"(bound {bound:.3e}). {err_msg}"
        )
