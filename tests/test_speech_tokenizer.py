"""Discrete speech units: k-means, de-duplication, on-disk cache, joint SentencePiece vocabulary."""

import csv
import os

import pytest
import torch

from modules.speech_tokenizer import (
    GENERATE_TEXT,
    START_OF_SPEECH,
    FbankFeatures,
    KMeans,
    SpeechUnitTokenizer,
    deduplicate,
    sequence_text,
    train_joint_sentencepiece,
    units_to_text,
)

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


def make_tokenizer(num_clusters=12):
    return SpeechUnitTokenizer(CountingFeatures(), num_clusters, kmeans_fraction=0.5, kmeans_batch_frames=200)


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
