"""Backends and devices for the test suite.

``CONVBASIS_BACKEND`` (set by nox) names the backends to run, comma-separated; unset, every
installed one runs.  ``numpy_readonly`` hands the library read-only NumPy arrays, so any
in-place write to an input fails loudly.

Tests build inputs with ``xp.asarray(numpy_array)``: the ``xp`` fixture is the backend's
namespace with ``asarray`` placing every array on the ``device`` fixture's device, a
non-default one where the library has one (array-api-strict's ``device1``, CUDA for torch
when present), so every test checks that results stay on the input's device.

``@pytest.mark.capabilities(name, ..., jit=False, method=None)`` names the public functions a
test exercises: a backend or device the declaration in :mod:`convbasis._capabilities`
excludes skips the test with the declared reason, and with ``jit=True`` on JAX a function
that is eager only (for ``method``) must raise
:class:`~convbasis._capabilities.EagerOnlyError` (strict xfail).
"""

from __future__ import annotations

import enum
import importlib
import os
import types

import array_api_compat
import numpy as np
import pytest
from hypothesis import settings

from convbasis._capabilities import EagerOnlyError, capabilities

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.register_profile("dev", deadline=None, max_examples=10)
# JAX compiles every eager operation for every new shape: its nox session draws fewer.
settings.register_profile("jax", deadline=None, max_examples=4, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class Backend(enum.Enum):
    """An array backend of the test matrix: ``(name, library, module)``.

    ``library`` is the name the capability declarations use (the read-only NumPy variant is
    NumPy); ``module`` is imported to build arrays.
    """

    NUMPY = "numpy", "numpy", "numpy"
    NUMPY_READONLY = "numpy_readonly", "numpy", "numpy"
    ARRAY_API_STRICT = "array_api_strict", "array_api_strict", "array_api_strict"
    TORCH = "torch", "torch", "torch"
    JAX = "jax", "jax", "jax.numpy"
    CUPY = "cupy", "cupy", "cupy"

    def __new__(cls, value, library, module):
        obj = object.__new__(cls)
        obj._value_ = value
        obj.library, obj.module = library, module
        return obj

    def __str__(self):
        return self.value

    def unavailable(self):
        """Why this backend cannot run here, or ``None`` when it can."""
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            return f"{self.value} is not installed"
        if self is Backend.CUPY:
            try:
                if module.cuda.runtime.getDeviceCount() == 0:
                    return "no GPU visible to CuPy"
            except Exception as exc:  # no driver, no runtime: CuPy raises its own errors
                return f"no GPU visible to CuPy ({exc})"
        return None

    def namespace(self):
        """The array-api-compat namespace (NumPy's, torch's wrappers; strict and JAX as is)."""
        if self is Backend.JAX:
            import jax

            # The oracles compare in float64; JAX computes in float32 unless told otherwise.
            jax.config.update("jax_enable_x64", True)
        module = importlib.import_module(self.module)
        return array_api_compat.array_namespace(module.asarray([0.0]))

    def device(self, xp):
        """A device of this backend, not the default one where the library has one."""
        if self is Backend.ARRAY_API_STRICT:
            return xp.Device("device1")
        if self is Backend.TORCH:
            import torch

            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self is Backend.CUPY:
            import cupy

            return cupy.cuda.Device()
        return array_api_compat.device(xp.asarray([0.0]))


class _OnDevice(types.ModuleType):
    """``xp`` with ``asarray`` placing arrays on ``device`` (read-only copies if asked)."""

    def __init__(self, xp, device, *, readonly=False):
        super().__init__(xp.__name__)
        self._xp, self._device, self._readonly = xp, device, readonly

    def __getattr__(self, name):
        return getattr(self._xp, name)

    def asarray(self, obj, /, *, dtype=None, device=None, copy=None):
        if self._readonly:
            out = np.array(obj, dtype=dtype, copy=True)
            out.flags.writeable = False
            return out
        device = self._device if device is None else device
        return self._xp.asarray(obj, dtype=dtype, device=device, copy=copy)


def _selected():
    chosen = os.environ.get("CONVBASIS_BACKEND")
    if not chosen:
        return list(Backend)
    valid = [b.value for b in Backend]
    unknown = sorted(set(chosen.split(",")) - set(valid))
    if unknown:
        raise pytest.UsageError(f"unknown CONVBASIS_BACKEND {unknown}; valid: {valid}")
    return [Backend(name) for name in chosen.split(",")]


def _params():
    params = []
    for backend in _selected():
        reason = backend.unavailable()
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(backend, id=backend.value, marks=marks))
    return params


@pytest.fixture(params=_params(), scope="session")
def backend(request):
    """The :class:`Backend` under test."""
    return request.param


# Modules that read results back with ``np.asarray``, which array-api-strict refuses off its
# CPU device: they keep the default device until they convert with ``testing.to_numpy``.
_DEFAULT_DEVICE_MODULES = {"test_array", "test_causal"}


@pytest.fixture(scope="module")
def device(request, backend):
    """The device inputs are placed on: non-default where the backend has more than one."""
    xp = backend.namespace()
    if request.module.__name__.rpartition(".")[2] in _DEFAULT_DEVICE_MODULES:
        return array_api_compat.device(xp.asarray([0.0]))
    return backend.device(xp)


@pytest.fixture(scope="module")
def xp(backend, device):
    """The array namespace under test; ``xp.asarray`` builds inputs on ``device``."""
    return _OnDevice(backend.namespace(), device, readonly=backend is Backend.NUMPY_READONLY)


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)


def _on_accelerator(backend):
    """Whether the fixture device is a non-CPU one (CUDA, array-api-strict's device1)."""
    if backend in (Backend.ARRAY_API_STRICT, Backend.CUPY):
        return True
    return "cpu" not in str(backend.device(backend.namespace())).lower()


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "capabilities(*names, jit=False, method=None): the public functions the test "
        "exercises (with method=); backends and devices their declarations exclude skip, "
        "and under jit an eager-only one must raise EagerOnlyError (strict xfail)",
    )


def pytest_runtest_setup(item):
    marker = item.get_closest_marker("capabilities")
    callspec = getattr(item, "callspec", None)
    if marker is None or callspec is None or "backend" not in callspec.params:
        return
    backend = callspec.params["backend"]
    for name in marker.args:
        declared = capabilities(name)
        if backend.library not in declared.backends:
            pytest.skip(f"{name} on {backend}: {declared.reason}")
        if not declared.device and _on_accelerator(backend):
            pytest.skip(f"{name} on {backend}'s non-CPU device: {declared.reason}")
        method = marker.kwargs.get("method")
        if marker.kwargs.get("jit") and backend is Backend.JAX and not declared.traceable(method):
            item.add_marker(
                pytest.mark.xfail(raises=EagerOnlyError, strict=True, reason=declared.reason)
            )


# Tile size when the tiled conv route is forced: small, so that short inputs get several
# blocks, pieces inside blocks and a last partial block.
CONV_TILE = 16


@pytest.fixture(params=["segment", "tiled"])
def conv_route(request, monkeypatch):
    """Forces the route of every conv-basis product (docs/conv.rst, "Tiled products"): the
    segment form, or tiles of ``CONV_TILE``, whatever the cost model would pick."""
    from convbasis.conv import _tiled, basis

    if request.param == "segment":
        choose = lambda starts, n, cost: None  # noqa: E731
    else:
        choose = lambda starts, n, cost: _tiled.tile_pieces(starts, n, CONV_TILE)  # noqa: E731
    monkeypatch.setattr(basis, "choose_tiles", choose)
    return request.param
