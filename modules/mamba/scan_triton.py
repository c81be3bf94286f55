"""Our Triton selective scan: both directions of a BiMamba in one launch, any (batch, time, channels) strides.

Computes :func:`modules.mamba.scan.directional_scan` (the specification is there): per direction g and
channel d, ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = <C_t, h_t> + D u_t``, then
``out = scale * sum_g y_g * silu(z)`` at each row's valid frames and 0 at padded ones. Direction 1 of
a bidirectional scan runs backwards inside each row's own length: its program maps scan step ``s``
to frame ``length - 1 - s`` in every load and store, so nothing is gathered, flipped or transposed.
softplus(delta + bias), the D skip, the SiLU(z) gate and the mean of the two directions are fused.

One program scans one (channel block, utterance, direction) through time in chunks of ``BLOCK_T``
frames: a chunk's decays and inputs are combined by a parallel associative scan over time, and the
state entering the chunk (float32, in registers) carries between chunks. The forward pass keeps the
state at every chunk start; the backward pass walks the chunks in reverse, recomputes their states
from those checkpoints and runs the adjoint recurrence ``g_s = C_s dy_s + exp(delta_{s+1} A) g_{s+1}``
by a reverse associative scan. Gradients shared across channels (B, C) are written per channel block,
those shared across the batch (A, D, delta bias) per utterance, and the caller sums them. Each
program loads the next chunk while it computes the current one (software pipelining by hand).

Padded steps have step size 0, an identity step (decay 1, no input): outputs and gradients there are
0 and each row's last state is the state after its own last frame. With ``TRITON_INTERPRET=1`` the
kernels run on CPU tensors, which is how CI tests them.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_T = 8  # frames per chunk: the associative scan's length and the forward's checkpoint interval
# channels per program and warps per program of each pass, chosen by `bench/scan_kernels.py --sweep`
FORWARD = dict(BLOCK_D=16, num_warps=4)
BACKWARD = dict(BLOCK_D=16, num_warps=4)


@triton.jit
def _affine_combine(decay_left, input_left, decay_right, input_right):
    """Composition of two steps h -> decay * h + input, the left one applied first."""
    return decay_left * decay_right, input_left * decay_right + input_right


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _parameters(A_ptr, D_ptr, bias_ptr, channels, channel_mask, state_offsets, BLOCK_D: tl.constexpr,
                HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A (BLOCK_D, N), D and the step-size bias (BLOCK_D,) of one channel block; zeros where absent."""
    A = tl.load(A_ptr + state_offsets, mask=channel_mask[:, None], other=0.0)
    D = tl.zeros([BLOCK_D], tl.float32)
    bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + channels, mask=channel_mask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channels, mask=channel_mask, other=0.0)
    return A, D, bias


@triton.jit
def _is_reversed(direction, BIDIRECTIONAL: tl.constexpr):
    """Direction 1 of a bidirectional scan runs backwards in time."""
    if BIDIRECTIONAL:
        return direction == 1
    else:
        return direction < 0


@triton.jit
def _chunk_frames(chunk, length, reverse, channel_mask, BLOCK_T: tl.constexpr):
    """Frames of scan chunk ``chunk`` (BLOCK_T,), which of them are valid, and the (BLOCK_T, BLOCK_D) mask."""
    steps = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = (steps >= 0) & (steps < length)  # chunk -1 is the backward pass's prefetch past the start
    frames = tl.where(reverse, length - 1 - steps, steps)
    return frames, valid, valid[:, None] & channel_mask[None, :]


@triton.jit
def _load_chunk(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, frames, valid, mask, dims, channels,
                s_ut, s_uc, s_dt, s_dc, s_Bt, s_Bn, s_Ct, s_Cn, s_zt, s_zc, N: tl.constexpr, HAS_Z: tl.constexpr):
    """One chunk's u, delta (BLOCK_T, BLOCK_D), B, C (BLOCK_T, N) and z, as stored; pointers are at the
    utterance (and B, C at the direction)."""
    states = tl.arange(0, N)
    u = tl.load(u_ptr + frames[:, None] * s_ut + channels[None, :] * s_uc, mask=mask, other=0.0)
    delta = tl.load(delta_ptr + frames[:, None] * s_dt + channels[None, :] * s_dc, mask=mask, other=0.0)
    B = tl.load(B_ptr + frames[:, None] * s_Bt + states[None, :] * s_Bn, mask=valid[:, None], other=0.0)
    C = tl.load(C_ptr + frames[:, None] * s_Ct + states[None, :] * s_Cn, mask=valid[:, None], other=0.0)
    z = u
    if HAS_Z:  # the gate has one set of channels, shared by both directions
        z = tl.load(z_ptr + frames[:, None] * s_zt + dims[None, :] * s_zc, mask=mask, other=0.0)
    return u, delta, B, C, z


@triton.jit
def _step_sizes(delta_raw, bias, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """softplus(delta + bias) in float32, 0 at padded frames (an identity step); also its argument."""
    delta_raw = delta_raw.to(tl.float32)
    if HAS_BIAS:
        delta_raw += bias[None, :]
    delta = delta_raw
    if SOFTPLUS:
        delta = _softplus(delta_raw)
    return tl.where(mask, delta, 0.0), delta_raw


@triton.jit
def _chunk_states(delta, u, B, A, h):
    """Decays exp(delta A), and the states after each step of the chunk from state h (BLOCK_T, BLOCK_D, N)."""
    decay = tl.exp(delta[:, :, None] * A[None, :, :])
    inputs = (delta * u)[:, :, None] * B[:, None, :]
    decay_product, states = tl.associative_scan((decay, inputs), 0, _affine_combine)
    return decay, inputs, states + decay_product * h[None, :, :]


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, lengths_ptr, h0_ptr,
    out_ptr, last_ptr, checkpoint_ptr,
    DIM, chunks,
    s_ub, s_ut, s_uc, s_db, s_dt, s_dc, s_Bb, s_Bt, s_Bg, s_Bn, s_Cb, s_Ct, s_Cg, s_Cn, s_zb, s_zt, s_zc,
    s_ob, s_ot, s_oc,
    scale,
    N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BIDIRECTIONAL: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_H0: tl.constexpr, ATOMIC_OUT: tl.constexpr,
):
    block, batch, direction = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(lengths_ptr + batch).to(tl.int32)
    reverse = _is_reversed(direction, BIDIRECTIONAL)
    dims = block * BLOCK_D + tl.arange(0, BLOCK_D)
    channel_mask = dims < DIM
    channels = direction * DIM + dims  # into u, delta, A, D, bias and the states
    states = tl.arange(0, N)
    state_offsets = channels[:, None] * N + states[None, :]
    A, D, bias = _parameters(A_ptr, D_ptr, bias_ptr, channels, channel_mask, state_offsets, BLOCK_D, HAS_D, HAS_BIAS)
    total_channels = DIM * (1 + BIDIRECTIONAL)
    u_ptr += batch * s_ub
    delta_ptr += batch * s_db
    B_ptr += batch * s_Bb + direction * s_Bg
    C_ptr += batch * s_Cb + direction * s_Cg
    if HAS_Z:
        z_ptr += batch * s_zb
    out_ptr += batch * s_ob
    checkpoint_ptr += batch * chunks * total_channels * N + state_offsets
    if HAS_H0:
        h = tl.load(h0_ptr + batch * total_channels * N + state_offsets, mask=channel_mask[:, None], other=0.0)
    else:
        h = tl.zeros([BLOCK_D, N], tl.float32)
    rows = tl.arange(0, BLOCK_T)
    # software pipelining: the loads of chunk k + 1 are in flight while chunk k is computed
    frames, valid, mask = _chunk_frames(0, length, reverse, channel_mask, BLOCK_T)
    u_next, delta_next, B_next, C_next, z_next = _load_chunk(
        u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, frames, valid, mask, dims, channels,
        s_ut, s_uc, s_dt, s_dc, s_Bt, s_Bn, s_Ct, s_Cn, s_zt, s_zc, N, HAS_Z)
    for chunk in range(0, tl.cdiv(length, BLOCK_T)):
        u, delta_raw, B, C, z = u_next, delta_next, B_next, C_next, z_next
        chunk_frames, chunk_mask = frames, mask
        frames, valid, mask = _chunk_frames(chunk + 1, length, reverse, channel_mask, BLOCK_T)
        u_next, delta_next, B_next, C_next, z_next = _load_chunk(
            u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, frames, valid, mask, dims, channels,
            s_ut, s_uc, s_dt, s_dc, s_Bt, s_Bn, s_Ct, s_Cn, s_zt, s_zc, N, HAS_Z)

        tl.store(checkpoint_ptr + chunk * total_channels * N, h, mask=channel_mask[:, None])
        u = u.to(tl.float32)
        delta, _ = _step_sizes(delta_raw, bias, chunk_mask, HAS_BIAS, SOFTPLUS)
        _, _, hs = _chunk_states(delta, u, B.to(tl.float32), A, h)
        y = tl.sum(hs * C.to(tl.float32)[:, None, :], 2) + D[None, :] * u
        h = tl.sum(tl.where((rows == BLOCK_T - 1)[:, None, None], hs, 0.0), 0)
        if HAS_Z:
            z = z.to(tl.float32)
            y = y * z * tl.sigmoid(z)
        y = y * scale
        out_offsets = out_ptr + chunk_frames[:, None] * s_ot + dims[None, :] * s_oc
        if ATOMIC_OUT:
            tl.atomic_add(out_offsets, y, mask=chunk_mask, sem="relaxed")
        else:
            tl.store(out_offsets, y.to(out_ptr.dtype.element_ty), mask=chunk_mask)
    tl.store(last_ptr + batch * total_channels * N + state_offsets, h, mask=channel_mask[:, None])


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, lengths_ptr, checkpoint_ptr,
    grad_out_ptr, grad_last_ptr,
    grad_u_ptr, grad_delta_ptr, grad_B_ptr, grad_C_ptr, grad_z_ptr, grad_A_ptr, grad_D_ptr, grad_bias_ptr,
    grad_h0_ptr,
    DIM, chunks,
    s_ub, s_ut, s_uc, s_db, s_dt, s_dc, s_Bb, s_Bt, s_Bg, s_Bn, s_Cb, s_Ct, s_Cg, s_Cn, s_zb, s_zt, s_zc,
    s_gb, s_gt, s_gc,
    s_gub, s_gut, s_guc, s_gBk, s_gBb, s_gBt, s_gBg, s_gBn, s_gzb, s_gzt, s_gzc,
    scale,
    N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BIDIRECTIONAL: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_GRAD_LAST: tl.constexpr,
):
    block, batch, direction = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(lengths_ptr + batch).to(tl.int32)
    reverse = _is_reversed(direction, BIDIRECTIONAL)
    dims = block * BLOCK_D + tl.arange(0, BLOCK_D)
    channel_mask = dims < DIM
    channels = direction * DIM + dims
    states = tl.arange(0, N)
    state_offsets = channels[:, None] * N + states[None, :]
    total_channels = DIM * (1 + BIDIRECTIONAL)
    A, D, bias = _parameters(A_ptr, D_ptr, bias_ptr, channels, channel_mask, state_offsets, BLOCK_D, HAS_D, HAS_BIAS)
    u_ptr += batch * s_ub
    delta_ptr += batch * s_db
    B_ptr += batch * s_Bb + direction * s_Bg
    C_ptr += batch * s_Cb + direction * s_Cg
    grad_out_ptr += batch * s_gb
    checkpoint_ptr += batch * chunks * total_channels * N + state_offsets
    grad_u_ptr += batch * s_gub
    grad_delta_ptr += batch * s_gub
    if HAS_Z:
        z_ptr += batch * s_zb
        grad_z_ptr += batch * s_gzb
    # B and C are shared by the channel blocks: each block writes its own partial sums, added by the caller
    grad_B_ptr += block * s_gBk + batch * s_gBb + direction * s_gBg
    grad_C_ptr += block * s_gBk + batch * s_gBb + direction * s_gBg
    if HAS_GRAD_LAST:
        carry = tl.load(grad_last_ptr + batch * total_channels * N + state_offsets, mask=channel_mask[:, None], other=0.0)
    else:
        carry = tl.zeros([BLOCK_D, N], tl.float32)  # dL/dh after the chunk being processed
    grad_A = tl.zeros([BLOCK_D, N], tl.float32)
    grad_D = tl.zeros([BLOCK_D], tl.float32)
    grad_bias = tl.zeros([BLOCK_D], tl.float32)
    rows = tl.arange(0, BLOCK_T)
    last_row = (rows == BLOCK_T - 1)[:, None, None]
    n_chunks = tl.cdiv(length, BLOCK_T)
    frames, valid, mask = _chunk_frames(n_chunks - 1, length, reverse, channel_mask, BLOCK_T)
    u_next, delta_next, B_next, C_next, z_next = _load_chunk(
        u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, frames, valid, mask, dims, channels,
        s_ut, s_uc, s_dt, s_dc, s_Bt, s_Bn, s_Ct, s_Cn, s_zt, s_zc, N, HAS_Z)
    grad_out_next = tl.load(grad_out_ptr + frames[:, None] * s_gt + dims[None, :] * s_gc, mask=mask, other=0.0)
    for back in range(0, n_chunks):
        chunk = n_chunks - 1 - back
        u, delta_raw, B, C, z, grad_out = u_next, delta_next, B_next, C_next, z_next, grad_out_next
        chunk_frames, chunk_valid, chunk_mask = frames, valid, mask
        frames, valid, mask = _chunk_frames(chunk - 1, length, reverse, channel_mask, BLOCK_T)
        u_next, delta_next, B_next, C_next, z_next = _load_chunk(
            u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, frames, valid, mask, dims, channels,
            s_ut, s_uc, s_dt, s_dc, s_Bt, s_Bn, s_Ct, s_Cn, s_zt, s_zc, N, HAS_Z)
        grad_out_next = tl.load(grad_out_ptr + frames[:, None] * s_gt + dims[None, :] * s_gc, mask=mask, other=0.0)

        h_start = tl.load(checkpoint_ptr + chunk * total_channels * N, mask=channel_mask[:, None], other=0.0)
        u = u.to(tl.float32)
        B = B.to(tl.float32)
        C = C.to(tl.float32)
        delta, delta_raw = _step_sizes(delta_raw, bias, chunk_mask, HAS_BIAS, SOFTPLUS)
        decay, inputs, hs = _chunk_states(delta, u, B, A, h_start)

        grad_out = grad_out.to(tl.float32) * scale
        grad_y = grad_out
        if HAS_Z:
            z = z.to(tl.float32)
            sig = tl.sigmoid(z)
            y = tl.sum(hs * C[:, None, :], 2) + D[None, :] * u
            grad_z = grad_out * y * sig * (1.0 + z * (1.0 - sig))
            grad_z_offsets = grad_z_ptr + chunk_frames[:, None] * s_gzt + dims[None, :] * s_gzc
            if BIDIRECTIONAL:
                tl.atomic_add(grad_z_offsets, grad_z, mask=chunk_mask, sem="relaxed")
            else:
                tl.store(grad_z_offsets, grad_z.to(grad_z_ptr.dtype.element_ty), mask=chunk_mask)
            grad_y = grad_out * z * sig
        BC_offsets = chunk_frames[:, None] * s_gBt + states[None, :] * s_gBn
        tl.store(grad_C_ptr + BC_offsets, tl.sum(hs * grad_y[:, :, None], 1), mask=chunk_valid[:, None])
        previous = hs - inputs  # decay_s * h_{s-1}

        # adjoint g_s = C_s dy_s + decay_{s+1} g_{s+1}; the chunk's last row takes the carry instead.
        # decay_{s+1} is recomputed from a load shifted by one step (cheaper than moving the tile)
        next_mask = chunk_mask & (chunk * BLOCK_T + rows + 1 < length)[:, None]  # a padded step has decay 1
        next_frames = tl.where(reverse, chunk_frames - 1, chunk_frames + 1)
        next_delta = tl.load(delta_ptr + next_frames[:, None] * s_dt + channels[None, :] * s_dc, mask=next_mask, other=0.0)
        next_delta, _ = _step_sizes(next_delta, bias, next_mask, HAS_BIAS, SOFTPLUS)
        next_decay = tl.where(last_row, 0.0, tl.exp(next_delta[:, :, None] * A[None, :, :]))
        sources = C[:, None, :] * grad_y[:, :, None] + tl.where(last_row, carry[None, :, :], 0.0)
        _, adjoint = tl.associative_scan((next_decay, sources), 0, _affine_combine, reverse=True)
        carry = tl.sum(tl.where((rows == 0)[:, None, None], decay * adjoint, 0.0), 0)

        grad_log_decay = adjoint * previous  # g_s * decay_s * h_{s-1}
        grad_A += tl.sum(grad_log_decay * delta[:, :, None], 0)
        grad_delta_u = tl.sum(adjoint * B[:, None, :], 2)
        grad_delta = tl.sum(grad_log_decay * A[None, :, :], 2) + grad_delta_u * u
        tl.store(grad_B_ptr + BC_offsets, tl.sum(adjoint * (delta * u)[:, :, None], 1), mask=chunk_valid[:, None])
        grad_u = grad_delta_u * delta + grad_y * D[None, :]
        if HAS_D:
            grad_D += tl.sum(grad_y * u, 0)
        if SOFTPLUS:
            grad_delta = grad_delta * tl.sigmoid(delta_raw)
        grad_delta = tl.where(chunk_mask, grad_delta, 0.0)
        grad_bias += tl.sum(grad_delta, 0)
        offsets = chunk_frames[:, None] * s_gut + channels[None, :] * s_guc
        tl.store(grad_u_ptr + offsets, grad_u.to(grad_u_ptr.dtype.element_ty), mask=chunk_mask)
        tl.store(grad_delta_ptr + offsets, grad_delta.to(grad_delta_ptr.dtype.element_ty), mask=chunk_mask)

    per_batch = batch * total_channels
    tl.store(grad_A_ptr + per_batch * N + state_offsets, grad_A, mask=channel_mask[:, None])
    tl.store(grad_D_ptr + per_batch + channels, grad_D, mask=channel_mask)
    tl.store(grad_bias_ptr + per_batch + channels, grad_bias, mask=channel_mask)
    tl.store(grad_h0_ptr + per_batch * N + state_offsets, carry, mask=channel_mask[:, None])


def _strides(tensor, count):
    return tuple(tensor.stride()) if tensor is not None else (0,) * count


@torch.library.custom_op("mamba_asr::directional_scan_fwd", mutates_args=())
def directional_scan_fwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor],
    z: Optional[Tensor], lengths: Tensor, initial_state: Optional[Tensor], directions: int, scale: float,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward kernel: out (batch, time, dim) in u's dtype, the last states and the chunk checkpoints."""
    batch, time, channels = u.shape
    dim, state = channels // directions, A.shape[1]
    bidirectional = directions == 2
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    out = torch.zeros(batch, time, dim, device=u.device, dtype=torch.float32 if bidirectional else u.dtype)
    last = u.new_empty(batch, channels, state, dtype=torch.float32)
    chunks = triton.cdiv(time, BLOCK_T)
    checkpoints = u.new_empty(batch, chunks, channels, state, dtype=torch.float32)
    grid = (triton.cdiv(dim, FORWARD["BLOCK_D"]), batch, directions)
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D, delta_bias, z, lengths, h0, out, last, checkpoints,
        dim, chunks, *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *_strides(z, 3), *out.stride(),
        scale, N=state, BLOCK_T=BLOCK_T, BIDIRECTIONAL=bidirectional,
        HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, HAS_Z=z is not None,
        HAS_H0=h0 is not None, ATOMIC_OUT=bidirectional, **FORWARD,
    )
    return out.to(u.dtype), last, checkpoints


@directional_scan_fwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, z, lengths, initial_state, directions, scale, delta_softplus):
    batch, time, channels = u.shape
    state = A.shape[1]
    out = u.new_empty(batch, time, channels // directions)
    last = u.new_empty(batch, channels, state, dtype=torch.float32)
    return out, last, u.new_empty(batch, triton.cdiv(time, BLOCK_T), channels, state, dtype=torch.float32)


@torch.library.custom_op("mamba_asr::directional_scan_bwd", mutates_args=())
def directional_scan_bwd(
    grad_out: Tensor, grad_last: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], delta_bias: Optional[Tensor], z: Optional[Tensor], lengths: Tensor, checkpoints: Tensor,
    directions: int, scale: float, delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward kernel: gradients of u, delta, A, B, C, D, delta_bias, z and the initial state (the
    optional ones as empty tensors when their input is None)."""
    batch, time, channels = u.shape
    dim, state = channels // directions, A.shape[1]
    bidirectional = directions == 2
    blocks = triton.cdiv(dim, BACKWARD["BLOCK_D"])
    grad_u = torch.zeros(batch, time, channels, device=u.device, dtype=u.dtype)
    grad_delta = torch.zeros(batch, time, channels, device=u.device, dtype=delta.dtype)
    grad_B = torch.zeros(blocks, batch, time, B.shape[2], state, device=u.device, dtype=torch.float32)
    grad_C = torch.zeros_like(grad_B)
    grad_z = None
    if z is not None:
        grad_z = torch.zeros(batch, time, dim, device=u.device, dtype=torch.float32 if bidirectional else z.dtype)
    grad_A = u.new_empty(batch, channels, state, dtype=torch.float32)
    grad_D = u.new_empty(batch, channels, dtype=torch.float32)
    grad_bias = torch.empty_like(grad_D)
    grad_h0 = torch.empty_like(grad_A)
    _scan_bwd_kernel[(blocks, batch, directions)](
        u, delta, A, B, C, D, delta_bias, z, lengths, checkpoints, grad_out,
        grad_last.float().contiguous() if grad_last is not None else None,
        grad_u, grad_delta, grad_B, grad_C, grad_z, grad_A, grad_D, grad_bias, grad_h0,
        dim, checkpoints.shape[1],
        *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *_strides(z, 3), *grad_out.stride(),
        *grad_u.stride(), *grad_B.stride(), *_strides(grad_z, 3),
        scale, N=state, BLOCK_T=BLOCK_T, BIDIRECTIONAL=bidirectional,
        HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, HAS_Z=z is not None,
        HAS_GRAD_LAST=grad_last is not None, **BACKWARD,
    )
    empty = u.new_empty(0)
    return (
        grad_u,
        grad_delta,
        grad_A.sum(0),
        grad_B.sum(0).to(B.dtype),
        grad_C.sum(0).to(C.dtype),
        grad_D.sum(0) if D is not None else empty,
        grad_bias.sum(0) if delta_bias is not None else empty,
        grad_z.to(z.dtype) if z is not None else empty,
        grad_h0,
    )


@directional_scan_bwd.register_fake
def _(grad_out, grad_last, u, delta, A, B, C, D, delta_bias, z, lengths, checkpoints, directions, scale,
      delta_softplus):
    empty = u.new_empty(0)
    batch, channels, state = u.shape[0], u.shape[2], A.shape[1]
    return (
        torch.empty_like(u),
        torch.empty_like(delta),
        torch.empty_like(A),
        torch.empty_like(B),
        torch.empty_like(C),
        torch.empty_like(D) if D is not None else empty,
        torch.empty_like(delta_bias) if delta_bias is not None else empty,
        torch.empty_like(z) if z is not None else empty,
        u.new_empty(batch, channels, state, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, z, lengths, initial_state, directions, scale, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, z, lengths, output[2])
    ctx.directions, ctx.scale, ctx.delta_softplus = directions, scale, delta_softplus
    ctx.optional = (D is not None, delta_bias is not None, z is not None, initial_state is not None)


def _backward(ctx, grad_out, grad_last, grad_checkpoints):
    u, delta, A, B, C, D, delta_bias, z, lengths, checkpoints = ctx.saved_tensors
    grads = directional_scan_bwd(
        grad_out, grad_last, u, delta, A, B, C, D, delta_bias, z, lengths, checkpoints,
        ctx.directions, ctx.scale, ctx.delta_softplus,
    )
    grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_bias, grad_z, grad_h0 = grads
    has_D, has_bias, has_z, has_h0 = ctx.optional
    return (
        grad_u, grad_delta, grad_A, grad_B, grad_C,
        grad_D if has_D else None, grad_bias if has_bias else None, grad_z if has_z else None,
        None, grad_h0 if has_h0 else None, None, None, None,
    )


directional_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


def triton_directional_scan(u, delta, A, B, C, D, delta_bias, z, lengths, initial_state, directions, scale,
                            delta_softplus):
    """:func:`modules.mamba.scan.directional_scan` on the Triton kernels; returns (out, last_state)."""
    state = A.shape[1]
    if state & (state - 1):
        raise ValueError(f"the Triton scan needs a state size that is a power of two, not {state}")
    A = A.float().contiguous()
    D = D.float().contiguous() if D is not None else None
    delta_bias = delta_bias.float().contiguous() if delta_bias is not None else None
    out, last, _ = directional_scan_fwd(
        u, delta, A, B, C, D, delta_bias, z, lengths, initial_state, directions, float(scale), delta_softplus
    )
    return out, last
