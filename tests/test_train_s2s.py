"""End-to-end checks of train_S2S.py: tiny encoder-decoders trained on a slice of the demo corpus.

Each run prepares the data, trains the tokenizer, trains a few epochs with beam-search validation,
averages the best checkpoints and decodes the test slice. The training loss must fall with either
decoder (Transformer, Mamba with its cached search), and a rerun with more epochs must resume from the
last checkpoint instead of starting again. Test decoding fuses a Transformer LM read from a local file
when ``lm_file`` is set.
"""

import os
import re

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from recipe_runs import ROOT, run_script
from train_S2S import build_test_scorer

# A model small enough to train in seconds on a CPU.
TINY_MODEL = [
    "--d_model=64",
    "--d_ffn=128",
    "--num_encoder_layers=1",
    "--num_decoder_layers=1",
    "--kernel_size=7",
    "--cnn_channels=(8, 8)",
    "--cnn_output_size=160",  # 8 channels x (80 mels / 4)
]
TINY_MAMBA = ["--d_state=4"]

# A slice of the demo corpus, learnt fast: no augmentation, small test beam.
TINY_RUN = [
    "--select_n_sentences=[24, 4, 4]",
    "--max_batch_length_train=8",
    "--n_warmup_steps=10",
    "--lr_adam=0.005",
    "--num_fea_augmentations=0",
    "--speed_changes=[100]",
    "--test_beam_size=4",
]


def run_recipe(config, output_folder, *overrides):
    """Runs train_S2S.py on hparams/S2S/demo_<config>.yaml from tmp space; returns the finished process."""
    return run_script(
        "train_S2S.py",
        f"hparams/S2S/demo_{config}.yaml",
        output_folder,
        *TINY_MODEL,
        *(TINY_MAMBA if "mamba" in config else []),
        *TINY_RUN,
        *overrides,
    )


def log_epochs(train_log):
    """(epoch, optimizer steps, train loss, valid line) of each epoch in SpeechBrain's train_log.txt."""
    with open(train_log, encoding="utf-8") as f:
        return [
            (int(m[1]), int(m[2]), float(m[3]), m[0])
            for m in re.finditer(r"epoch: (\d+), lr: \S+, steps: (\d+) - train loss: ([0-9.e+-]+).*", f.read())
        ]


@pytest.mark.parametrize(
    "config", ["conmamba", "conmambamamba"], ids=["transformer_decoder", "mamba_decoder"]
)
def test_tiny_training_run_learns_and_decodes(config, tmp_path):
    proc = run_recipe(config, tmp_path, "--number_of_epochs=6", "--valid_search_interval=3")

    epochs = log_epochs(tmp_path / "train_log.txt")
    assert [e[0] for e in epochs] == [1, 2, 3, 4, 5, 6]
    losses = [e[2] for e in epochs]
    assert losses[-1] < 0.7 * losses[0], losses
    # Token accuracy every epoch, beam-search WER every valid_search_interval epochs.
    assert all("valid ACC" in e[3] for e in epochs)
    assert ["valid WER" in e[3] for e in epochs] == [False, False, True, False, False, True]

    wer_file = tmp_path / "wer_test.txt"
    assert "%WER" in wer_file.read_text(encoding="utf-8")
    assert re.search(r"Test WER on test: [0-9.]+ %", proc.stdout), proc.stdout[-2000:]


def test_rerun_with_more_epochs_resumes_from_the_checkpoint(tmp_path):
    run_recipe("conformer", tmp_path, "--number_of_epochs=1")
    first = log_epochs(tmp_path / "train_log.txt")
    assert [e[0] for e in first] == [1]

    proc = run_recipe("conformer", tmp_path, "--number_of_epochs=3")
    output = proc.stdout + proc.stderr
    assert "Going into epoch 1" not in output
    assert "Going into epoch 2" in output

    epochs = log_epochs(tmp_path / "train_log.txt")
    assert [e[0] for e in epochs] == [1, 2, 3]
    assert epochs[0] == first[0]
    steps = [e[1] for e in epochs]
    assert steps[0] < steps[1] < steps[2]  # the optimizer step count carries on


def test_test_search_fuses_a_local_transformer_lm(tmp_path):
    yaml_file = os.path.join(ROOT, "hparams", "S2S", "demo_conmambamamba.yaml")
    tiny_lm = {"lm_d_model": 32, "lm_nhead": 2, "lm_num_layers": 1, "lm_d_ffn": 64}
    with open(yaml_file, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, {"output_folder": str(tmp_path), "output_neurons": 40, **tiny_lm})
    assert set(build_test_scorer(hparams, "cpu").full_scorers) == {"ctc"}  # off by default

    lm = hparams["lm_model"]()
    torch.save(lm.state_dict(), tmp_path / "lm.ckpt")
    hparams["lm_file"] = str(tmp_path / "lm.ckpt")
    scorer = build_test_scorer(hparams, "cpu")
    assert set(scorer.full_scorers) == {"ctc", "transformerlm"}
    assert scorer.weights == {**scorer.weights, "ctc": 0.4, "transformerlm": 0.6}
    loaded = scorer.full_scorers["transformerlm"].lm.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in lm.state_dict().items())

    searcher = hparams["test_search"](scorer=scorer)
    hparams["modules"]["encoder_decoder"].eval()
    with torch.no_grad():
        hyps, _, _, _ = searcher(torch.randn(2, 10, hparams["d_model"]), torch.tensor([1.0, 0.7]))
    assert len(hyps) == 2
