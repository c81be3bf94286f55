"""One Triton launch that packs a Mamba-1 mixer's directions' parameters (:mod:`.packing`), and one for
its backward.

A program packs one block of channels of one direction: its convolution taps and bias, A = -exp(A_log)
(written transposed, (state, channels), the layout the scan reads), D and the step-size bias, its
columns of the block-diagonal ``x_proj`` weight and its rows of the block-diagonal ``dt_proj`` weight,
zeros included. The backward gathers the diagonal blocks of the two matrices' gradients back into each
direction's weights, in their dtype, and multiplies A's gradient by A (d(-exp(a))/da = -exp(a)); the
other gradients are slices of the packed ones. With ``TRITON_INTERPRET=1`` the kernels run on CPU
tensors, which is how CI tests them.
"""

import torch
import triton
import triton.language as tl

BLOCK_D = 32  # channels a program


@triton.jit
def _of_direction(direction, forward_pointer, backward_pointer):
    """The pointer of the forward direction's tensor, or of the backward one's."""
    if direction == 0:
        pointer = forward_pointer
    else:
        pointer = backward_pointer
    return pointer


@triton.jit
def _x_proj_rows(rows, direction, DIRECTIONS: tl.constexpr, RANK: tl.constexpr, N: tl.constexpr):
    """Row of the packed ``x_proj`` weight that row ``rows`` of one direction's weight goes to: the
    directions' step-size ranks first, then each direction's B and C rows."""
    return tl.where(rows < RANK, direction * RANK + rows, DIRECTIONS * RANK + direction * 2 * N + rows - RANK)


@triton.jit
def pack_directions_kernel(
    conv_w0, conv_w1, conv_b0, conv_b1, A_log0, A_log1, D0, D1, bias0, bias1, x_proj0, x_proj1, dt_proj0, dt_proj1,
    conv_w_out, conv_b_out, vectors_out, A_out, x_proj_out, dt_proj_out, dim,
    WIDTH: tl.constexpr, N: tl.constexpr, RANK: tl.constexpr, DIRECTIONS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    block, direction = tl.program_id(0), tl.program_id(1)
    channels = block * BLOCK_D + tl.arange(0, BLOCK_D)
    channel_mask = channels < dim
    packed = direction * dim + channels  # the channels' index in the packed tensors
    total = DIRECTIONS * dim

    taps = tl.arange(0, BLOCK_W)
    tap_mask = channel_mask[:, None] & (taps[None, :] < WIDTH)
    conv_w = tl.load(_of_direction(direction, conv_w0, conv_w1) + channels[:, None] * WIDTH + taps[None, :],
                     mask=tap_mask)
    tl.store(conv_w_out + packed[:, None] * WIDTH + taps[None, :], conv_w, mask=tap_mask)
    if HAS_CONV_BIAS:
        conv_b = tl.load(_of_direction(direction, conv_b0, conv_b1) + channels, mask=channel_mask)
        tl.store(conv_b_out + packed, conv_b, mask=channel_mask)
    D = tl.load(_of_direction(direction, D0, D1) + channels, mask=channel_mask)
    tl.store(vectors_out + packed, D.to(tl.float32), mask=channel_mask)
    bias = tl.load(_of_direction(direction, bias0, bias1) + channels, mask=channel_mask)
    tl.store(vectors_out + total + packed, bias.to(tl.float32), mask=channel_mask)

    states = tl.arange(0, N)
    A_log = tl.load(_of_direction(direction, A_log0, A_log1) + channels[:, None] * N + states[None, :],
                    mask=channel_mask[:, None])
    tl.store(A_out + states[None, :] * total + packed[:, None], -tl.exp(A_log.to(tl.float32)),
             mask=channel_mask[:, None])

    # x_proj: the channels' columns, every row (the other direction's rows are zeros)
    rows = tl.arange(0, BLOCK_K)  # rows of the packed matrix
    is_rank = rows < DIRECTIONS * RANK
    owner = tl.where(is_rank, rows // RANK, (rows - DIRECTIONS * RANK) // (2 * N))
    source = tl.where(is_rank, rows % RANK, RANK + (rows - DIRECTIONS * RANK) % (2 * N))
    row_mask = rows < DIRECTIONS * (RANK + 2 * N)
    x_proj = tl.load(_of_direction(direction, x_proj0, x_proj1) + source[:, None] * dim + channels[None, :],
                     mask=(row_mask & (owner == direction))[:, None] & channel_mask[None, :], other=0.0)
    tl.store(x_proj_out + rows[:, None] * total + packed[None, :], x_proj.to(x_proj_out.dtype.element_ty),
             mask=row_mask[:, None] & channel_mask[None, :])

    # dt_proj: the channels' rows, every column
    columns = tl.arange(0, BLOCK_R)
    column_mask = columns < DIRECTIONS * RANK
    own = (columns // RANK == direction) & column_mask
    dt_proj = tl.load(_of_direction(direction, dt_proj0, dt_proj1) + channels[:, None] * RANK
                      + (columns - direction * RANK)[None, :], mask=channel_mask[:, None] & own[None, :], other=0.0)
    tl.store(dt_proj_out + packed[:, None] * (DIRECTIONS * RANK) + columns[None, :],
             dt_proj.to(dt_proj_out.dtype.element_ty), mask=channel_mask[:, None] & column_mask[None, :])


@triton.jit
def unpack_gradients_kernel(
    grad_A_packed, A_packed, grad_x_proj_packed, grad_dt_proj_packed, grad_A_log, grad_x_proj, grad_dt_proj, dim,
    s_gA_n, s_gA_c, s_gx_r, s_gx_c, s_gdt_c, s_gdt_r,
    N: tl.constexpr, RANK: tl.constexpr, DIRECTIONS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    block, direction = tl.program_id(0), tl.program_id(1)
    channels = block * BLOCK_D + tl.arange(0, BLOCK_D)
    channel_mask = channels < dim
    packed = direction * dim + channels
    total = DIRECTIONS * dim

    states = tl.arange(0, N)
    mask = channel_mask[:, None]
    grad_A = tl.load(grad_A_packed + states[None, :] * s_gA_n + packed[:, None] * s_gA_c, mask=mask)
    A = tl.load(A_packed + states[None, :] * total + packed[:, None], mask=mask)
    tl.store(grad_A_log + (direction * dim + channels[:, None]) * N + states[None, :],
             (grad_A.to(tl.float32) * A).to(grad_A_log.dtype.element_ty), mask=mask)

    rows = tl.arange(0, BLOCK_K)  # rows of one direction's weight
    mask = (rows < RANK + 2 * N)[:, None] & channel_mask[None, :]
    grad = tl.load(grad_x_proj_packed + _x_proj_rows(rows, direction, DIRECTIONS, RANK, N)[:, None] * s_gx_r
                   + packed[None, :] * s_gx_c, mask=mask)
    tl.store(grad_x_proj + (direction * (RANK + 2 * N) + rows[:, None]) * dim + channels[None, :],
             grad.to(grad_x_proj.dtype.element_ty), mask=mask)

    columns = tl.arange(0, BLOCK_R)
    mask = channel_mask[:, None] & (columns < RANK)[None, :]
    grad = tl.load(grad_dt_proj_packed + packed[:, None] * s_gdt_c + (direction * RANK + columns)[None, :] * s_gdt_r,
                   mask=mask)
    tl.store(grad_dt_proj + (direction * dim + channels[:, None]) * RANK + columns[None, :],
             grad.to(grad_dt_proj.dtype.element_ty), mask=mask)


class TritonPack(torch.autograd.Function):
    """:func:`triton_pack_directions` with its one-launch backward."""

    @staticmethod
    def forward(ctx, dtype, *parameters):
        directions = len(parameters) // 7
        conv_w, conv_b, A_log, D, bias, x_proj, dt_proj = parameters[:7]
        dim, width = conv_w.shape[0], conv_w.shape[-1]
        state, rank = A_log.shape[1], dt_proj.shape[1]
        total = directions * dim
        conv_w_out = conv_w.new_empty(total, width)
        conv_b_out = conv_b.new_empty(total) if conv_b is not None else None
        vectors = conv_w.new_empty(2, total, dtype=torch.float32)  # D and the step-size bias
        A_out = conv_w.new_empty(state, total, dtype=torch.float32)
        x_proj_out = conv_w.new_empty(directions * (rank + 2 * state), total, dtype=dtype)
        dt_proj_out = conv_w.new_empty(total, directions * rank, dtype=dtype)
        pointers = [p.contiguous() if p is not None else None for p in parameters]
        pairs = [(pointers[i], pointers[i + 7 * (directions - 1)]) for i in range(7)]
        pack_directions_kernel[(triton.cdiv(dim, BLOCK_D), directions)](
            *(p for pair in pairs for p in pair), conv_w_out, conv_b_out, vectors, A_out, x_proj_out, dt_proj_out, dim,
            WIDTH=width, N=state, RANK=rank, DIRECTIONS=directions, HAS_CONV_BIAS=conv_b is not None,
            BLOCK_D=BLOCK_D, BLOCK_W=triton.next_power_of_2(width),
            BLOCK_K=triton.next_power_of_2(directions * (rank + 2 * state)),
            BLOCK_R=triton.next_power_of_2(directions * rank), num_warps=1,
        )
        ctx.save_for_backward(A_out)
        ctx.shapes = [(p.shape, p.dtype) if p is not None else None for p in parameters[:7]]
        ctx.directions = directions
        return conv_w_out, conv_b_out, A_out.t(), vectors[0], vectors[1], x_proj_out, dt_proj_out

    @staticmethod
    def backward(ctx, grad_conv_w, grad_conv_b, grad_A, grad_D, grad_bias, grad_x_proj, grad_dt_proj):
        (A_packed,) = ctx.saved_tensors
        directions = ctx.directions
        conv_w, conv_b, A_log, D, bias, x_proj, dt_proj = ctx.shapes
        state, total = A_packed.shape
        dim, rank = total // directions, dt_proj[0][1]
        grad_A_log = A_packed.new_empty(directions, dim, state, dtype=A_log[1])
        grad_x_proj_out = A_packed.new_empty(directions, rank + 2 * state, dim, dtype=x_proj[1])
        grad_dt_proj_out = A_packed.new_empty(directions, dim, rank, dtype=dt_proj[1])
        grad_A = grad_A.t()  # (state, channels), as packed
        unpack_gradients_kernel[(triton.cdiv(dim, BLOCK_D), directions)](
            grad_A, A_packed, grad_x_proj, grad_dt_proj, grad_A_log, grad_x_proj_out, grad_dt_proj_out, dim,
            *grad_A.stride(), *grad_x_proj.stride(), *grad_dt_proj.stride(),
            N=state, RANK=rank, DIRECTIONS=directions, BLOCK_D=BLOCK_D,
            BLOCK_K=triton.next_power_of_2(rank + 2 * state), BLOCK_R=triton.next_power_of_2(rank), num_warps=1,
        )
        grads = []
        for g in range(directions):
            channels = slice(g * dim, (g + 1) * dim)
            grads += [
                grad_conv_w[channels].reshape(conv_w[0]).to(conv_w[1]),
                grad_conv_b[channels].to(conv_b[1]) if conv_b is not None else None,
                grad_A_log[g],
                grad_D[channels].to(D[1]),
                grad_bias[channels].to(bias[1]),
                grad_x_proj_out[g],
                grad_dt_proj_out[g],
            ]
        return (None, *grads)


def triton_pack_directions(directions, dtype):
    """The seven tensors of :class:`.packing.PackedDirections` from one launch; ``directions``: one or two
    :class:`.mamba.MambaDirection` tuples."""
    parameters = []
    for d in directions:
        conv_b = d.conv1d.bias
        parameters += [d.conv1d.weight, conv_b, d.A_log, d.D, d.dt_proj.bias, d.x_proj.weight, d.dt_proj.weight]
    return TritonPack.apply(dtype, *parameters)
