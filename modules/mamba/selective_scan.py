"""Selective scan (the Mamba-1 state-space recurrence) with two back-ends and a reference.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (per channel d and state n)
    y_t = <C_t, h_t> + D * u_t,      out_t = y_t * silu(z_t)

Shapes follow ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` so the two back-ends are
interchangeable: u, delta, z (batch, dim, time); A (dim, state); B, C (batch, groups, state, time) or
(batch, state, time) for one group; D, delta_bias (dim,). Channels are split into ``groups`` equal,
contiguous blocks and block g reads B[:, g] and C[:, g]; a bidirectional mixer stacks its two
directions as two groups and runs one scan.

* :func:`selective_scan` dispatches: the ``mamba_ssm`` CUDA kernel (through the custom ops of
  :mod:`.scan_cuda`, which ``torch.compile`` traces) when it is installed and the tensors are on a
  GPU, :class:`SelectiveScanTorch` otherwise.
* :class:`SelectiveScanTorch` is the pure-PyTorch back-end: a time loop of one fused multiply-add
  per step without autograd, and a hand-written backward pass (a reverse-time loop), so that memory
  and speed do not depend on autograd unrolling the loop.
* :func:`selective_scan_ref` is the specification: a plain sequential loop that autograd
  differentiates. Tests compare both back-ends with it in float64.
"""

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from . import scan_cuda


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    return_last_state=False,
):
    """Runs the selective scan on the fastest back-end available for these tensors.

    ``initial_state`` (batch, dim, state) continues a scan (streaming, decoding caches); the CUDA
    kernel has no such input, so scans that need it take the PyTorch path on every device.
    Returns ``out`` (batch, dim, time), or ``(out, last_state)`` when ``return_last_state``.
    """
    if scan_cuda.available and u.is_cuda and initial_state is None:
        return scan_cuda.selective_scan_cuda_op(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
        )
    out, last_state = SelectiveScanTorch.apply(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state
    )
    return (out, last_state) if return_last_state else out


def cuda_kernel_available():
    """True when the ``mamba_ssm`` selective-scan kernel can be used."""
    return scan_cuda.available and torch.cuda.is_available()


def _as_groups(BC):
    """(batch, state, time) -> (batch, 1, state, time); grouped input is returned as is."""
    return BC.unsqueeze(1) if BC.dim() == 3 else BC


def _time_major(u, delta, A, B, C, delta_bias, delta_softplus):
    """Step sizes (batch, dim, time) and the small time-major tensors the chunk loop slices.

    Returns delta, delta (time, batch, dim), delta*u (time, batch, groups, dim/groups) and B, C
    (time, batch, groups, state).
    """
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, time = u.shape
    groups = B.shape[1]
    delta_t = delta.permute(2, 0, 1).contiguous()
    delta_u_t = (delta * u).permute(2, 0, 1).reshape(time, batch, groups, dim // groups).contiguous()
    B_t = B.permute(3, 0, 1, 2).contiguous()
    C_t = C.permute(3, 0, 1, 2).contiguous()
    return delta, delta_t, delta_u_t, B_t, C_t


def _chunk_states(A, delta_t, delta_u_t, B_t, h):
    """Every state of one chunk of time, starting after state ``h`` (batch, dim, state).

    Returns decay = exp(delta*A) and the states, both (chunk, batch, dim, state); the states are
    written over the inputs delta*B*u, one fused multiply-add per step.
    """
    time, batch, groups, per_group = delta_u_t.shape
    decay = torch.exp(delta_t[..., None] * A)
    states = (delta_u_t[..., None] * B_t[:, :, :, None, :]).view(time, batch, groups * per_group, -1)
    for t in range(time):
        h = torch.addcmul(states[t], decay[t], h, out=states[t])
    return decay, states


class SelectiveScanTorch(torch.autograd.Function):
    """Pure-PyTorch selective scan with an explicit backward pass (any device, float32/64).

    Time is cut in chunks small enough for the CPU caches; within a chunk the recurrence is one
    fused multiply-add per step. Only the state entering each chunk is kept for the backward pass,
    which recomputes a chunk's states and runs the adjoint recurrence backwards in time. Inputs are
    computed in float32 (float64 stays float64), like the CUDA kernel under bf16 autocast; the
    output has the dtype of ``u``, the last state stays in the compute dtype (as the kernel's), so
    a decoding or streaming cache carries it without rounding to bf16.
    """

    CHUNK_ELEMENTS = 2**20  # chunk length * batch * dim * state: about 4 MB of float32

    @staticmethod
    def _chunk_length(batch, dim, state):
        return max(1, SelectiveScanTorch.CHUNK_ELEMENTS // (batch * dim * state))

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
        in_dtype = u.dtype
        compute = torch.float64 if in_dtype == torch.float64 else torch.float32
        cast = lambda t: None if t is None else t.to(compute)  # noqa: E731
        u_, delta_, A_, D_, z_, bias_, h0 = map(cast, (u, delta, A, D, z, delta_bias, initial_state))
        B_, C_ = cast(_as_groups(B)), cast(_as_groups(C))
        batch, dim, time = u.shape
        groups, state = B_.shape[1], B_.shape[2]
        with torch.no_grad(), torch.autocast(u.device.type, enabled=False):
            delta_sp, delta_t, delta_u_t, B_t, C_t = _time_major(u_, delta_, A_, B_, C_, bias_, delta_softplus)
            h = h0 if h0 is not None else u_.new_zeros(batch, dim, state)
            chunk = SelectiveScanTorch._chunk_length(batch, dim, state)
            y_t = u_.new_empty(time, batch, dim)
            chunk_starts = []
            for start in range(0, time, chunk):
                end = min(start + chunk, time)
                chunk_starts.append(h)
                _, states = _chunk_states(A_, delta_t[start:end], delta_u_t[start:end], B_t[start:end], h)
                h = states[-1].clone()
                y_t[start:end] = torch.matmul(
                    states.view(end - start, batch, groups, dim // groups, state), C_t[start:end, ..., None]
                ).view(end - start, batch, dim)
            y = y_t.permute(1, 2, 0)
            if D_ is not None:
                y = y + D_[:, None] * u_
            out = y * F.silu(z_) if z_ is not None else y
        ctx.delta_softplus = delta_softplus
        ctx.chunk = chunk
        ctx.B_was_grouped, ctx.C_was_grouped = B.dim() == 4, C.dim() == 4
        ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(u_, delta_, A_, B_, C_, D_, z_, bias_, y, torch.stack(chunk_starts))
        return out.to(in_dtype), h

    @staticmethod
    def backward(ctx, grad_out, grad_last_state):
        with torch.autocast(grad_out.device.type, enabled=False):
            return SelectiveScanTorch._backward(ctx, grad_out, grad_last_state)

    @staticmethod
    def _backward(ctx, grad_out, grad_last_state):
        u, delta, A, B, C, D, z, delta_bias, y, chunk_starts = ctx.saved_tensors
        grad_out = grad_out.to(u.dtype)
        batch, dim, time = u.shape
        groups, state = B.shape[1], B.shape[2]
        per_group = dim // groups
        delta_sp, delta_t, delta_u_t, B_t, C_t = _time_major(u, delta, A, B, C, delta_bias, ctx.delta_softplus)

        grad_z = None
        if z is not None:
            sig = torch.sigmoid(z)
            grad_z = grad_out * y * sig * (1 + z * (1 - sig))
            grad_out = grad_out * z * sig
        grad_D = (grad_out * u).sum((0, 2)) if D is not None else None
        grad_y_t = grad_out.permute(2, 0, 1).reshape(time, batch, groups, per_group).contiguous()

        # Adjoint recurrence, chunks in reverse: g_t = C_t * dy_t + decay_{t+1} * g_{t+1}
        grad_delta_t = torch.empty_like(delta_t)  # through the decays
        grad_delta_u_t = torch.empty_like(delta_t)  # through the inputs delta*u*B
        grad_B_t, grad_C_t = torch.empty_like(B_t), torch.empty_like(C_t)
        grad_A = torch.zeros_like(A)
        carry = grad_last_state.to(u.dtype) if grad_last_state is not None else None
        for index in range(len(chunk_starts) - 1, -1, -1):
            start = index * ctx.chunk
            end = min(start + ctx.chunk, time)
            length = end - start
            h_start = chunk_starts[index]
            decay, states = _chunk_states(A, delta_t[start:end], delta_u_t[start:end], B_t[start:end], h_start)
            grad_y = grad_y_t[start:end]
            grad_states = (grad_y[..., None] * C_t[start:end, :, :, None, :]).view(length, batch, dim, state)
            if carry is not None:
                grad_states[-1] += carry
            for t in range(length - 2, -1, -1):
                grad_states[t].addcmul_(decay[t + 1], grad_states[t + 1])
            carry = decay[0] * grad_states[0]  # dL/dh before this chunk

            grouped_states = states.view(length, batch, groups, per_group, state)
            grouped_grads = grad_states.view(length, batch, groups, per_group, state)
            grad_C_t[start:end] = torch.matmul(grad_y[:, :, :, None, :], grouped_states).squeeze(-2)
            grad_B_t[start:end] = torch.matmul(delta_u_t[start:end, :, :, None, :], grouped_grads).squeeze(-2)
            grad_delta_u_t[start:end] = torch.matmul(grouped_grads, B_t[start:end, ..., None]).view(length, batch, dim)
            # dL/d(delta*A) = g_t * h_{t-1} * decay_t, built in place of the decays
            grad_log_decay = decay.mul_(grad_states)
            grad_log_decay[1:] *= states[:-1]
            grad_log_decay[0] *= h_start
            grad_A += (grad_log_decay * delta_t[start:end, ..., None]).sum((0, 1))
            grad_delta_t[start:end] = grad_log_decay.mul_(A).sum(-1)

        grad_delta_u = grad_delta_u_t.permute(1, 2, 0)
        grad_delta = grad_delta_t.permute(1, 2, 0) + grad_delta_u * u
        grad_u = grad_delta_u * delta_sp
        if D is not None:
            grad_u = grad_u + grad_out * D[:, None]
        if ctx.delta_softplus:
            pre = delta + delta_bias[:, None] if delta_bias is not None else delta
            grad_delta = grad_delta * torch.sigmoid(pre)
        grad_bias = grad_delta.sum((0, 2)) if delta_bias is not None else None
        grad_B = grad_B_t.permute(1, 2, 3, 0)
        grad_C = grad_C_t.permute(1, 2, 3, 0)
        if not ctx.B_was_grouped:
            grad_B = grad_B.squeeze(1)
        if not ctx.C_was_grouped:
            grad_C = grad_C.squeeze(1)
        grad_h0 = carry if ctx.has_h0 else None

        grads = (grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_bias, grad_h0)
        grads = [None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return (*grads[:8], None, grads[8])


def selective_scan_ref(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    initial_state=None,
    return_last_state=False,
):
    """Specification of :func:`selective_scan`: one time step at a time, differentiated by autograd."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, time = u.shape
    B, C = _as_groups(B), _as_groups(C)
    repeat = dim // B.shape[1]
    B, C = B.repeat_interleave(repeat, dim=1), C.repeat_interleave(repeat, dim=1)
    h = initial_state if initial_state is not None else u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(time):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    out = y * F.silu(z) if z is not None else y
    return (out, h) if return_last_state else out


def scan_loop(u, delta, A, B, C, D=None, delta_bias=None, delta_softplus=False):
    """:func:`_scan_loop` as a TorchScript function, whose loop over time survives ``torch.jit.trace``
    (export). It is scripted at its first call, not at import: ``torch.jit.script`` warns that it is
    deprecated, and only an export should print that."""
    return _scripted_scan_loop()(u, delta, A, B, C, D, delta_bias, delta_softplus)


@functools.cache
def _scripted_scan_loop():
    return torch.jit.script(_scan_loop)


def _scan_loop(u, delta, A, B, C, D: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], delta_softplus: bool):
    """The recurrence of ``selective_scan_ref`` (without z and initial state) in TorchScript, which
    keeps its loop over time a loop; the reference's conditional return type does not script.

    u, delta (batch, dim, time), A (dim, state), B, C (batch, groups, state, time) or (batch, state,
    time). Computes in float32 (float64 stays float64); returns (batch, dim, time) in u's dtype.
    """
    dtype = u.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    u, delta, A = u.to(compute), delta.to(compute), A.to(compute)
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    B, C = B.to(compute), C.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, state = u.shape[0], u.shape[1], A.shape[1]
    groups = B.shape[1]
    decay = torch.exp(delta.permute(2, 0, 1).unsqueeze(-1) * A)  # (time, batch, dim, state)
    delta_u = (delta * u).permute(2, 0, 1).reshape(-1, batch, groups, dim // groups, 1)
    states = (delta_u * B.permute(3, 0, 1, 2).unsqueeze(3)).reshape(-1, batch, dim, state)
    h = torch.zeros(batch, dim, state, dtype=u.dtype, device=u.device)
    for t in range(states.shape[0]):  # the inputs delta*B*u become the states, in place
        h = states[t].addcmul_(decay[t], h)
    C_t = C.permute(3, 0, 1, 2).unsqueeze(-1)  # (time, batch, groups, state, 1)
    y = torch.matmul(states.view(-1, batch, groups, dim // groups, state), C_t).view(-1, batch, dim).permute(1, 2, 0)
    if D is not None:
        y = y + D.to(compute)[:, None] * u
    return y.to(dtype)
