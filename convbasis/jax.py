"""JAX autodiff for every attention method: :func:`attention`, a ``jax.custom_vjp``.

The forward is the method's attention operator applied to ``v``
(:func:`convbasis.attention_operator`); the backward is the library's own gradient,
:func:`convbasis.attention_gradients`, in the meaning chosen by ``gradient=``.  ``method``,
``causal``, ``scale``, ``gradient`` and the options are static: array-valued options (such as
multipole's downsampling kernels) are constants, never differentiated.

Under ``jax.jit`` and ``jax.vmap`` the library first runs on the tracers; a method that reads
values back into Python (the polynomial's degree and radius for ``"lowrank"``, the recovered
segment starts for ``"conv"``) cannot be traced, and then runs as a host callback
(``jax.pure_callback`` on NumPy copies of the inputs: a device-to-host copy each way, one call
per batch element under ``vmap``).  ``"dense"`` and ``"multipole"`` trace and compile with
XLA on the inputs' device.

JAX is an optional dependency (``pip install jax``); this module imports it only when
:func:`attention` is called.
"""

from __future__ import annotations

import functools

import array_api_compat

from ._array import as_dtype
from ._capabilities import EagerOnlyError
from .batching import batched_call, check_lengths_options
from .gradients import attention_gradients, check_gradient
from .operators import attention_operator, check_options

__all__ = ["attention"]


def _forward(settings, q, k, v):
    method, causal, scale, _, options = settings
    op = attention_operator(q, k, method=method, causal=causal, scale=scale, **dict(options))
    # a conv operator built from half precision holds float32 (its FFT needs it)
    xp = array_api_compat.array_namespace(q, k, v)
    return as_dtype(xp, op.matmul(v), xp.result_type(q, k, v))


def _gradients(settings, q, k, v, grad_out):
    method, causal, scale, gradient, options = settings
    grads = attention_gradients(
        q,
        k,
        v,
        grad_out,
        method=method,
        gradient=gradient,
        causal=causal,
        scale=scale,
        **dict(options),
    )
    # The library returns the inputs' common dtype; a cotangent has its primal's dtype.
    return tuple(grad.astype(x.dtype) for grad, x in zip(grads, (q, k, v), strict=True))


@functools.cache
def _vjp():
    """The ``jax.custom_vjp`` function, built on first use so that importing needs no JAX."""
    try:
        import jax
    except ImportError:
        raise ImportError("convbasis.jax needs JAX: pip install jax") from None
    import jax.numpy as jnp
    import numpy as np

    untraceable = (
        EagerOnlyError,  # an eager-only function's boundary check
        jax.errors.ConcretizationTypeError,  # float()/bool() on a traced value
        jax.errors.TracerArrayConversionError,
        jax.errors.TracerIntegerConversionError,
        jax.errors.NonConcreteBooleanIndexError,
    )

    def traced_or_host(func, result, *arrays):
        """``func(*arrays)`` on the arrays themselves, else as a callback on NumPy copies."""
        try:
            return func(*arrays)
        except untraceable:
            if not any(isinstance(a, jax.core.Tracer) for a in arrays):
                raise

        def host(*values):
            out = func(*(np.asarray(a) for a in values))
            return jax.tree.map(lambda o, r: np.asarray(o, dtype=r.dtype), out, result)

        # sequential: under vmap each batch element gets the choices it would get alone (one
        # call shares conv's segment starts and lowrank's polynomial across its batch axes).
        return jax.pure_callback(host, result, *arrays, vmap_method="sequential")

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def attend(settings, q, k, v):
        batch = jnp.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        result = jax.ShapeDtypeStruct((*batch, q.shape[-2], v.shape[-1]), jnp.result_type(q, k, v))
        return traced_or_host(functools.partial(_forward, settings), result, q, k, v)

    def forward(settings, q, k, v):
        return attend(settings, q, k, v), (q, k, v)

    def backward(settings, saved, grad_out):
        result = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in saved)
        # A caller of the VJP may pass a NumPy cotangent (jax.test_util.check_grads does).
        grad_out = jnp.asarray(grad_out)
        return traced_or_host(functools.partial(_gradients, settings), result, *saved, grad_out)

    attend.defvjp(forward, backward)
    return attend


def attention(
    q,
    k,
    v,
    /,
    *,
    method="dense",
    causal=True,
    scale=None,
    gradient="model",
    lengths=None,
    **options,
):
    """Attention ``O = f V`` with the chosen structure, differentiable by ``jax.grad``.

    Parameters
    ----------
    q, k : arrays ``(..., n, d)``
    v : array ``(..., m, e)``
        Leading (batch, head) axes broadcast, as in :func:`convbasis.attention_operator`;
        ``k`` and ``v`` may have fewer heads (axis ``-3``) than ``q``: grouped-query
        attention.  The layout is ``(batch, heads, n, d)``; ``jax.nn.dot_product_attention``
        takes ``(batch, n, heads, d)``: swap the axes first.
    method : str
        Any name in ``convbasis.operators.METHODS`` (``"dense"``, ``"lowrank"``, ``"conv"``,
        ``"multipole"``, ...); ``options`` go to its constructor (``rank=`` for conv, ``eps=``
        or ``degree=`` for lowrank, ``block=``, ``basis=`` for multipole).
    causal : bool
        Default ``True``, unlike ``jax.nn.dot_product_attention``.
    scale : float, optional
        Default ``1/sqrt(d)``.
    gradient : {"model", "exact-formula"}
        The reverse-mode rule's meaning (docs: "Fast gradients"): ``"model"`` (default) is the
        exact gradient of this forward; ``"exact-formula"`` puts the method's ``f̃`` into the
        gradient formulas of exact attention (not the gradient of this forward unless
        ``method="dense"``).
    lengths : int array or sequence ``(batch,)``, optional
        Valid length of each sequence (first batch axis), concrete (static under ``jax.jit``):
        each sequence is attended alone, truncated, and output rows beyond its length are
        zero (docs: "Conventions").

    Returns
    -------
    array ``(..., n, e)``
        In the inputs' common floating dtype.  Reverse mode (``jax.grad``, ``jax.vjp``); forward
        mode raises ``TypeError``.  A second derivative works where the library's backward
        traces (dense, multipole: JAX differentiates it) and raises ``ValueError`` where it
        runs as a host callback (lowrank, conv).

    Raises
    ------
    ValueError
        For an unknown ``method`` or ``gradient``.
    TypeError
        For an option the method does not take.
    """
    attend = _vjp()
    import jax.numpy as jnp

    check_options(method, options)
    check_gradient(gradient)
    check_lengths_options(method, lengths, options)
    settings = (method, causal, scale, gradient, tuple(sorted(options.items())))
    # Grouped heads and lengths are reshapes, gathers and slices around the custom rule, so
    # JAX differentiates them itself (the group sums of dk, dv included).
    return batched_call(
        functools.partial(attend, settings),
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        lengths=lengths,
    )
