"""Tests for librispeech_prepare on tiny corpora written into tmp_path."""

import csv
import os
import re

import numpy as np
import pytest
import soundfile

import librispeech_prepare
from librispeech_prepare import prepare_librispeech
from modules.training.data_checks import BadDataError
from reliability_report import record

# utterance id -> (number of samples at 16 kHz, transcript)
CORPUS = {
    "train": {
        "19-198-0000": (16000, "NORTHANGER ABBEY"),
        "19-198-0001": (8000, "THIS LITTLE WORK WAS FINISHED"),
        "26-495-0000": (24000, "HELLO WORLD"),
    },
    "dev": {
        "84-121-0000": (4000, "GO DO YOU HEAR"),
    },
}


def write_split(data_folder, split, utterances, sample_rate=16000):
    """Write a LibriSpeech-style split: one noise FLAC and one line per utterance."""
    rng = np.random.default_rng(0)
    for utt_id, (n_samples, words) in utterances.items():
        speaker, chapter, _ = utt_id.split("-")
        chapter_folder = data_folder / split / speaker / chapter
        chapter_folder.mkdir(parents=True, exist_ok=True)
        noise = 0.1 * rng.standard_normal(n_samples)
        soundfile.write(chapter_folder / f"{utt_id}.flac", noise, sample_rate)
        with open(chapter_folder / f"{speaker}-{chapter}.trans.txt", "a") as f:
            f.write(f"{utt_id} {words}\n")


@pytest.fixture
def data_folder(tmp_path):
    """A corpus with a 'train' and a 'dev' split."""
    folder = tmp_path / "LibriSpeech"
    for split, utterances in CORPUS.items():
        write_split(folder, split, utterances)
    return folder


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_writes_csv_with_ids_durations_paths_speakers_and_words(data_folder, tmp_path):
    save_folder = tmp_path / "save"
    prepare_librispeech(data_folder, save_folder, tr_splits=["train"])

    rows = read_csv(save_folder / "train.csv")
    assert rows[0] == ["ID", "duration", "wav", "spk_id", "wrd"]
    assert len(rows) == 1 + len(CORPUS["train"])
    for utt_id, duration, wav, spk_id, words in rows[1:]:
        n_samples, expected_words = CORPUS["train"][utt_id]
        speaker, chapter, _ = utt_id.split("-")
        assert float(duration) == pytest.approx(n_samples / 16000)
        assert wav == str(data_folder / "train" / speaker / chapter / f"{utt_id}.flac")
        assert os.path.isabs(wav)
        assert spk_id == speaker
        assert words == expected_words


def test_writes_one_csv_per_split(data_folder, tmp_path):
    save_folder = tmp_path / "save"
    prepare_librispeech(
        data_folder, save_folder, tr_splits=["train"], dev_splits=["dev"]
    )

    assert len(read_csv(save_folder / "train.csv")) == 1 + len(CORPUS["train"])
    assert [row[0] for row in read_csv(save_folder / "dev.csv")[1:]] == ["84-121-0000"]


def test_merge_concatenates_split_csvs(data_folder, tmp_path):
    save_folder = tmp_path / "save"
    prepare_librispeech(
        data_folder,
        save_folder,
        tr_splits=["train", "dev"],
        merge_lst=["train", "dev"],
        merge_name="all",
    )

    train, dev = read_csv(save_folder / "train.csv"), read_csv(save_folder / "dev.csv")
    assert read_csv(save_folder / "all.csv") == train + dev[1:]


def test_merge_name_may_already_end_in_csv(data_folder, tmp_path):
    save_folder = tmp_path / "save"
    prepare_librispeech(
        data_folder,
        save_folder,
        tr_splits=["train"],
        merge_lst=["train"],
        merge_name="all.csv",
    )

    assert (save_folder / "all.csv").is_file()
    assert not (save_folder / "all.csv.csv").exists()


def test_select_n_sentences_keeps_first_utterances_of_each_split(data_folder, tmp_path):
    save_folder = tmp_path / "save"
    prepare_librispeech(
        data_folder,
        save_folder,
        tr_splits=["train"],
        dev_splits=["dev"],
        select_n_sentences=[2, None],
    )

    train_ids = [row[0] for row in read_csv(save_folder / "train.csv")[1:]]
    assert train_ids == ["19-198-0000", "19-198-0001"]
    assert len(read_csv(save_folder / "dev.csv")) == 2


def test_second_call_with_same_options_does_not_rewrite(data_folder, tmp_path):
    save_folder = tmp_path / "save"
    prepare_librispeech(data_folder, save_folder, tr_splits=["train"])
    csv_path = save_folder / "train.csv"
    os.utime(csv_path, ns=(0, 0))

    prepare_librispeech(data_folder, save_folder, tr_splits=["train"])

    assert csv_path.stat().st_mtime_ns == 0


def test_changed_options_rebuild_the_csvs(data_folder, tmp_path):
    save_folder = tmp_path / "save"
    prepare_librispeech(data_folder, save_folder, tr_splits=["train"])

    prepare_librispeech(
        data_folder, save_folder, tr_splits=["train"], select_n_sentences=[1]
    )

    assert len(read_csv(save_folder / "train.csv")) == 2


def test_missing_csv_triggers_rebuild(data_folder, tmp_path):
    save_folder = tmp_path / "save"
    prepare_librispeech(data_folder, save_folder, tr_splits=["train"])
    (save_folder / "train.csv").unlink()

    prepare_librispeech(data_folder, save_folder, tr_splits=["train"])

    assert len(read_csv(save_folder / "train.csv")) == 1 + len(CORPUS["train"])


def test_skip_prep_writes_nothing(data_folder, tmp_path):
    save_folder = tmp_path / "save"
    prepare_librispeech(data_folder, save_folder, tr_splits=["train"], skip_prep=True)

    assert not save_folder.exists()


def test_parallel_header_reading_gives_same_csv(data_folder, tmp_path, monkeypatch):
    prepare_librispeech(data_folder, tmp_path / "serial", tr_splits=["train"])
    monkeypatch.setattr(librispeech_prepare, "PARALLEL_MIN_FILES", 1)
    monkeypatch.setattr(librispeech_prepare.os, "cpu_count", lambda: 2)

    prepare_librispeech(data_folder, tmp_path / "parallel", tr_splits=["train"])

    assert read_csv(tmp_path / "parallel" / "train.csv") == read_csv(
        tmp_path / "serial" / "train.csv"
    )


def test_missing_data_folder_raises_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        prepare_librispeech(missing, tmp_path / "save", tr_splits=["train"])


def test_missing_split_folder_raises_listing_existing_splits(data_folder, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        prepare_librispeech(
            data_folder, tmp_path / "save", tr_splits=["train-clean-100"]
        )

    message = str(error.value)
    assert str(data_folder / "train-clean-100") in message
    assert "dev, train" in message


def test_split_without_transcripts_raises(tmp_path):
    data_folder = tmp_path / "LibriSpeech"
    (data_folder / "train" / "19" / "198").mkdir(parents=True)

    with pytest.raises(
        BadDataError, match=re.escape(str(data_folder / "train"))
    ):
        prepare_librispeech(data_folder, tmp_path / "save", tr_splits=["train"])


def test_missing_audio_raises_naming_transcript_line_and_audio(data_folder, tmp_path):
    audio = data_folder / "train" / "19" / "198" / "19-198-0001.flac"
    audio.unlink()

    with pytest.raises(BadDataError) as error:
        prepare_librispeech(data_folder, tmp_path / "save", tr_splits=["train"])

    message = str(error.value)
    assert str(data_folder / "train" / "19" / "198" / "19-198.trans.txt") in message
    assert "line 2" in message
    assert str(audio) in message


def test_unreadable_audio_raises_naming_it(data_folder, tmp_path):
    audio = data_folder / "train" / "26" / "495" / "26-495-0000.flac"
    audio.write_bytes(b"not a flac file")

    with pytest.raises(BadDataError, match=re.escape(str(audio))):
        prepare_librispeech(data_folder, tmp_path / "save", tr_splits=["train"])


def test_empty_transcript_raises_naming_file_and_line(data_folder, tmp_path):
    trans_file = data_folder / "dev" / "84" / "121" / "84-121.trans.txt"
    trans_file.write_text("84-121-0000 \n")

    with pytest.raises(BadDataError) as error:
        prepare_librispeech(data_folder, tmp_path / "save", dev_splits=["dev"])

    message = str(error.value)
    assert str(trans_file) in message
    assert "line 1" in message


def test_wrong_sample_rate_raises_naming_file_and_rate(tmp_path):
    data_folder = tmp_path / "LibriSpeech"
    write_split(data_folder, "test", {"7-9-0000": (8000, "HI")}, sample_rate=8000)

    with pytest.raises(BadDataError) as error:
        prepare_librispeech(data_folder, tmp_path / "save", te_splits=["test"])

    message = str(error.value)
    assert str(data_folder / "test" / "7" / "9" / "7-9-0000.flac") in message
    assert "8000 Hz" in message
    assert "sox" in message


def test_failed_rebuild_is_not_taken_as_done(data_folder, tmp_path):
    save_folder = tmp_path / "save"
    prepare_librispeech(data_folder, save_folder, tr_splits=["train"])
    audio = data_folder / "train" / "19" / "198" / "19-198-0000.flac"
    audio.write_bytes(b"broken")
    with pytest.raises(BadDataError):
        prepare_librispeech(
            data_folder, save_folder, tr_splits=["train"], select_n_sentences=1
        )

    with pytest.raises(BadDataError):
        prepare_librispeech(data_folder, save_folder, tr_splits=["train"])


def test_empty_audio_raises_naming_it(data_folder, tmp_path):
    audio = data_folder / "dev" / "84" / "121" / "84-121-0000.flac"
    soundfile.write(audio, np.zeros(0), 16000, format="WAV")  # libsndfile writes no empty FLAC

    with pytest.raises(BadDataError, match=re.escape(f"Audio file {audio} is empty")):
        prepare_librispeech(data_folder, tmp_path / "save", dev_splits=["dev"])


@pytest.mark.reliability
def test_skip_leaves_out_each_unusable_utterance_naming_it(data_folder, tmp_path, caplog):
    chapter = data_folder / "train" / "19" / "198"
    missing, resampled = chapter / "19-198-0000.flac", chapter / "19-198-0001.flac"
    unreadable = data_folder / "train" / "26" / "495" / "26-495-0000.flac"
    empty = chapter / "19-198-0002.flac"
    missing.unlink()
    soundfile.write(resampled, np.zeros(8000), 8000)
    unreadable.write_bytes(b"not a flac file")
    write_split(data_folder, "train", {"19-198-0002": (16000, "EMPTY AUDIO"), "19-198-0003": (16000, "")})
    soundfile.write(empty, np.zeros(0), 16000, format="WAV")  # libsndfile writes no empty FLAC
    write_split(data_folder, "train", {"19-198-0004": (16000, "KEPT")})
    named = [missing, resampled, unreadable, empty, "Empty transcript for 19-198-0003"]

    with caplog.at_level("WARNING"):
        prepare_librispeech(data_folder, tmp_path / "save", tr_splits=["train"], bad_data="skip")

    rows = read_csv(tmp_path / "save" / "train.csv")[1:]
    assert [row[0] for row in rows] == ["19-198-0004"]
    left_out = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Left out an utterance")]
    assert len(left_out) == len(named)
    for name in named:
        assert any(str(name) in message for message in left_out), name
    assert any("left out 5 utterances" in r.getMessage() for r in caplog.records)
    record(
        "librispeech_prepare.py with bad_data: skip on a split with a missing, an 8 kHz, a non-FLAC and an empty "
        "audio file and an empty transcript",
        f"train.csv keeps the {len(rows)} healthy utterance; {len(left_out)} warnings 'Left out an utterance: ...', "
        "each naming its file (" + ", ".join(os.path.relpath(name, data_folder) for name in named[:4])
        + ") or transcript line, and a summary 'left out 5 utterances'",
    )


def test_transcripts_are_normalised_to_librispeech_convention(tmp_path):
    """Case, accents and typographic apostrophes are normalised; other characters are kept (the recipes then
    stop at start-up naming them: tests/test_tokenizer.py)."""
    data_folder = tmp_path / "LibriSpeech"
    write_split(data_folder, "train", {"19-198-0000": (16000, "Héllo  Wörld’s ‘naïve’ ROOM 101")})
    prepare_librispeech(data_folder, tmp_path / "save", tr_splits=["train"])
    assert read_csv(tmp_path / "save" / "train.csv")[1][4] == "HELLO WORLD'S 'NAIVE' ROOM 101"
