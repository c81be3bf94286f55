"""End-to-end check of train_decoder_only.py: one tiny model per family on a slice of the demo corpus.

Each run prepares the data, computes (or reuses) the speech units, trains the joint tokenizer,
trains a few epochs, averages the best checkpoints and beam-searches the test slice; the training
loss must fall and the WER file must exist. The three runs share one speech-token cache.
"""

import re

import pytest

from recipe_runs import run_script, train_losses

# Small enough to train in seconds on a CPU.
TINY = [
    "--select_n_sentences=[40, 8, 8]",
    "--number_of_epochs=6",
    "--n_warmup_steps=6",
    "--lr=0.005",
    "--max_batch_length_train=400",
    "--num_clusters=16",
    "--vocab_size=80",
    "--test_beam_size=2",
    "--test_max_length=12",
    "--avg_checkpoints=2",
    "--d_model=32",
    "--dropout=0.0",
]
FAMILIES = {
    "mamba-parallel": ("demo_mamba.yaml", ["--num_blocks=1", "--d_state=4", "--prefixing=parallel"]),
    "mamba2-serial": ("demo_mamba2.yaml", ["--num_blocks=1", "--d_state=8", "--headdim=16", "--prefixing=serial"]),
    "transformer-prefix": (
        "demo_transformer.yaml",
        ["--num_layers=1", "--nhead=2", "--d_ffn=64", "--prefix_lm=True", "--relative_buckets=8"],
    ),
}


@pytest.fixture(scope="module")
def token_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("speech_tokens")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_training_run_lowers_the_loss_and_decodes(family, tmp_path, token_folder):
    yaml, overrides = FAMILIES[family]
    proc = run_script(
        "train_decoder_only.py",
        f"hparams/decoder_only/{yaml}",
        tmp_path,
        f"--token_folder={token_folder}",
        *TINY,
        *overrides,
    )

    losses = train_losses(tmp_path / "train_log.txt")
    assert len(losses) == 6
    assert losses[-1] < 0.8 * losses[0], losses

    assert "%WER" in (tmp_path / "wer_test.txt").read_text(encoding="utf-8")
    assert re.search(r"Test WER on test: [0-9.]+ %", proc.stdout), proc.stdout[-2000:]
