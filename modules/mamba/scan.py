"""The scan of the Mamba-1 mixers, one or two directions, and the one place that picks its back-end.

:func:`directional_scan` takes what a mixer's projections produce, in their (batch, time, channels)
layout with any strides: u, delta (batch, time, directions * dim), B, C (batch, time, directions,
state), the gate z (batch, time, dim), A (directions * dim, state), D and the step-size bias
(directions * dim,). Channel block g of u, delta, A, D and the bias belongs to direction g, which
reads B[:, :, g] and C[:, :, g]. Direction 0 runs forwards in time; direction 1 (bidirectional only)
runs backwards inside each row's own ``lengths``, so padding never enters a valid frame's scan and
an utterance's output does not depend on its batch (the published ConMamba, arXiv:2407.09732, flips
the padded batch instead). It returns

    out = scale * sum_g y_g * silu(z),   y_g = selective scan of direction g (with the D skip),

of shape (batch, time, dim), 0 at padded frames; with ``return_last_state``, also each direction's
state after each row's last valid frame (batch, directions * dim, state), float32.

Back-ends, picked by ``backend`` (a mixer's ``scan_backend``, settable from the yaml):

* ``"auto"`` (default): ``"triton"`` on CUDA tensors, ``"torch"`` elsewhere;
* ``"triton"``: our kernels (:mod:`.scan_triton`), both directions in one launch, everything fused;
  Triton comes with PyTorch's CUDA wheels, so a GPU needs nothing compiled. The Mamba-1 mixers then
  run their depthwise convolution on Triton too (:mod:`.conv_triton`), and so does the ConMamba
  layer's convolution module;
* ``"mamba_ssm"``: the CUDA kernel of the ``mamba_ssm`` package (:mod:`.scan_cuda`), only when asked
  for (to benchmark the two side by side: RESULTS.md); it takes no initial state, so such scans
  (streaming, decoding caches) run on ``"triton"``;
* ``"torch"``: :class:`~.selective_scan.SelectiveScanTorch`, any device;
* ``"script"``: :func:`~.selective_scan.scan_loop`, whose time loop survives ``torch.jit.trace``
  (TorchScript export; no initial state, no last state).

The last three see the backward direction through per-row gathers (:mod:`.reverse`) in the
(batch, channels, time) layout of :func:`~.selective_scan.selective_scan`.
"""

import torch
import torch.nn.functional as F

from . import scan_cuda
from .reverse import reversal_index, reverse_time
from .selective_scan import SelectiveScanTorch, scan_loop, selective_scan_ref

BACKENDS = ("auto", "triton", "mamba_ssm", "torch", "script")
PADDED_STEP = -1e4  # a raw step size whose softplus is 0: padded frames become identity steps


def directional_scan(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    delta_bias=None,
    z=None,
    lengths=None,
    directions=1,
    scale=1.0,
    delta_softplus=True,
    initial_state=None,
    return_last_state=False,
    backend="auto",
):
    """Scans one or two directions (see the module docstring); returns out, or (out, last_state)."""
    if directions not in (1, 2):
        raise ValueError(f"directions must be 1 or 2, not {directions}")
    batch, time, _ = u.shape
    if lengths is None:
        lengths = torch.full((batch,), time, device=u.device, dtype=torch.int32)
    backend = pick_backend(backend, u.is_cuda, scan_cuda.available, initial_state is not None)
    if backend == "triton":
        from .scan_triton import triton_directional_scan  # imports Triton only where it runs

        out, last_state = triton_directional_scan(
            u, delta, A, B, C, D, delta_bias, z, lengths, initial_state, directions, scale, delta_softplus
        )
    else:
        scan = {"mamba_ssm": _mamba_ssm_scan, "torch": _torch_scan, "script": _script_scan}[backend]
        out, last_state = scan_with_gathers(
            scan, u, delta, A, B, C, D, delta_bias, z, lengths, directions, scale, delta_softplus, initial_state
        )
    return (out, last_state) if return_last_state else out


def pick_backend(requested, on_cuda, mamba_ssm_built, has_initial_state):
    """The back-end that runs a scan (the order of the module docstring)."""
    if requested not in BACKENDS:
        raise ValueError(f"scan_backend must be one of {BACKENDS}, not {requested!r}")
    if requested == "mamba_ssm" and not mamba_ssm_built:
        raise RuntimeError("scan_backend 'mamba_ssm' needs the mamba_ssm CUDA kernels: pip install mamba-ssm")
    backend = requested
    if requested == "auto":
        backend = "triton" if on_cuda else "torch"
    if backend == "mamba_ssm" and has_initial_state:
        backend = "triton"  # the mamba_ssm kernel starts every scan from zero
    return backend


def directional_scan_ref(u, delta, A, B, C, D=None, delta_bias=None, z=None, lengths=None, directions=1,
                         scale=1.0, delta_softplus=True, initial_state=None, return_last_state=False):
    """Specification of :func:`directional_scan`: the sequential loop of
    :func:`~.selective_scan.selective_scan_ref`, differentiated by autograd (tests run it in float64)."""
    if lengths is None:
        lengths = torch.full((u.shape[0],), u.shape[1], device=u.device)
    out, last_state = scan_with_gathers(
        _reference_scan, u, delta, A, B, C, D, delta_bias, z, lengths, directions, scale, delta_softplus, initial_state
    )
    return (out, last_state) if return_last_state else out


def scan_with_gathers(scan, u, delta, A, B, C, D, delta_bias, z, lengths, directions, scale, delta_softplus,
                      initial_state):
    """:func:`directional_scan` through a (batch, channels, time) scan
    ``scan(u, delta, A, B, C, D, delta_bias, delta_softplus, h0)`` that returns (y, last_state): the
    backward direction is reversed inside each row by a gather, and padded frames get step size 0
    (an identity step), so that each row's last state is taken after its own frames."""
    batch, time, channels = u.shape
    dim = channels // directions
    valid = (torch.arange(time, device=u.device) < lengths[:, None])[..., None]
    if delta_softplus:  # softplus(PADDED_STEP + bias) is exactly 0 in float32
        delta = delta.masked_fill(~valid, PADDED_STEP)
    else:
        delta = delta * valid
    if directions == 2:
        index = reversal_index(lengths, time)
        u, delta = (torch.cat([t[..., :dim], reverse_time(t[..., dim:], index, dim=1)], dim=-1) for t in (u, delta))
        B, C = (torch.stack([t[:, :, 0], reverse_time(t[:, :, 1], index, dim=1)], dim=2) for t in (B, C))
    y, last_state = scan(
        u.transpose(1, 2), delta.transpose(1, 2), A, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), D, delta_bias,
        delta_softplus, initial_state,
    )
    y = y.transpose(1, 2)
    if directions == 2:
        y = y[..., :dim] + reverse_time(y[..., dim:], index, dim=1)
    if scale != 1.0:
        y = y * scale
    if z is not None:
        y = y * F.silu(z)
    return y * valid, last_state


def _reference_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, initial_state):
    return selective_scan_ref(u, delta, A, B, C, D, None, delta_bias, delta_softplus, initial_state, True)


def _torch_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, initial_state):
    return SelectiveScanTorch.apply(u, delta, A, B, C, D, None, delta_bias, delta_softplus, initial_state)


def _mamba_ssm_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, initial_state):
    return scan_cuda.selective_scan_cuda_op(u, delta, A, B, C, D, None, delta_bias, delta_softplus, True)


def _script_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, initial_state):
    if initial_state is not None:
        raise NotImplementedError("the scripted scan covers whole sequences (no initial state)")
    return scan_loop(u, delta, A, B, C, D, delta_bias, delta_softplus), None
