"""The parameters of a Mamba-1 mixer's directions, packed in the layouts its forward pass reads.

A BiMamba keeps each direction's parameters under ``mamba_ssm``'s names (:class:`.mamba.MambaDirection`),
but runs both directions as one convolution, two matrix products and one scan, which read them side by
side. :func:`pack_directions` builds, for ``directions`` tuples (forward first):

* ``conv_weight`` (directions * dim, width) and ``conv_bias`` (directions * dim,) or None;
* ``A`` = -exp(A_log) (directions * dim, state), float32; ``D`` and ``delta_bias`` (directions * dim,),
  float32, as the scans read them;
* ``x_proj_weight`` (directions * (rank + 2 state), directions * dim), block diagonal: the rows of every
  direction's step-size rank first, then each direction's B and C rows, so that ``x_proj`` of the
  convolved (batch, time, directions * dim) input gives the step-size input of all directions as one
  (batch, time, directions * rank) slice, and B, C as a (batch, time, directions, 2 state) view;
* ``dt_proj_weight`` (directions * dim, directions * rank), block diagonal.

With ``use_triton`` one Triton launch (:mod:`.packing_triton`) does what a dozen stacks, block
diagonals, casts and exponentials do otherwise, the matrices written in ``dtype`` (the autocast
dtype, so that no cast follows), and its backward is one launch too. An eager training step is
bound by the host, which pays for every launch and every autograd node; ``torch.compile``, which fuses
such operations itself, traces the PyTorch expression.
"""

from typing import NamedTuple, Optional

import torch


class PackedDirections(NamedTuple):
    """The directions' parameters side by side; see the module docstring."""

    conv_weight: torch.Tensor
    conv_bias: Optional[torch.Tensor]
    A: torch.Tensor
    D: torch.Tensor
    delta_bias: torch.Tensor
    x_proj_weight: torch.Tensor
    dt_proj_weight: torch.Tensor


def pack_directions(directions, dtype, use_triton):
    """:class:`PackedDirections` of ``directions`` (a mixer's :class:`.mamba.MambaDirection` tuples);
    ``dtype``: that of the two matrices on the Triton path (the PyTorch expression keeps the weights'
    dtype, which autocast casts)."""
    if use_triton and not torch.compiler.is_compiling():
        from .packing_triton import triton_pack_directions  # imports Triton only where it runs

        return PackedDirections(*triton_pack_directions(directions, dtype))
    return pack_directions_torch(directions)


def pack_directions_torch(directions):
    """:func:`pack_directions` in PyTorch operations (the specification of the Triton pack)."""
    rank = directions[0].dt_proj.weight.shape[1]
    conv_bias = None
    if directions[0].conv1d.bias is not None:
        conv_bias = torch.cat([d.conv1d.bias for d in directions])
    x_proj = [d.x_proj.weight for d in directions]
    return PackedDirections(
        conv_weight=torch.cat([d.conv1d.weight for d in directions]).flatten(1),
        conv_bias=conv_bias,
        A=-torch.exp(torch.cat([d.A_log for d in directions]).float()),
        D=torch.cat([d.D for d in directions]).float(),
        delta_bias=torch.cat([d.dt_proj.bias for d in directions]).float(),
        x_proj_weight=torch.cat([torch.block_diag(*(w[:rank] for w in x_proj)),
                                 torch.block_diag(*(w[rank:] for w in x_proj))]),
        dt_proj_weight=torch.block_diag(*(d.dt_proj.weight for d in directions)),
    )
