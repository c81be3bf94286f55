"""transcribe.py on the tiny CTC run's inference folder: files, folders and lists are transcribed as
SpeechBrain's EncoderASR transcribes them; each bad file gets one error line naming it while the others
go on, and the exit status says that something failed; JSON output has word times."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from modules.inference.folders import load_asr
from recipe_runs import tiny_ctc_run
from reliability_report import record
from test_checkpoints import OpensAFile
from transcribe import Transcriber, main


@pytest.fixture(scope="session")
def ctc_run(tmp_path_factory):
    return tiny_ctc_run(tmp_path_factory)


@pytest.fixture(scope="module")
def audio(ctc_run, tmp_path_factory):
    """A folder of three training utterances (one in a subfolder, beside a text file), and their
    transcripts by the inference interface."""
    folder = tmp_path_factory.mktemp("audio")
    (folder / "sub").mkdir()
    asr = load_asr(ctc_run / "inference")
    with open(ctc_run / "train.csv", newline="", encoding="utf-8") as f:
        wavs = [row["wav"] for row in csv.DictReader(f)][:3]
    expected = {}
    for name, source in zip(["a.flac", "b.wav", "sub/c.flac"], wavs):
        signal, rate = soundfile.read(source)
        soundfile.write(folder / name, signal, rate)
        expected[str(folder / name)] = asr.transcribe_file(source)
    (folder / "notes.txt").write_text("not audio\n")
    return folder, expected


def run(args, capsys):
    status = main([str(a) for a in args] + ["--noprogressbar"])
    out, err = capsys.readouterr()
    return status, out, err


def lines(out):
    return dict(line.split("\t") for line in out.splitlines())


def test_folder_is_searched_recursively_for_audio_and_transcribed_as_the_interface_does(ctc_run, audio, capsys):
    folder, expected = audio
    status, out, err = run(["--model", ctc_run / "inference", "--batch_size", "2", folder], capsys)
    assert status == 0, err
    assert lines(out) == expected


def test_bad_files_get_an_error_line_each_and_the_others_are_transcribed(ctc_run, audio, tmp_path, capsys):
    folder, expected = audio
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(64))
    missing = tmp_path / "missing.flac"
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join([str(missing), *expected]) + "\n")

    status, out, err = run(["--model", ctc_run / "inference", corrupt, folder / "notes.txt", "--list", listed], capsys)

    assert status == 1
    assert lines(out) == expected
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 3
    assert any(str(missing) in line and "no such file" in line for line in errors)
    assert any(str(corrupt) in line and "cannot read it as audio" in line for line in errors)
    assert any(str(folder / "notes.txt") in line and "cannot read it as audio" in line for line in errors)


def test_other_sample_rates_are_resampled_to_the_model_rate(ctc_run, audio, tmp_path, capsys):
    folder, _ = audio
    signal, rate = soundfile.read(folder / "a.flac")
    resampled = torchaudio.functional.resample(torch.tensor(signal, dtype=torch.float32), rate, 2 * rate)
    soundfile.write(tmp_path / "a_32k.wav", resampled.numpy(), 2 * rate)

    as_written = torch.tensor(soundfile.read(tmp_path / "a_32k.wav")[0], dtype=torch.float32)
    back = torchaudio.functional.resample(as_written, 2 * rate, rate)
    texts, _ = load_asr(ctc_run / "inference").transcribe_batch(back[None], torch.ones(1))

    status, out, err = run(["--model", ctc_run / "inference", tmp_path / "a_32k.wav"], capsys)

    assert status == 0, err
    assert lines(out) == {str(tmp_path / "a_32k.wav"): texts[0]}


def test_json_output_has_the_words_of_the_text_with_times_inside_the_audio(ctc_run, audio, tmp_path, capsys):
    folder, expected = audio
    output = tmp_path / "out.json"
    status, _, err = run(["--model", ctc_run / "inference", "--json", "--output", output, folder], capsys)

    assert status == 0, err
    results = json.loads(output.read_text())
    assert {r["path"]: r["text"] for r in results} == expected
    for result in results:
        duration = soundfile.info(result["path"]).duration
        assert [w["word"] for w in result["words"]] == result["text"].split()
        starts, ends = [w["start"] for w in result["words"]], [w["end"] for w in result["words"]]
        assert starts == sorted(starts) and ends == sorted(ends)
        assert all(0 <= start < end <= duration + 0.001 for start, end in zip(starts, ends)), (result, duration)


def test_a_folder_that_is_not_an_inference_folder_is_refused_clearly(tmp_path, capsys):
    status, _, err = run(["--model", tmp_path, tmp_path / "a.wav"], capsys)
    assert status == 2
    assert "not an inference folder" in err


@pytest.mark.reliability
def test_a_too_short_or_nan_file_gets_its_error_line_and_the_others_are_transcribed(ctc_run, audio, tmp_path, capsys):
    """Alone in their batch, a 10 ms file and a file with a NaN sample crashed the whole job."""
    folder, expected = audio
    short, nan = tmp_path / "short.wav", tmp_path / "nan.wav"
    soundfile.write(short, np.full(160, 0.01), 16000)  # 10 ms
    samples = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    samples[100] = np.nan
    soundfile.write(nan, samples, 16000, subtype="FLOAT")

    status, out, err = run(["--model", ctc_run / "inference", "--batch_size", "1", short, nan, folder], capsys)

    assert status == 1
    assert lines(out) == expected
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == [
        f"transcribe.py: error: {short}: too short (10 ms): at least 40 ms of audio is needed",
        f"transcribe.py: error: {nan}: the audio has NaN or infinite samples; export it again from its source",
    ]
    assert f"2 of {2 + len(expected)} files failed" in err
    record(
        "transcribe.py on a 10 ms WAV, a WAV with a NaN sample and 3 good files (--batch_size 1)",
        f"exit 1; the 3 good files transcribed on stdout; on stderr, after each file's path: "
        f"'{errors[0].split(f'{short}: ')[1]}' and '{errors[1].split(f'{nan}: ')[1]}', then '2 of 5 files failed'",
    )


def test_a_file_the_model_fails_on_costs_only_its_own_transcript(ctc_run, audio, capsys, monkeypatch):
    folder, expected = audio
    failing = sorted(expected)[1]
    transcribe_batch = Transcriber.transcribe_batch

    def fails_on_one_file(self, batch):
        if any(path == failing for path, _ in batch):
            raise RuntimeError("injected model failure")
        return transcribe_batch(self, batch)

    monkeypatch.setattr(Transcriber, "transcribe_batch", fails_on_one_file)
    status, out, err = run(["--model", ctc_run / "inference", "--batch_size", "8", folder], capsys)

    assert status == 1
    assert lines(out) == {path: text for path, text in expected.items() if path != failing}
    assert f"error: {failing}: the model failed on it (RuntimeError: injected model failure)" in err


@pytest.fixture
def folder_copy(ctc_run, tmp_path):
    """A copy of the tiny run's inference folder, to break."""
    copy = tmp_path / "inference"
    shutil.copytree(ctc_run / "inference", copy)
    return copy


def break_model(folder, how):
    """Replaces model.ckpt: cut short, missing a key, or holding a pickled payload that writes a marker file."""
    model = folder / "model.ckpt"
    if how == "truncated":
        model.write_bytes(model.read_bytes()[:1000])
    elif how == "missing a key":
        state = torch.load(model, weights_only=True)
        state.pop(sorted(state)[0])
        torch.save(state, model)
    else:
        torch.save({"weight": OpensAFile(str(folder.parent / "code_ran"))}, model)
    return model


@pytest.mark.reliability
@pytest.mark.parametrize("how", ["truncated", "missing a key", "a pickled payload"])
def test_a_broken_model_file_is_named_with_its_own_exit_status(folder_copy, audio, capsys, monkeypatch, how):
    """Before: a 30-line traceback not naming the file, with status 1 (as for failed audio); a model.ckpt
    missing keys loaded non-strictly; with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 a payload ran."""
    folder, _ = audio
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default off: the loader must say so
    model = break_model(folder_copy, how)

    status, out, err = run(["--model", folder_copy, folder], capsys)

    assert status == 2 and not out
    message = err.strip().splitlines()[0]
    assert message.startswith(f"transcribe.py: error: Cannot load the checkpoint file {model}: ")
    assert {"truncated": "PytorchStreamReader", "missing a key": "Missing key(s)",
            "a pickled payload": "Weights only load failed"}[how] in err
    assert not (folder_copy.parent / "code_ran").exists()
    record(
        f"transcribe.py with an inference folder whose model.ckpt is {how} (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1)",
        f"exit 2 (1 is for audio files that failed), no transcript, the error: {' '.join(err.split())[:260]} ...; "
        "no pickled code ran",
    )


def test_an_inference_folder_loads_from_another_directory_without_the_repository(ctc_run, audio, tmp_path):
    """The folder ships its code (modules/, custom.py), SpeechBrain's way: before, modules.models.speech_encoder
    could not be found outside the repository root."""
    _, expected = audio
    moved = tmp_path / "elsewhere" / "inference"
    shutil.copytree(ctc_run / "inference", moved)
    path, text = sorted(expected.items())[0]
    code = (
        "from speechbrain.inference.interfaces import foreign_class\n"
        f"asr = foreign_class(source={str(moved)!r}, savedir={str(moved)!r}, pymodule_file='custom.py', "
        "classname='ASR')\n"
        f"print(repr(asr.transcribe_file({path!r})))\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == repr(text)
