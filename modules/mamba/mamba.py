"""Mamba-1 mixer, unidirectional or bidirectional (BiMamba), on either selective-scan back-end.

Parameter names follow ``mamba_ssm.modules.mamba_simple.Mamba`` (``in_proj, conv1d, x_proj, dt_proj,
A_log, D, out_proj``) so that weights interchange. The bidirectional mixer is the "BiMamba v2" of
ConMamba (arXiv 2407.09732): ``in_proj`` and ``out_proj`` are shared, the backward direction has its
own ``conv1d_b, x_proj_b, dt_proj_b, A_log_b, D_b``, and the two directions are averaged (or summed,
``combine``).

Both directions run as *one* scan (:func:`.scan.directional_scan`): the backward direction runs
backwards inside each utterance's own length, its convolution is the anti-causal mirror of the
forward one, and the gate SiLU(z) and the mean of the directions are applied inside the scan.

The unidirectional mixer also decodes recurrently, like ``mamba_ssm``: :meth:`Mamba.allocate_cache`
makes a (conv_state, ssm_state) pair, ``forward(..., cache=...)`` scans a prefix in parallel from it and
leaves each row's state after its own last valid frame there, and :meth:`Mamba.step` adds one token in O(1).

The pieces of that are public, one direction at a time, for mixers that compose the two directions
their own way (MADEON's speech prefixing): :meth:`Mamba.project`, :meth:`Mamba.scan_direction`,
:meth:`Mamba.step_direction` and :meth:`Mamba.output`, each direction's parameters from
:meth:`Mamba.direction`, and ``forward``'s ``reverse_index``, the order the backward direction reads.
"""

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .conv import causal_conv1d_silu
from .reverse import reverse_time
from .scan import directional_scan, pick_backend
from .selective_scan import selective_scan


def inverse_softplus_dt(size, dt_min, dt_max, dt_init_floor):
    """Bias whose softplus is a step size drawn log-uniformly in [dt_min, dt_max] (Mamba's dt init)."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


def stack_directions(mixer, name, attribute=None):
    """Parameter ``name`` (or ``name.attribute``) of each of ``mixer.directions``, forward first,
    stacked on a new first axis, so that both directions run as one batched op."""
    tensors = [getattr(direction, name) for direction in mixer.directions]
    if attribute is not None:
        tensors = [getattr(t, attribute) for t in tensors]
    return torch.stack(tensors)


class MambaDirection(NamedTuple):
    """The parameters of one direction of a :class:`Mamba` mixer (``in_proj``/``out_proj`` are shared)."""

    conv1d: nn.Conv1d
    x_proj: nn.Linear
    dt_proj: nn.Linear
    A_log: nn.Parameter
    D: nn.Parameter


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
        Quirk of the published code: leave ``dt_proj_b`` at PyTorch's default Linear init, as the
        published code does, instead of Mamba's step-size init. Off by default.
    combine : "mean" or "sum"
        How the two directions are combined before ``out_proj``: ConMamba averages them,
        MADEON's speech-prefixing mixer sums them.
    scan_backend : str
        Which scan runs the whole-sequence forward: "auto" (our Triton kernel on a GPU, PyTorch
        elsewhere), "triton", "mamba_ssm", "torch" or "script"; see :mod:`.scan`.

    Example
    -------
    >>> mixer = Mamba(32, bidirectional=True)
    >>> mixer(torch.randn(2, 7, 32), lengths=torch.tensor([7, 4])).shape
    torch.Size([2, 7, 32])
    """

    # Whether a bidirectional mixer may decode recurrently. A BiMamba's backward direction reads the
    # future, so it may not; MADEON's prefixing mixers set this, their backward branch reading the
    # text in time order (arXiv 2411.06968).
    recurrent_backward = False

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
        combine="mean",
        scan_backend="auto",
    ):
        super().__init__()
        self.scan_backend = scan_backend
        if combine not in ("mean", "sum"):
            raise ValueError(f"combine must be 'mean' or 'sum', not {combine!r}")
        self.combine = combine
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.bidirectional = bidirectional
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

        # state_dict names of the directions' parameters: mamba_ssm's, "_b" for the backward one
        self.suffixes = ("", "_b") if bidirectional else ("",)
        direction = dict(d_conv=d_conv, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor, conv_bias=conv_bias)
        self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D = self._new_direction(**direction)
        if bidirectional:
            self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_log_b, self.D_b = self._new_direction(
                **direction, dt_init=not default_init_backward_dt
            )

    def _new_direction(self, d_conv, dt_min, dt_max, dt_init_floor, conv_bias, dt_init=True):
        """Freshly initialised parameters of one direction, as a :class:`MambaDirection`."""
        conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, bias=conv_bias)
        x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        if dt_init:
            std = self.dt_rank**-0.5
            nn.init.uniform_(dt_proj.weight, -std, std)
            with torch.no_grad():
                dt_proj.bias.copy_(inverse_softplus_dt(self.d_inner, dt_min, dt_max, dt_init_floor))
        # S4D-real initialisation: A = -(1, 2, ..., d_state) for every channel
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        A_log = nn.Parameter(torch.log(A))
        D = nn.Parameter(torch.ones(self.d_inner))
        A_log._no_weight_decay = D._no_weight_decay = True
        return MambaDirection(conv1d, x_proj, dt_proj, A_log, D)

    def direction(self, backward=False):
        """The parameters of the forward direction, or of the backward one, as a :class:`MambaDirection`."""
        if not backward:
            return MambaDirection(self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        if not self.bidirectional:
            raise ValueError("a unidirectional Mamba has no backward direction")
        return MambaDirection(self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_log_b, self.D_b)

    @property
    def directions(self):
        """The parameters of each direction, forward first (:meth:`direction`)."""
        if self.bidirectional:
            return self.direction(), self.direction(backward=True)
        return (self.direction(),)

    def forward(self, hidden, lengths=None, cache=None, reverse_index=None):
        """hidden (batch, time, d_model); lengths (batch,) valid frames, needed when bidirectional.

        ``cache``: a (conv_state, ssm_state) pair from :meth:`allocate_cache` (unidirectional mixer
        only) to continue from; see :meth:`_forward_from_cache`. ``reverse_index`` (batch, time): the
        order in which the backward direction reads the sequence, a self-inverse per-row time gather
        (:mod:`.reverse`); by default each row is reversed inside ``lengths``, and another order (MADEON
        reverses only the speech prefix, arXiv 2411.06968) runs :meth:`_forward_reordered`. Returns
        (batch, time, d_model).
        """
        if cache is not None:
            return self._forward_from_cache(hidden, lengths, cache)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)  # (batch, time, d_inner) views
        if reverse_index is not None:
            return self._forward_reordered(x, z, reverse_index)
        batch, time, _ = hidden.shape
        if lengths is not None:
            lengths = lengths.to(torch.int32)
        directions = len(self.suffixes)
        u = self._convolve_directions(x, lengths)  # (batch, time, directions * d_inner)
        # x_proj and dt_proj of both directions as one matrix product each (block-diagonal weights),
        # in the (batch, time, channels) layout that the scan reads without copies
        x_dbl = F.linear(u, torch.block_diag(*(d.x_proj.weight for d in self.directions)))
        dt, B, C = x_dbl.view(batch, time, directions, -1).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt.flatten(2), torch.block_diag(*(d.dt_proj.weight for d in self.directions)))
        y = directional_scan(
            u,
            delta,
            -torch.exp(stack_directions(self, "A_log").float()).flatten(0, 1),
            B,
            C,
            D=stack_directions(self, "D").float().flatten(),
            delta_bias=stack_directions(self, "dt_proj", "bias").float().flatten(),
            z=z,
            lengths=lengths,
            directions=directions,
            scale=0.5 if self.bidirectional and self.combine == "mean" else 1.0,
            backend=self.scan_backend,
        )
        return self.out_proj(y)

    def _convolve_directions(self, x, lengths):
        """SiLU(depthwise conv) of each direction over x (batch, time, d_inner), in time order.

        The backward direction's causal convolution of the reversed sequence is, in time order, an
        anti-causal one (it reads frames t .. t+width-1, zeros at and past the row's length), so no
        reversal is needed. Where the scan runs on our Triton kernels, so does the convolution
        (:mod:`.conv_triton`, one launch for both directions, no transposes). Returns (batch, time,
        directions * d_inner), contiguous.
        """
        directions = len(self.suffixes)
        if pick_backend(self.scan_backend, x.is_cuda, mamba_ssm_built=True, has_initial_state=False) == "triton":
            from .conv_triton import directional_conv_silu  # imports Triton only where it runs

            if lengths is None:
                lengths = torch.full((x.shape[0],), x.shape[1], device=x.device, dtype=torch.int32)
            weight = stack_directions(self, "conv1d", "weight").view(directions * self.d_inner, -1)
            bias = stack_directions(self, "conv1d", "bias").flatten() if self.conv1d.bias is not None else None
            return directional_conv_silu(x, weight, bias, lengths, directions)
        if lengths is not None and self.bidirectional:  # the backward convolution reads the frames after t
            x = x * (torch.arange(x.shape[1], device=x.device) < lengths[:, None])[..., None].to(x.dtype)
        x = x.transpose(1, 2)
        if not self.bidirectional:
            return causal_conv1d_silu(x, self.conv1d.weight.squeeze(1), self.conv1d.bias).transpose(1, 2).contiguous()
        batch, channels, time = x.shape
        width = self.conv1d.weight.shape[-1]
        padded = x.new_zeros(batch, 2 * channels, time + width - 1)
        padded[:, :channels, width - 1 :] = x  # zeros before: causal
        padded[:, channels:, :time] = x  # zeros after: anti-causal
        weight = torch.cat([self.conv1d.weight, self.conv1d_b.weight.flip(-1)])
        bias = torch.cat([self.conv1d.bias, self.conv1d_b.bias]) if self.conv1d.bias is not None else None
        return F.silu(F.conv1d(padded, weight, bias, groups=2 * channels)).transpose(1, 2).contiguous()

    def _forward_reordered(self, x, z, reverse_index):
        """Bidirectional forward whose backward direction reads the sequence gathered by ``reverse_index``:
        both directions run as one forward-in-time scan of two channel groups, then the backward output
        is gathered back and the two are combined."""
        batch, time, _ = x.shape
        x = x.transpose(1, 2)
        x = torch.cat([x, reverse_time(x, reverse_index, dim=2)], dim=1)
        directions = len(self.suffixes)
        conv_weight = stack_directions(self, "conv1d", "weight").view(directions * self.d_inner, -1)
        conv_bias = stack_directions(self, "conv1d", "bias").flatten() if self.conv1d.bias is not None else None
        x = causal_conv1d_silu(x, conv_weight, conv_bias).view(batch, directions, self.d_inner, time)
        x_dbl = torch.einsum("bgdl,gkd->bgkl", x, stack_directions(self, "x_proj", "weight"))
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=2)
        dt = torch.einsum("bgrl,gdr->bgdl", dt, stack_directions(self, "dt_proj", "weight"))
        y = selective_scan(
            x.flatten(1, 2),
            dt.flatten(1, 2),
            -torch.exp(stack_directions(self, "A_log").float()).flatten(0, 1),
            B,
            C,
            D=stack_directions(self, "D").float().flatten(),
            delta_bias=stack_directions(self, "dt_proj", "bias").float().flatten(),
            delta_softplus=True,
        )
        y_forward, y_backward = y.chunk(2, dim=1)
        y = y_forward + reverse_time(y_backward, reverse_index, dim=2)
        if self.combine == "mean":
            y = 0.5 * y
        return self.out_proj((y * F.silu(z.transpose(1, 2))).transpose(1, 2))

    def project(self, hidden):
        """``in_proj`` of hidden (batch, time, d_model), split into x and z, each (batch, d_inner, time)."""
        return self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)

    def output(self, y, z):
        """Gate and ``out_proj``: y (the scans' combined output) and z, each (batch, d_inner, time),
        to (batch, time, d_model)."""
        return self.out_proj((y * F.silu(z)).to(z.dtype).transpose(1, 2))

    def allocate_cache(self, batch_size, dtype=None, device=None):
        """Zero states for recurrent decoding, as ``mamba_ssm``'s ``allocate_inference_cache``.

        Returns conv_state (batch, d_inner, d_conv), the last d_conv inputs of the convolution (newest
        last), in the convolution's dtype; and ssm_state (batch, d_inner, d_state) in ``dt_proj``'s dtype
        (float32 under mixed precision) unless ``dtype`` is given. A mixer with ``recurrent_backward``
        gets a second pair for its backward direction: (conv_state, ssm_state, conv_state_b, ssm_state_b).
        """
        if not self.recurrent_backward:
            self._check_unidirectional()
        device = device or self.conv1d.weight.device
        d_conv = self.conv1d.weight.shape[-1]
        conv_dtype, ssm_dtype = dtype or self.conv1d.weight.dtype, dtype or self.dt_proj.weight.dtype
        states = ()
        for _ in self.directions:
            conv_state = torch.zeros(batch_size, self.d_inner, d_conv, dtype=conv_dtype, device=device)
            ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, dtype=ssm_dtype, device=device)
            states += (conv_state, ssm_state)
        return states

    def _forward_from_cache(self, hidden, lengths, cache):
        """Scans a whole chunk in parallel starting from ``cache``, then overwrites the cache in place.

        Per-row lengths are exact (see :meth:`scan_direction`). Meant for inference: the in-place
        update is not differentiable.
        """
        self._check_unidirectional()
        batch, time, _ = hidden.shape
        if lengths is None:
            lengths = torch.full((batch,), time, device=hidden.device)
        x, z = self.project(hidden)
        return self.output(self.scan_direction(x, lengths, *cache), z)

    def scan_direction(self, x, lengths, conv_state, ssm_state, backward=False):
        """Convolution and scan of one direction (the forward one, or the ``backward`` one) over x
        (batch, d_inner, time) from :meth:`project`, in the order given, from its (conv_state, ssm_state),
        which are overwritten in place.

        The scan treats padded frames as identity steps and the conv_state is gathered at each row's
        last valid frame, so the states hold every row's state after its own valid frames (on a GPU the
        Triton kernel runs this, initial state included). Returns y (batch, d_inner, time), before
        gating, 0 at padded frames. Inference only: not differentiable.
        """
        conv1d, x_proj, dt_proj, A_log, D = self.direction(backward)
        d_conv = conv_state.shape[-1]
        history = torch.cat([conv_state.to(x.dtype), x], dim=2)  # cached inputs, then the new ones
        window = lengths[:, None] + torch.arange(d_conv, device=x.device)  # ends at the last valid frame
        new_conv_state = history.gather(2, window[:, None, :].expand(-1, self.d_inner, -1))
        x = causal_conv1d_silu(history[..., 1:], conv1d.weight.squeeze(1), conv1d.bias)
        x = x[..., d_conv - 1 :]

        x = x.transpose(1, 2)  # (batch, time, d_inner): the scan's layout
        dt, B, C = x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        y, last_state = directional_scan(
            x,
            F.linear(dt, dt_proj.weight),
            -torch.exp(A_log.float()),
            B[:, :, None],
            C[:, :, None],
            D=D.float(),
            delta_bias=dt_proj.bias.float(),
            lengths=lengths,
            initial_state=ssm_state,
            return_last_state=True,
            backend=self.scan_backend,
        )
        conv_state.copy_(new_conv_state)
        ssm_state.copy_(last_state)
        return y.transpose(1, 2)

    def step(self, hidden, cache):
        """Adds one token: hidden (batch, 1, d_model) -> (batch, 1, d_model), updating ``cache`` in place.

        The cost is O(1) in the length of what came before (see :meth:`step_direction`).
        """
        self._check_unidirectional()
        x, z = self.project(hidden)  # (batch, d_inner, 1) each
        return self.output(self.step_direction(x[..., 0], *cache)[..., None], z)

    def step_direction(self, x, conv_state, ssm_state, backward=False):
        """One recurrent step of one direction (the forward one, or the ``backward`` one) for x
        (batch, d_inner): roll the convolution window, then h = exp(delta * A) * h + delta * B * x,
        updating (conv_state, ssm_state) in place. Returns y (batch, d_inner), before gating."""
        conv1d, x_proj, dt_proj, A_log, D = self.direction(backward)
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x
        x = (conv_state * conv1d.weight.squeeze(1)).sum(-1)
        if conv1d.bias is not None:
            x = x + conv1d.bias
        x = F.silu(x)

        dt, B, C = x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(dt_proj(dt))  # (batch, d_inner)
        decay = torch.exp(delta[..., None] * -torch.exp(A_log.float()))
        ssm_state.copy_(decay * ssm_state + (delta * x)[..., None] * B[:, None, :])
        return torch.einsum("bdn,bn->bd", ssm_state, C.to(ssm_state.dtype)) + D.float() * x

    def _check_unidirectional(self):
        """Recurrent decoding needs a causal mixer: a backward direction would read the future."""
        if self.bidirectional:
            raise ValueError("recurrent inference needs a unidirectional Mamba (bidirectional=False)")
