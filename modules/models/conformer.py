"""SpeechBrain's Conformer encoder with the padding of its convolution modules zeroed.

SpeechBrain's ``ConvolutionModule`` masks padded frames only at its output, so its depthwise convolution
reads the padding of the batch (normalised, projected and gated, hence not zero) at the end of every
shorter utterance: a Conformer's output depends on what else is in the batch. ``ConMambaEncoder``
zeroes the padding before its depthwise convolution; :class:`ConformerEncoder` does the same for the
Conformer baselines, so that both families compute, on a padded batch, what each utterance computes
alone. Parameters, their names and the output on unpadded input are SpeechBrain's.
"""

from speechbrain.lobes.models.transformer import Conformer


class PaddingMaskedConvolutionModule(Conformer.ConvolutionModule):
    """SpeechBrain's ``ConvolutionModule`` with padded frames zeroed before the depthwise convolution.

    ``mask`` (batch, time, 1) is True at padded frames, as ``ConformerEncoderLayer`` passes it. Dynamic
    chunk training keeps SpeechBrain's path.
    """

    def forward(self, x, mask=None, dynchunktrain_config=None):
        if mask is None or dynchunktrain_config is not None:
            return super().forward(x, mask, dynchunktrain_config)
        out = self.bottleneck(self.layer_norm(x).transpose(1, 2))  # (batch, channels, time)
        out = self.conv(out.masked_fill(mask.transpose(1, 2), 0.0))
        if self.causal:
            out = out[..., : -self.padding]  # keep the frames that see no future
        out = self.after_conv(out.transpose(1, 2))
        return out.masked_fill(mask, 0.0)


class ConformerEncoder(Conformer.ConformerEncoder):
    """SpeechBrain's ``ConformerEncoder`` (same arguments, same parameters) whose layers' convolution
    modules are :class:`PaddingMaskedConvolutionModule`.

    Example
    -------
    >>> import torch
    >>> encoder = ConformerEncoder(
    ...     num_layers=1, d_model=16, d_ffn=32, nhead=2, kernel_size=5, attention_type="regularMHA"
    ... ).eval()
    >>> x = torch.randn(1, 6, 16)
    >>> padded = torch.cat([x, torch.randn(1, 4, 16)], dim=1)
    >>> mask = torch.tensor([[False] * 6 + [True] * 4])
    >>> torch.allclose(encoder(padded, src_key_padding_mask=mask)[0][:, :6], encoder(x)[0], atol=1e-6)
    True
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for layer in self.layers:
            # Same module and weights, only forward differs: switch the class in place
            layer.convolution_module.__class__ = PaddingMaskedConvolutionModule
