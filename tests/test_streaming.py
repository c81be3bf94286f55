"""Streaming causal ConMamba: chunk-wise output equals whole-utterance output; the causal configs train."""

import os
import re
import subprocess
import sys

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml
from speechbrain.dataio.dataio import read_audio
from speechbrain.decoders import ctc_greedy_decode

from modules.inference.streaming import StreamingCTC
from recipe_runs import CTC_DEMO_YAML, DEMO_DATA, ROOT, TINY_CTC_MODEL, run_script, train_losses, yaml_top_level

CAUSAL_DEMO_YAML = os.path.join(ROOT, "hparams", "CTC", "demo_conmamba_causal.yaml")
SAMPLE_RATE = 16000


def load_tiny(yaml_file, output_folder):
    """A CTC yaml built with the TINY_CTC_MODEL overrides and two encoder layers (caches chain)."""
    overrides = dict(option[2:].split("=", 1) for option in TINY_CTC_MODEL)
    overrides.update(num_encoder_layers="2", output_folder=str(output_folder))
    with open(yaml_file, encoding="utf-8") as f:
        return load_hyperpyyaml(f, "\n".join(f"{key}: {value}" for key, value in overrides.items()))


@pytest.fixture(scope="module")
def hparams(tmp_path_factory):
    """The causal demo config, tiny, with random weights and global statistics from random audio."""
    hparams = load_tiny(CAUSAL_DEMO_YAML, tmp_path_factory.mktemp("streaming"))
    feats = hparams["compute_features"](torch.randn(2, SAMPLE_RATE))
    hparams["normalize"](feats, torch.ones(2), epoch=0)
    for module in hparams["modules"].values():
        module.eval()
    return hparams


def whole_utterance_log_probs(hparams, audio):
    """The recipe's own forward (train_CTC.py compute_forward at inference) on one utterance."""
    with torch.no_grad():
        feats = hparams["normalize"](hparams["compute_features"](audio[None]), torch.ones(1))
        encoded = hparams["speech_encoder"](hparams["CNN"](feats), torch.ones(1))
        return hparams["ctc_lin"](encoded).log_softmax(dim=-1)


def stream(streamer, audio, chunk_sizes):
    """Feeds ``audio`` in chunks of the given sizes (cycled), then flushes; the concatenated log-probs."""
    pieces, start, index = [], 0, 0
    while start < len(audio):
        size = chunk_sizes[index % len(chunk_sizes)]
        pieces.append(streamer.encode_chunk(audio[start : start + size]))
        start, index = start + size, index + 1
    pieces.append(streamer.encode_chunk(audio[:0], last=True))
    streamer.reset()
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("chunk_ms", [[160], [320], [640], [37, 500, 90]])
def test_chunked_log_probs_equal_whole_utterance(hparams, chunk_ms):
    streamer = StreamingCTC.from_hparams(hparams)
    generator = torch.Generator().manual_seed(sum(chunk_ms))
    chunk_sizes = [SAMPLE_RATE * ms // 1000 for ms in chunk_ms]
    for _ in range(3):
        length = int(torch.randint(SAMPLE_RATE // 10, 2 * SAMPLE_RATE, (1,), generator=generator))
        audio = 0.1 * torch.randn(length, generator=generator)
        expected = whole_utterance_log_probs(hparams, audio)
        streamed = stream(streamer, audio, chunk_sizes)
        assert streamed.shape == expected.shape
        torch.testing.assert_close(streamed, expected, atol=1e-4, rtol=1e-4)


def test_partial_transcripts_grow_into_the_whole_utterance_greedy_transcript(hparams):
    streamer = StreamingCTC.from_hparams(hparams)
    audio = 0.1 * torch.randn(3 * SAMPLE_RATE, generator=torch.Generator().manual_seed(0))
    partials = [streamer.transcribe_chunk(chunk) for chunk in audio.split(SAMPLE_RATE * 320 // 1000)]
    final = streamer.finish()
    expected = ctc_greedy_decode(whole_utterance_log_probs(hparams, audio), torch.ones(1), blank_id=0)[0]
    assert final == expected and len(expected) > 0
    for earlier, later in zip(partials, partials[1:] + [final]):
        assert later[: len(earlier)] == earlier


def test_lookahead_is_the_front_end_receptive_field(hparams):
    streamer = StreamingCTC.from_hparams(hparams)
    # Fbank: 25 ms windows every 10 ms; CNN: two kernel-3 stride-2 convolutions.
    assert streamer.frame_ms == 40
    assert streamer.lookahead_ms == 12.5 + 3 * 10


def test_non_streamable_config_is_rejected(tmp_path):
    hparams = load_tiny(CTC_DEMO_YAML, tmp_path)
    with pytest.raises(ValueError, match="StreamableFbank"):
        StreamingCTC.from_hparams(hparams)


@pytest.mark.parametrize("base", ["demo_conmamba.yaml", "conmamba_large.yaml"])
def test_causal_configs_differ_from_their_base_only_in_causality(base):
    causal = yaml_top_level(os.path.join(ROOT, "hparams", "CTC", base.replace(".yaml", "_causal.yaml")))
    reference = yaml_top_level(os.path.join(ROOT, "hparams", "CTC", base))
    assert set(causal) - set(reference) == {"causal"}
    assert not set(reference) - set(causal)
    differing = {key for key in reference if causal[key] != reference[key]}
    assert differing == {"output_folder", "bidirectional", "encoder", "compute_features"}


def test_causal_demo_config_trains_and_streams_from_its_inference_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    run_script(
        "train_CTC.py",
        CAUSAL_DEMO_YAML,
        out,
        *TINY_CTC_MODEL,
        "--select_n_sentences=[32, 4, 2]",
        "--number_of_epochs=6",
        "--n_warmup_steps=10",
        "--max_batch_length_train=8",
        "--lr_adam=0.005",
        "--num_fea_augmentations=0",
        "--speed_changes=[100]",
        "--avg_checkpoints=1",
    )
    losses = train_losses(out / "train_log.txt")
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses

    streamer = StreamingCTC.from_inference_folder(str(out / "inference"))
    audio = read_audio(os.path.join(DEMO_DATA, "test", "3001", "30011", "3001-30011-0001.flac"))
    for chunk in audio.split(SAMPLE_RATE // 4):
        streamer.transcribe_chunk(chunk)
    whole = ctc_greedy_decode(whole_utterance_log_probs(streamer.modules, audio), torch.ones(1), blank_id=0)[0]
    assert streamer.finish() == streamer.tokenizer.decode_ids(whole)


def test_benchmark_prints_one_row_per_chunk_size():
    command = [
        sys.executable, "bench/streaming.py", "--hparams", CAUSAL_DEMO_YAML, "--threads", "1", "--seconds", "0.5",
        "--chunk-ms", "160,320",
    ]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    rows = [line.split("|")[1].strip() for line in completed.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert rows == ["160", "320"]
    assert "front-end lookahead 42.5 ms" in completed.stdout


def test_to_moves_the_normalization_statistics_with_the_modules(tmp_path):
    # ModuleDict.to does not call InputNormalization.to, which alone moves its statistics: a streamer
    # moved to a GPU once failed with its statistics left on the CPU ("meta" stands in for the GPU).
    hparams = load_tiny(CAUSAL_DEMO_YAML, tmp_path)
    hparams["normalize"](hparams["compute_features"](torch.randn(1, SAMPLE_RATE)), torch.ones(1), epoch=0)
    streamer = StreamingCTC.from_hparams(hparams).to("meta")
    assert streamer.modules.normalize.glob_mean.device.type == "meta"
    assert streamer.modules.normalize.glob_std.device.type == "meta"
    assert streamer.modules.ctc_lin.w.weight.device.type == "meta"
