"""Bad data meets the recipes: with ``bad_data: fail`` the CTC training (and the speech units of the
decoder-only recipe) stop naming each unusable file; with ``skip`` they leave them out, log and count them,
and training runs to the end.

A few demo utterances are copied into a temporary corpus, the manifests are prepared, and then files and
manifest rows are broken as a corrupt download or a hand-edited manifest would break them.
"""

import csv
import os
import re
import shutil

import numpy as np
import pytest
import soundfile

from librispeech_prepare import prepare_librispeech
from modules.training.data_checks import BadDataError
from modules.units.features import FbankFeatures
from modules.units.manifests import UnitManifestWriter
from recipe_runs import DEMO_DATA, run_tiny_ctc
from reliability_report import record

pytestmark = pytest.mark.reliability

CHAPTERS = {"train": ["1001/10011", "1002/10021"], "dev": ["2001/20011"], "test": ["3001/30011"]}
# What is said of each row that break_manifest_rows breaks, after its audio path
ROW_PROBLEMS = [
    "is missing", "is empty (duration 0.0 s)", "lasts 120.0 s, more than max_duration", "has an empty transcript"
]


@pytest.fixture
def corpus(tmp_path):
    """A copy of a few demo chapters and its manifests in ``output``; returns (data folder, output)."""
    data_folder = tmp_path / "LibriSpeech"
    for split, chapters in CHAPTERS.items():
        for chapter in chapters:
            shutil.copytree(os.path.join(DEMO_DATA, split, chapter), data_folder / split / chapter)
    output = tmp_path / "output"
    prepare_librispeech(
        data_folder, output, tr_splits=["train"], dev_splits=["dev"], te_splits=["test"],
        merge_lst=["train"], merge_name="train.csv",
    )
    return data_folder, output


def read_manifest(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_manifest(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def break_manifest_rows(output):
    """Breaks the first four train.csv rows: missing audio, zero duration, 120 s, empty transcript.
    Returns their audio paths."""
    rows = read_manifest(output / "train.csv")
    broken = [row["wav"] for row in rows[:4]]
    os.remove(rows[0]["wav"])
    rows[1]["duration"] = "0.0"
    rows[2]["duration"] = "120.0"
    rows[3]["wrd"] = " "
    write_manifest(output / "train.csv", rows)
    return broken


def truncate_audio(output):
    """Cuts the last training FLAC to half its bytes (its header still reads); returns its path."""
    truncated = read_manifest(output / "train.csv")[-1]["wav"]
    with open(truncated, "rb") as f:
        head = f.read(os.path.getsize(truncated) // 2)
    with open(truncated, "wb") as f:
        f.write(head)
    return truncated


def resample_audio(output):
    """Replaces the last but one training FLAC by 8 kHz audio; returns its path."""
    resampled = read_manifest(output / "train.csv")[-2]["wav"]
    soundfile.write(resampled, np.zeros(8000), 8000)
    return resampled


def checkpoints(output):
    return list((output / "save").glob("CKPT*"))


def run_recipe(output, *overrides, returncode=0):
    """Trains the tiny CTC model one epoch on the prepared manifests; returns (log.txt, what it printed)."""
    proc = run_tiny_ctc(
        output,
        "--skip_prep=True",
        "--number_of_epochs=1",
        "--avg_checkpoints=1",
        *overrides,
        returncode=returncode,
    )
    with open(output / "log.txt", encoding="utf-8") as f:
        return f.read(), proc.stdout + proc.stderr


def relative(path, data_folder):
    return os.path.relpath(path, data_folder)


def test_unusable_manifest_rows_stop_training_naming_each_file(corpus):
    data_folder, output = corpus
    broken = break_manifest_rows(output)

    _, text = run_recipe(output, returncode=1)

    assert "BadDataError: 4 unusable utterances" in text
    for wav, problem in zip(broken, ROW_PROBLEMS):
        assert f"{wav} {problem}" in text
    assert "bad_data: skip" in text  # the fix is named
    assert not checkpoints(output)
    record(
        "train.csv rows with a missing file, zero duration, 120 s duration, empty transcript (bad_data: fail)",
        f"train_CTC.py exited 1 before training with BadDataError naming all {len(broken)} files: "
        + ", ".join(relative(wav, data_folder) for wav in broken),
    )


def test_undecodable_audio_stops_training_naming_it(corpus):
    data_folder, output = corpus
    truncated = truncate_audio(output)

    _, text = run_recipe(output, returncode=1)

    assert f"BadDataError: audio file {truncated} cannot be decoded" in text
    assert not checkpoints(output)
    record(
        "truncated FLAC (half its bytes) listed in train.csv (bad_data: fail)",
        "train_CTC.py exited 1 during the first epoch, before any checkpoint: BadDataError 'audio file "
        f"{relative(truncated, data_folder)} cannot be decoded (...)'",
    )


def test_skip_leaves_out_bad_utterances_and_training_completes(corpus):
    data_folder, output = corpus
    broken = break_manifest_rows(output)
    truncated, resampled = truncate_audio(output), resample_audio(output)
    n_rows = len(read_manifest(output / "train.csv"))

    log, _ = run_recipe(output, "--bad_data=skip")

    assert f"Skipped 4 of {n_rows} utterances of {output / 'train.csv'}" in log
    for wav, problem in zip(broken, ROW_PROBLEMS):
        assert f"{wav} {problem}" in log
    assert f"audio file {truncated} cannot be decoded" in log
    assert f"audio file {resampled} is sampled at 8000 Hz, not 16000 Hz" in log
    dropped = [int(n) for n in re.findall(r"Dropped (\d+) of \d+ utterances from a batch", log)]
    assert sum(dropped) == 2  # one epoch reads each file once
    assert os.path.isfile(output / "wer_test.txt")
    record(
        "the 4 broken train.csv rows plus a truncated FLAC and an 8 kHz FLAC (bad_data: skip)",
        f"training completed and tested (exit 0, wer_test.txt written); log.txt: 'Skipped 4 of {n_rows} "
        f"utterances of train.csv', each named; {relative(truncated, data_folder)} (cannot be decoded) and "
        f"{relative(resampled, data_folder)} (8000 Hz) skipped when read and dropped from their batches "
        f"({', '.join(f'Dropped {n} of ...' for n in dropped)})",
    )


def speech_units(output, bad_data):
    """The unit manifests of train.csv, as train_decoder_only.py computes them (filterbank units)."""
    tokenizer = UnitManifestWriter(FbankFeatures(), num_clusters=4, kmeans_fraction=1.0, bad_data=bad_data)
    train_csv = str(output / "train.csv")
    return tokenizer(train_csv, {"train": train_csv}, output / "tokens")


def test_speech_units_stop_at_undecodable_audio_naming_it(corpus):
    data_folder, output = corpus
    truncated = truncate_audio(output)

    with pytest.raises(BadDataError, match=f"audio file {truncated} cannot be decoded"):
        speech_units(output, "fail")
    record(
        "truncated FLAC met while computing the speech units of train_decoder_only.py (bad_data: fail)",
        f"BadDataError: 'audio file {relative(truncated, data_folder)} cannot be decoded (...)'",
    )


def test_speech_units_leave_out_undecodable_audio_with_skip(corpus, caplog):
    data_folder, output = corpus
    truncated = truncate_audio(output)

    units = read_manifest(speech_units(output, "skip")["train"])

    rows = read_manifest(output / "train.csv")
    assert [row["ID"] for row in units] == [row["ID"] for row in rows if row["wav"] != truncated]
    assert all(row["units"] for row in units)
    messages = [entry.getMessage() for entry in caplog.records]
    assert sum(f"audio file {truncated} cannot be decoded" in message for message in messages) == 2  # k-means, units
    assert sum(message.startswith("Left 1 unreadable utterances") for message in messages) == 1
    record(
        "truncated FLAC met while computing the speech units of train_decoder_only.py (bad_data: skip)",
        f"unit manifest keeps {len(units)} of {len(rows)} utterances; warnings name "
        f"{relative(truncated, data_folder)} and log 'Left 1 unreadable utterances of train.csv out of ...'",
    )


def test_characters_outside_the_alphabet_stop_training_at_start_up(corpus):
    """Digits and an accent in a hand-edited transcript would grow the character tokenizer past the
    output layer (31), and torch's CTC loss takes labels outside it without an error."""
    _, output = corpus
    rows = read_manifest(output / "train.csv")
    rows[2]["wrd"] = "ROOM 101 CAFÉ"
    write_manifest(output / "train.csv", rows)

    _, text = run_recipe(output, returncode=1)

    message = text.strip().splitlines()[-1]
    assert "characters outside LibriSpeech's alphabet (A-Z and '): '0', '1', 'É'" in message
    assert f"e.g. utterance {rows[2]['ID']}: 'ROOM 101 CAFÉ'" in message
    assert "The tokenizer then has 34 tokens, more than output_neurons (31)" in message
    assert not checkpoints(output)
    record(
        "characters outside A-Z and the apostrophe ('ROOM 101 CAFÉ') in a train.csv transcript (CTC, characters)",
        f"stops at start-up, before training: {message[:420]} ...",
    )


def make_stereo(wav):
    """Rewrites a FLAC as two channels: the original and its half."""
    signal, rate = soundfile.read(wav)
    soundfile.write(wav, np.stack([signal, 0.5 * signal], axis=1), rate)


def test_stereo_audio_is_mixed_down_in_training_validation_and_test(corpus):
    data_folder, output = corpus
    stereo = [read_manifest(output / f"{split}.csv")[0]["wav"] for split in ("train", "dev", "test")]
    for wav in stereo:
        make_stereo(wav)

    run_recipe(output)  # stopped with "IndexError: All tensors must have same number of dimensions"

    assert os.path.isfile(output / "wer_test.txt")
    assert stereo[2].split("/")[-1][: -len(".flac")] in (output / "wer_test.txt").read_text()
    record(
        "a stereo FLAC in each of train, dev and test (bad_data: fail)",
        "mixed down to mono when read (as transcribe.py does): training, validation and test completed (exit 0) "
        f"and {relative(stereo[2], data_folder)} is scored in wer_test.txt",
    )


def edit_manifest_by_hand(output):
    """Cuts the third train.csv row short (its last two fields) and gives the fifth row the ID of the first
    (as the same ID in two chapters would). Returns (the cut row's line, the duplicate's ID and line)."""
    path = output / "train.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[3] = ",".join(lines[3].split(",")[:3])  # line 4 of the file: header, then rows
    first_id = lines[1].split(",")[0]
    lines[5] = ",".join([first_id] + lines[5].split(",")[1:])
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 4, first_id, 6


def test_hand_edited_manifest_rows_stop_training_naming_file_and_lines(corpus):
    _, output = corpus
    cut_line, duplicate_id, duplicate_line = edit_manifest_by_hand(output)

    _, text = run_recipe(output, returncode=1)  # a bare IndexError or "Duplicate id" before

    message = text.strip().splitlines()[-1]
    assert f"BadDataError: 2 unusable utterances in {output / 'train.csv'}: " in message
    assert f"line {cut_line}: has 3 fields where the header has 5" in message
    assert f"{duplicate_id} (line {duplicate_line}): has the utterance ID of line 2; IDs must be unique" in message
    assert not checkpoints(output)
    record(
        "train.csv edited by hand: a row cut short and an utterance ID used twice (bad_data: fail)",
        f"stops before training: {message.split(': ', 1)[1][:400]}",
    )


def test_hand_edited_manifest_rows_are_left_out_with_skip(corpus):
    _, output = corpus
    cut_line, duplicate_id, duplicate_line = edit_manifest_by_hand(output)
    n_rows = len(read_manifest(output / "train.csv"))

    log, _ = run_recipe(output, "--bad_data=skip")

    assert f"Skipping line {cut_line} of {output / 'train.csv'}: has 3 fields where the header has 5" in log
    assert f"Skipping {duplicate_id} (line {duplicate_line}) of {output / 'train.csv'}" in log
    assert f"Skipped 2 of {n_rows} utterances of {output / 'train.csv'}" in log
    assert os.path.isfile(output / "wer_test.txt")
    record(
        "train.csv edited by hand: a row cut short and an utterance ID used twice (bad_data: skip)",
        f"both rows left out, each logged with its line ('Skipping line {cut_line} of train.csv: has 3 fields where "
        f"the header has 5', 'Skipping {duplicate_id} (line {duplicate_line}) of train.csv: has the utterance ID of "
        f"line 2'); 'Skipped 2 of {n_rows} utterances'; training and test completed",
    )


def test_a_manifest_without_a_column_stops_naming_file_and_column(corpus):
    _, output = corpus
    rows = read_manifest(output / "test.csv")
    for row in rows:
        del row["duration"]
    write_manifest(output / "test.csv", rows)

    _, text = run_recipe(output, "--bad_data=skip", returncode=1)  # a bare KeyError: 'duration' before

    message = text.strip().splitlines()[-1]
    assert f"BadDataError: {output / 'test.csv'} has no column duration (its header: ID,wav,spk_id,wrd)" in message
    record(
        "test.csv without its duration column (bad_data: skip)",
        f"stops before training: {message.split(': ', 1)[1]}",
    )


def test_the_test_result_line_says_how_many_utterances_were_left_out(corpus):
    """bad_data: skip on a test set dropped utterances without the result line saying so."""
    _, output = corpus
    rows = read_manifest(output / "test.csv")
    os.remove(rows[0]["wav"])  # left out when the manifest is loaded
    rows[1]["wrd"] = ""
    write_manifest(output / "test.csv", rows)
    truncated = rows[2]["wav"]  # left out when its audio is read
    with open(truncated, "rb") as f:
        head = f.read(os.path.getsize(truncated) // 2)
    with open(truncated, "wb") as f:
        f.write(head)

    _, text = run_recipe(output, "--bad_data=skip")

    result = re.search(r"Test WER on test: .*", text).group(0)
    assert result.endswith(f"% (3 of {len(rows)} utterances left out: bad_data: skip)"), result
    record(
        f"bad_data: skip on a test set of {len(rows)} utterances: a missing file, an empty transcript, a truncated FLAC",
        f"the result line says so: '{re.sub(r'[0-9.]+ %', '<WER> %', result)}'",
    )
