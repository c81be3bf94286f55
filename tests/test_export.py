"""TorchScript export of the CTC ConMamba model: same log-probabilities as the eager model, any length."""

import os

import pytest
import torch

from modules.inference.export import export_ctc
from modules.mamba.selective_scan import scan_loop, selective_scan_ref
from modules.models.front_end import WaveformEncoder
from recipe_runs import ROOT
from test_streaming import load_tiny

KEYS = ("compute_features", "normalize", "CNN", "speech_encoder", "ctc_lin")


def test_scripted_scan_matches_the_reference():
    generator = torch.Generator().manual_seed(0)
    batch, dim, state, time, groups = 2, 8, 4, 13, 2
    u, delta = (torch.randn(batch, dim, time, generator=generator, dtype=torch.float64) for _ in range(2))
    A = -torch.rand(dim, state, generator=generator, dtype=torch.float64)
    B, C = (torch.randn(batch, groups, state, time, generator=generator, dtype=torch.float64) for _ in range(2))
    D, bias = torch.randn(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    expected = selective_scan_ref(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True)
    torch.testing.assert_close(scan_loop(u, delta, A, B, C, D, bias, True), expected)


@pytest.mark.parametrize("yaml_name", ["demo_conmamba.yaml", "demo_conmamba_causal.yaml"])
def test_exported_model_matches_eager_for_untraced_lengths_and_batches(yaml_name, tmp_path):
    hparams = load_tiny(os.path.join(ROOT, "hparams", "CTC", yaml_name), tmp_path)
    hparams["normalize"](hparams["compute_features"](torch.randn(2, 16000)), torch.ones(2), epoch=0)
    eager = WaveformEncoder(*(hparams[key] for key in KEYS)).eval()

    export_ctc(hparams, example_samples=16000).save(str(tmp_path / "model.pt"))
    exported = torch.jit.load(str(tmp_path / "model.pt"))

    generator = torch.Generator().manual_seed(1)
    for samples, wav_lens in [(7000, [1.0]), (16000, [1.0, 0.75]), (37000, [0.4, 1.0, 0.8])]:
        wavs = torch.randn(len(wav_lens), samples, generator=generator)
        wav_lens = torch.tensor(wav_lens)
        with torch.no_grad():
            expected = eager(wavs, wav_lens)
            output = exported(wavs, wav_lens)
        assert output.shape == expected.shape
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)

