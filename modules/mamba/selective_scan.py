"""Selective scan (the Mamba-1 state-space recurrence) with two back-ends and a reference.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (per channel d and state n)
    y_t = <C_t, h_t> + D * u_t,      out_t = y_t * silu(z_t)

Shapes follow ``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` so the two back-ends are
interchangeable: u, delta, z (batch, dim, time); A (dim, state); B, C (batch, groups, state, time) or
(batch, state, time) for one group; D, delta_bias (dim,). Channels are split into ``groups`` equal,
contiguous blocks and block g reads B[:, g] and C[:, g]; a bidirectional mixer stacks its two
directions as two groups and runs one scan.

* :func:`selective_scan` dispatches: the ``mamba_ssm`` CUDA kernel when it is installed and the
  tensors are on a GPU, :class:`SelectiveScanTorch` otherwise.
* :class:`SelectiveScanTorch` is the pure-PyTorch back-end: a time loop of one fused multiply-add
  per step without autograd, and a hand-written backward pass (a reverse-time loop), so that memory
  and speed do not depend on autograd unrolling the loop.
* :func:`selective_scan_ref` is the specification: a plain sequential loop that autograd
  differentiates. Tests compare both back-ends with it in float64.
"""

import torch
import torch.nn.functional as F

try:  # optional GPU kernel
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_selective_scan
except ImportError:  # CPU machines, or mamba-ssm not built
    _cuda_selective_scan = None


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
    if _cuda_selective_scan is not None and u.is_cuda and initial_state is None:
        return _cuda_selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
        )
    out, last_state = SelectiveScanTorch.apply(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state
    )
    return (out, last_state) if return_last_state else out


def cuda_kernel_available():
    """True when the ``mamba_ssm`` selective-scan kernel can be used."""
    return _cuda_selective_scan is not None and torch.cuda.is_available()


def _as_groups(BC):
    """(batch, state, time) -> (batch, 1, state, time); grouped input is returned as is."""
    return BC.unsqueeze(1) if BC.dim() == 3 else BC


def _discretize(u, delta, A, B, delta_bias, delta_softplus):
    """Returns step sizes (batch, dim, time) and, time-major (time, batch, dim, state),
    the decays exp(delta*A) and the inputs delta*B*u, built by broadcasting (no big transposes)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, time = u.shape
    groups, state = B.shape[1], B.shape[2]
    decay = torch.exp(delta.permute(2, 0, 1).contiguous()[..., None] * A)
    delta_u = (delta * u).permute(2, 0, 1).reshape(time, batch, groups, dim // groups, 1)
    drive = delta_u * B.permute(3, 0, 1, 2).contiguous()[:, :, :, None, :]
    return delta, decay.contiguous(), drive.reshape(time, batch, dim, state).contiguous()


def _contract_C(states, C):
    """sum_n states[t, b, d, n] * C[b, g(d), n, t] -> (batch, dim, time)."""
    time, batch, dim, state = states.shape
    groups = C.shape[1]
    states = states.view(time * batch * groups, dim // groups, state)
    C = C.permute(3, 0, 1, 2).reshape(time * batch * groups, state, 1)
    return torch.bmm(states, C).view(time, batch, dim).permute(1, 2, 0)


class SelectiveScanTorch(torch.autograd.Function):
    """Pure-PyTorch selective scan with an explicit backward pass (any device, float32/64).

    Inputs are upcast to float32 (or kept in float64) like the CUDA kernel, which also keeps its
    state in float32 under bf16 autocast; the output has the dtype of ``u``.
    """

    @staticmethod
    def _scan(decay, drive, h0):
        """h_t = decay_t * h_{t-1} + drive_t for all t: returns every state (time, batch, dim, state)."""
        states = torch.empty_like(drive, memory_format=torch.contiguous_format)
        h = h0
        for t in range(drive.shape[0]):
            if h is None:
                states[t] = drive[t]
            else:
                torch.addcmul(drive[t], decay[t], h, out=states[t])
            h = states[t]
        return states

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
        in_dtype = u.dtype
        compute = torch.float64 if in_dtype == torch.float64 else torch.float32
        cast = lambda t: None if t is None else t.to(compute)  # noqa: E731
        u_, delta_, A_, D_, z_, bias_, h0 = map(cast, (u, delta, A, D, z, delta_bias, initial_state))
        B_, C_ = cast(_as_groups(B)), cast(_as_groups(C))
        with torch.no_grad(), torch.autocast(u.device.type, enabled=False):
            _, decay, drive = _discretize(u_, delta_, A_, B_, bias_, delta_softplus)
            states = SelectiveScanTorch._scan(decay, drive, h0)
            y = _contract_C(states, C_)
            if D_ is not None:
                y = y + D_[:, None] * u_
            out = y * F.silu(z_) if z_ is not None else y
        ctx.delta_softplus = delta_softplus
        ctx.B_was_grouped, ctx.C_was_grouped = B.dim() == 4, C.dim() == 4
        ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias, initial_state)]
        ctx.save_for_backward(u_, delta_, A_, B_, C_, D_, z_, bias_, h0)
        return out.to(in_dtype), states[-1].to(in_dtype)

    @staticmethod
    def backward(ctx, grad_out, grad_last_state):
        with torch.autocast(grad_out.device.type, enabled=False):
            return SelectiveScanTorch._backward(ctx, grad_out, grad_last_state)

    @staticmethod
    def _backward(ctx, grad_out, grad_last_state):
        u, delta, A, B, C, D, z, delta_bias, h0 = ctx.saved_tensors
        grad_out = grad_out.to(u.dtype)
        delta_sp, decay, drive = _discretize(u, delta, A, B, delta_bias, ctx.delta_softplus)
        states = SelectiveScanTorch._scan(decay, drive, h0)
        y = _contract_C(states, C)
        if D is not None:
            y = y + D[:, None] * u

        grad_z = None
        if z is not None:
            sig = torch.sigmoid(z)
            grad_z = grad_out * y * sig * (1 + z * (1 - sig))
            grad_out = grad_out * z * sig
        grad_D = (grad_out * u).sum((0, 2)) if D is not None else None
        grad_u = grad_out * D[:, None] if D is not None else torch.zeros_like(u)

        # dL/dh_t, accumulated backwards in time: g_t = C_t * dy_t + decay_{t+1} * g_{t+1}
        time, batch, dim, state = states.shape
        groups, per_group = C.shape[1], dim // C.shape[1]
        grad_y = grad_out.permute(2, 0, 1).reshape(time, batch, groups, per_group, 1)
        C_t = C.permute(3, 0, 1, 2)[:, :, :, None, :]  # (time, batch, groups, 1, state)
        grad_states = (grad_y * C_t).view(time, batch, dim, state)
        grad_C = torch.matmul(
            grad_y.transpose(-1, -2), states.view(time, batch, groups, per_group, state)
        ).squeeze(-2).permute(1, 2, 3, 0)
        if grad_last_state is not None:
            grad_states[-1] += grad_last_state.to(u.dtype)
        for t in range(time - 2, -1, -1):
            grad_states[t].addcmul_(decay[t + 1], grad_states[t + 1])

        # h_t = decay_t * h_{t-1} + drive_t: gradients of decay_t = exp(delta_t*A) and drive_t
        grad_h0 = decay[0] * grad_states[0] if h0 is not None else None
        grad_log_decay = decay  # reused in place: dL/d(delta*A) = g_t * h_{t-1} * decay_t
        grad_log_decay[1:] *= states[:-1]
        if h0 is not None:
            grad_log_decay[0] *= h0
        else:
            grad_log_decay[0] = 0
        grad_log_decay *= grad_states
        B_t = B.permute(3, 0, 1, 2)[:, :, :, None, :]
        grad_delta_u = (grad_states.view(time, batch, groups, per_group, state) * B_t).sum(-1)
        grad_delta_u = grad_delta_u.reshape(time, batch, dim).permute(1, 2, 0)  # dL/d(delta*u)
        grad_delta = torch.einsum("lbdn,dn->bdl", grad_log_decay, A) + grad_delta_u * u
        grad_u = grad_u + grad_delta_u * delta_sp
        grad_A = torch.einsum("lbdn,bdl->dn", grad_log_decay, delta_sp)
        delta_u = (delta_sp * u).permute(2, 0, 1).reshape(time, batch, groups, 1, per_group)
        grad_B = torch.matmul(delta_u, grad_states.view(time, batch, groups, per_group, state))
        grad_B = grad_B.squeeze(-2).permute(1, 2, 3, 0)
        if ctx.delta_softplus:
            pre = delta + delta_bias[:, None] if delta_bias is not None else delta
            grad_delta = grad_delta * torch.sigmoid(pre)
        grad_bias = grad_delta.sum((0, 2)) if delta_bias is not None else None
        if not ctx.B_was_grouped:
            grad_B = grad_B.squeeze(1)
        if not ctx.C_was_grouped:
            grad_C = grad_C.squeeze(1)

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
