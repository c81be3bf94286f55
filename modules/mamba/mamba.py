"""Mamba-1 mixer, unidirectional or bidirectional (BiMamba), on either selective-scan back-end.

Parameter names follow ``mamba_ssm.modules.mamba_simple.Mamba`` (``in_proj, conv1d, x_proj, dt_proj,
A_log, D, out_proj``) so that weights interchange. The bidirectional mixer is the "BiMamba v2" of
ConMamba (conmamba.md 1.2): ``in_proj`` and ``out_proj`` are shared, the backward direction has its
own ``conv1d_b, x_proj_b, dt_proj_b, A_log_b, D_b``, and the two directions are averaged.

Both directions run as *one* scan: the backward input is reversed inside each utterance's length
(:mod:`.reverse`), stacked after the forward channels, and B/C enter as two groups. Gating by
SiLU(z) commutes with that reversal, so it is applied once, after the directions are combined.
"""

import math

import torch
import torch.nn as nn

from .conv import causal_conv1d_silu
from .reverse import reversal_index, reverse_time
from .selective_scan import selective_scan


def inverse_softplus_dt(size, dt_min, dt_max, dt_init_floor):
    """Bias whose softplus is a step size drawn log-uniformly in [dt_min, dt_max] (Mamba's dt init)."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba(nn.Module):
    """Selective state-space mixer over (batch, time, d_model).

    Arguments
    ---------
    d_model : int
        Input and output size.
    d_state, d_conv, expand : int
        State size per channel, width of the causal convolution, inner size = expand * d_model.
    dt_rank : int or "auto"
        Rank of the step-size projection; "auto" is ceil(d_model / 16).
    bidirectional : bool
        Adds a backward direction with its own conv/x_proj/dt_proj/A/D (ConMamba's BiMamba).
    default_init_backward_dt : bool
        Paper quirk (conmamba.md 1.2): leave ``dt_proj_b`` at PyTorch's default Linear init, as the
        published code does, instead of Mamba's step-size init. Off by default.

    Example
    -------
    >>> mixer = Mamba(32, bidirectional=True)
    >>> mixer(torch.randn(2, 7, 32), lengths=torch.tensor([7, 4])).shape
    torch.Size([2, 7, 32])
    """

    def __init__(
        self,
        d_model,
        d_state=16,
        d_conv=4,
        expand=2,
        dt_rank="auto",
        dt_min=0.001,
        dt_max=0.1,
        dt_init_floor=1e-4,
        conv_bias=True,
        bias=False,
        bidirectional=False,
        default_init_backward_dt=False,
    ):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.bidirectional = bidirectional
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

        self.suffixes = ("", "_b") if bidirectional else ("",)
        for suffix in self.suffixes:
            conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, bias=conv_bias)
            x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
            if not (suffix == "_b" and default_init_backward_dt):
                std = self.dt_rank**-0.5
                nn.init.uniform_(dt_proj.weight, -std, std)
                with torch.no_grad():
                    dt_proj.bias.copy_(inverse_softplus_dt(self.d_inner, dt_min, dt_max, dt_init_floor))
            # S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel
            A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
            A_log = nn.Parameter(torch.log(A))
            D = nn.Parameter(torch.ones(self.d_inner))
            A_log._no_weight_decay = D._no_weight_decay = True
            setattr(self, "conv1d" + suffix, conv1d)
            setattr(self, "x_proj" + suffix, x_proj)
            setattr(self, "dt_proj" + suffix, dt_proj)
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
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (batch, d_inner, time) each
        if self.bidirectional:
            if lengths is None:
                lengths = torch.full((batch,), time, device=hidden.device)
            index = reversal_index(lengths, time)
            x = torch.cat([x, reverse_time(x, index, dim=2)], dim=1)

        directions = len(self.suffixes)
        conv_weight = self._stacked("conv1d", "weight").view(directions * self.d_inner, -1)
        conv_bias = self._stacked("conv1d", "bias").flatten() if self.conv1d.bias is not None else None
        x = causal_conv1d_silu(x, conv_weight, conv_bias)
        x = x.view(batch, directions, self.d_inner, time)

        x_dbl = torch.einsum("bgdl,gkd->bgkl", x, self._stacked("x_proj", "weight"))
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=2)
        dt = torch.einsum("bgrl,gdr->bgdl", dt, self._stacked("dt_proj", "weight"))
        A = -torch.exp(self._stacked("A_log").float()).flatten(0, 1)
        y = selective_scan(
            x.flatten(1, 2),
            dt.flatten(1, 2),
            A,
            B,
            C,
            D=self._stacked("D").float().flatten(),
            delta_bias=self._stacked("dt_proj", "bias").float().flatten(),
            delta_softplus=True,
        )
        if self.bidirectional:
            y_forward, y_backward = y.chunk(2, dim=1)
            y = 0.5 * (y_forward + reverse_time(y_backward, index, dim=2))
        y = y * nn.functional.silu(z)
        return self.out_proj(y.transpose(1, 2))
