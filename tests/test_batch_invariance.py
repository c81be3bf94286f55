"""An utterance's output does not depend on its batch: the full model, waveform to log-probabilities, run
on a short utterance alone and padded next to an utterance 30x longer, agrees to 1e-5 on the short
utterance's frames, and those frames are exactly as many as its samples give (modules/models/front_end.py).

Random weights (the demo yamls' models), CPU, eval mode. The recipes' own ``compute_forward`` is run, so
the test covers what training, validation and test compute.
"""

import os

import pytest
import speechbrain as sb
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.batch import PaddedBatch

from modules.models.front_end import WaveformEncoder
from recipe_runs import ROOT

SHORT, LONG = 5920, 30 * 5920  # samples; the case: 10 valid encoder frames, 9 before the fix
TOLERANCE = 1e-5


def encoder_frames(samples):
    """Fbank (10 ms hop, centred) then two kernel-3, stride-2 convolutions."""
    frames = samples // 160 + 1
    for _ in range(2):
        frames = (frames - 1) // 2 + 1
    return frames


def load(paradigm, name, tmp_path):
    with open(os.path.join(ROOT, "hparams", paradigm, name), encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, {"output_folder": str(tmp_path), "data_folder": str(tmp_path)})
    # Global feature statistics of some audio, as after training (the fresh normalizer has none)
    feats = hparams["compute_features"](torch.randn(2, 16000))
    hparams["normalize"].train()(feats, torch.ones(2), epoch=0)
    return hparams


def waveforms(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SHORT, generator=generator) * 0.1, torch.randn(LONG, generator=generator) * 0.1


def batch(wavs, **items):
    """SpeechBrain's PaddedBatch of the waveforms, in the given order, plus per-utterance items."""
    examples = [dict(id=str(i), sig=wav, **{k: v[i] for k, v in items.items()}) for i, wav in enumerate(wavs)]
    return PaddedBatch(examples)


def brain(module, hparams):
    """The recipe's Brain on the CPU, in eval mode, at an epoch without validation beam search."""
    asr = module.ASR(modules=hparams["modules"], hparams=hparams, run_opts={"device": "cpu"})
    asr.modules.eval()
    hparams["epoch_counter"].current = 1
    return asr


def valid_frames(log_probs, lengths):
    return torch.round(lengths * log_probs.shape[1]).long().tolist()


@pytest.mark.parametrize("long_first", [False, True])
def test_ctc_log_probabilities_do_not_depend_on_the_batch(long_first, tmp_path):
    import train_CTC

    asr = brain(train_CTC, load("CTC", "demo_conmamba.yaml", tmp_path))
    short, long = waveforms()
    order = [long, short] if long_first else [short, long]
    with torch.no_grad():
        alone, alone_lens = asr.compute_forward(batch([short]), sb.Stage.TEST)
        together, lens = asr.compute_forward(batch(order), sb.Stage.TEST)
    row = 1 if long_first else 0
    n = encoder_frames(SHORT)
    assert n == 10
    assert valid_frames(alone, alone_lens) == [n]
    assert valid_frames(together, lens)[row] == n
    assert valid_frames(together, lens)[1 - row] == together.shape[1] == encoder_frames(LONG)
    assert torch.allclose(together[row, :n], alone[0, :n], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", ["demo_conmamba.yaml", "demo_conmambamamba.yaml", "demo_conformer.yaml"])
def test_s2s_log_probabilities_do_not_depend_on_the_batch(name, tmp_path):
    import train_S2S

    hparams = load("S2S", name, tmp_path)
    asr = brain(train_S2S, hparams)
    short, long = waveforms()
    generator = torch.Generator().manual_seed(1)
    tokens = [torch.randint(3, hparams["output_neurons"], (n,), generator=generator) for n in (7, 40)]
    with torch.no_grad():
        p_ctc_alone, p_seq_alone, lens_alone, _ = asr.compute_forward(
            batch([short], tokens_bos=tokens[:1]), sb.Stage.VALID
        )
        p_ctc, p_seq, lens, _ = asr.compute_forward(batch([short, long], tokens_bos=tokens), sb.Stage.VALID)
    n = encoder_frames(SHORT)
    assert valid_frames(p_ctc_alone, lens_alone) == [n] and valid_frames(p_ctc, lens)[0] == n
    assert torch.allclose(p_ctc[0, :n], p_ctc_alone[0, :n], atol=TOLERANCE, rtol=0)
    # The decoder's teacher-forced log-probabilities over the short utterance's 7 tokens
    assert torch.allclose(p_seq[0, :7], p_seq_alone[0, :7], atol=TOLERANCE, rtol=0)


def test_unit_encoder_layers_do_not_depend_on_the_batch(tmp_path):
    # The decoder-only demos take their speech units from a layer of the CTC encoder, run by the
    # inference folder's WaveformEncoder (modules.units.features.EncoderFeatures): every layer's output.
    hparams = load("CTC", "demo_conmamba.yaml", tmp_path)
    encoder = WaveformEncoder(*(hparams[k] for k in ("compute_features", "normalize", "CNN", "speech_encoder")))
    encoder.eval()
    outputs = []
    for layer in hparams["speech_encoder"].encoder.layers:
        layer.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    short, long = waveforms(seed=2)
    wavs = torch.zeros(2, LONG)
    wavs[0, :SHORT], wavs[1] = short, long
    with torch.no_grad():
        encoder(short[None], torch.ones(1))
        alone, outputs[:] = list(outputs), []
        encoder(wavs, torch.tensor([SHORT / LONG, 1.0]))
    n = encoder_frames(SHORT)
    assert len(outputs) == len(alone) == hparams["num_encoder_layers"]
    for index, (together, single) in enumerate(zip(outputs, alone)):
        assert single.shape[1] == n
        assert torch.allclose(together[0, :n], single[0], atol=TOLERANCE, rtol=0), f"layer {index + 1}"
