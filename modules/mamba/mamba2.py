"""Mamba-2 mixer, unidirectional or bidirectional, on either SSD back-end.

Parameter names follow ``mamba_ssm.modules.mamba2.Mamba2`` (``in_proj, conv1d, dt_bias, A_log, D,
norm, out_proj``). Bidirectional: ``in_proj``/``out_proj`` (hence z, x, B, C and dt) are shared and the
backward direction owns ``conv1d_b, dt_bias_b, A_log_b, D_b`` (the parallel speech-prefixing mixer of
MADEON, arXiv 2411.06968). Both directions run as one scan: reversed heads are stacked after the forward
heads and B/C enter as twice the groups.

The unidirectional mixer decodes recurrently, like :class:`.mamba.Mamba`: :meth:`Mamba2.allocate_cache`
makes a (conv_state, ssm_state) pair, ``forward(..., cache=...)`` scans a prefix in parallel from it and
leaves each row's state after its own last valid frame there, and :meth:`Mamba2.step` adds one token in O(1).
As in :class:`.mamba.Mamba`, the pieces are public one direction at a time (:meth:`Mamba2.project`,
:meth:`Mamba2.scan_direction`, :meth:`Mamba2.step_direction`, :meth:`Mamba2.output`, :meth:`Mamba2.direction`).
"""

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conv import causal_conv1d_silu
from .mamba import inverse_softplus_dt, stack_directions
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


class Mamba2Direction(NamedTuple):
    """The parameters of one direction of a :class:`Mamba2` mixer (``in_proj``/``norm``/``out_proj`` are shared)."""

    conv1d: nn.Conv1d
    dt_bias: nn.Parameter
    A_log: nn.Parameter
    D: nn.Parameter


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
        SiLU(z). MADEON turns it off (arXiv 2411.06968, footnote 1).
    bidirectional : bool
        Adds a backward direction with its own conv1d/dt_bias/A/D.
    combine : "mean" or "sum"
        How the two directions are combined: averaged (ConMamba) or summed (MADEON).

    Example
    -------
    >>> mixer = Mamba2(64, d_state=16, headdim=16, bidirectional=True)
    >>> mixer(torch.randn(2, 7, 64), lengths=torch.tensor([7, 3])).shape
    torch.Size([2, 7, 64])
    """

    # Whether a bidirectional mixer may decode recurrently; see :class:`.mamba.Mamba`.
    recurrent_backward = False

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
        combine="mean",
    ):
        super().__init__()
        if combine not in ("mean", "sum"):
            raise ValueError(f"combine must be 'mean' or 'sum', not {combine!r}")
        self.combine = combine
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

        # state_dict names of the directions' parameters: mamba_ssm's, "_b" for the backward one
        self.suffixes = ("", "_b") if bidirectional else ("",)
        direction = dict(
            conv_dim=conv_dim, d_conv=d_conv, conv_bias=conv_bias, A_init_range=A_init_range,
            dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
        )
        self.conv1d, self.dt_bias, self.A_log, self.D = self._new_direction(**direction)
        if bidirectional:
            self.conv1d_b, self.dt_bias_b, self.A_log_b, self.D_b = self._new_direction(**direction)

    def _new_direction(self, conv_dim, d_conv, conv_bias, A_init_range, dt_min, dt_max, dt_init_floor):
        """Freshly initialised parameters of one direction, as a :class:`Mamba2Direction`."""
        conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, bias=conv_bias)
        dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads, dt_min, dt_max, dt_init_floor))
        A = torch.empty(self.nheads).uniform_(*A_init_range)
        A_log = nn.Parameter(torch.log(A))
        D = nn.Parameter(torch.ones(self.nheads))
        dt_bias._no_weight_decay = A_log._no_weight_decay = D._no_weight_decay = True
        return Mamba2Direction(conv1d, dt_bias, A_log, D)

    def direction(self, backward=False):
        """The parameters of the forward direction, or of the backward one, as a :class:`Mamba2Direction`."""
        if not backward:
            return Mamba2Direction(self.conv1d, self.dt_bias, self.A_log, self.D)
        if not self.bidirectional:
            raise ValueError("a unidirectional Mamba2 has no backward direction")
        return Mamba2Direction(self.conv1d_b, self.dt_bias_b, self.A_log_b, self.D_b)

    @property
    def directions(self):
        """The parameters of each direction, forward first (:meth:`direction`)."""
        if self.bidirectional:
            return self.direction(), self.direction(backward=True)
        return (self.direction(),)

    def forward(self, hidden, lengths=None, cache=None, reverse_index=None):
        """hidden (batch, time, d_model); lengths (batch,) valid frames, needed when bidirectional.

        ``cache``: a (conv_state, ssm_state) pair from :meth:`allocate_cache` (unidirectional mixer
        only) to continue from; see :meth:`scan_direction`. ``reverse_index`` (batch, time): the order
        in which the backward direction reads the sequence, a self-inverse per-row time gather
        (:mod:`.reverse`); by default each row is reversed inside ``lengths`` (MADEON reverses only the
        speech prefix, arXiv 2411.06968). Returns (batch, time, d_model).
        """
        batch, time, _ = hidden.shape
        z, xBC, dt = self.project(hidden)
        if cache is not None:
            self._check_unidirectional()
            if lengths is None:
                lengths = torch.full((batch,), time, device=hidden.device)
            return self.output(self.scan_direction(xBC, dt, lengths, *cache), z)
        if self.bidirectional:
            if reverse_index is None:
                if lengths is None:
                    lengths = torch.full((batch,), time, device=hidden.device)
                reverse_index = reversal_index(lengths, time)
            xBC = torch.cat([xBC, reverse_time(xBC, reverse_index, dim=2)], dim=1)
            dt = torch.cat([dt, reverse_time(dt, reverse_index, dim=1)], dim=2)

        directions = len(self.suffixes)
        conv_weight = stack_directions(self, "conv1d", "weight").flatten(0, 1).squeeze(1)
        conv_bias = stack_directions(self, "conv1d", "bias").flatten() if self.conv1d.bias is not None else None
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
            -torch.exp(stack_directions(self, "A_log").float().flatten()),
            B,
            C,
            D=stack_directions(self, "D").float().flatten(),
            dt_bias=stack_directions(self, "dt_bias").float().flatten(),
            chunk_size=self.chunk_size,
        )
        y = y.reshape(batch, time, directions, self.d_inner)
        if self.bidirectional:
            y = y[:, :, 0] + reverse_time(y[:, :, 1], reverse_index, dim=1)
            if self.combine == "mean":
                y = 0.5 * y
        else:
            y = y[:, :, 0]
        return self.output(y, z)

    def project(self, hidden):
        """in_proj, split into z (batch, time, d_inner), xBC (batch, conv_dim, time), dt (batch, time, heads)."""
        z, xBC, dt = self.in_proj(hidden).split(
            [self.d_inner, self.d_inner + 2 * self.ngroups * self.d_state, self.nheads], dim=-1
        )
        return z, xBC.transpose(1, 2), dt

    def output(self, y, z):
        """Gate (or gated RMSNorm) and out_proj: y, z (..., d_inner) -> (..., d_model)."""
        y = self.norm(y, z) if self.norm is not None else y * F.silu(z)
        return self.out_proj(y.to(z.dtype))

    def allocate_cache(self, batch_size, dtype=None, device=None):
        """Zero states for recurrent decoding, as ``mamba_ssm``'s ``allocate_inference_cache``.

        Returns conv_state (batch, conv_dim, d_conv), the last d_conv inputs of the convolution (newest
        last), in the convolution's dtype; and ssm_state (batch, heads, headdim, d_state) in float32
        unless ``dtype`` is given. A mixer with ``recurrent_backward`` gets a second pair for its
        backward direction: (conv_state, ssm_state, conv_state_b, ssm_state_b).
        """
        if not self.recurrent_backward:
            self._check_unidirectional()
        device = device or self.conv1d.weight.device
        conv_dim, _, d_conv = self.conv1d.weight.shape
        states = ()
        for _ in self.directions:
            conv_state = torch.zeros(
                batch_size, conv_dim, d_conv, dtype=dtype or self.conv1d.weight.dtype, device=device
            )
            ssm_state = torch.zeros(
                batch_size, self.nheads, self.headdim, self.d_state, dtype=dtype or self.A_log.dtype, device=device
            )
            states += (conv_state, ssm_state)
        return states

    def scan_direction(self, xBC, dt, lengths, conv_state, ssm_state, backward=False):
        """Convolution and scan of one direction (the forward one, or the ``backward`` one) from its
        (conv_state, ssm_state), which are overwritten in place.

        xBC (batch, conv_dim, time), dt (batch, time, heads) from :meth:`project`, in the order given.
        Padded frames get step size 0 (dt = -inf before the softplus), an identity step of the
        recurrence, and the conv_state is gathered at each row's last valid frame, so the states hold
        every row's state after its own valid frames. Returns y (batch, time, d_inner), before gating.
        Inference only: not differentiable.
        """
        conv1d, dt_bias, A_log, D = self.direction(backward)
        batch, conv_dim, time = xBC.shape
        d_conv = conv_state.shape[-1]
        history = torch.cat([conv_state.to(xBC.dtype), xBC], dim=2)  # cached inputs, then the new ones
        window = lengths[:, None] + torch.arange(d_conv, device=xBC.device)  # ends at the last valid frame
        new_conv_state = history.gather(2, window[:, None, :].expand(-1, conv_dim, -1))
        xBC = causal_conv1d_silu(history[..., 1:], conv1d.weight.squeeze(1), conv1d.bias)[..., d_conv - 1 :]
        x, B, C = xBC.transpose(1, 2).split(
            [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1
        )
        valid = torch.arange(time, device=dt.device) < lengths[:, None]
        dt = dt.masked_fill(~valid[..., None], float("-inf"))
        y, last_state = ssd_scan(
            x.reshape(batch, time, self.nheads, self.headdim),
            dt,
            -torch.exp(A_log.float()),
            B.reshape(batch, time, self.ngroups, self.d_state),
            C.reshape(batch, time, self.ngroups, self.d_state),
            D=D.float(),
            dt_bias=dt_bias.float(),
            chunk_size=self.chunk_size,
            initial_state=ssm_state,
            return_final_state=True,
        )
        conv_state.copy_(new_conv_state)
        ssm_state.copy_(last_state)
        return y.reshape(batch, time, self.d_inner)

    def step(self, hidden, cache):
        """Adds one token: hidden (batch, 1, d_model) -> (batch, 1, d_model), updating ``cache`` in place."""
        self._check_unidirectional()
        z, xBC, dt = self.project(hidden)
        y = self.step_direction(xBC[..., 0], dt[:, 0], *cache)
        return self.output(y, z[:, 0]).unsqueeze(1)

    def step_direction(self, xBC, dt, conv_state, ssm_state, backward=False):
        """One recurrent step of one direction (the forward one, or the ``backward`` one), O(1) in the
        past: xBC (batch, conv_dim), dt (batch, heads), updating (conv_state, ssm_state) in place.

        Rolls the convolution window, then h = exp(dt * A) * h + dt * x B^T per head; y = h C + D x.
        Returns y (batch, d_inner), before gating.
        """
        conv1d, dt_bias, A_log, D = self.direction(backward)
        batch = xBC.shape[0]
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = xBC
        xBC = (conv_state * conv1d.weight.squeeze(1)).sum(-1)
        if conv1d.bias is not None:
            xBC = xBC + conv1d.bias
        x, B, C = F.silu(xBC).split(
            [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1
        )
        heads_per_group = self.nheads // self.ngroups
        B = B.view(batch, self.ngroups, self.d_state).repeat_interleave(heads_per_group, dim=1)
        C = C.view(batch, self.ngroups, self.d_state).repeat_interleave(heads_per_group, dim=1)
        x = x.view(batch, self.nheads, self.headdim).to(ssm_state.dtype)

        dt = F.softplus(dt.float() + dt_bias.float())  # (batch, heads)
        decay = torch.exp(dt * -torch.exp(A_log.float()))
        update = (dt[..., None] * x)[..., None] * B[:, :, None, :].to(ssm_state.dtype)
        ssm_state.copy_(decay[..., None, None] * ssm_state + update)
        y = torch.einsum("bhpn,bhn->bhp", ssm_state, C.to(ssm_state.dtype))
        y = y + D.float()[:, None] * x
        return y.reshape(batch, self.d_inner)

    def _check_unidirectional(self):
        """Recurrent decoding needs a causal mixer: a backward direction would read the future."""
        if self.bidirectional:
            raise ValueError("recurrent inference needs a unidirectional Mamba2 (bidirectional=False)")
