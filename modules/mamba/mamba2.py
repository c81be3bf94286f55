"""Mamba-2 mixer, unidirectional or bidirectional, on either SSD back-end.

Parameter names follow ``mamba_ssm.modules.mamba2.Mamba2`` (``in_proj, conv1d, dt_bias, A_log, D,
norm, out_proj``). Bidirectional: ``in_proj``/``out_proj`` (hence z, x, B, C and dt) are shared and the
backward direction owns ``conv1d_b, dt_bias_b, A_log_b, D_b`` (the parallel speech-prefixing mixer of
MADEON, madeon.md 2.2). Both directions run as one scan: reversed heads are stacked after the forward
heads and B/C enter as twice the groups.
"""

import torch
import torch.nn as nn

from .conv import causal_conv1d_silu
from .mamba import inverse_softplus_dt
from .reverse import reversal_index, reverse_time
from .ssd import ssd_scan


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * SiLU(z)) with a learned scale, Mamba-2's output norm (``norm_before_gate=False``)."""

    def __init__(self, size, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, y, z):
        y = y * nn.functional.silu(z)
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Mamba2(nn.Module):
    """Mamba-2 (SSD) mixer over (batch, time, d_model).

    Arguments
    ---------
    d_model : int
        Input and output size.
    d_state, d_conv, expand, headdim, ngroups : int
        State size, causal-conv width, inner size = expand * d_model split in heads of ``headdim``,
        number of B/C groups.
    rmsnorm : bool
        Gated RMSNorm before ``out_proj`` (Mamba-2's default); without it the output is gated by
        SiLU(z). MADEON turns it off (madeon.md 1.3).
    bidirectional : bool
        Adds a backward direction with its own conv1d/dt_bias/A/D.

    Example
    -------
    >>> mixer = Mamba2(64, d_state=16, headdim=16, bidirectional=True)
    >>> mixer(torch.randn(2, 7, 64), lengths=torch.tensor([7, 3])).shape
    torch.Size([2, 7, 64])
    """

    def __init__(
        self,
        d_model,
        d_state=128,
        d_conv=4,
        expand=2,
        headdim=64,
        ngroups=1,
        A_init_range=(1, 16),
        dt_min=0.001,
        dt_max=0.1,
        dt_init_floor=1e-4,
        chunk_size=256,
        rmsnorm=True,
        conv_bias=True,
        bias=False,
        bidirectional=False,
    ):
        super().__init__()
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"expand * d_model = {self.d_inner} is not a multiple of headdim = {headdim}")
        self.d_state, self.headdim, self.ngroups = d_state, headdim, ngroups
        self.nheads = self.d_inner // headdim
        self.chunk_size = chunk_size
        self.bidirectional = bidirectional
        conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + conv_dim + self.nheads, bias=bias)
        self.norm = GatedRMSNorm(self.d_inner) if rmsnorm else None
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

        self.suffixes = ("", "_b") if bidirectional else ("",)
        for suffix in self.suffixes:
            conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, bias=conv_bias)
            dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads, dt_min, dt_max, dt_init_floor))
            A = torch.empty(self.nheads).uniform_(*A_init_range)
            A_log = nn.Parameter(torch.log(A))
            D = nn.Parameter(torch.ones(self.nheads))
            dt_bias._no_weight_decay = A_log._no_weight_decay = D._no_weight_decay = True
            setattr(self, "conv1d" + suffix, conv1d)
            setattr(self, "dt_bias" + suffix, dt_bias)
            setattr(self, "A_log" + suffix, A_log)
            setattr(self, "D" + suffix, D)

    def _stacked(self, name, attribute=None):
        """Parameter ``name`` (or ``name.attribute``) of each direction, stacked on a new first axis."""
        tensors = [getattr(self, name + suffix) for suffix in self.suffixes]
        if attribute is not None:
            tensors = [getattr(t, attribute) for t in tensors]
        return torch.stack(tensors)

    def forward(self, hidden, lengths=None):
        """hidden (batch, time, d_model); lengths (batch,) valid frames, needed when bidirectional."""
        batch, time, _ = hidden.shape
        z, xBC, dt = self.in_proj(hidden).split(
            [self.d_inner, self.d_inner + 2 * self.ngroups * self.d_state, self.nheads], dim=-1
        )
        xBC = xBC.transpose(1, 2)
        if self.bidirectional:
            if lengths is None:
                lengths = torch.full((batch,), time, device=hidden.device)
            index = reversal_index(lengths, time)
            xBC = torch.cat([xBC, reverse_time(xBC, index, dim=2)], dim=1)
            dt = torch.cat([dt, reverse_time(dt, index, dim=1)], dim=2)

        directions = len(self.suffixes)
        conv_weight = self._stacked("conv1d", "weight").flatten(0, 1).squeeze(1)
        conv_bias = self._stacked("conv1d", "bias").flatten() if self.conv1d.bias is not None else None
        xBC = causal_conv1d_silu(xBC, conv_weight, conv_bias)
        xBC = xBC.view(batch, directions, -1, time).transpose(-1, -2)  # (batch, dir, time, conv_dim)
        x, B, C = xBC.split(
            [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1
        )
        # heads (and groups) of the two directions side by side: (batch, time, dir*heads, headdim)
        x = x.permute(0, 2, 1, 3).reshape(batch, time, directions * self.nheads, self.headdim)
        B = B.permute(0, 2, 1, 3).reshape(batch, time, directions * self.ngroups, self.d_state)
        C = C.permute(0, 2, 1, 3).reshape(batch, time, directions * self.ngroups, self.d_state)
        y = ssd_scan(
            x,
            dt,
            -torch.exp(self._stacked("A_log").float().flatten()),
            B,
            C,
            D=self._stacked("D").float().flatten(),
            dt_bias=self._stacked("dt_bias").float().flatten(),
            chunk_size=self.chunk_size,
        )
        y = y.reshape(batch, time, directions, self.d_inner)
        if self.bidirectional:
            y = 0.5 * (y[:, :, 0] + reverse_time(y[:, :, 1], index, dim=1))
        else:
            y = y[:, :, 0]
        y = self.norm(y, z) if self.norm is not None else y * nn.functional.silu(z)
        return self.out_proj(y)

