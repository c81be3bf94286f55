"""Causal depthwise convolution + SiLU, the short convolution in front of every Mamba scan."""

import torch.nn.functional as F

try:  # optional GPU kernel
    from causal_conv1d import causal_conv1d_fn as _cuda_causal_conv1d
except ImportError:
    _cuda_causal_conv1d = None


def causal_conv1d_silu(x, weight, bias):
    """SiLU(causal depthwise conv) of x (batch, channels, time) with weight (channels, width).

    Uses the ``causal_conv1d`` kernel when installed and x is on a GPU; ``F.conv1d`` otherwise.
    """
    if _cuda_causal_conv1d is not None and x.is_cuda:
        return _cuda_causal_conv1d(x, weight, bias, activation="silu")
    width = weight.shape[1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])
    return F.silu(out[..., : x.shape[-1]])
