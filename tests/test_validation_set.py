"""Validation data as the published MADEON setup has it (arXiv 2411.06968, released recipe): dev-clean and
dev-other merged into one validation set, and training and validation utterances over 30 s left out."""

import csv
import os
import statistics

from librispeech_prepare import prepare_librispeech
from modules.training.recipe import load_datasets, prepare_manifests
from recipe_runs import DEMO_DATA


def demo_hparams(tmp_path, **overrides):
    """The data keys of a recipe yaml, on the demo corpus (its splits: train, dev, test)."""
    hparams = dict(
        data_folder=DEMO_DATA, output_folder=str(tmp_path), train_splits=["train"], dev_splits=["dev", "test"],
        test_splits=["test"], select_n_sentences=None, skip_prep=False, bad_data="fail", max_duration=40.0,
        valid_csv=str(tmp_path / "valid.csv"), sorting="random", train_dataloader_opts={},
    )
    hparams.update(overrides)
    return hparams


def rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_a_valid_csv_that_is_no_split_merges_all_dev_splits(tmp_path):
    prepare_manifests(demo_hparams(tmp_path), prepare_librispeech)
    merged = rows(tmp_path / "valid.csv")
    assert [r["ID"] for r in merged] == [r["ID"] for r in rows(tmp_path / "dev.csv") + rows(tmp_path / "test.csv")]


def test_a_valid_csv_of_one_split_stays_that_split(tmp_path):
    hparams = demo_hparams(tmp_path, dev_splits=["dev"], valid_csv=str(tmp_path / "dev.csv"))
    prepare_manifests(hparams, prepare_librispeech)
    assert not os.path.exists(tmp_path / "valid.csv")
    flacs = [f for _, _, files in os.walk(os.path.join(DEMO_DATA, "dev")) for f in files if f.endswith(".flac")]
    assert len(rows(tmp_path / "dev.csv")) == len(flacs)


def test_max_train_duration_leaves_out_long_training_and_validation_utterances_only(tmp_path):
    prepare_manifests(demo_hparams(tmp_path), prepare_librispeech)
    durations = [float(r["duration"]) for r in rows(tmp_path / "train.csv")]
    limit = statistics.median(durations)
    hparams = demo_hparams(tmp_path, max_train_duration=limit)
    csvs = [os.path.join(tmp_path, name) for name in ("train.csv", "valid.csv", "test.csv")]
    train, valid, tests = load_datasets(hparams, csvs[0], csvs[1], {"test": csvs[2]})
    whole_train, whole_valid, _ = load_datasets(demo_hparams(tmp_path), csvs[0], csvs[1], {"test": csvs[2]})

    assert len(train) == sum(d <= limit for d in durations) < len(whole_train)
    assert all(float(train.data[i]["duration"]) <= limit for i in train.data_ids)
    assert 0 < len(valid) < len(whole_valid)
    assert all(float(valid.data[i]["duration"]) <= limit for i in valid.data_ids)
    assert len(tests["test"]) == len(rows(csvs[2]))  # test sets are never filtered
