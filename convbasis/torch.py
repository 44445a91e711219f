"""PyTorch autograd for every attention method: :func:`attention`.

The forward is the method's attention operator applied to ``v``
(:func:`convbasis.attention_operator`); the backward is the library's own gradient,
:func:`convbasis.attention_gradients`, in the meaning chosen by ``gradient=``.  Autograd never
sees the library's internal operations, whose data-dependent choices (a polynomial's degree, a
recovered conv basis) it would treat as constants: that is why the top-level functions refuse
tensors that require grad (``TypeError`` pointing here).

PyTorch is an optional dependency (``pip install torch``); this module imports it only when
:func:`attention` is called.
"""

from __future__ import annotations

import functools

from .batching import batched_call, check_lengths_options
from .gradients import attention_gradients, check_gradient
from .operators import attention_operator, check_options

__all__ = ["attention"]


@functools.cache
def _function():
    """The ``torch.autograd.Function``, built on first use so that importing needs no torch."""
    try:
        import torch
    except ImportError:
        raise ImportError("convbasis.torch needs PyTorch: pip install torch") from None
    from torch.autograd.function import once_differentiable

    class Attention(torch.autograd.Function):
        # Function.apply runs forward in no-grad mode and once_differentiable runs backward
        # under torch.no_grad(), so the library's refusal of tracked tensors does not fire.
        @staticmethod
        def forward(q, k, v, method, causal, scale, gradient, options, lengths):
            def attend(q, k, v):
                op = attention_operator(q, k, method=method, causal=causal, scale=scale, **options)
                # a conv operator built from half precision holds float32 (its FFT needs it)
                return op.matmul(v).to(
                    torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
                )

            return batched_call(attend, q, k, v, lengths=lengths)

        @staticmethod
        def setup_context(ctx, inputs, output):
            q, k, v, *settings = inputs
            ctx.save_for_backward(q, k, v)
            ctx.settings = settings

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_out):
            q, k, v = ctx.saved_tensors
            method, causal, scale, gradient, options, lengths = ctx.settings
            grads = attention_gradients(
                q,
                k,
                v,
                grad_out,
                method=method,
                gradient=gradient,
                causal=causal,
                scale=scale,
                lengths=lengths,
                **options,
            )
            # The library returns the inputs' common dtype; autograd wants each input's own.
            dq, dk, dv = (
                grad.to(x.dtype) if needed else None
                for grad, x, needed in zip(grads, (q, k, v), ctx.needs_input_grad[:3], strict=True)
            )
            return dq, dk, dv, None, None, None, None, None, None

    return Attention


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
    """Attention ``O = f V`` with the chosen structure, differentiable by torch autograd.

    Parameters
    ----------
    q, k : tensors ``(..., n, d)``
    v : tensor ``(..., m, e)``
        Leading (batch, head) axes broadcast, as in :func:`convbasis.attention_operator`;
        ``k`` and ``v`` may have fewer heads (axis ``-3``) than ``q``: grouped-query attention,
        like SDPA's ``enable_gqa=True``.  The layout is ``(batch, heads, n, d)``, as for SDPA;
        transpose flash-attn's ``(batch, n, heads, d)`` first.
    method : str
        Any name in ``convbasis.operators.METHODS`` (``"dense"``, ``"lowrank"``, ``"conv"``,
        ``"multipole"``, ...); ``options`` go to its constructor (``rank=`` for conv, ``eps=``
        or ``degree=`` for lowrank, ``block=``, ``basis=`` for multipole).
    causal : bool
        Default ``True``, unlike ``torch.nn.functional.scaled_dot_product_attention``.
    scale : float, optional
        Default ``1/sqrt(d)``.
    gradient : {"model", "exact-formula"}
        The backward's meaning (docs: "Fast gradients"): ``"model"`` (default) is the exact
        gradient of this forward, what training the approximated model needs;
        ``"exact-formula"`` puts the method's ``f̃`` into the gradient formulas of exact
        attention (not the gradient of this forward unless ``method="dense"``).

    Returns
    -------
    tensor ``(..., n, e)``
        On the inputs' device, in their common floating dtype.  Its backward returns
        ``dq, dk, dv`` in the dtypes of ``q, k, v``; it is once differentiable (a second
        backward raises ``RuntimeError``).

    Raises
    ------
    ValueError
        For an unknown ``method`` or ``gradient``.
    TypeError
        For non-tensor inputs or an option the method does not take.
    """
    function = _function()
    import torch

    for a, name in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
    check_options(method, options)
    check_gradient(gradient)
    check_lengths_options(method, lengths, options)
    return function.apply(q, k, v, method, causal, scale, gradient, options, lengths)
