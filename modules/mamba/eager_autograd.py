"""Eager-mode autograd for our Triton custom ops, without the custom-op dispatch.

A ``torch.library.custom_op`` is what lets ``torch.compile`` trace a kernel it cannot look into, but
every eager call pays for that registration: the dispatcher and the generated autograd wrapper cost
tens of microseconds a call on the host (``python bench/scan_kernels.py --host``, RESULTS.md), and the
training step of an eager model is bound by the host. :func:`eager_autograd` builds the
``torch.autograd.Function`` that runs the same kernel function with the same autograd formula, for
the calls made outside ``torch.compile``; :func:`pick` chooses between the two at each call.
"""

import torch


def eager_autograd(kernel, setup_context, backward):
    """``apply`` of an autograd Function computing ``kernel(*inputs)`` (the function registered as
    the custom op), with the op's ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)``."""

    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = kernel(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    EagerOp.__name__ = EagerOp.__qualname__ = f"Eager_{kernel.__name__}"
    return EagerOp.apply


def pick(custom_op, eager_apply):
    """The custom op while ``torch.compile`` traces (it needs the registration), else the eager Function."""
    return custom_op if torch.compiler.is_compiling() else eager_apply
