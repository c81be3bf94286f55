"""The ``mamba_ssm`` selective-scan CUDA kernel as PyTorch custom ops.

``mamba_ssm`` calls its kernel from a Python ``autograd.Function``, which ``torch.compile`` cannot
trace: every Mamba layer would split a compiled model into pieces, and the element-wise work around
the scan (reversals, gating, step-size transforms) would stay unfused. Registered as custom ops with
shape functions and an autograd formula, the kernel becomes one opaque node of the compiled graph.

Only the kernel's own arguments are used: no ``z`` (gating is left to the caller, where the compiler
fuses it), and ``D`` / ``delta_bias`` always given (zeros when the caller has none), so every output
is a tensor. ``available`` is False when ``mamba_ssm`` is not built.
"""

import torch
from torch import Tensor

try:
    import selective_scan_cuda
except ImportError:  # CPU machines, or mamba-ssm not built
    selective_scan_cuda = None

available = selective_scan_cuda is not None
CHUNK = 2048  # the kernel keeps one state per 2048 steps for its backward pass


def _last_dim_contiguous(tensor):
    """The kernel reads every tensor with unit stride along time (other strides are free)."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


@torch.library.custom_op("mamba_asr::selective_scan_fwd", mutates_args=(), device_types="cuda")
def selective_scan_fwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, delta_bias: Tensor, delta_softplus: bool
) -> tuple[Tensor, Tensor]:
    """Returns out (like ``delta``) and the per-chunk states (batch, dim, chunks, 2 * state) in A's dtype."""
    out, chunk_states = selective_scan_cuda.fwd(u, delta, A, B, C, D, None, delta_bias, delta_softplus)[:2]
    return out, chunk_states


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus):
    batch, dim, time = u.shape
    chunks = -(-time // CHUNK)
    return torch.empty_like(delta), u.new_empty(batch, dim, chunks, 2 * A.shape[1], dtype=A.dtype)


@torch.library.custom_op("mamba_asr::selective_scan_bwd", mutates_args=(), device_types="cuda")
def selective_scan_bwd(
    grad_out: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    delta_bias: Tensor,
    chunk_states: Tensor,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of u, delta, A, B, C, D, delta_bias."""
    grads = selective_scan_cuda.bwd(
        u, delta, A, B, C, D, None, delta_bias, grad_out, chunk_states, None, None, delta_softplus, False
    )
    return tuple(grads[:7])


@selective_scan_bwd.register_fake
def _(grad_out, u, delta, A, B, C, D, delta_bias, chunk_states, delta_softplus):
    return tuple(torch.empty_like(t) for t in (u, delta, A, B, C, D, delta_bias))


def _setup_context(ctx, inputs, output):
    *tensors, ctx.delta_softplus = inputs
    ctx.save_for_backward(*tensors, output[1])


def _backward(ctx, grad_out, grad_chunk_states):
    u, delta, A, B, C, D, delta_bias, chunk_states = ctx.saved_tensors
    grads = selective_scan_bwd(
        _last_dim_contiguous(grad_out), u, delta, A, B, C, D, delta_bias, chunk_states, ctx.delta_softplus
    )
    return (*grads, None)


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_cuda_op(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """:func:`modules.mamba.selective_scan.selective_scan` on the CUDA kernel, traceable by torch.compile.

    The gradient of ``last_state`` is not propagated (as in ``mamba_ssm``): training never uses it.
    """
    dim = u.shape[1]
    zeros = u.new_zeros(dim, dtype=torch.float32)
    B, C = (t.unsqueeze(1) if t.dim() == 3 else t for t in (B, C))  # one group
    out, chunk_states = selective_scan_fwd(
        *map(_last_dim_contiguous, (u, delta, A, B, C)),
        D.float() if D is not None else zeros,
        delta_bias.float() if delta_bias is not None else zeros,
        delta_softplus,
    )
    if z is not None:
        out = out * torch.nn.functional.silu(z)
    return (out, chunk_states[:, :, -1, 1::2]) if return_last_state else out
