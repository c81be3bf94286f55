"""ConMamba encoder: SpeechBrain's Conformer layer with attention replaced by a (Bi)Mamba mixer.

Layer (Speech Slytherin, arXiv 2407.09732), pre-LayerNorm macaron layout:

    x = x + 0.5 * FFN(x)
    x = x + Mixer(LayerNorm(x))          # BiMamba; no dropout on this branch, as published
    x = x + ConvolutionModule(x)         # padded frames masked before the depthwise convolution
    x = LayerNorm(x + 0.5 * FFN(x))

There is no positional encoding: the scan is order-aware by itself. Unlike the published code, padded
frames never reach valid ones (length-aware backward scan, masked convolution), so an utterance's
output does not depend on the rest of its batch.
"""

import torch
import torch.nn as nn
from speechbrain.nnet.attention import PositionalwiseFeedForward
from speechbrain.nnet.normalization import LayerNorm

from modules.mamba.mamba import Mamba
from modules.mamba.mamba2 import Mamba2
from modules.mamba.scan import pick_backend

MIXERS = {"mamba": Mamba, "mamba2": Mamba2}


def frame_counts(x, padding_mask):
    """Valid frames of each row of x (batch, time, ...) given its padding mask (True at padded frames;
    None: all valid), int32 as our kernels read them."""
    if padding_mask is None:
        return torch.full((x.shape[0],), x.shape[1], device=x.device, dtype=torch.int32)
    return (~padding_mask).sum(dim=1, dtype=torch.int32)


class ConvolutionModule(nn.Module):
    """Conformer convolution module with padded frames zeroed *before* the depthwise convolution.

    LayerNorm -> pointwise conv (2 * d_model) + GLU -> depthwise conv -> LayerNorm -> activation ->
    Linear -> Dropout, as in SpeechBrain's Conformer; SpeechBrain 1.1 masks only the output, so
    padding still leaks into the last valid frames through the kernel. ``causal`` pads on the left;
    a causal module can also run chunk by chunk, its left context carried in a cache (streaming).

    Where ``backend`` (the mixer's ``scan_backend``, :func:`modules.mamba.scan.pick_backend`) picks our
    Triton kernels, the whole module runs in the (batch, time, channels) layout and the depthwise
    convolution is :func:`modules.mamba.conv_triton.depthwise_conv`: no transposes, no padding or
    masking operations, and less GPU time than PyTorch's bf16 depthwise kernels (RESULTS.md).
    """

    def __init__(self, d_model, kernel_size=31, activation=nn.GELU, dropout=0.0, causal=False, backend="auto"):
        super().__init__()
        self.backend = backend
        self.left_padding = kernel_size - 1 if causal else (kernel_size - 1) // 2
        self.right_padding = kernel_size - 1 - self.left_padding
        self.layer_norm = nn.LayerNorm(d_model)
        self.pointwise = nn.Conv1d(d_model, 2 * d_model, kernel_size=1)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model)
        self.after_conv = nn.Sequential(
            nn.LayerNorm(d_model), activation(), nn.Linear(d_model, d_model), nn.Dropout(dropout)
        )

    def forward(self, x, padding_mask=None, cache=None, lengths=None):
        """x (batch, time, d_model); padding_mask (batch, time) True at padded frames; or ``lengths``
        (batch,), int32, valid frames (the Triton path reads them; without, they come from the mask).

        ``cache`` (from :meth:`allocate_cache`) holds the depthwise convolution's inputs
        of the frames before ``x``; it replaces the left padding and is updated in place.
        """
        on_triton = pick_backend(self.backend, x.is_cuda, mamba_ssm_built=True, has_initial_state=False) == "triton"
        if on_triton and cache is None:
            return self._forward_triton(x, padding_mask, lengths)
        out = nn.functional.glu(self.pointwise(self.layer_norm(x).transpose(1, 2)), dim=1)
        if padding_mask is not None:
            out = out.masked_fill(padding_mask.unsqueeze(1), 0.0)
        if cache is None:
            out = nn.functional.pad(out, (self.left_padding, self.right_padding))
        else:
            out = torch.cat([cache, out], dim=2)
            cache.copy_(out[:, :, out.shape[2] - cache.shape[2] :])
        return self.after_conv(self.depthwise(out).transpose(1, 2))

    def _forward_triton(self, x, padding_mask, lengths):
        """:meth:`forward` in the (batch, time, channels) layout with our Triton depthwise convolution."""
        from modules.mamba.conv_triton import depthwise_conv  # imports Triton only where it runs

        if lengths is None:
            lengths = frame_counts(x, padding_mask)
        pointwise = nn.functional.linear(self.layer_norm(x), self.pointwise.weight.squeeze(-1), self.pointwise.bias)
        out = nn.functional.glu(pointwise, dim=-1)
        depthwise = self.depthwise
        return self.after_conv(depthwise_conv(out, depthwise.weight.squeeze(1), depthwise.bias, lengths,
                                              self.left_padding))

    def allocate_cache(self, batch_size, dtype=None, device=None):
        """Zero left context (batch, d_model, kernel_size - 1) for chunk-wise inference (causal only)."""
        if self.right_padding:
            raise ValueError("chunk-wise inference needs a causal convolution module (causal=True)")
        weight = self.depthwise.weight
        return torch.zeros(
            batch_size, weight.shape[0], self.left_padding, dtype=dtype or weight.dtype, device=device or weight.device
        )


class FeedForward(PositionalwiseFeedForward):
    """SpeechBrain's feed-forward module (same parameters and names) on (batch, time, d_model) as it is.

    SpeechBrain's permutes its input to (time, batch, d_model) and back, so its first matrix product
    copies the whole input to make it contiguous, forward and backward; a position-wise module needs
    no permutation.
    """

    def forward(self, x):
        return self.ffn(x)


class ConMambaEncoderLayer(nn.Module):
    """One ConMamba layer over (batch, time, d_model); see the module docstring.

    ``mamba_config`` is passed to the mixer; its key ``mixer`` ("mamba" or "mamba2") picks the class.
    With ``causal=True`` the mixer is unidirectional and the convolution module causal.
    """

    def __init__(self, d_model, d_ffn, kernel_size=31, activation=nn.GELU, dropout=0.0, causal=False, mamba_config=None):
        super().__init__()
        config = dict(mamba_config or {})
        mixer_class = MIXERS[config.pop("mixer", "mamba")]
        config["bidirectional"] = config.get("bidirectional", True) and not causal
        self.mixer_norm = LayerNorm(d_model)
        self.mixer = mixer_class(d_model, **config)
        self.convolution_module = ConvolutionModule(d_model, kernel_size, activation, dropout, causal,
                                                    backend=config.get("scan_backend", "auto"))
        self.ffn_module1, self.ffn_module2 = [
            nn.Sequential(
                LayerNorm(d_model),
                FeedForward(d_ffn=d_ffn, input_size=d_model, dropout=dropout, activation=activation),
                nn.Dropout(dropout),
            )
            for _ in range(2)
        ]
        self.norm = LayerNorm(d_model)

    def forward(self, x, lengths, padding_mask=None, cache=None):
        """x (batch, time, d_model); lengths (batch,) valid frames; padding_mask (batch, time) True at pad.

        ``cache``: a (mixer cache, convolution cache) pair from :meth:`allocate_cache` to
        continue from (causal layers only), updated in place.
        """
        mixer_cache, convolution_cache = (None, None) if cache is None else cache
        x = torch.add(x, self.ffn_module1(x), alpha=0.5)  # x + 0.5 * FFN(x), one operation
        x = x + self.mixer(self.mixer_norm(x), lengths, cache=mixer_cache)
        x = x + self.convolution_module(x, padding_mask, cache=convolution_cache, lengths=lengths)
        return self.norm(torch.add(x, self.ffn_module2(x), alpha=0.5))

    def allocate_cache(self, batch_size, dtype=None, device=None):
        """Zero states of the mixer and of the convolution module, for chunk-wise inference."""
        return (
            self.mixer.allocate_cache(batch_size, dtype, device),
            self.convolution_module.allocate_cache(batch_size, dtype, device),
        )


class ConMambaEncoder(nn.Module):
    """A stack of :class:`ConMambaEncoderLayer` followed by a LayerNorm.

    ``forward`` has the signature and return value of SpeechBrain's ``ConformerEncoder`` so the two
    swap in a yaml; ``src_mask`` and ``pos_embs`` are accepted and unused (no attention, no positions).

    ``xavier_init`` reproduces a quirk of the published recipe (github.com/xi-j/Mamba-ASR): xavier-normal
    initialisation of every parameter with more than one dimension, which also overwrites Mamba's
    ``A_log``. Off by default.

    Example
    -------
    >>> encoder = ConMambaEncoder(num_layers=2, d_model=32, d_ffn=64, kernel_size=5)
    >>> mask = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    >>> encoder(torch.randn(2, 6, 32), src_key_padding_mask=mask)[0].shape
    torch.Size([2, 6, 32])
    """

    def __init__(
        self,
        num_layers,
        d_model,
        d_ffn,
        kernel_size=31,
        activation=nn.GELU,
        dropout=0.0,
        causal=False,
        mamba_config=None,
        xavier_init=False,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            ConMambaEncoderLayer(d_model, d_ffn, kernel_size, activation, dropout, causal, mamba_config)
            for _ in range(num_layers)
        )
        self.norm = LayerNorm(d_model, eps=1e-6)
        if xavier_init:
            for parameter in self.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_normal_(parameter)

    def forward(
        self, src, src_mask=None, src_key_padding_mask=None, pos_embs=None, dynchunktrain_config=None, cache=None
    ):
        """src (batch, time, d_model); src_key_padding_mask (batch, time), True at padded frames.

        ``cache`` (causal encoder only, from :meth:`allocate_cache`) makes ``src`` the
        continuation of what the cache has seen: the output equals that of the whole sequence, chunk
        by chunk (streaming). Returns (output, None) like ``ConformerEncoder`` (which returns
        attention maps there).
        """
        if dynchunktrain_config is not None:
            raise NotImplementedError("ConMamba has no dynamic-chunk training; use causal=True for streaming.")
        lengths = frame_counts(src, src_key_padding_mask)  # computed once here rather than in every layer
        output = src
        for index, layer in enumerate(self.layers):
            output = layer(output, lengths, src_key_padding_mask, None if cache is None else cache[index])
        return self.norm(output), None

    def allocate_cache(self, batch_size, dtype=None, device=None):
        """One zero cache per layer for chunk-wise :meth:`forward` (causal encoder only)."""
        return [layer.allocate_cache(batch_size, dtype, device) for layer in self.layers]
