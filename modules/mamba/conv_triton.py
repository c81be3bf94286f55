"""Our Triton depthwise convolutions over the (batch, time, channels) layout of the projections: the
Mamba-1 mixers' convolution + SiLU, both directions of a BiMamba in one launch, and the plain depthwise
convolution of the ConMamba layer's convolution module.

Direction 0 reads ``LEFT`` frames before each frame, ``out_t = act(b + sum_k w_k x_{t-LEFT+k})``: causal
with ``LEFT = W - 1`` (the mixers'), centred with ``(W - 1) // 2`` (the convolution module's). Direction
1 (bidirectional mixers) is the causal convolution of each row reversed inside its own length, which in
time order reads ``x_{t+W-1-k}``: its taps are used as they are, nothing is flipped, gathered or
transposed. Frames at or past a row's length read as 0. For ``x`` (batch, time, dim) and ``weight``
(directions * dim, W) the output is (batch, time, directions * dim), direction g in channel block g:
what ``F.conv1d`` computes on the transposed, padded and masked input, in one kernel instead of about
ten operations and their gradients.

The backward pass recomputes the pre-activations from x (W loads a tile), so nothing but x is kept. It
runs as two kernels: one walks each row's channel block through time (a wide convolution's, one tile
of frames a program), storing the gradient of the pre-activations (with SiLU; without, that is the
output's gradient) and summing the taps' and bias's gradients in registers (one atomic add a
program); the other gathers each input frame's gradient from the W outputs it feeds, in both
directions.
With ``TRITON_INTERPRET=1`` the kernels run on CPU tensors, which is how CI tests them.

The passes are registered as custom ops, which ``torch.compile`` traces; eager calls run the same
functions through an autograd Function instead, without the ops' dispatch (:mod:`.eager_autograd`).
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .eager_autograd import eager_autograd, pick

# Frames and channels of a program's tile, and warps of the first backward kernel (the others take
# Triton's default of 4), from `bench/conv_kernels.py --sweep` on an H200: forward + backward of both
# convolutions at CTC-large 12 s took 0.28 and 0.24 ms against 0.49 and 0.42 with 32 x 64 tiles and 4 warps.
BLOCK_T = 64
BLOCK_C = 32
GRADIENT_WARPS = 2


@triton.jit
def _tap(x_ptr, t, k, sign, length, channels, channel_mask, s_xt, s_xc, LEFT: tl.constexpr):
    """x at frame t + sign * (k - LEFT) for a tile of frames t (BLOCK_T,) and channels, float32; 0
    outside [0, length)."""
    frame = t + sign * (k - LEFT)
    valid = (frame >= 0) & (frame < length)
    x = tl.load(x_ptr + frame[:, None] * s_xt + channels[None, :] * s_xc,
                mask=valid[:, None] & channel_mask[None, :], other=0.0)
    return x.to(tl.float32)


@triton.jit
def _preactivation(x_ptr, w_ptr, bias, t, sign, length, channels, weight_channels, channel_mask, s_xt, s_xc,
                   WIDTH: tl.constexpr, LEFT: tl.constexpr):
    """b + sum_k w_k x_{t + sign (k - LEFT)} for a tile, float32."""
    pre = tl.zeros([t.shape[0], channels.shape[0]], tl.float32) + bias[None, :]
    for k in tl.static_range(WIDTH):
        w = tl.load(w_ptr + weight_channels * WIDTH + k, mask=channel_mask, other=0.0).to(tl.float32)
        pre += w[None, :] * _tap(x_ptr, t, k, sign, length, channels, channel_mask, s_xt, s_xc, LEFT)
    return pre


@triton.jit
def _grad_preactivation(grad_out_ptr, pre, t, TIME, weight_channels, channel_mask, s_gt, s_gc):
    """dL/d(pre-activation) at frames t (0 outside the sequence): grad_out * silu'(pre)."""
    valid = (t >= 0) & (t < TIME)
    grad_out = tl.load(grad_out_ptr + t[:, None] * s_gt + weight_channels[None, :] * s_gc,
                       mask=valid[:, None] & channel_mask[None, :], other=0.0).to(tl.float32)
    sig = tl.sigmoid(pre)
    return grad_out * sig * (1.0 + pre * (1.0 - sig))


@triton.jit
def _direction_setup(b_ptr, lengths_ptr, batch, direction, channels, DIM, HAS_BIAS: tl.constexpr):
    """A program's channel mask, row length, reading direction (+1 causal, -1 anti-causal), channels
    into the taps and bias (float32, 0 without one)."""
    channel_mask = channels < DIM
    length = tl.load(lengths_ptr + batch).to(tl.int32)
    sign = 1 - 2 * direction  # direction 1 reads the frames after t
    weight_channels = direction * DIM + channels
    bias = tl.zeros([channels.shape[0]], tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + weight_channels, mask=channel_mask, other=0.0).to(tl.float32)
    return channel_mask, length, sign, weight_channels, bias


@triton.jit
def conv_forward_kernel(
    x_ptr, w_ptr, b_ptr, lengths_ptr, out_ptr, TIME, DIM, s_xb, s_xt, s_xc, s_ob, s_ot, s_oc,
    WIDTH: tl.constexpr, LEFT: tl.constexpr, SILU: tl.constexpr, DIRECTIONS: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # one program: a tile of frames and channels of one row, in one direction
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    batch, direction = tl.program_id(2) // DIRECTIONS, tl.program_id(2) % DIRECTIONS
    channel_mask, length, sign, weight_channels, bias = _direction_setup(b_ptr, lengths_ptr, batch, direction,
                                                                          channels, DIM, HAS_BIAS)
    out = _preactivation(x_ptr + batch * s_xb, w_ptr, bias, t, sign, length, channels, weight_channels, channel_mask,
                         s_xt, s_xc, WIDTH, LEFT)
    if SILU:
        out = out * tl.sigmoid(out)
    tl.store(out_ptr + batch * s_ob + t[:, None] * s_ot + weight_channels[None, :] * s_oc,
             out.to(out_ptr.dtype.element_ty), mask=(t < TIME)[:, None] & channel_mask[None, :])


@triton.jit
def conv_grad_preactivation_kernel(
    x_ptr, w_ptr, b_ptr, lengths_ptr, grad_out_ptr, grad_pre_ptr, grad_w_ptr, grad_b_ptr,
    TIME, DIM, FRAMES, s_xb, s_xt, s_xc, s_gb, s_gt, s_gc, s_pb, s_pt, s_pc,
    WIDTH: tl.constexpr, LEFT: tl.constexpr, SILU: tl.constexpr, DIRECTIONS: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # one program: a block of channels of one row in one direction, through FRAMES frames (a multiple of
    # BLOCK_T); with SiLU it stores the gradient of the pre-activations (without, that is the output's
    # gradient as it is), and adds its sums for the taps and the bias once, at the end
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    batch, direction = tl.program_id(2) // DIRECTIONS, tl.program_id(2) % DIRECTIONS
    channel_mask, length, sign, weight_channels, bias = _direction_setup(b_ptr, lengths_ptr, batch, direction,
                                                                          channels, DIM, HAS_BIAS)
    x_ptr += batch * s_xb
    grad_out_ptr += batch * s_gb
    grad_pre_ptr += batch * s_pb
    taps = tl.arange(0, BLOCK_W)
    grad_w = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    grad_b = tl.zeros([BLOCK_C], tl.float32)
    first = tl.program_id(0) * FRAMES
    for start in range(first, tl.minimum(first + FRAMES, TIME), BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        if SILU:
            pre = _preactivation(x_ptr, w_ptr, bias, t, sign, length, channels, weight_channels, channel_mask,
                                 s_xt, s_xc, WIDTH, LEFT)
            grad_pre = _grad_preactivation(grad_out_ptr, pre, t, TIME, weight_channels, channel_mask, s_gt, s_gc)
            tl.store(grad_pre_ptr + t[:, None] * s_pt + weight_channels[None, :] * s_pc, grad_pre,
                     mask=(t < TIME)[:, None] & channel_mask[None, :])
        else:
            grad_pre = tl.load(grad_out_ptr + t[:, None] * s_gt + weight_channels[None, :] * s_gc,
                               mask=(t < TIME)[:, None] & channel_mask[None, :], other=0.0).to(tl.float32)
        for k in tl.static_range(WIDTH):
            x = _tap(x_ptr, t, k, sign, length, channels, channel_mask, s_xt, s_xc, LEFT)
            grad_w += tl.where(taps[:, None] == k, tl.sum(grad_pre * x, 0)[None, :], 0.0)
        grad_b += tl.sum(grad_pre, 0)
    tl.atomic_add(grad_w_ptr + weight_channels[None, :] * WIDTH + taps[:, None], grad_w,
                  mask=(taps < WIDTH)[:, None] & channel_mask[None, :], sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(grad_b_ptr + weight_channels, grad_b, mask=channel_mask, sem="relaxed")


@triton.jit
def conv_grad_input_kernel(
    w_ptr, lengths_ptr, grad_pre_ptr, grad_x_ptr, TIME, DIM, s_pb, s_pt, s_pc, s_dxb, s_dxt, s_dxc,
    WIDTH: tl.constexpr, LEFT: tl.constexpr, DIRECTIONS: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # one program: a tile of frames and channels of one row, both directions (they share x); frame t
    # feeds the outputs at t - sign (k - LEFT) through tap k
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    batch = tl.program_id(2)
    channel_mask = channels < DIM
    length = tl.load(lengths_ptr + batch).to(tl.int32)
    grad_pre_ptr += batch * s_pb
    grad_x = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for direction in tl.static_range(DIRECTIONS):
        sign = 1 - 2 * direction
        weight_channels = direction * DIM + channels
        for k in tl.static_range(WIDTH):
            output_frames = t - sign * (k - LEFT)
            valid = (output_frames >= 0) & (output_frames < TIME)
            grad_pre = tl.load(grad_pre_ptr + output_frames[:, None] * s_pt + weight_channels[None, :] * s_pc,
                               mask=valid[:, None] & channel_mask[None, :], other=0.0).to(tl.float32)
            w = tl.load(w_ptr + weight_channels * WIDTH + k, mask=channel_mask, other=0.0).to(tl.float32)
            grad_x += w[None, :] * grad_pre
    grad_x = tl.where((t < length)[:, None], grad_x, 0.0)  # frames past the length read as 0
    tl.store(grad_x_ptr + batch * s_dxb + t[:, None] * s_dxt + channels[None, :] * s_dxc,
             grad_x.to(grad_x_ptr.dtype.element_ty), mask=(t < TIME)[:, None] & channel_mask[None, :])


def _conv_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lengths: Tensor, directions: int, left: int, silu: bool
) -> Tensor:
    """(batch, time, directions * dim) in x's dtype; see the module docstring."""
    batch, time, dim = x.shape
    out = x.new_empty(batch, time, directions * dim)
    grid = (triton.cdiv(time, BLOCK_T), triton.cdiv(dim, BLOCK_C), batch * directions)
    conv_forward_kernel[grid](
        x, weight, bias, lengths, out, time, dim, *x.stride(), *out.stride(),
        WIDTH=weight.shape[1], LEFT=left, SILU=silu, DIRECTIONS=directions, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
        HAS_BIAS=bias is not None,
    )
    return out


depthwise_conv_fwd = torch.library.custom_op("mamba_asr::depthwise_conv_fwd", mutates_args=())(_conv_forward)


@depthwise_conv_fwd.register_fake
def _(x, weight, bias, lengths, directions, left, silu):
    return x.new_empty(x.shape[0], x.shape[1], directions * x.shape[2])


def _frames_per_gradient_program(time, width):
    """Frames each program of the first backward kernel walks. Narrow taps (the mixers' 4) walk whole
    rows, one atomic add of the sums a row; wide ones (the convolution module's 31) cost 2 x width tile
    loads a tile, so their tiles are spread over programs: a row walk of 280 programs took 0.46 ms at
    CTC-large 12 s on an H200 (RESULTS.md)."""
    return triton.cdiv(time, BLOCK_T) * BLOCK_T if width <= 8 else BLOCK_T


def _conv_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], lengths: Tensor, directions: int, left: int,
    silu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of x, the weight and the bias (empty without a bias)."""
    batch, time, dim = x.shape
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    grad_w = torch.zeros(weight.shape, device=x.device, dtype=torch.float32)
    grad_b = torch.zeros(weight.shape[0], device=x.device, dtype=torch.float32)
    # with SiLU the gradient of the pre-activations is stored by the first kernel; without, it is grad_out
    grad_pre = x.new_empty(batch, time, directions * dim, dtype=torch.float32) if silu else grad_out
    frames = _frames_per_gradient_program(time, weight.shape[1])
    conv_grad_preactivation_kernel[(triton.cdiv(time, frames), triton.cdiv(dim, BLOCK_C), batch * directions)](
        x, weight, bias, lengths, grad_out, grad_pre, grad_w, grad_b, time, dim, frames,
        *x.stride(), *grad_out.stride(), *grad_pre.stride(),
        WIDTH=weight.shape[1], LEFT=left, SILU=silu, DIRECTIONS=directions,
        BLOCK_W=triton.next_power_of_2(weight.shape[1]), BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, HAS_BIAS=bias is not None,
        num_warps=GRADIENT_WARPS,
    )
    conv_grad_input_kernel[(triton.cdiv(time, BLOCK_T), triton.cdiv(dim, BLOCK_C), batch)](
        weight, lengths, grad_pre, grad_x, time, dim, *grad_pre.stride(), *grad_x.stride(),
        WIDTH=weight.shape[1], LEFT=left, DIRECTIONS=directions, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
    )
    grad_b = grad_b.to(bias.dtype) if bias is not None else x.new_empty(0)
    return grad_x, grad_w.to(weight.dtype), grad_b


depthwise_conv_bwd = torch.library.custom_op("mamba_asr::depthwise_conv_bwd", mutates_args=())(_conv_backward)


@depthwise_conv_bwd.register_fake
def _(grad_out, x, weight, bias, lengths, directions, left, silu):
    return torch.empty_like(x, memory_format=torch.contiguous_format), weight.new_empty(weight.shape), (
        bias.new_empty(bias.shape) if bias is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lengths, directions, left, silu = inputs
    ctx.save_for_backward(x, weight, bias, lengths)
    ctx.directions, ctx.left, ctx.silu, ctx.has_bias = directions, left, silu, bias is not None


def _backward_through(conv_backward):
    """The convolution's backward formula, running ``conv_backward`` (the custom op or its plain function)."""

    def backward(ctx, grad_out):
        x, weight, bias, lengths = ctx.saved_tensors
        grad_x, grad_w, grad_b = conv_backward(grad_out, x, weight, bias, lengths, ctx.directions, ctx.left, ctx.silu)
        return grad_x, grad_w, grad_b if ctx.has_bias else None, None, None, None, None

    return backward


depthwise_conv_fwd.register_autograd(_backward_through(depthwise_conv_bwd), setup_context=_setup_context)
_eager_conv = eager_autograd(_conv_forward, _setup_context, _backward_through(_conv_backward))


def _convolve(x, weight, bias, lengths, directions, left, silu):
    bias = bias.contiguous() if bias is not None else None
    return pick(depthwise_conv_fwd, _eager_conv)(x, weight.contiguous(), bias, lengths, directions, left, silu)


def directional_conv_silu(x, weight, bias, lengths, directions):
    """SiLU(depthwise convolution) of x (batch, time, dim) in each direction: (batch, time, directions *
    dim); ``weight`` (directions * dim, width) holds each direction's taps as its own causal
    convolution has them, ``lengths`` (batch,) int32."""
    return _convolve(x, weight, bias, lengths, directions, weight.shape[1] - 1, True)


def depthwise_conv(x, weight, bias, lengths, left):
    """Depthwise convolution of x (batch, time, dim) over ``left`` frames before each frame and width - 1 -
    left after it, no activation (a Conformer convolution module's; ``left`` (width - 1) // 2 centres
    it, width - 1 makes it causal): (batch, time, dim). ``weight`` (dim, width), ``lengths`` (batch,)
    int32; frames at or past a row's length read as 0."""
    return _convolve(x, weight, bias, lengths, 1, left, False)
