"""The inference folder each recipe writes loads with SpeechBrain's interfaces (MadeonASR for
decoder-only models) and transcribes every test utterance exactly as the recipe's own test decoding did
(the hypotheses of its WER file), from the average of checkpoints that the test used."""

import csv
import os
import re
import shutil

import pytest
import speechbrain as sb
import torch
from speechbrain.inference.ASR import EncoderASR, EncoderDecoderASR

from modules.inference.folders import MOVED_PATHS, load_asr
from modules.inference.interfaces import MadeonASR
from recipe_runs import run_script, tiny_ctc_run, wer_file_hypotheses, yaml_top_level
from test_train_decoder_only import FAMILIES, FBANK_UNITS, TINY
from test_train_s2s import TINY_MAMBA, TINY_MODEL, TINY_RUN

TRAINING_ONLY_KEYS = {"__set_seed", "output_folder", "checkpointer", "train_logger", "epoch_counter", "fea_augment"}


def utterances(csv_file):
    """(id, audio path) of each row of a recipe's manifest."""
    with open(csv_file, newline="", encoding="utf-8") as f:
        return [(row["ID"], row["wav"]) for row in csv.DictReader(f)]


def transcripts(asr, csv_file):
    return {uid: asr.transcribe_file(wav) for uid, wav in utterances(csv_file)}


def assert_same_as_recipe(got, wer_file):
    assert got == wer_file_hypotheses(wer_file)
    assert sum(bool(text) for text in got.values()) >= len(got) / 2, "too few words to compare"


@pytest.fixture(scope="session")
def ctc_run(tmp_path_factory):
    return tiny_ctc_run(tmp_path_factory)


@pytest.fixture(scope="module", params=["conmamba", "conmambamamba"], ids=["transformer_decoder", "mamba_decoder"])
def s2s_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_s2s_run")
    run_script(
        "train_S2S.py",
        f"hparams/S2S/demo_{request.param}.yaml",
        out,
        *TINY_MODEL,
        *(TINY_MAMBA if "mamba" in request.param else []),
        *TINY_RUN,
        "--number_of_epochs=4",
        "--valid_search_interval=100",
        "--avg_checkpoints=2",
        "--test_batch_size=1",
    )
    return out


@pytest.fixture(scope="module")
def decoder_only_run(tmp_path_factory, ctc_run):
    """A tiny MADEON run whose units come, as in the demo yamls, from a CTC encoder (the tiny CTC run's)."""
    out = tmp_path_factory.mktemp("tiny_decoder_only_run")
    yaml_file, family = FAMILIES["mamba-parallel"]
    run_script(
        "train_decoder_only.py",
        f"hparams/decoder_only/{yaml_file}",
        out,
        f"--token_folder={out / 'tokens'}",
        *TINY,
        *(override for override in family if override != FBANK_UNITS),
        f"--unit_encoder={ctc_run / 'inference'}",
        "--unit_layer=1",
        "--test_batch_size=1",
    )
    return out


def test_ctc_folder_moved_elsewhere_loads_with_encoder_asr_and_transcribes_as_the_recipe_test(
    ctc_run, tmp_path, monkeypatch
):
    folder = shutil.copytree(ctc_run / "inference", tmp_path / "moved")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    asr = EncoderASR.from_hparams(source=str(folder), savedir=str(tmp_path / "savedir"))

    assert_same_as_recipe(transcripts(asr, ctc_run / "train.csv"), ctc_run / "wer_train.txt")
    assert os.listdir(tmp_path / "cwd") == []  # loading wrote nothing where it ran


def test_ctc_folder_holds_the_checkpoint_average_the_test_used(ctc_run):
    best = sb.utils.checkpoints.Checkpointer(ctc_run / "save").find_checkpoints(min_key="WER", max_num_checkpoints=2)
    assert len(best) == 2
    average = sb.utils.checkpoints.average_checkpoints(
        best, "model", parameter_loader=lambda path, map_location: torch.load(path, map_location, weights_only=True)
    )
    exported = torch.load(ctc_run / "inference" / "model.ckpt", weights_only=True)
    assert exported.keys() == average.keys()
    assert all(torch.allclose(exported[name], average[name]) for name in exported)


def test_inference_yaml_keeps_the_model_keys_and_leaves_out_training(ctc_run):
    keys = set(yaml_top_level(ctc_run / "inference" / "hyperparams.yaml"))
    assert {"speech_encoder", "CNN", "normalize", "model", "modules", "pretrainer", "tokenizer"} <= keys
    assert not keys & TRAINING_ONLY_KEYS


def test_s2s_folder_loads_with_encoder_decoder_asr_and_transcribes_as_the_recipe_test(s2s_run):
    asr = load_asr(s2s_run / "inference")
    assert isinstance(asr, EncoderDecoderASR)
    assert_same_as_recipe(transcripts(asr, s2s_run / "test.csv"), s2s_run / "wer_test.txt")


def test_decoder_only_folder_loads_with_madeon_asr_and_transcribes_as_the_recipe_test(decoder_only_run):
    asr = load_asr(decoder_only_run / "inference")
    assert isinstance(asr, MadeonASR)
    assert_same_as_recipe(transcripts(asr, decoder_only_run / "test.csv"), decoder_only_run / "wer_test.txt")


def test_decoder_only_folder_moved_elsewhere_uses_its_own_copy_of_the_unit_encoder(decoder_only_run, tmp_path):
    folder = shutil.copytree(decoder_only_run / "inference", tmp_path / "moved")
    original_copy = decoder_only_run / "inference" / "unit_encoder"
    hidden = original_copy.rename(tmp_path / "hidden")  # the path written in the moved yaml now leads nowhere
    try:
        asr = load_asr(folder)
        assert_same_as_recipe(transcripts(asr, decoder_only_run / "test.csv"), decoder_only_run / "wer_test.txt")
    finally:
        hidden.rename(original_copy)


def test_decoder_only_batch_transcribes_each_utterance_as_alone(decoder_only_run):
    asr = load_asr(decoder_only_run / "inference")
    paths = [wav for _, wav in utterances(decoder_only_run / "test.csv")]
    wavs = [asr.load_audio(path) for path in paths]
    longest = max(len(wav) for wav in wavs)
    batch = torch.stack([torch.nn.functional.pad(wav, (0, longest - len(wav))) for wav in wavs])
    texts, _ = asr.transcribe_batch(batch, torch.tensor([len(wav) / longest for wav in wavs]))
    assert texts == [asr.transcribe_file(path) for path in paths]


def test_ctc_folder_loaded_on_a_device_moves_the_feature_statistics_there(ctc_run):
    # SpeechBrain moves each interface module with its own to(); InputNormalization keeps its statistics
    # in plain attributes that only its to() moves, so inside the encoder they stayed on the CPU and a
    # GPU transcription failed ("meta" stands in for the GPU).
    asr = load_asr(ctc_run / "inference", device="meta")
    normalize = asr.mods.encoder.normalize
    assert normalize.glob_mean.device.type == "meta" and normalize.glob_std.device.type == "meta"
    assert next(asr.mods.encoder.parameters()).device.type == "meta"


def test_ctc_folder_decodes_with_its_own_copy_of_the_word_lm_offline(ctc_run, tmp_path, monkeypatch):
    # The demo yaml's beam search fuses a word 3-gram estimated from the training transcripts; the folder
    # carries a copy, which load_asr uses wherever the folder is, with no network (HF_HUB_OFFLINE).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = shutil.copytree(ctc_run / "inference", tmp_path / "moved")
    asr = load_asr(str(folder))
    searcher = asr.decoding_function
    assert searcher.kenlm_model is not None
    assert searcher.kenlm_model_path == os.path.join(str(folder), "ngram_lm.arpa")
    with open(ctc_run / "train.csv", newline="", encoding="utf-8") as f:
        training_words = {word for row in csv.DictReader(f) for word in row["wrd"].split()}
    assert searcher.lm._unigram_set - {"<s>"} == training_words  # the LM's vocabulary: the training transcripts'
    assert_same_as_recipe(transcripts(asr, ctc_run / "train.csv"), ctc_run / "wer_train.txt")


DOTTED_PATH = r"(?<![\w.])modules(?:\.\w+)+"


def as_written_before_modules_were_grouped(folder):
    """Rewrites a folder's yamls (its own and a bundled unit encoder's) and custom.py with the dotted paths
    that folders exported before modules/ was grouped into packages have (e.g. modules.speech_encoder)."""
    old_paths = {new: old for old, new in MOVED_PATHS.items()}
    for path in [*folder.glob("**/hyperparams.yaml"), *folder.glob("**/custom.py")]:
        text = re.sub(DOTTED_PATH, lambda match: old_paths.get(match[0], match[0]), path.read_text(encoding="utf-8"))
        assert not set(re.findall(DOTTED_PATH, text)) & set(old_paths), f"{path} still names a current path"
        path.write_text(text, encoding="utf-8")
    return folder


def test_ctc_folder_written_before_modules_were_grouped_into_packages_loads(ctc_run, tmp_path):
    folder = as_written_before_modules_were_grouped(shutil.copytree(ctc_run / "inference", tmp_path / "old"))
    text = (folder / "hyperparams.yaml").read_text(encoding="utf-8")
    assert "interface: modules.inference.ExactLengthsEncoderASR" in text
    assert "!new:modules.speech_encoder.SpeechEncoder" in text and "!new:modules.front_end.WaveformEncoder" in text
    asr = load_asr(folder)
    assert_same_as_recipe(transcripts(asr, ctc_run / "train.csv"), ctc_run / "wer_train.txt")


def test_s2s_folder_written_before_modules_were_grouped_into_packages_loads(s2s_run, tmp_path):
    folder = as_written_before_modules_were_grouped(shutil.copytree(s2s_run / "inference", tmp_path / "old"))
    text = (folder / "hyperparams.yaml").read_text(encoding="utf-8")
    assert "!new:modules.encoder_decoder.EncoderDecoderASR" in text and "!apply:modules.inference.complete" in text
    asr = load_asr(folder)
    assert isinstance(asr, EncoderDecoderASR)
    assert_same_as_recipe(transcripts(asr, s2s_run / "test.csv"), s2s_run / "wer_test.txt")


def test_decoder_only_folder_written_before_modules_were_grouped_into_packages_loads(decoder_only_run, tmp_path):
    folder = as_written_before_modules_were_grouped(shutil.copytree(decoder_only_run / "inference", tmp_path / "old"))
    text = (folder / "hyperparams.yaml").read_text(encoding="utf-8")
    assert "interface: modules.inference.MadeonASR" in text and "!new:modules.speech_tokenizer.KMeans" in text
    assert "!new:modules.speech_encoder.SpeechEncoder" in (folder / "unit_encoder" / "hyperparams.yaml").read_text()
    asr = load_asr(folder)
    assert isinstance(asr, MadeonASR)
    assert_same_as_recipe(transcripts(asr, decoder_only_run / "test.csv"), decoder_only_run / "wer_test.txt")
