"""modules/training/augmentation.py: the recipes' augmentations on the device, equal to SpeechBrain's."""

import pytest
import torch
from speechbrain.augment.freq_domain import SpectrogramDrop, Warping

from modules.training.augmentation import FeatureAugmenter, UtteranceSpeedPerturb

LENGTHS = [16000, 12345, 8000, 19, 3, 15999]


def padded_batch(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    wavs = torch.zeros(len(lengths), max(lengths))
    for row, length in enumerate(lengths):
        wavs[row, :length] = torch.randn(length, generator=generator)
    return wavs, torch.tensor(lengths, dtype=torch.float) / max(lengths)


def test_each_utterance_is_resampled_as_alone_at_its_own_speed():
    perturb = UtteranceSpeedPerturb(orig_freq=16000, speeds=[95, 100, 105])
    wavs, lens = padded_batch(LENGTHS)
    wavs[1, LENGTHS[1]:] = 0.0
    torch.manual_seed(1)
    out, out_lens = perturb(wavs, lens)
    torch.manual_seed(1)
    speeds = torch.randint(3, (len(LENGTHS),))  # the draws the module made
    assert len(set(speeds.tolist())) == 3  # the seed gives every speed a row
    for row, length in enumerate(LENGTHS):
        alone = perturb.resamplers[speeds[row]](wavs[row : row + 1, :length])[0]
        valid = round(float(out_lens[row] * out.shape[1]))
        assert valid == alone.shape[0]
        torch.testing.assert_close(out[row, :valid], alone, atol=1e-6, rtol=0)
        assert not out[row, valid:].any()  # padding stays zero
    assert out_lens.max() == 1.0


def test_fractional_speeds_give_the_lengths_of_resampling_alone():
    """A fractional speed resamples orig_freq to round(orig_freq * 100 / speed), not exactly 100 / speed."""
    perturb = UtteranceSpeedPerturb(orig_freq=160, speeds=[92.5, 107.3])  # a low rate: small filters
    lengths = [1600, 1234, 7, 999]
    wavs, lens = padded_batch(lengths)
    torch.manual_seed(3)
    out, out_lens = perturb(wavs, lens)
    torch.manual_seed(3)
    speeds = torch.randint(2, (len(lengths),))
    assert len(set(speeds.tolist())) == 2
    for row, length in enumerate(lengths):
        alone = perturb.resamplers[speeds[row]](wavs[row : row + 1, :length])[0]
        assert round(float(out_lens[row] * out.shape[1])) == alone.shape[0]


def test_speeds_are_drawn_per_utterance():
    perturb = UtteranceSpeedPerturb(orig_freq=16000, speeds=[90, 110])
    wavs, lens = padded_batch([16000] * 64)
    torch.manual_seed(0)
    out, out_lens = perturb(wavs, lens)
    samples = {round(float(x) * out.shape[1]) for x in out_lens}
    assert samples == {17778, 14546}  # ceil(16000 * 100 / speed): both speeds in one batch


@pytest.mark.parametrize("replace", ["zeros", "mean"])
def test_augmenter_draws_the_masks_of_speechbrains_spectrogram_drops(replace):
    """With the same seed the CPU draws are SpeechBrain's, so the augmented features are identical; other
    augmentations (time warping) run as they are, in order; ``count`` keeps the first ones."""
    time_drop = SpectrogramDrop(drop_length_low=6, drop_length_high=12, drop_count_low=1, drop_count_high=5,
                                replace=replace, dim=1)
    freq_drop = SpectrogramDrop(drop_length_low=10, drop_length_high=20, drop_count_low=1, drop_count_high=3,
                                replace=replace, dim=2)
    warping = Warping(warp_window=5, warp_mode="bicubic", dim=1)
    feats, lens = torch.randn(5, 300, 80), torch.rand(5)
    augmenter = FeatureAugmenter([time_drop, freq_drop, warping])
    for seed in range(5):
        torch.manual_seed(seed)
        expected = warping(freq_drop(time_drop(feats.clone())))
        torch.manual_seed(seed)
        augmented, augmented_lens = augmenter(feats, lens)
        torch.testing.assert_close(augmented, expected, atol=0, rtol=0)
        assert augmented_lens is lens
        assert not torch.equal(augmented, feats)
    assert torch.equal(FeatureAugmenter([time_drop, freq_drop], count=0)(feats, lens)[0], feats)
    torch.manual_seed(0)
    expected = time_drop(feats.clone())
    torch.manual_seed(0)
    assert torch.equal(FeatureAugmenter([time_drop, freq_drop], count=1)(feats, lens)[0], expected)
    tokens = torch.arange(5)
    assert augmenter.replicate_labels(tokens) is tokens  # no augmented copies


def test_augmenter_refuses_a_replacement_it_does_not_do():
    with pytest.raises(ValueError, match="zeros or the mean"):
        FeatureAugmenter([SpectrogramDrop(replace="cutcat")])
