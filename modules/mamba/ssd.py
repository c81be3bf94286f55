"""Mamba-2 scan (state-space duality, scalar decay per head) with two back-ends.

    h_t = exp(dt_t * A_h) * h_{t-1} + dt_t * x_t B_t^T,   y_t = h_t C_t + D_h * x_t

Shapes follow ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``: x (batch, time, heads,
headdim), dt (batch, time, heads), A (heads,), B, C (batch, time, groups, state), D, dt_bias (heads,).

On a GPU with ``mamba_ssm`` installed this runs the Triton SSD kernels. Elsewhere it runs the
selective scan of :mod:`.selective_scan`: a Mamba-2 head is a block of ``headdim`` Mamba-1 channels
that share one step size and one decay, so the same recurrence (and its float64 reference) covers
both mixers exactly.
"""

import torch.nn.functional as F

from .selective_scan import selective_scan

try:  # optional GPU kernel
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _triton_ssd
except ImportError:
    _triton_ssd = None


def ssd_scan(x, dt, A, B, C, D=None, dt_bias=None, chunk_size=256, initial_state=None, return_final_state=False):
    """Runs the Mamba-2 scan with softplus(dt + dt_bias) step sizes.

    Returns y (batch, time, heads, headdim), and the final state (batch, heads, headdim, state)
    when ``return_final_state``.
    """
    if _triton_ssd is not None and x.is_cuda:
        return _triton_ssd(
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True,
            initial_states=initial_state, return_final_states=return_final_state,
        )
    batch, time, heads, headdim = x.shape
    if dt_bias is not None:
        dt = dt + dt_bias
    dt = F.softplus(dt)
    channels = heads * headdim
    u = x.reshape(batch, time, channels).transpose(1, 2)
    delta = dt.repeat_interleave(headdim, dim=2).transpose(1, 2)
    A_channels = A.repeat_interleave(headdim)[:, None].expand(channels, B.shape[-1])
    D_channels = D.repeat_interleave(headdim) if D is not None else None
    h0 = initial_state.reshape(batch, channels, -1) if initial_state is not None else None
    y, last = selective_scan(
        u, delta, A_channels, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), D=D_channels,
        initial_state=h0, return_last_state=True,
    )
    y = y.transpose(1, 2).reshape(batch, time, heads, headdim)
    if return_final_state:
        return y, last.view(batch, heads, headdim, -1)
    return y
