"""Backends for the test suite.

``CONVBASIS_BACKEND`` (set by nox) picks one backend by name; unset, every installed one
runs.  ``numpy_readonly`` hands the library read-only NumPy arrays, so any in-place write to
an input fails loudly.
"""

from __future__ import annotations

import importlib
import os
import types

import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.register_profile("dev", deadline=None, max_examples=10)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class _ReadOnlyNumpy(types.ModuleType):
    """NumPy namespace whose ``asarray`` returns read-only arrays."""

    def __init__(self):
        super().__init__("numpy_readonly")

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def asarray(obj, dtype=None, **kwargs):
        out = np.array(obj, dtype=dtype, copy=True)
        out.flags.writeable = False
        return out


def _gpu_available():
    try:
        cupy = importlib.import_module("cupy")
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _load(name):
    if name == "numpy":
        return np
    if name == "numpy_readonly":
        return _ReadOnlyNumpy()
    if name == "cupy" and not _gpu_available():
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


_ALL = ("numpy", "numpy_readonly", "array_api_strict", "cupy", "torch")
_chosen = os.environ.get("CONVBASIS_BACKEND")
if _chosen:
    _NAMES = tuple(_chosen.split(","))
    _unknown = set(_NAMES) - set(_ALL)
    if _unknown:
        raise pytest.UsageError(f"unknown CONVBASIS_BACKEND {sorted(_unknown)}; valid: {_ALL}")
else:
    _NAMES = _ALL


def _params():
    params = []
    for name in _NAMES:
        module = _load(name)
        marks = []
        if module is None:
            reason = "no GPU present" if name == "cupy" else f"{name} is not installed"
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


@pytest.fixture(params=_params(), scope="session")
def xp(request):
    """The array namespace under test (a module whose ``asarray`` builds inputs)."""
    return _load(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)
