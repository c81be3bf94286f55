"""The recipes' SentencePiece tokenizer (modules/training/recipe.py: train_tokenizer,
modules/training/sentencepiece_models.py) is never trained on a partial or outdated text, never loaded
half-written, trains in a folder whose path has a space, and has as many tokens as the output layer has
outputs."""

import csv
import os

import pytest

from librispeech_prepare import prepare_librispeech
from modules.training.recipe import train_tokenizer
from recipe_runs import DEMO_DATA, run_tiny_ctc
from reliability_report import record

pytestmark = pytest.mark.reliability


@pytest.fixture
def hparams(tmp_path):
    """The tokenizer keys of the CTC demo yaml, for 100 demo training utterances."""
    prepare_librispeech(DEMO_DATA, tmp_path, tr_splits=["train"], select_n_sentences=[100])
    return {
        "train_csv": str(tmp_path / "train.csv"),
        "tokenizer_folder": str(tmp_path / "tokenizer"),
        "output_neurons": 31,
        "token_type": "char",
        "character_coverage": 1.0,
        "bos_index": 1,
        "eos_index": 2,
    }


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def transcripts(hparams):
    return [row["wrd"] for row in read_csv(hparams["train_csv"])]


def training_text(hparams):
    with open(os.path.join(hparams["tokenizer_folder"], "train.txt"), encoding="utf-8") as f:
        return f.read().splitlines()


def test_a_text_cut_short_by_a_killed_run_is_not_reused(hparams):
    """A run killed while writing the training text left half of it; the next run must not train on it."""
    os.makedirs(hparams["tokenizer_folder"])
    half = transcripts(hparams)[:50]
    with open(os.path.join(hparams["tokenizer_folder"], "train.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(half) + "\n")

    tokenizer = train_tokenizer(hparams)

    assert training_text(hparams) == transcripts(hparams)
    assert tokenizer.sp.vocab_size() == 31
    record(
        "tokenizer/train.txt cut short (50 of 100 lines) by a run killed while writing it, then the run restarted",
        "the text is written again whole (100 lines) and the tokenizer trained on it; the text and the model are "
        "written under temporary names and reused only when tokenizer/31_char.json records the same text hash "
        "and options",
    )


def test_a_model_cut_short_by_a_full_disk_is_trained_again(hparams, caplog):
    trained = train_tokenizer(hparams).prefix_model_file + ".model"
    with open(trained, "rb") as f:
        whole = f.read()
    with open(trained, "wb") as f:
        f.write(whole[: len(whole) // 3])

    with caplog.at_level("INFO"):
        train_tokenizer(hparams)

    with open(trained, "rb") as f:
        assert f.read() == whole
    assert f"Training the tokenizer again: {trained} was not trained on" in caplog.text
    record(
        "tokenizer model cut to a third of its bytes (a full disk), then the run restarted",
        "the model is trained again (byte-identical to the first one) instead of failing with 'could not parse "
        "ModelProto' on every run",
    )


def test_a_changed_training_text_trains_the_tokenizer_again(hparams):
    train_tokenizer(hparams)
    rows = read_csv(hparams["train_csv"])[:10]
    with open(hparams["train_csv"], "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    train_tokenizer(hparams)

    assert training_text(hparams) == [row["wrd"] for row in rows]


def test_an_output_folder_with_a_space_trains(tmp_path):
    output = tmp_path / "my runs" / "ctc demo"
    output.mkdir(parents=True)
    run_tiny_ctc(
        output, "--select_n_sentences=[16, 4, 4]", "--number_of_epochs=1", "--avg_checkpoints=1", cwd=tmp_path
    )
    assert (output / "tokenizer" / "31_char.model").is_file()
    assert (output / "wer_test.txt").is_file()
    assert (output / "inference" / "model.ckpt").is_file()
    record(
        "output folder path with a space (train_CTC.py --output_folder='.../my runs/ctc demo')",
        "trains, tests and writes its inference folder (SentencePiece gets its options as keyword arguments, "
        "not one command-line string)",
    )
