"""The recipes' training augmentations, applied on the batch's device without waiting for it.

SpeechBrain's LibriSpeech recipes speed-perturb each utterance in the data loader's workers, on the
CPU; :class:`UtteranceSpeedPerturb` does it on the training batch where it lies (the GPU), with the
same per-utterance draw (SpeechBrain's ``SpeedPerturb`` draws one speed per call, which on a batch
would give all its utterances the same speed). :class:`FeatureAugmenter` is SpeechBrain's feature
``Augmenter`` (SpecAugment's masks) with its random draws made on the CPU: SpeechBrain's reads them
back from the GPU, and every such read makes the host wait until the GPU has caught up.
Both copy their CPU draws to the device through page-locked memory (:mod:`.device_copies`).
"""

import torch
from speechbrain.augment.freq_domain import SpectrogramDrop
from speechbrain.augment.time_domain import SpeedPerturb

from modules.training.device_copies import to_device


class UtteranceSpeedPerturb(SpeedPerturb):
    """SpeechBrain's ``SpeedPerturb`` (same arguments) for padded batches: each utterance is resampled
    at a speed drawn for it among ``speeds`` (percentages), then the batch is padded again.

    An utterance's valid samples are those of resampling it alone: the resampler is a filter of
    finite width over zero padding either way. The relative lengths returned count each utterance's
    new valid samples, as many as resampling it alone gives (``ceil(samples * 100 / speed)``).

    Example
    -------
    >>> perturb = UtteranceSpeedPerturb(orig_freq=16000, speeds=[90, 100, 110])
    >>> wavs, lens = perturb(torch.randn(4, 16000), torch.tensor([1.0, 0.5, 0.8, 0.25]))
    >>> wavs.shape[0], bool(lens.max() == 1.0)
    (4, True)
    """

    def forward(self, wavs, wav_lens):
        """(batch, samples) waveforms and relative lengths -> perturbed waveforms and relative lengths.

        Give the lengths on the CPU, as the data loader makes them: lengths on the GPU are read back,
        which makes the host wait for the GPU.
        """
        with torch.autocast(wavs.device.type, enabled=False):  # audio in float32, not the training's bf16
            return self.perturb(wavs.float(), wav_lens)

    def perturb(self, wavs, wav_lens):
        """:meth:`forward` in the precision of ``wavs``."""
        samples = torch.round(wav_lens.cpu().double() * wavs.shape[1]).long()
        choice = torch.randint(len(self.speeds), (wavs.shape[0],))
        # each resampler maps orig_freq samples to new_freq ones (100 to 100 * 100 / speed)
        new_freq = torch.tensor([resampler.new_freq for resampler in self.resamplers])[choice]
        orig_freq = torch.tensor([resampler.orig_freq for resampler in self.resamplers])[choice]
        new_samples = (samples * new_freq + orig_freq - 1) // orig_freq  # the resampler's ceil
        out = wavs.new_zeros(wavs.shape[0], int(new_samples.max()))
        ends = to_device(new_samples, wavs.device)
        for index, resampler in enumerate(self.resamplers):
            rows = (choice == index).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            length = int(samples[rows].max())
            rows = to_device(rows, wavs.device)
            resampled = resampler(wavs[rows, :length])
            valid = torch.arange(resampled.shape[1], device=wavs.device) < ends[rows, None]  # zeros past the end
            out[rows, : resampled.shape[1]] = resampled * valid
        return out, (new_samples / out.shape[1]).to(wav_lens)


class FeatureAugmenter(torch.nn.Module):
    """SpeechBrain's ``Augmenter`` applying the first ``count`` of its ``augmentations`` (all by default),
    in order, as it does with ``min_augmentations`` = ``max_augmentations`` = ``count``, without
    waiting for the GPU where SpeechBrain's would.

    SpeechBrain's Augmenter and ``SpectrogramDrop`` draw on the features' device and read the draws
    back (how many augmentations, how many masks, how long), several waits for the GPU a batch. Here
    each ``SpectrogramDrop`` (time or frequency masking, ``replace`` "zeros" or "mean") has its masks
    drawn on the CPU, with SpeechBrain's distribution, and only built on the device; any other
    augmentation (e.g. ``Warping``) is applied as it is. The lengths are kept and no augmented copy
    is added.

    Example
    -------
    >>> from speechbrain.augment.freq_domain import SpectrogramDrop
    >>> augmenter = FeatureAugmenter([SpectrogramDrop(dim=1), SpectrogramDrop(dim=2)])
    >>> feats, lens = augmenter(torch.ones(2, 100, 80), torch.ones(2))
    >>> bool((feats == 0).any()), feats.shape
    (True, torch.Size([2, 100, 80]))
    """

    def __init__(self, augmentations, count=None):
        super().__init__()
        augmentations = augmentations[:count]
        for augmentation in augmentations:
            if isinstance(augmentation, SpectrogramDrop) and augmentation.replace not in ("zeros", "mean"):
                raise ValueError(
                    f"FeatureAugmenter's SpectrogramDrop replaces masked values with zeros or the mean, not "
                    f"{augmentation.replace!r}"
                )
        self.augmentations = torch.nn.ModuleList(augmentations)

    def forward(self, feats, lengths):
        """(batch, time, features) and relative lengths -> augmented features and the same lengths."""
        for augmentation in self.augmentations:
            if isinstance(augmentation, SpectrogramDrop):
                feats = self.drop(feats, augmentation)
            else:
                feats = augmentation(feats)
        return feats, lengths

    @staticmethod
    def drop(feats, drop):
        """SpeechBrain's SpectrogramDrop ``drop`` with its draws made on the CPU."""
        batch, time, features = feats.shape
        size = time if drop.dim == 1 else features
        count = int(torch.randint(drop.drop_count_low, drop.drop_count_high + 1, (1,)))
        if count == 0:
            return feats
        length = torch.randint(drop.drop_length_low, drop.drop_length_high, (batch, count, 1))
        start = torch.randint(0, max(1, size), (batch, count, 1))  # as SpeechBrain's: masks may run past the end
        position = torch.arange(size, device=feats.device).view(1, 1, -1)
        start, end = to_device(torch.stack([start, start + length]), feats.device)  # one copy
        masked = ((start <= position) & (position < end)).any(dim=1)
        masked = masked.unsqueeze(2) if drop.dim == 1 else masked.unsqueeze(1)
        value = feats.mean().detach() if drop.replace == "mean" else feats.new_zeros(())
        return torch.where(masked, value.to(feats.dtype), feats)  # masked_fill would read a tensor value back

    def replicate_labels(self, labels):
        """The labels of the masked batch: the same (the interface of SpeechBrain's ``Augmenter``, which the
        recipes call, since an Augmenter may add augmented copies)."""
        return labels
