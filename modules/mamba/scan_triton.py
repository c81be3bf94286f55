"""Our Triton selective scan: both directions of a BiMamba in one launch, any (batch, time, channels) strides.

Computes :func:`modules.mamba.scan.directional_scan` (the specification is there): per direction g and
channel d, ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = <C_t, h_t> + D u_t``, then
``out = scale * sum_g y_g * silu(z)`` at each row's valid frames and 0 at padded ones. Direction 1 of
a bidirectional scan runs backwards inside each row's own length: its program maps scan step ``s``
to frame ``length - 1 - s`` in every load and store, so nothing is gathered, flipped or transposed.
softplus(delta + bias), the D skip, the SiLU(z) gate and the mean of the two directions are fused.

One program scans one (channel block, utterance, direction) through time, one frame per step. Its
lanes run along the channels and each thread keeps all N states of its channel in float32 registers,
so the sums over states (``<C_t, h_t>`` and the backward's sums) never leave a thread and every load
of u, delta, z is a coalesced row of consecutive channels. The forward pass keeps the state every
``BLOCK_T`` frames. The backward pass walks those chunks in reverse: it recomputes a chunk's states
from its checkpoint, keeping every other one in a small per-program scratch buffer, then runs the
adjoint recurrence ``g_s = C_s dy_s + exp(delta_{s+1} A) g_{s+1}`` frame by frame backwards, a pair of
frames a stored state (the odd frame's state is one step on from it). Each frame's loads are issued a
frame ahead. Gradients shared across channels (B, C) are summed over the block's lanes and written per
channel block, those shared across the batch (A, D, delta bias) per utterance, and the caller sums them.
When a launch would have few programs (long utterances in small batches), the backward splits each row
into time segments walked at once: the adjoint recurrence is linear, so a first small kernel walks each
segment from a zero adjoint (what it sends back, and the sum of its step sizes, whose exponential carries
any adjoint through it) and each segment's program starts from the later segments' carries.

Padded steps have step size 0, an identity step (decay 1, no input): outputs and gradients there are
0 and each row's last state is the state after its own last frame. With ``TRITON_INTERPRET=1`` the
kernels run on CPU tensors, which is how CI tests them.

The passes are registered as custom ops, which ``torch.compile`` traces; eager calls run the same
functions through an autograd Function instead, without the ops' dispatch (:mod:`.eager_autograd`).
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .eager_autograd import eager_autograd, pick

# Frames between the forward's state checkpoints; the backward recomputes one such chunk at a time.
# 8 is 10 % faster in the backward (`bench/scan_kernels.py --sweep`) but doubles the checkpoints'
# memory (float32, batch x time / BLOCK_T x state x channels a layer).
BLOCK_T = 16
# Channels, warps and state parts (SPLIT programs share a channel block) per program of each pass, from
# `bench/scan_kernels.py --sweep` on an H200: one warp of 32 channels was the fastest at every shape;
# splitting the states in two gains 2-5 % in the forward and loses in the backward (atomics).
# An optional ``maxnreg`` caps the registers a thread. The backward needs 255 uncapped, so 8 one-warp
# programs share a multiprocessor; capped at 224 (9 share it, at 12 spilled loads and stores) it was 3-5 %
# faster at all three shapes of the sweep (same-process A/B, H200: 1.486 -> 1.412 ms at CTC-large 12 s).
FORWARD = dict(BLOCK_D=32, num_warps=1, SPLIT=2)
BACKWARD = dict(BLOCK_D=32, num_warps=1, SPLIT=1, maxnreg=224)
# A backward launch of fewer programs than SEGMENT_BELOW (long rows in small batches: 4 one-warp programs
# a multiprocessor of an H200) splits each row into time segments, walked at once from the adjoints the
# later segments send back, to about SEGMENTED_PROGRAMS programs. Same-process A/B on an H200, forward +
# backward at CTC-large: 60 s (448 programs) 2.97 -> 2.26 ms, 120 s (224) 5.63 -> 3.08 ms; 30 s (896)
# was fastest unsplit (1.79 ms; 2.17 in 2 segments).
SEGMENT_BELOW = 528
SEGMENTED_PROGRAMS = 4224
LOG2_E = tl.constexpr(1.4426950408889634)
LN_2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _is_reversed(direction, BIDIRECTIONAL: tl.constexpr):
    """Direction 1 of a bidirectional scan runs backwards in time."""
    if BIDIRECTIONAL:
        return direction == 1
    else:
        return direction < 0


@triton.jit
def _parameters(A_ptr, D_ptr, bias_ptr, channels, channel_mask, state_offsets, BLOCK_D: tl.constexpr,
                HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A log2(e) (N, BLOCK_D), D and the step-size bias (BLOCK_D,) of one channel block; zeros where absent."""
    A = tl.load(A_ptr + state_offsets, mask=channel_mask[None, :], other=0.0) * LOG2_E  # exp(x A) = exp2(x A log2 e)
    D = tl.zeros([BLOCK_D], tl.float32)
    bias = tl.zeros([BLOCK_D], tl.float32)
    if HAS_D:
        D = tl.load(D_ptr + channels, mask=channel_mask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channels, mask=channel_mask, other=0.0)
    return A, D, bias


@triton.jit
def _frame(step, length, reverse):
    """The frame that scan step ``step`` reads, and whether it is a valid one."""
    return tl.where(reverse, length - 1 - step, step), (step >= 0) & (step < length)


@triton.jit
def _load_step(u_ptr, delta_ptr, B_ptr, C_ptr, frame, valid, channels, channel_mask, states,
               s_ut, s_uc, s_dt, s_dc, s_Bt, s_Bn, s_Ct, s_Cn):
    """One frame's u, raw delta (BLOCK_D,) and B, C (N,), as stored; 0 at padded frames."""
    mask = channel_mask & valid
    u = tl.load(u_ptr + frame * s_ut + channels * s_uc, mask=mask, other=0.0)
    delta = tl.load(delta_ptr + frame * s_dt + channels * s_dc, mask=mask, other=0.0)
    B = tl.load(B_ptr + frame * s_Bt + states * s_Bn, mask=valid, other=0.0)
    C = tl.load(C_ptr + frame * s_Ct + states * s_Cn, mask=valid, other=0.0)
    return u, delta, B, C


@triton.jit
def _load_gate(z_ptr, frame, valid, dims, channel_mask, s_zt, s_zc, HAS_Z: tl.constexpr):
    """One frame's gate z (BLOCK_D,) as stored (0 where absent or padded)."""
    if HAS_Z:
        return tl.load(z_ptr + frame * s_zt + dims * s_zc, mask=channel_mask & valid, other=0.0)
    else:
        return tl.zeros([dims.shape[0]], tl.float32)


@triton.jit
def _walk_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, grad_out_ptr, frame, valid, dims, channels, channel_mask,
                states, s_ut, s_uc, s_dt, s_dc, s_Bt, s_Bn, s_Ct, s_Cn, s_zt, s_zc, s_gt, s_gc, HAS_Z: tl.constexpr):
    """What the backward's walk reads at one frame: u, raw delta, B, C, the output's gradient and z, as stored."""
    u, delta, B, C = _load_step(u_ptr, delta_ptr, B_ptr, C_ptr, frame, valid, channels, channel_mask, states,
                                s_ut, s_uc, s_dt, s_dc, s_Bt, s_Bn, s_Ct, s_Cn)
    grad_y = tl.load(grad_out_ptr + frame * s_gt + dims * s_gc, mask=channel_mask & valid, other=0.0)
    z = _load_gate(z_ptr, frame, valid, dims, channel_mask, s_zt, s_zc, HAS_Z)
    return u, delta, B, C, grad_y, z


@triton.jit
def _step_size(delta_raw, bias, valid, SOFTPLUS: tl.constexpr):
    """softplus(delta + bias) in float32, 0 at padded frames (an identity step); also its argument."""
    delta_raw = delta_raw.to(tl.float32) + bias
    delta = delta_raw
    if SOFTPLUS:
        delta = _softplus(delta_raw)
    return tl.where(valid, delta, 0.0), delta_raw


@triton.jit
def _walk_frame(h_even, ODD: tl.constexpr, loaded, frame, valid, gradients, A, D, bias, scale, dims, channels,
                channel_mask, states, grad_u_ptr, grad_delta_ptr, grad_B_ptr, grad_C_ptr, grad_z_ptr,
                s_gut, s_guc, s_gBt, s_gBn, s_gzt, s_gzc, BIDIRECTIONAL: tl.constexpr, HAS_D: tl.constexpr,
                SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, SPLIT: tl.constexpr):
    """One frame of the backward's walk: writes the gradients of u, delta, B, C and z at ``frame`` and
    returns the sums it carries to the frame before (adjoint, grad_A, grad_D, grad_bias). The walk keeps
    the state after each even frame of a chunk, ``h_even``: an odd frame's state is one step on from it."""
    u, delta_raw, B, C, grad_y, z = loaded
    adjoint, grad_A, grad_D, grad_bias = gradients
    u, B, C, grad_y = u.to(tl.float32), B.to(tl.float32), C.to(tl.float32), grad_y.to(tl.float32) * scale
    mask = channel_mask & valid
    delta, delta_raw = _step_size(delta_raw, bias, valid, SOFTPLUS)
    if ODD:
        previous = tl.math.exp2(delta[None, :] * A) * h_even  # exp(delta A) h_{s-1}
        h = previous + (delta * u)[None, :] * B[:, None]
    else:
        h = h_even
        previous = h - (delta * u)[None, :] * B[:, None]
    if HAS_Z:
        z = z.to(tl.float32)
        sig = tl.sigmoid(z)
        y = tl.sum(h * C[:, None], 0) + D * u
        grad_z = grad_y * y * sig * (1.0 + z * (1.0 - sig))
        grad_z_offsets = grad_z_ptr + frame * s_gzt + dims * s_gzc
        if BIDIRECTIONAL or SPLIT > 1:
            tl.atomic_add(grad_z_offsets, grad_z, mask=mask, sem="relaxed")
        else:
            tl.store(grad_z_offsets, grad_z.to(grad_z_ptr.dtype.element_ty), mask=mask)
        grad_y = grad_y * z * sig
    adjoint += C[:, None] * grad_y[None, :]
    tl.store(grad_C_ptr + frame * s_gBt + states * s_gBn, tl.sum(h * grad_y[None, :], 1), mask=valid)
    tl.store(grad_B_ptr + frame * s_gBt + states * s_gBn, tl.sum(adjoint * (delta * u)[None, :], 1), mask=valid)
    grad_log_decay = adjoint * previous
    grad_A += grad_log_decay * delta[None, :]
    grad_delta_u = tl.sum(adjoint * B[:, None], 0)
    grad_delta = tl.sum(grad_log_decay * A, 0) * LN_2 + grad_delta_u * u
    grad_u = grad_delta_u * delta + grad_y * D
    if HAS_D:
        grad_D += grad_y * u
    if SOFTPLUS:
        grad_delta = grad_delta * tl.sigmoid(delta_raw)
    grad_delta = tl.where(valid, grad_delta, 0.0)
    grad_bias += grad_delta
    offsets = frame * s_gut + channels * s_guc
    if SPLIT > 1:  # sums over the states: each part adds its own
        tl.atomic_add(grad_u_ptr + offsets, grad_u, mask=mask, sem="relaxed")
        tl.atomic_add(grad_delta_ptr + offsets, grad_delta, mask=mask, sem="relaxed")
    else:
        tl.store(grad_u_ptr + offsets, grad_u.to(grad_u_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_delta_ptr + offsets, grad_delta.to(grad_delta_ptr.dtype.element_ty), mask=mask)
    adjoint = tl.math.exp2(delta[None, :] * A) * adjoint
    return adjoint, grad_A, grad_D, grad_bias


@triton.jit
def scan_forward_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, lengths_ptr, h0_ptr,
    out_ptr, last_ptr, checkpoint_ptr,
    DIM,
    s_ub, s_ut, s_uc, s_db, s_dt, s_dc, s_Bb, s_Bt, s_Bg, s_Bn, s_Cb, s_Ct, s_Cg, s_Cn, s_zb, s_zt, s_zc,
    s_ob, s_ot, s_oc, s_kb, s_kk, s_kn,
    scale,
    N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BIDIRECTIONAL: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_H0: tl.constexpr, ATOMIC_OUT: tl.constexpr, SPLIT: tl.constexpr,
):
    # SPLIT programs share a channel block, each scanning N / SPLIT of its states
    block, part = tl.program_id(0) // SPLIT, tl.program_id(0) % SPLIT
    batch, direction = tl.program_id(1), tl.program_id(2)
    length = tl.load(lengths_ptr + batch).to(tl.int32)
    reverse = _is_reversed(direction, BIDIRECTIONAL)
    dims = block * BLOCK_D + tl.arange(0, BLOCK_D)
    channel_mask = dims < DIM
    channels = direction * DIM + dims  # into u, delta, A, D, bias and the states
    states = part * (N // SPLIT) + tl.arange(0, N // SPLIT)
    total_channels = DIM * (1 + BIDIRECTIONAL)
    # (N, BLOCK_D) into A and the states, stored (state, channels): lanes read consecutive channels
    state_offsets = states[:, None] * total_channels + channels[None, :]
    state_mask = channel_mask[None, :]
    A, D, bias = _parameters(A_ptr, D_ptr, bias_ptr, channels, channel_mask, state_offsets, BLOCK_D, HAS_D,
                             HAS_BIAS)
    D = tl.where(part == 0, D, 0.0)  # the parts' outputs are summed: one of them adds the D skip
    u_ptr += batch * s_ub
    delta_ptr += batch * s_db
    B_ptr += batch * s_Bb + direction * s_Bg
    C_ptr += batch * s_Cb + direction * s_Cg
    if HAS_Z:
        z_ptr += batch * s_zb
    out_ptr += batch * s_ob
    checkpoint_ptr += batch * s_kb + states[:, None] * s_kn + channels[None, :]
    if HAS_H0:
        h = tl.load(h0_ptr + batch * total_channels * N + state_offsets, mask=state_mask, other=0.0)
    else:
        h = tl.zeros([N // SPLIT, BLOCK_D], tl.float32)
    # the loads of step s + 1 are issued before step s is computed
    frame, valid = _frame(0, length, reverse)
    u_next, delta_next, B_next, C_next = _load_step(u_ptr, delta_ptr, B_ptr, C_ptr, frame, valid, channels,
                                                    channel_mask, states, s_ut, s_uc, s_dt, s_dc, s_Bt, s_Bn, s_Ct, s_Cn)
    z_next = _load_gate(z_ptr, frame, valid, dims, channel_mask, s_zt, s_zc, HAS_Z)
    for step in range(0, length):
        u, delta_raw, B, C = u_next.to(tl.float32), delta_next, B_next.to(tl.float32), C_next.to(tl.float32)
        z, this_frame = z_next, frame
        frame, valid = _frame(step + 1, length, reverse)
        u_next, delta_next, B_next, C_next = _load_step(u_ptr, delta_ptr, B_ptr, C_ptr, frame, valid, channels,
                                                        channel_mask, states, s_ut, s_uc, s_dt, s_dc, s_Bt, s_Bn, s_Ct, s_Cn)
        z_next = _load_gate(z_ptr, frame, valid, dims, channel_mask, s_zt, s_zc, HAS_Z)
        if step % BLOCK_T == 0:
            tl.store(checkpoint_ptr + (step // BLOCK_T) * s_kk, h, mask=state_mask)
        delta, _ = _step_size(delta_raw, bias, True, SOFTPLUS)
        h = tl.math.exp2(delta[None, :] * A) * h + (delta * u)[None, :] * B[:, None]
        y = tl.sum(h * C[:, None], 0) + D * u
        if HAS_Z:
            z = z.to(tl.float32)
            y = y * z * tl.sigmoid(z)
        y = y * scale
        out_offsets = out_ptr + this_frame * s_ot + dims * s_oc
        if ATOMIC_OUT:
            tl.atomic_add(out_offsets, y, mask=channel_mask, sem="relaxed")
        else:
            tl.store(out_offsets, y.to(out_ptr.dtype.element_ty), mask=channel_mask)
    tl.store(last_ptr + batch * total_channels * N + state_offsets, h, mask=state_mask)


@triton.jit
def scan_adjoint_carry_kernel(
    delta_ptr, A_ptr, C_ptr, bias_ptr, z_ptr, lengths_ptr, grad_out_ptr, carry_ptr, step_sum_ptr,
    DIM, PROGRAMS_PER_SEGMENT, SEGMENT_STEPS,
    s_db, s_dt, s_dc, s_Cb, s_Ct, s_Cg, s_Cn, s_zb, s_zt, s_zc, s_gb, s_gt, s_gc,
    scale,
    N: tl.constexpr, BLOCK_D: tl.constexpr, BIDIRECTIONAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, SPLIT: tl.constexpr,
):
    # one program per (time segment but the first, channel block, state part, utterance, direction): the
    # adjoint its segment sends to the step before it, from a zero adjoint at its end, and the sum of its
    # step sizes (an adjoint entering at its end leaves multiplied by exp(A sum))
    segment = 1 + tl.program_id(0) // PROGRAMS_PER_SEGMENT
    block, part = (tl.program_id(0) % PROGRAMS_PER_SEGMENT) // SPLIT, tl.program_id(0) % SPLIT
    batch, direction = tl.program_id(1), tl.program_id(2)
    length = tl.load(lengths_ptr + batch).to(tl.int32)
    reverse = _is_reversed(direction, BIDIRECTIONAL)
    dims = block * BLOCK_D + tl.arange(0, BLOCK_D)
    channel_mask = dims < DIM
    channels = direction * DIM + dims
    states = part * (N // SPLIT) + tl.arange(0, N // SPLIT)
    total_channels = DIM * (1 + BIDIRECTIONAL)
    state_offsets = states[:, None] * total_channels + channels[None, :]
    A, _D, bias = _parameters(A_ptr, None, bias_ptr, channels, channel_mask, state_offsets, BLOCK_D, False,
                              HAS_BIAS)
    delta_ptr += batch * s_db
    C_ptr += batch * s_Cb + direction * s_Cg
    grad_out_ptr += batch * s_gb
    if HAS_Z:
        z_ptr += batch * s_zb
    adjoint = tl.zeros([N // SPLIT, BLOCK_D], tl.float32)
    step_sum = tl.zeros([BLOCK_D], tl.float32)
    first, end = segment * SEGMENT_STEPS, tl.minimum((segment + 1) * SEGMENT_STEPS, length)
    for back in range(0, end - first):
        frame = _frame(end - 1 - back, length, reverse)[0]
        delta_raw = tl.load(delta_ptr + frame * s_dt + channels * s_dc, mask=channel_mask, other=0.0)
        C = tl.load(C_ptr + frame * s_Ct + states * s_Cn).to(tl.float32)
        grad_y = tl.load(grad_out_ptr + frame * s_gt + dims * s_gc, mask=channel_mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z = _load_gate(z_ptr, frame, True, dims, channel_mask, s_zt, s_zc, HAS_Z).to(tl.float32)
            grad_y = grad_y * z * tl.sigmoid(z)
        delta = _step_size(delta_raw, bias, True, SOFTPLUS)[0]
        adjoint = tl.math.exp2(delta[None, :] * A) * (adjoint + C[:, None] * (grad_y * scale)[None, :])
        step_sum += delta
    offset = (segment - 1) * tl.num_programs(1) + batch
    tl.store(carry_ptr + offset * N * total_channels + state_offsets, adjoint, mask=channel_mask[None, :])
    if part == 0:
        tl.store(step_sum_ptr + offset * total_channels + channels, step_sum, mask=channel_mask)


@triton.jit
def scan_backward_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, lengths_ptr, checkpoint_ptr, scratch_ptr,
    grad_out_ptr, grad_last_ptr, carry_ptr, step_sum_ptr,
    grad_u_ptr, grad_delta_ptr, grad_B_ptr, grad_C_ptr, grad_z_ptr, grad_parameters_ptr, grad_h0_ptr,
    TIME, DIM, PROGRAMS_PER_SEGMENT, SEGMENTS, SEGMENT_CHUNKS,
    s_ub, s_ut, s_uc, s_db, s_dt, s_dc, s_Bb, s_Bt, s_Bg, s_Bn, s_Cb, s_Ct, s_Cg, s_Cn, s_zb, s_zt, s_zc,
    s_kb, s_kk, s_kn, s_gb, s_gt, s_gc,
    s_gub, s_gut, s_guc, s_gBk, s_gBb, s_gBt, s_gBg, s_gBn, s_gzb, s_gzt, s_gzc,
    scale,
    N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BIDIRECTIONAL: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_GRAD_LAST: tl.constexpr, SPLIT: tl.constexpr, SEGMENTED: tl.constexpr,
):
    # SPLIT programs share a channel block, each scanning N / SPLIT of its states; SEGMENTED, each program
    # walks one time segment of SEGMENT_CHUNKS chunks, else its whole row
    if SEGMENTED:
        segment = tl.program_id(0) // PROGRAMS_PER_SEGMENT
    else:
        segment = 0
    block, part = (tl.program_id(0) % PROGRAMS_PER_SEGMENT) // SPLIT, tl.program_id(0) % SPLIT
    batch, direction = tl.program_id(1), tl.program_id(2)
    length = tl.load(lengths_ptr + batch).to(tl.int32)
    reverse = _is_reversed(direction, BIDIRECTIONAL)
    dims = block * BLOCK_D + tl.arange(0, BLOCK_D)
    channel_mask = dims < DIM
    channels = direction * DIM + dims
    states = part * (N // SPLIT) + tl.arange(0, N // SPLIT)
    total_channels = DIM * (1 + BIDIRECTIONAL)
    state_offsets = states[:, None] * total_channels + channels[None, :]
    state_mask = channel_mask[None, :]
    A, D, bias = _parameters(A_ptr, D_ptr, bias_ptr, channels, channel_mask, state_offsets, BLOCK_D, HAS_D,
                             HAS_BIAS)
    D = tl.where(part == 0, D, 0.0)  # the parts' outputs are summed: one of them adds the D skip
    u_ptr += batch * s_ub
    delta_ptr += batch * s_db
    B_ptr += batch * s_Bb + direction * s_Bg
    C_ptr += batch * s_Cb + direction * s_Cg
    if HAS_Z:
        z_ptr += batch * s_zb
        grad_z_ptr += batch * s_gzb
    grad_out_ptr += batch * s_gb
    checkpoint_ptr += batch * s_kb + states[:, None] * s_kn + channels[None, :]
    grad_u_ptr += batch * s_gub
    grad_delta_ptr += batch * s_gub
    # this program's states of one chunk, written by the recomputation and read back in reverse
    program = (direction * tl.num_programs(1) + batch) * tl.num_programs(0) + tl.program_id(0)
    scratch_ptr += (program * (BLOCK_T // 2) * (N // SPLIT) * BLOCK_D + tl.arange(0, N // SPLIT)[:, None] * BLOCK_D
                    + tl.arange(0, BLOCK_D)[None, :])
    # B and C are shared by the channel blocks: each block writes its own partial sums, added by the caller
    grad_B_ptr += block * s_gBk + batch * s_gBb + direction * s_gBg
    grad_C_ptr += block * s_gBk + batch * s_gBb + direction * s_gBg
    if HAS_GRAD_LAST:
        adjoint = tl.load(grad_last_ptr + batch * total_channels * N + state_offsets, mask=state_mask, other=0.0)
    else:
        adjoint = tl.zeros([N // SPLIT, BLOCK_D], tl.float32)  # dL/dh of the step after the one being processed
    padded_end = TIME  # the padded frames' zero gradients are written by the first segment
    if SEGMENTED:
        for back in range(0, SEGMENTS - 1 - segment):  # through the later segments: their carries and decays
            offset = (SEGMENTS - 2 - back) * tl.num_programs(1) + batch
            step_sum = tl.load(step_sum_ptr + offset * total_channels + channels, mask=channel_mask, other=0.0)
            carry = tl.load(carry_ptr + offset * N * total_channels + state_offsets, mask=state_mask, other=0.0)
            adjoint = tl.math.exp2(step_sum[None, :] * A) * adjoint + carry
        padded_end = tl.where(segment == 0, TIME, length)
    grad_A = tl.zeros([N // SPLIT, BLOCK_D], tl.float32)
    grad_D = tl.zeros([BLOCK_D], tl.float32)
    grad_bias = tl.zeros([BLOCK_D], tl.float32)
    gradients = (adjoint, grad_A, grad_D, grad_bias)
    # each frame's loads are issued a frame ahead, in both loops
    first_chunk = segment * SEGMENT_CHUNKS
    end_chunk = tl.minimum(first_chunk + SEGMENT_CHUNKS, tl.cdiv(length, BLOCK_T))
    for back in range(0, end_chunk - first_chunk):
        first = (end_chunk - 1 - back) * BLOCK_T
        # recompute the chunk's states from its checkpoint, keeping those after its even frames
        h = tl.load(checkpoint_ptr + (first // BLOCK_T) * s_kk, mask=state_mask, other=0.0)
        frame_next, valid_next = _frame(first, length, reverse)
        loads_next = _load_step(u_ptr, delta_ptr, B_ptr, C_ptr, frame_next, valid_next, channels, channel_mask, states,
                                s_ut, s_uc, s_dt, s_dc, s_Bt, s_Bn, s_Ct, s_Cn)
        for k in range(0, BLOCK_T):
            u, delta_raw, B, _C = loads_next
            valid = valid_next
            frame_next, valid_next = _frame(first + k + 1, length, reverse)
            loads_next = _load_step(u_ptr, delta_ptr, B_ptr, C_ptr, frame_next, valid_next, channels, channel_mask,
                                    states, s_ut, s_uc, s_dt, s_dc, s_Bt, s_Bn, s_Ct, s_Cn)
            delta = _step_size(delta_raw, bias, valid, SOFTPLUS)[0]
            h = tl.math.exp2(delta[None, :] * A) * h + (delta * u.to(tl.float32))[None, :] * B.to(tl.float32)[:, None]
            if k % 2 == 0:
                tl.store(scratch_ptr + (k // 2) * (N // SPLIT) * BLOCK_D, h)
        # walk it backwards, a pair of frames (odd, then even) at a time, from the state after the even one:
        # adjoint_s = C_s dy_s + exp(delta_{s+1} A) adjoint_{s+1}
        frame_next, valid_next = _frame(first + BLOCK_T - 1, length, reverse)
        loads_next = _walk_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, grad_out_ptr, frame_next, valid_next, dims,
                                 channels, channel_mask, states, s_ut, s_uc, s_dt, s_dc, s_Bt, s_Bn, s_Ct, s_Cn, s_zt,
                                 s_zc, s_gt, s_gc, HAS_Z)
        h_next = tl.load(scratch_ptr + (BLOCK_T // 2 - 1) * (N // SPLIT) * BLOCK_D)
        for pair_back in range(0, BLOCK_T // 2):
            pair = BLOCK_T // 2 - 1 - pair_back
            for parity in tl.static_range(2):
                k = 2 * pair + 1 - parity
                loaded, frame, valid = loads_next, frame_next, valid_next
                frame_next, valid_next = _frame(first + k - 1, length, reverse)
                valid_next = valid_next & (k > 0)  # the chunk's first frame is followed by the previous chunk
                loads_next = _walk_loads(u_ptr, delta_ptr, B_ptr, C_ptr, z_ptr, grad_out_ptr, frame_next, valid_next,
                                         dims, channels, channel_mask, states, s_ut, s_uc, s_dt, s_dc, s_Bt, s_Bn,
                                         s_Ct, s_Cn, s_zt, s_zc, s_gt, s_gc, HAS_Z)
                if parity == 0:
                    h_even = h_next
                else:  # the next pair's state
                    h_next = tl.load(scratch_ptr + tl.maximum(pair - 1, 0) * (N // SPLIT) * BLOCK_D)
                gradients = _walk_frame(h_even, parity == 0, loaded, frame, valid, gradients, A, D, bias, scale,
                                        dims, channels, channel_mask, states, grad_u_ptr, grad_delta_ptr, grad_B_ptr,
                                        grad_C_ptr, grad_z_ptr, s_gut, s_guc, s_gBt, s_gBn, s_gzt, s_gzc,
                                        BIDIRECTIONAL, HAS_D, SOFTPLUS, HAS_Z, SPLIT)
    adjoint, grad_A, grad_D, grad_bias = gradients

    # padded frames get zero gradients (with SPLIT > 1, those of u and delta are zeroed by the caller)
    for frame in range(length, padded_end):
        tl.store(grad_B_ptr + frame * s_gBt + states * s_gBn, tl.zeros([N // SPLIT], tl.float32))
        tl.store(grad_C_ptr + frame * s_gBt + states * s_gBn, tl.zeros([N // SPLIT], tl.float32))
        if SPLIT == 1:
            tl.store(grad_u_ptr + frame * s_gut + channels * s_guc, tl.zeros([BLOCK_D], tl.float32), mask=channel_mask)
            tl.store(grad_delta_ptr + frame * s_gut + channels * s_guc, tl.zeros([BLOCK_D], tl.float32),
                     mask=channel_mask)
    # this utterance's (and segment's and state part's) share of the gradients of A, D and the bias:
    # (N + 2, channels)
    grad_parameters_ptr += ((segment * SPLIT + part) * tl.num_programs(1) + batch) * (N + 2) * total_channels
    tl.store(grad_parameters_ptr + state_offsets, grad_A, mask=state_mask)
    tl.store(grad_parameters_ptr + N * total_channels + channels, tl.where(part == 0, grad_D, 0.0), mask=channel_mask)
    tl.store(grad_parameters_ptr + (N + 1) * total_channels + channels, grad_bias, mask=channel_mask)
    if SEGMENTED:
        state_mask = state_mask & (segment == 0)  # the adjoint before the row's first frame
    tl.store(grad_h0_ptr + batch * total_channels * N + state_offsets, adjoint, mask=state_mask)


def _strides(tensor, count):
    return tuple(tensor.stride()) if tensor is not None else (0,) * count


def _scan_forward(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], delta_bias: Optional[Tensor],
    z: Optional[Tensor], lengths: Tensor, initial_state: Optional[Tensor], directions: int, scale: float,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward kernel: out (batch, time, dim) in u's dtype, the last states and the chunk checkpoints.
    A is transposed, (state, channels), float32 and contiguous, as the kernels read it (so are the
    backward's and its gradient)."""
    batch, time, channels = u.shape
    dim, state = channels // directions, A.shape[0]
    bidirectional = directions == 2
    # the kernels keep states as (state, channels): a warp's lanes read consecutive channels
    h0 = initial_state.float().transpose(1, 2).contiguous() if initial_state is not None else None
    split = min(FORWARD["SPLIT"], state)
    atomic = bidirectional or split > 1  # several programs add into each output
    out = torch.zeros(batch, time, dim, device=u.device, dtype=torch.float32 if atomic else u.dtype)
    last = u.new_empty(batch, state, channels, dtype=torch.float32)
    checkpoints = u.new_empty(batch, triton.cdiv(time, BLOCK_T), state, channels, dtype=torch.float32)
    grid = (triton.cdiv(dim, FORWARD["BLOCK_D"]) * split, batch, directions)
    scan_forward_kernel[grid](
        u, delta, A, B, C, D, delta_bias, z, lengths, h0, out, last, checkpoints,
        dim, *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *_strides(z, 3), *out.stride(),
        *checkpoints.stride()[:3],
        scale, N=state, BLOCK_T=BLOCK_T, BIDIRECTIONAL=bidirectional,
        HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, HAS_Z=z is not None,
        HAS_H0=h0 is not None, ATOMIC_OUT=atomic, BLOCK_D=FORWARD["BLOCK_D"], num_warps=FORWARD["num_warps"],
        maxnreg=FORWARD.get("maxnreg"), SPLIT=split,
    )
    return out.to(u.dtype), last.transpose(1, 2), checkpoints  # (batch, channels, state), a view: no copy


directional_scan_fwd = torch.library.custom_op("mamba_asr::directional_scan_fwd", mutates_args=())(_scan_forward)


@directional_scan_fwd.register_fake
def _(u, delta, A, B, C, D, delta_bias, z, lengths, initial_state, directions, scale, delta_softplus):
    batch, time, channels = u.shape
    state = A.shape[0]
    out = u.new_empty(batch, time, channels // directions)
    last = u.new_empty(batch, state, channels, dtype=torch.float32).transpose(1, 2)
    return out, last, u.new_empty(batch, triton.cdiv(time, BLOCK_T), state, channels, dtype=torch.float32)


def _time_segments(chunks, programs):
    """(segments, chunks a segment) of the backward: one segment of all the chunks from SEGMENT_BELOW
    programs up, else as many segments as bring the launch to about SEGMENTED_PROGRAMS programs."""
    if programs >= SEGMENT_BELOW:
        return 1, chunks
    segment_chunks = triton.cdiv(chunks, max(1, min(chunks, SEGMENTED_PROGRAMS // programs)))
    return triton.cdiv(chunks, segment_chunks), segment_chunks


def _adjoint_carries(grad_out, delta, A_transposed, C, delta_bias, z, lengths, directions, scale, delta_softplus,
                     segments, segment_chunks):
    """What each time segment but the first sends back to the one before it, (segments - 1, batch, state,
    channels), and the sums of its step sizes, (segments - 1, batch, channels): float32; None with one
    segment."""
    if segments == 1:
        return None, None
    batch, time, channels = delta.shape
    dim, state = channels // directions, A_transposed.shape[0]
    block_d, split = BACKWARD["BLOCK_D"], min(BACKWARD["SPLIT"], state)
    carries = delta.new_empty(segments - 1, batch, state, channels, dtype=torch.float32)
    step_sums = delta.new_empty(segments - 1, batch, channels, dtype=torch.float32)
    programs = triton.cdiv(dim, block_d) * split
    scan_adjoint_carry_kernel[((segments - 1) * programs, batch, directions)](
        delta, A_transposed, C, delta_bias, z, lengths, grad_out, carries, step_sums,
        dim, programs, segment_chunks * BLOCK_T,
        *delta.stride(), *C.stride(), *_strides(z, 3), *grad_out.stride(),
        scale, N=state, BLOCK_D=block_d, BIDIRECTIONAL=directions == 2, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, HAS_Z=z is not None, SPLIT=split, num_warps=BACKWARD["num_warps"],
    )
    return carries, step_sums


def _scan_backward(
    grad_out: Tensor, grad_last: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Optional[Tensor], delta_bias: Optional[Tensor], z: Optional[Tensor], lengths: Tensor, checkpoints: Tensor,
    directions: int, scale: float, delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward kernel: gradients of u, delta, B and C stacked (batch, time, 2, directions, state), z
    (empty without a gate) and the initial state, and those of A (transposed, as A is), D and delta_bias
    stacked in one (state + 2, channels) tensor (a custom op's outputs may not be views of one another:
    :func:`_backward_through` splits the stacks)."""
    batch, time, channels = u.shape
    dim, state = channels // directions, A.shape[0]
    bidirectional = directions == 2
    block_d, split = BACKWARD["BLOCK_D"], min(BACKWARD["SPLIT"], state)
    blocks = triton.cdiv(dim, block_d)
    if split > 1:  # the state parts add into them
        grad_u = torch.zeros(batch, time, channels, device=u.device, dtype=torch.float32)
        grad_delta = torch.zeros_like(grad_u)
    else:  # the kernel writes every frame, padded ones included
        grad_u = u.new_empty(batch, time, channels)
        grad_delta = delta.new_empty(batch, time, channels)
    # B and C are shared by the channel blocks: each block writes its partial sums at every frame (zeros at
    # padded ones), added below; B's and C's in one buffer, so that one sum and one cast serve both
    grad_BC = u.new_empty(blocks, batch, time, 2, B.shape[2], state, dtype=torch.float32)
    grad_B, grad_C = grad_BC.unbind(3)
    grad_z = None
    if z is not None:
        atomic = bidirectional or split > 1
        grad_z = torch.zeros(batch, time, dim, device=u.device, dtype=torch.float32 if atomic else z.dtype)
    segments, segment_chunks = _time_segments(triton.cdiv(time, BLOCK_T), blocks * split * batch * directions)
    # per time segment, state part and utterance: the gradients of A (transposed), D and the bias, summed
    # below; a part writes only its own states of A
    grad_parameters = (torch.zeros if split > 1 else torch.empty)(
        segments * split, batch, state + 2, channels, device=u.device, dtype=torch.float32)
    grad_h0 = u.new_empty(batch, state, channels, dtype=torch.float32)
    # the states after every other frame of one chunk, per program
    scratch = u.new_empty(segments * blocks * split * batch * directions, BLOCK_T // 2, state // split, block_d,
                          dtype=torch.float32)
    carries, step_sums = _adjoint_carries(grad_out, delta, A, C, delta_bias, z, lengths, directions, scale,
                                          delta_softplus, segments, segment_chunks)
    scan_backward_kernel[(segments * blocks * split, batch, directions)](
        u, delta, A, B, C, D, delta_bias, z, lengths, checkpoints, scratch, grad_out,
        grad_last.float().transpose(1, 2).contiguous() if grad_last is not None else None, carries, step_sums,
        grad_u, grad_delta, grad_B, grad_C, grad_z, grad_parameters, grad_h0,
        time, dim, blocks * split, segments, segment_chunks,
        *u.stride(), *delta.stride(), *B.stride(), *C.stride(), *_strides(z, 3), *checkpoints.stride()[:3],
        *grad_out.stride(),
        *grad_u.stride(), *grad_B.stride(), *_strides(grad_z, 3),
        scale, N=state, BLOCK_T=BLOCK_T, BIDIRECTIONAL=bidirectional,
        HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, HAS_Z=z is not None,
        HAS_GRAD_LAST=grad_last is not None, BLOCK_D=block_d, num_warps=BACKWARD["num_warps"],
        maxnreg=BACKWARD.get("maxnreg"), SPLIT=split,
        SEGMENTED=segments > 1,
    )
    return (
        grad_u.to(u.dtype),
        grad_delta.to(delta.dtype),
        grad_BC.sum(0).to(B.dtype),
        grad_z.to(z.dtype) if z is not None else u.new_empty(0),
        grad_h0.transpose(1, 2),
        grad_parameters.sum((0, 1)),
    )


directional_scan_bwd = torch.library.custom_op("mamba_asr::directional_scan_bwd", mutates_args=())(_scan_backward)


@directional_scan_bwd.register_fake
def _(grad_out, grad_last, u, delta, A, B, C, D, delta_bias, z, lengths, checkpoints, directions, scale,
      delta_softplus):
    batch, channels, state = u.shape[0], u.shape[2], A.shape[0]
    return (  # the real gradients are fresh contiguous tensors, whatever the inputs' strides
        u.new_empty(u.shape),
        delta.new_empty(delta.shape),
        B.new_empty(B.shape[0], B.shape[1], 2, *B.shape[2:]),
        z.new_empty(z.shape) if z is not None else u.new_empty(0),
        u.new_empty(batch, state, channels, dtype=torch.float32).transpose(1, 2),
        A.new_empty(state + 2, channels),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, z, lengths, initial_state, directions, scale, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, z, lengths, output[2])
    ctx.directions, ctx.scale, ctx.delta_softplus = directions, scale, delta_softplus
    ctx.optional = (D is not None, delta_bias is not None, z is not None, initial_state is not None)
    ctx.mark_non_differentiable(output[2])  # the checkpoints only serve the backward
    ctx.set_materialize_grads(False)  # an unused output gets None, not a tensor of zeros to read


def _backward_through(scan_backward):
    """The scan's backward formula, running ``scan_backward`` (the custom op or its plain function)."""

    def backward(ctx, grad_out, grad_last, grad_checkpoints):
        u, delta, A, B, C, D, delta_bias, z, lengths, checkpoints = ctx.saved_tensors
        if grad_out is None:  # only the last state was used
            grad_out = u.new_zeros(u.shape[0], u.shape[1], u.shape[2] // ctx.directions)
        grads = scan_backward(
            grad_out, grad_last, u, delta, A, B, C, D, delta_bias, z, lengths, checkpoints,
            ctx.directions, ctx.scale, ctx.delta_softplus,
        )
        grad_u, grad_delta, grad_BC, grad_z, grad_h0, grad_parameters = grads
        grad_B, grad_C = grad_BC.unbind(2)
        grad_A, grad_D, grad_bias = grad_parameters.split([A.shape[0], 1, 1])
        has_D, has_bias, has_z, has_h0 = ctx.optional
        return (
            grad_u, grad_delta, grad_A, grad_B, grad_C,
            grad_D.squeeze(0) if has_D else None, grad_bias.squeeze(0) if has_bias else None,
            grad_z if has_z else None,
            None, grad_h0 if has_h0 else None, None, None, None,
        )

    return backward


directional_scan_fwd.register_autograd(_backward_through(directional_scan_bwd), setup_context=_setup_context)
_eager_scan = eager_autograd(_scan_forward, _setup_context, _backward_through(_scan_backward))


def triton_directional_scan(u, delta, A, B, C, D, delta_bias, z, lengths, initial_state, directions, scale,
                            delta_softplus):
    """:func:`modules.mamba.scan.directional_scan` on the Triton kernels; returns (out, last_state)."""
    state = A.shape[1]
    if state & (state - 1):
        raise ValueError(f"the Triton scan needs a state size that is a power of two, not {state}")
    A = A.float().t().contiguous()  # once, for both passes; the gradient flows back through the transpose
    D = D.float().contiguous() if D is not None else None
    delta_bias = delta_bias.float().contiguous() if delta_bias is not None else None
    out, last, _ = pick(directional_scan_fwd, _eager_scan)(
        u, delta, A, B, C, D, delta_bias, z, lengths, initial_state, directions, float(scale), delta_softplus
    )
    return out, last
