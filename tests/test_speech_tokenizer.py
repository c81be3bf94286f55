"""Discrete speech units: CTC-encoder features, k-means, de-duplication, on-disk cache, speed-perturbed
training copies, joint SentencePiece vocabulary."""

import csv
import os
import shutil

import pytest
import torch
from speechbrain.dataio.dataio import read_audio

from modules.units.features import EncoderFeatures, FbankFeatures
from modules.units.kmeans import KMeans
from modules.units.manifests import SPEED_PERTURBED_TRAIN, TRAIN, UnitManifestWriter
from modules.units.tokens import (
    GENERATE_TEXT,
    START_OF_SPEECH,
    deduplicate,
    sequence_text,
    train_joint_sentencepiece,
    units_to_text,
)
from recipe_runs import tiny_ctc_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TRAIN = os.path.join(ROOT, "demo", "LibriSpeech", "train")


def test_consecutive_duplicates_are_removed_and_units_become_characters():
    units = deduplicate(torch.tensor([3, 3, 3, 1, 1, 3, 0, 0]))
    assert units.tolist() == [3, 1, 3, 0]
    assert units_to_text(units) == "\u4e03\u4e01\u4e03\u4e00"


def test_kmeans_finds_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    frames = (centres[:, None] + 0.1 * torch.randn(3, 200, 2, generator=g)).reshape(-1, 2)
    kmeans = KMeans(3, seed=0)
    for batch in frames[torch.randperm(600, generator=g)].split(100):
        kmeans.partial_fit(batch)
    labels = kmeans(frames).view(3, 200)
    assert all(len(row.unique()) == 1 for row in labels)  # each true cluster is one label ...
    assert len(labels[:, 0].unique()) == 3  # ... and the three labels differ


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """A csv of 12 demo training utterances."""
    folder = tmp_path_factory.mktemp("manifest")
    rows = []
    for speaker in sorted(os.listdir(DEMO_TRAIN))[:2]:
        chapter_dir = os.path.join(DEMO_TRAIN, speaker, os.listdir(os.path.join(DEMO_TRAIN, speaker))[0])
        with open(next(os.path.join(chapter_dir, f) for f in os.listdir(chapter_dir) if f.endswith(".txt"))) as f:
            for line in list(f)[:6]:
                uid, words = line.strip().split(" ", 1)
                rows.append({"ID": uid, "duration": 1.0, "wav": os.path.join(chapter_dir, uid + ".flac"), "wrd": words})
    path = folder / "train.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


class CountingFeatures(FbankFeatures):
    calls = 0

    def forward(self, wav):
        CountingFeatures.calls += 1
        return super().forward(wav)


def make_tokenizer(num_clusters=12, speeds=(100,), kmeans_fraction=0.5):
    return UnitManifestWriter(
        CountingFeatures(), num_clusters, kmeans_fraction=kmeans_fraction, kmeans_batch_frames=200, speeds=speeds
    )


def read_rows(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_units_are_computed_once_and_reused_from_disk(manifest, tmp_path):
    first = make_tokenizer()(manifest, {"train": manifest}, str(tmp_path))
    assert CountingFeatures.calls > 0
    with open(first["train"], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and all(row["units"] for row in rows)

    CountingFeatures.calls = 0
    second = make_tokenizer()(manifest, {"train": manifest}, str(tmp_path))
    assert second == first
    assert CountingFeatures.calls == 0  # no feature was computed again

    other = make_tokenizer(num_clusters=8)(manifest, {"train": manifest}, str(tmp_path))
    assert os.path.dirname(other["train"]) != os.path.dirname(first["train"])  # new settings, new folder


def test_speed_perturbed_training_copies_have_their_own_ids_durations_and_units(manifest, tmp_path):
    units = make_tokenizer(speeds=[90, 100, 110])(manifest, {"valid": manifest}, str(tmp_path))
    recorded = {row["ID"]: row for row in read_rows(units[TRAIN])}
    copies = {row["ID"]: row for row in read_rows(units[SPEED_PERTURBED_TRAIN])}
    assert len(recorded) == 12 and len(copies) == 36
    for uid, row in recorded.items():
        assert copies[uid] == row  # the copy at speed 100 is the recorded set
        for speed in (90, 110):
            copy = copies[f"{uid}-sp{speed}"]
            assert float(copy["duration"]) == pytest.approx(float(row["duration"]) * 100 / speed, abs=1e-3)
            assert copy["wrd"] == row["wrd"] and copy["units"] != row["units"]
    slower = sum(len(copies[f"{uid}-sp90"]["units"]) for uid in recorded)
    faster = sum(len(copies[f"{uid}-sp110"]["units"]) for uid in recorded)
    assert slower > faster  # slowed-down audio has more frames, so more unit runs
    assert read_rows(units["valid"]) == list(recorded.values())  # other sets are never perturbed


def test_kmeans_is_fitted_on_the_recorded_training_audio_only(manifest, tmp_path, monkeypatch):
    fed = []
    partial_fit = KMeans.partial_fit
    monkeypatch.setattr(KMeans, "partial_fit", lambda self, frames: fed.append(frames) or partial_fit(self, frames))
    make_tokenizer(speeds=[80, 100, 120], kmeans_fraction=1.0)(manifest, {}, str(tmp_path))

    features = FbankFeatures()
    recorded = torch.cat([features(read_audio(row["wav"])) for row in read_rows(manifest)])
    fed = torch.cat(fed)
    assert fed.shape == recorded.shape  # every recorded frame once, no perturbed frame
    assert torch.allclose(fed.sum(0), recorded.sum(0), atol=1e-2)


def test_speed_copies_are_cached_and_only_new_speeds_are_computed(manifest, tmp_path):
    first = make_tokenizer(speeds=[90, 100, 110])(manifest, {}, str(tmp_path))

    CountingFeatures.calls = 0
    again = make_tokenizer(speeds=[90, 100, 110])(manifest, {}, str(tmp_path))
    assert again == first and CountingFeatures.calls == 0

    CountingFeatures.calls = 0
    other = make_tokenizer(speeds=[90, 100, 120])(manifest, {}, str(tmp_path))
    assert other[SPEED_PERTURBED_TRAIN] != first[SPEED_PERTURBED_TRAIN]  # the speeds name the training copies
    assert other[TRAIN] == first[TRAIN]  # same k-means, same recorded units
    assert CountingFeatures.calls == 12  # only the copy at 120 % was computed
    ids = [row["ID"] for row in read_rows(other[SPEED_PERTURBED_TRAIN])]
    assert len(ids) == 36 and sum(uid.endswith("-sp120") for uid in ids) == 12


def test_joint_vocabulary_encodes_speech_prefix_then_text(manifest, tmp_path):
    units_csv = make_tokenizer()(manifest, {"train": manifest}, str(tmp_path))["train"]
    tokenizer = train_joint_sentencepiece(units_csv, str(tmp_path / "sp"), vocab_size=60)
    sp = tokenizer.sp
    assert [sp.id_to_piece(i) for i in range(6)] == [
        "<unk>", "</s>", "<startoftext>", "<generatetext>", "<startofspeech>", "<generatespeech>"
    ]
    units = units_to_text(torch.tensor([1, 5, 2, 7]))
    ids = sp.encode_as_ids(sequence_text(units, "the lord"))
    assert ids[0] == sp.piece_to_id(START_OF_SPEECH)
    text = ids[ids.index(sp.piece_to_id(GENERATE_TEXT)) + 1 :]
    assert sp.decode_ids(text) == "the lord"


@pytest.mark.parametrize("speeds", [[], [90, 90], [0, 100], [-10]])
def test_bad_speeds_are_refused_naming_the_yaml_key(speeds):
    with pytest.raises(ValueError, match="speed_perturb_speeds"):
        UnitManifestWriter(FbankFeatures(), 4, speeds=speeds)


@pytest.fixture(scope="module")
def ctc_folder(tmp_path_factory):
    """The inference folder of the tiny CTC run that the inference tests share (one ConMamba layer)."""
    return tiny_ctc_run(tmp_path_factory) / "inference"


def test_encoder_features_are_what_the_ctc_head_reads_one_frame_per_40_ms(ctc_folder, manifest):
    features = EncoderFeatures(str(ctc_folder), layer=1)
    wav = read_audio(read_rows(manifest)[0]["wav"])
    frames = features(wav)
    assert frames.dtype == torch.float32 and frames.device.type == "cpu"
    assert abs(len(frames) - len(wav) / 640) <= 1  # 40 ms at 16 kHz
    encoder = features.asr.mods.encoder  # last layer -> final LayerNorm -> CTC head = the model's output
    log_probs = encoder.ctc_lin(encoder.speech_encoder.encoder.norm(frames[None])).log_softmax(dim=-1)
    assert torch.allclose(log_probs, features.asr.encode_batch(wav[None], torch.ones(1)), atol=1e-5)
    assert torch.equal(features(wav), frames)  # no dropout: the same audio, the same units


def test_encoder_features_without_a_trained_model_say_how_to_train_one(tmp_path):
    features = EncoderFeatures(str(tmp_path / "inference"), layer=1)
    expected = f"{tmp_path / 'inference'}.*python train_CTC.py hparams/CTC/demo_conmamba.yaml"
    with pytest.raises(FileNotFoundError, match=expected):
        features.settings
    with pytest.raises(FileNotFoundError, match=expected):
        features(torch.zeros(16000))


def test_encoder_layer_outside_the_model_is_refused_naming_its_layers(ctc_folder):
    with pytest.raises(ValueError, match="layer 2 asked.* has layers 1-1"):
        EncoderFeatures(str(ctc_folder), layer=2)(torch.zeros(16000))


def test_units_of_another_encoder_model_go_to_another_cache_folder(ctc_folder, manifest, tmp_path):
    source = shutil.copytree(ctc_folder, tmp_path / "inference")

    def units_folder():
        tokenizer = UnitManifestWriter(EncoderFeatures(str(source), layer=1), 4, kmeans_fraction=0.25)
        return os.path.dirname(tokenizer(manifest, {}, str(tmp_path / "tokens"))[TRAIN])

    first = units_folder()
    state = torch.load(source / "model.ckpt", weights_only=True)
    torch.save(state, source / "model.ckpt")  # rewritten, same weights
    assert units_folder() == first
    torch.save({name: 1.01 * value for name, value in state.items()}, source / "model.ckpt")  # retrained
    assert units_folder() != first
