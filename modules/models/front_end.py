"""Batch-independent front-end: Fbank features and the convolutional front-end with exact frame counts.

SpeechBrain passes relative lengths (valid part / padded length) from the waveform to every stage and
rounds them at each frame rate, so an utterance padded next to a much longer one can lose a frame (5920
samples next to 192000: 9 encoder frames instead of 10). Its ``Fbank`` also floors each row at 80 dB
below the row's loudest frame, padding included, and its ``Conv2d`` pads the time axis by reflection at
the end of the *batch*, so a short utterance's last output frame reads its padding instead of its own
reflection. Here each stage computes the exact number of frames of every utterance from its sample count
and fills the padding with what the utterance alone would see, so that an utterance's encoder input does
not depend on the rest of its batch:

* :func:`exact_features`: frames = samples // hop + 1 (SpeechBrain's centred STFT); the dB floor is taken
  over the valid frames only; padded frames are zero.
* :class:`ConvolutionFrontEnd`: before each convolution of the front-end, the frame just past each
  utterance holds the utterance's own reflection (what ``Conv2d``'s reflect padding gives it alone) and
  later frames are zero; output frames = floor((frames + 2 * pad - kernel) / stride) + 1.

Both return relative lengths that round back to the exact counts, so the encoder, the CTC loss and the
searchers, which take SpeechBrain's relative lengths, see exactly the valid frames.
"""

import torch
from speechbrain.lobes.models import convolution
from speechbrain.nnet.CNN import Conv2d
from speechbrain.processing.features import spectral_magnitude


def exact_features(compute_features, wavs, wav_lens):
    """Filterbank features of a padded batch, each utterance's exactly as if it were alone.

    Arguments
    ---------
    compute_features : speechbrain.lobes.features.Fbank
        The yaml's feature extractor (or a subclass such as ``modules.inference.streaming.StreamableFbank``),
        without deltas or context windows.
    wavs : torch.Tensor
        Waveforms (batch, samples), zero-padded.
    wav_lens : torch.Tensor
        Relative lengths (batch,) of the waveforms.

    Returns
    -------
    feats : torch.Tensor
        (batch, frames, n_mels), zero at padded frames.
    feat_lens : torch.Tensor
        Relative lengths (batch,) that round to each utterance's exact frame count.

    Example
    -------
    >>> from speechbrain.lobes.features import Fbank
    >>> fbank = Fbank(n_mels=4)
    >>> wavs = torch.randn(2, 1600)
    >>> wavs[1, 800:] = 0.0
    >>> feats, feat_lens = exact_features(fbank, wavs, torch.tensor([1.0, 0.5]))
    >>> alone, _ = exact_features(fbank, wavs[1:, :800], torch.ones(1))
    >>> (feat_lens * feats.shape[1]).round().tolist(), alone.shape[1]
    ([11.0, 6.0], 6)
    >>> torch.allclose(feats[1, :6], alone[0])
    True
    """
    if compute_features.deltas or compute_features.context:
        raise ValueError("exact_features: Fbank with deltas or context windows is not supported")
    stft = compute_features.compute_STFT
    if not stft.center:
        raise ValueError("exact_features: the STFT must be centred (SpeechBrain's default)")
    _keep_constants_on(wavs.device, compute_features)
    samples = torch.round(wav_lens * wavs.shape[1])
    frames = torch.div(samples, stft.hop_length, rounding_mode="floor") + 1
    magnitude = spectral_magnitude(stft(wavs))
    padding = torch.arange(magnitude.shape[1], device=wavs.device)[None, :] >= frames[:, None]
    # Silent padded frames cannot raise the utterance's dB floor (Filterbank's top_db)
    feats = compute_features.compute_fbanks(magnitude.masked_fill(padding[..., None], 0.0))
    feats = feats.masked_fill(padding[..., None], 0.0)
    return feats, frames / feats.shape[1]


def _keep_constants_on(device, compute_features):
    """Moves the Fbank's constant tensors (the STFT window; the filterbank's frequencies, unless they
    are trained parameters) to ``device``, once. SpeechBrain keeps them on the CPU and copies them to
    the device at every call; a copy from ordinary host memory waits until the GPU has run all the work
    queued before it, so the host could not queue a training step while the GPU runs the previous one."""
    stft, filterbank = compute_features.compute_STFT, compute_features.compute_fbanks
    if stft.window.device != device:
        stft.window = stft.window.to(device)
    for name in ("f_central", "band", "all_freqs_mat"):
        value = getattr(filterbank, name)
        if not isinstance(value, torch.nn.Parameter) and value.device != device:
            setattr(filterbank, name, value.to(device))
    filterbank.device_inp = device  # where the filterbank makes its own constants


class ConvolutionFrontEnd(convolution.ConvolutionFrontEnd):
    """SpeechBrain's ``ConvolutionFrontEnd`` (same arguments and parameters) that, given relative lengths,
    convolves each utterance as if it were alone and returns (output, exact relative lengths); without
    lengths, it is SpeechBrain's. A module of its own, so that the recipes call it through DDP's wrapper.

    The module docstring says how; blocks of ``Conv2d`` layers with ``padding="same"``, without residual
    connections, are supported.

    Example
    -------
    >>> cnn = ConvolutionFrontEnd([None, None, 8], num_blocks=2, num_layers_per_block=1,
    ...     out_channels=(4, 4), kernel_sizes=(3, 3), strides=(2, 2), residuals=(False, False)).eval()
    >>> x = torch.randn(2, 13, 8)
    >>> out, out_lens = cnn(x, torch.tensor([1.0, 5 / 13]))
    >>> alone, _ = cnn(x[1:, :5], torch.ones(1))
    >>> (out_lens * out.shape[1]).round().tolist(), alone.shape[1], cnn.output_frames(5)
    ([4.0, 2.0], 2, 2)
    >>> torch.allclose(out[1, :2], alone[0], atol=1e-6)
    True
    """

    def forward(self, x, lengths=None):
        if lengths is None:
            return super().forward(x)
        frames = torch.round(lengths * x.shape[1])
        output = self.encode(x, torch.arange(x.shape[1], device=x.device) >= frames[:, None])
        return output, self.output_frames(frames) / output.shape[1]

    def encode(self, x, padding_mask):
        """The output (batch, frames_out, ...) of features x (batch, frames, ...) whose padded frames are
        True in ``padding_mask``: the part of :meth:`forward` that
        :func:`modules.training.cuda_graphs.use_cuda_graphs` records as one graph."""
        frames = padding_mask.logical_not().sum(dim=1)
        for block in self.children():
            if block.reduce_conv is not None:
                raise NotImplementedError("ConvolutionFrontEnd: residual blocks are not supported")
            for layer in block.convs.children():
                if isinstance(layer, Conv2d):
                    x = _convolve_valid_frames(layer, x, frames)
                    frames = _output_frames(layer, frames)
                else:
                    x = layer(x)
        return x

    def output_frames(self, frames):
        """The number of output frames of ``frames`` valid input frames (an int or a tensor)."""
        for block in self.children():
            for layer in block.convs.children():
                if isinstance(layer, Conv2d):
                    frames = _output_frames(layer, frames)
        return frames


def _time_padding(conv):
    """The frames that the ``padding="same"`` Conv2d ``conv`` pads on each side of the time axis."""
    if conv.padding != "same":
        raise ValueError(f"ConvolutionFrontEnd: only padding='same' is supported, not {conv.padding!r}")
    kernel, stride, dilation = conv.kernel_size[-1], conv.stride[-1], conv.dilation[-1]
    pad = kernel // 2 if stride > 1 else dilation * (kernel - 1) // 2  # SpeechBrain's get_padding_elem
    if pad > 1:
        raise NotImplementedError("ConvolutionFrontEnd: at most one frame of time padding is supported")
    return pad


def _output_frames(conv, frames):
    """Valid output frames of the Conv2d ``conv`` on ``frames`` valid input frames (int or tensor)."""
    kernel, stride, dilation = conv.kernel_size[-1], conv.stride[-1], conv.dilation[-1]
    if stride == 1:  # "same" padding keeps the frames
        return frames
    return (frames + 2 * _time_padding(conv) - dilation * (kernel - 1) - 1) // stride + 1


def _convolve_valid_frames(conv, x, frames):
    """One ``Conv2d`` (time on axis 1 of x) on the first ``frames`` frames of each row of x."""
    reflect = _time_padding(conv) == 1 and conv.padding_mode == "reflect"
    return conv(_pad_past_lengths(x, frames, reflect))


def _pad_past_lengths(x, frames, reflect):
    """x (batch, time, ...) with, in each row, zeros past ``frames`` but for the first padded frame, which
    holds the row's reflection around its last frame (x[frames - 2]) when ``reflect``."""
    time = torch.arange(x.shape[1], device=x.device)[None, :]
    valid = time < frames[:, None]
    shape = valid.shape + (1,) * (x.dim() - 2)
    padded = x.masked_fill(~valid.view(shape), 0.0)
    if reflect:
        mirror = (time == frames[:, None]).view(shape)
        source = (frames - 2).clamp(min=0).long().view((-1, 1) + (1,) * (x.dim() - 2))
        reflection = x.gather(1, source.expand((x.shape[0], 1) + x.shape[2:]))
        padded = torch.where(mirror, reflection, padded)
    return padded


def encoder_input(compute_features, normalize, CNN, wavs, wav_lens, augment=None, epoch=None):
    """Waveforms -> the speech encoder's input and its exact relative lengths, as every recipe computes it:
    :func:`exact_features` -> ``normalize`` -> ``augment`` (training only) -> ``CNN`` with lengths.

    ``normalize`` is the yaml's ``InputNormalization`` (``epoch`` decides whether it still updates its
    statistics); ``augment`` the yaml's feature ``Augmenter`` or None; ``CNN`` a
    :class:`ConvolutionFrontEnd` (possibly wrapped by DDP).
    """
    feats, feat_lens = exact_features(compute_features, wavs, wav_lens)
    feats = normalize(feats, feat_lens, epoch=epoch)
    if augment is not None:
        feats, feat_lens = augment(feats, feat_lens)
    return CNN(feats, feat_lens)


class WaveformEncoder(torch.nn.Module):
    """Waveforms (batch, samples) and relative lengths (batch,) -> the speech encoder's output, or, given
    ``ctc_lin``, CTC log-probabilities: what ``train_CTC.py`` and ``train_S2S.py`` compute at test
    (:func:`encoder_input`, then the encoder). The modules are the yaml's keys of the same names; this is
    the ``encoder`` of the inference folders and the module that ``modules.inference.export`` traces.
    """

    def __init__(self, compute_features, normalize, CNN, speech_encoder, ctc_lin=None):
        super().__init__()
        self.compute_features, self.normalize, self.CNN = compute_features, normalize, CNN
        self.speech_encoder, self.ctc_lin = speech_encoder, ctc_lin

    def forward(self, wavs, wav_lens):
        return self.encode(wavs, wav_lens)[0]

    def encode(self, wavs, wav_lens):
        """-> (output (batch, frames, ...), relative lengths (batch,) rounding to the exact frame counts)."""
        src, src_lens = encoder_input(self.compute_features, self.normalize, self.CNN, wavs, wav_lens)
        encoded = self.speech_encoder(src, src_lens)
        if self.ctc_lin is None:
            return encoded, src_lens
        return self.ctc_lin(encoded).log_softmax(dim=-1), src_lens
