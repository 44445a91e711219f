"""What every public function supports: array libraries, ``jax.jit``, non-CPU devices.

One :class:`Capabilities` per public function or class (SciPy's ``xp_capabilities`` idea,
kept in one table rather than on each function): the test suite's ``capabilities`` mark
skips what a declaration excludes, with its reason (``tests/conftest.py``), and
``docs/capabilities.rst`` holds :func:`table` verbatim (``tests/test_capabilities.py``
checks it; :func:`write_page` rewrites it).  Functions that read array values back into
Python call :func:`check_eager` at their public boundary, so JAX tracing stops there with
one :class:`EagerOnlyError` instead of a traceback from deep inside.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from array_api_compat import is_jax_array

__all__ = [
    "DECLARATIONS",
    "LIBRARIES",
    "Capabilities",
    "EagerOnlyError",
    "capabilities",
    "check_eager",
    "table",
    "traced",
    "write_page",
]

LIBRARIES = ("numpy", "array_api_strict", "cupy", "torch", "jax", "dask")
"""Array libraries a declaration can name, in the docs table's column order."""

_LABELS = {
    "numpy": "NumPy",
    "array_api_strict": "array-api-strict",
    "cupy": "CuPy",
    "torch": "torch",
    "jax": "JAX",
    "dask": "Dask",
}
_IN_MEMORY = LIBRARIES[:-1]


class EagerOnlyError(TypeError):
    """An eager-only function was called on traced JAX arrays (``jax.jit``, ``grad``, ``vmap``)."""


@dataclass(frozen=True)
class Capabilities:
    """Where one public function runs.

    Attributes
    ----------
    backends : tuple of str
        The libraries of :data:`LIBRARIES` whose arrays it takes; empty for functions of
        Python numbers.
    jit : bool or tuple of str
        Whether it runs on traced JAX arrays (under ``jax.jit``, ``jax.vmap``): ``True``,
        ``False`` (eager only: it reads array values back into Python), or the methods
        (``method=`` / ``attention=``) for which it does.
    device : bool
        Whether it runs on a non-CPU device, results staying there.
    reason : str
        What is excluded and why: the docs' note, the skip reason, the error message.
    """

    backends: tuple = _IN_MEMORY
    jit: bool | tuple = True
    device: bool = True
    reason: str = ""

    def traceable(self, method=None):
        """Whether a call (with ``method``, for functions taking one) runs under tracing."""
        if isinstance(self.jit, tuple):
            return method in self.jit
        return self.jit


_SAFE_METHODS = ("dense", "multipole", "composite")
_NUMBERS = Capabilities(backends=(), reason="Python numbers in and out")
_LOWRANK = Capabilities(
    jit=False, reason="picks the polynomial from the largest row norms of q and k"
)
_CONV = Capabilities(
    jit=False,
    reason="recovery chooses the segment starts from the logits' values and checks the "
    "logit residual",
)
_BY_METHOD = Capabilities(
    jit=_SAFE_METHODS,
    reason="lowrank and conv are eager only (their polynomial or segment starts depend on "
    "the values of q and k)",
)
_OPERATOR_PRODUCTS = Capabilities(
    reason="products of a built operator trace; building a lowrank or conv one is eager only"
)

DECLARATIONS = {
    # convbasis: dense oracles
    "attention": Capabilities(),
    "attention_backward": Capabilities(),
    "attention_weights": Capabilities(),
    "multipole_weights": Capabilities(),
    "multipole_reference": Capabilities(),
    # causal prefix products
    "masked_lowrank_matmul": Capabilities(),
    "masked_hadamard_matmul": Capabilities(),
    "face_splitting_product": Capabilities(),
    # polynomial method and the exp approximations behind it
    "lowrank_attention": _LOWRANK,
    "lowrank_operator": _LOWRANK,
    "lowrank_factors": _LOWRANK,
    "LowRankFactors": _OPERATOR_PRODUCTS,
    "LowRankAttentionOperator": _OPERATOR_PRODUCTS,
    "exp_coefficients": _NUMBERS,
    "taylor_coefficients": _NUMBERS,
    "chebyshev_coefficients": _NUMBERS,
    "exp_approximation_error": _NUMBERS,
    "degree_for": _NUMBERS,
    "rank_for": _NUMBERS,
    # the k-conv basis
    "conv_matmul": Capabilities(),
    "conv_rmatmul": Capabilities(),
    "ConvBasis": Capabilities(),
    "decompose_conv_basis": Capabilities(
        jit=False, reason="finds the segment starts where the aligned columns change"
    ),
    "fit_conv_basis": Capabilities(
        jit=False, reason="chooses the segment starts at the largest column changes"
    ),
    "recover_conv_basis": _CONV,
    "conv_operator": _CONV,
    "conv_attention": _CONV,
    "ConvAttentionOperator": _OPERATOR_PRODUCTS,
    # Fast Multipole Attention
    "multipole_attention": Capabilities(),
    "multipole_attention_backward": Capabilities(),
    "multipole_operator": Capabilities(),
    "MultipoleAttentionOperator": Capabilities(),
    # exact near field + structured far field
    "composite_operator": Capabilities(),
    "composite_attention": Capabilities(
        reason="target_error= and return_report=True read the error estimate back: eager only"
    ),
    "CompositeAttentionOperator": Capabilities(),
    # operators and gradients, any method
    "attention_operator": _BY_METHOD,
    "DenseAttentionOperator": Capabilities(),
    "attention_gradients": _BY_METHOD,
    "self_attention_gradients": _BY_METHOD,
    # convbasis.transformer
    "transformer.init_params": Capabilities(reason="builds arrays from Python numbers"),
    "transformer.forward": _BY_METHOD,
    "transformer.loss_and_gradients": _BY_METHOD,
    "transformer.squared_error_loss": Capabilities(),
    "transformer.cross_entropy_loss": Capabilities(
        reason="labels outside [0, vocab) raise eagerly; traced, they give a NaN loss"
    ),
    "transformer.gradient_errors": Capabilities(
        jit=False, reason="returns Python floats (relative errors)"
    ),
    # convbasis.torch and convbasis.jax: autodiff through the library's own gradients
    "torch.attention": Capabilities(
        backends=("torch",),
        reason="torch tensors only (a torch.autograd.Function); CUDA tensors untested",
    ),
    "jax.attention": Capabilities(
        backends=("jax",),
        reason="JAX arrays only (a jax.custom_vjp); under jax.jit lowrank and conv run as "
        "host callbacks",
    ),
    # convbasis.dask
    "dask.attention": Capabilities(
        backends=("dask",), reason="Dask arrays with NumPy or CuPy chunks"
    ),
    "dask.attention_gradients": Capabilities(
        backends=("dask",), reason="Dask arrays with NumPy or CuPy chunks"
    ),
}
"""Declarations by public name (``transformer.``, ``torch.``, ``jax.`` and ``dask.`` for those
modules' names).

The in-memory functions refuse Dask arrays (:data:`LIBRARIES` ``dask`` column): they read
values back and loop over Python-level blocks, which :mod:`convbasis.dask` runs per chunk.
"""


def capabilities(name):
    """The declaration of public ``name``; ``KeyError`` listing the declared names if none."""
    try:
        return DECLARATIONS[name]
    except KeyError:
        raise KeyError(
            f"no capability declaration for {name!r}; declared: {sorted(DECLARATIONS)}"
        ) from None


def traced(*arrays):
    """Whether values computed from ``arrays`` are JAX tracers (``jax.jit``, ``grad``, ``vmap``).

    True for a tracer among ``arrays``, and for concrete JAX arrays that a traced function
    captured (every operation on them is staged too).  JAX is looked up in ``sys.modules``,
    never imported: without it nothing is traced.
    """
    jax, jnp = sys.modules.get("jax"), sys.modules.get("jax.numpy")
    if jax is None or jnp is None:
        return False
    if any(isinstance(a, jax.core.Tracer) for a in arrays):
        return True
    # A constant made now is a tracer exactly when a trace is under way (one cached op).
    return any(map(is_jax_array, arrays)) and isinstance(jnp.zeros(()), jax.core.Tracer)


def check_eager(name, *arrays, method=None, option="method"):
    """Raise :class:`EagerOnlyError` when ``name`` cannot trace and :func:`traced` holds.

    ``method`` is the call's method (passed as the keyword ``option``), for the functions
    whose declaration lists the methods that trace.
    """
    if not DECLARATIONS[name].traceable(method) and traced(*arrays):
        call = f"{name}({option}={method!r})" if method is not None else name
        raise EagerOnlyError(
            f"{call} is eager only: it reads array values back into Python "
            f"({DECLARATIONS[name].reason}), so it cannot run under jax.jit, jax.vmap or "
            "jax.grad tracing; call it on concrete arrays outside the transformation"
        )


def _jit_cell(declared):
    if "jax" not in declared.backends:
        return "n/a"
    if isinstance(declared.jit, tuple):
        return "method " + " or ".join(declared.jit)
    return "yes" if declared.jit else "eager only"


def _row(name, declared):
    if not declared.backends:
        return [f"``{name}``", *["n/a"] * (len(LIBRARIES) + 2), declared.reason]
    libraries = ["yes" if lib in declared.backends else "no" for lib in LIBRARIES]
    device = "yes" if declared.device else "no"
    return [f"``{name}``", *libraries, _jit_cell(declared), device, declared.reason]


def table():
    """The reStructuredText ``csv-table`` of :data:`DECLARATIONS` for the docs page."""
    header = ["Function", *(_LABELS[lib] for lib in LIBRARIES), "jax.jit", "non-CPU", "Notes"]

    def line(cells):
        return ", ".join('"' + cell.replace('"', '""') + '"' for cell in cells)

    rows = [f"   {line(_row(name, d))}" for name, d in DECLARATIONS.items()]
    return "\n".join([".. csv-table::", f"   :header: {line(header)}", "", *rows]) + "\n"


_BEGIN, _END = ".. capability table begin\n", ".. capability table end\n"


def page_with_table(text):
    """``text`` (a docs page) with the part between the table markers replaced by :func:`table`."""
    head, _, rest = text.partition(_BEGIN)
    _, _, tail = rest.partition(_END)
    return f"{head}{_BEGIN}\n{table()}\n{_END}{tail}"


def write_page(path=None):
    """Rewrite the table in ``path`` (default: the checkout's docs/capabilities.rst)."""
    page = Path(path or Path(__file__).resolve().parent.parent / "docs" / "capabilities.rst")
    page.write_text(page_with_table(page.read_text(encoding="utf-8")), encoding="utf-8")
