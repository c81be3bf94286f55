"""End-to-end check of train_decoder_only.py: one tiny model per family on a slice of the demo corpus.

Each run prepares the data, computes (or reuses) the speech units, trains the joint tokenizer,
trains a few epochs, averages the best checkpoints and beam-searches the test slice; the training
loss must fall and the WER file must exist. The three runs share one speech-token cache. Two take
their units from filterbanks, the third as the demo yamls do, from a CTC encoder (the tiny CTC run's).
"""

import json
import os
import re

import pytest
from test_speech_tokenizer import make_tokenizer, manifest, read_rows  # noqa: F401 (manifest: a fixture)

from modules.units.manifests import SPEED_PERTURBED_TRAIN, TRAIN
from modules.units.tokens import sequence_text
from recipe_runs import run_script, tiny_ctc_run, train_losses
from train_decoder_only import prepare_tokens

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
FBANK_UNITS = "--unit_features=!new:modules.units.features.FbankFeatures"  # units that need no CTC model
FAMILIES = {
    "mamba-parallel": (  # also trains on speed-perturbed copies, as the published configs
        "demo_mamba.yaml",
        ["--num_blocks=1", "--d_state=4", "--prefixing=parallel", "--speed_perturb_speeds=[90, 100, 110]", FBANK_UNITS],
    ),
    "mamba2-serial": (  # the yaml's own units: a CTC encoder's (encoder_units)
        "demo_mamba2.yaml",
        ["--num_blocks=1", "--d_state=8", "--headdim=16", "--prefixing=serial"],
    ),
    "transformer-prefix": (
        "demo_transformer.yaml",
        ["--num_layers=1", "--nhead=2", "--d_ffn=64", "--prefix_lm=True", "--relative_buckets=8", FBANK_UNITS],
    ),
}


@pytest.fixture(scope="module")
def token_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("speech_tokens")


@pytest.fixture(scope="module")
def encoder_units(tmp_path_factory):
    """Overrides that point the demo yamls' units to the tiny CTC run's encoder (its one layer)."""
    return [f"--unit_encoder={tiny_ctc_run(tmp_path_factory) / 'inference'}", "--unit_layer=1"]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_training_run_lowers_the_loss_and_decodes(family, tmp_path, token_folder, request):
    yaml, overrides = FAMILIES[family]
    if FBANK_UNITS not in overrides:
        overrides = overrides + request.getfixturevalue("encoder_units")
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
    unit_settings = [json.loads(path.read_text()) for path in token_folder.glob("units_*/settings.json")]
    unit_kinds = {settings["features"]["kind"] for settings in unit_settings}
    assert ("fbank" if FBANK_UNITS in overrides else "encoder") in unit_kinds


def test_sentencepiece_learns_from_the_recorded_training_set_and_the_lm_from_all_speeds(manifest, tmp_path):
    hparams = dict(
        train_csv=manifest, valid_csv=manifest, test_csv=[], token_folder=str(tmp_path),
        speech_tokenizer=make_tokenizer(speeds=[90, 100, 110]), vocab_size=60, text_repeats=2, eos_index=1,
    )
    units, tokenizer = prepare_tokens(hparams)
    recorded = read_rows(units[TRAIN])
    assert len(read_rows(units[SPEED_PERTURBED_TRAIN])) == 3 * len(recorded)
    text_file = os.path.join(os.path.dirname(tokenizer.prefix_model_file), "sentencepiece_text.txt")
    with open(text_file, encoding="utf-8") as f:
        lines = f.read().splitlines()  # the text SentencePiece was trained on
    assert lines == [sequence_text(row["units"], row["wrd"].lower(), text_repeats=2) for row in recorded]
