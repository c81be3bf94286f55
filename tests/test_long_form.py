"""Long-form CTC transcription (modules/inference/long_form.py): the windows tile the recording, the stitched
log-probabilities are the whole recording's where the context covers it, and a recording made of
utterances end to end is transcribed, across many window boundaries, with about the word error rate of
the utterances transcribed one by one. That last test needs a trained model, so CI skips it:
> LONG_FORM_MODEL=results/demo_conmamba/3402/inference python -m pytest tests/test_long_form.py

Run as a script, this file measures transcribe.py on a long recording of the demo's held-out utterances
(WER against the utterances one by one, peak memory, time); options it does not know go to transcribe.py:
> python tests/test_long_form.py --model results/demo_conmamba/3402/inference --minutes 10 [--pause_seconds 0.3]
"""

import argparse
import csv
import itertools
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import pytest
import soundfile
import torch
from speechbrain.utils.metric_stats import ErrorRateStats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.inference.folders import load_asr  # noqa: E402
from modules.inference.long_form import (  # noqa: E402
    SPEECH_EDGE_FRAMES,
    frame_samples,
    long_form_log_probs,
    pauses,
    transcribe_long,
    windows,
)
from recipe_runs import ROOT, tiny_ctc_run  # noqa: E402

def word_error_rate(references, hypotheses):
    """WER (%) of hypothesis word lists against reference word lists."""
    stats = ErrorRateStats()
    stats.append([str(i) for i in range(len(references))], hypotheses, references)
    return stats.summarize("error_rate")


def concatenate(asr, paths, pause_seconds=0.0):
    """One recording: the utterances end to end, with ``pause_seconds`` of silence between them."""
    pause = torch.zeros(round(pause_seconds * asr.audio_normalizer.sample_rate))
    pieces = [asr.load_audio(path) for path in paths]
    return torch.cat([piece for wav in pieces for piece in (wav, pause)][:-1])


def manifest(csv_file):
    """(audio path, words) of each row of a recipe's manifest."""
    with open(csv_file, newline="", encoding="utf-8") as f:
        return [(row["wav"], row["wrd"].split()) for row in csv.DictReader(f)]


@pytest.fixture(scope="session")
def ctc_run(tmp_path_factory):
    return tiny_ctc_run(tmp_path_factory)


@pytest.fixture(scope="module")
def asr(ctc_run):
    return load_asr(ctc_run / "inference")


def test_windows_keep_every_frame_exactly_once_with_its_context():
    spans = windows(num_frames=23, chunk_frames=5, context_frames=2)
    assert [(start, end) for _, _, start, end in spans] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert all(lo == max(0, start - 2) and hi == min(23, end + 2) for lo, hi, start, end in spans)


def test_stitched_log_probs_are_the_whole_recordings_when_the_context_covers_it(asr, ctc_run):
    wav = concatenate(asr, [path for path, _ in manifest(ctc_run / "train.csv")[:4]])
    seconds = len(wav) / asr.audio_normalizer.sample_rate
    whole = asr.encode_batch(wav[None], torch.ones(1))[0]
    stitched = long_form_log_probs(
        asr, wav, chunk_seconds=0.5, context_seconds=seconds, batch_size=3, min_pause_seconds=None
    )
    assert stitched.shape == whole.shape
    torch.testing.assert_close(stitched, whole, atol=1e-4, rtol=1e-4)


def test_pauses_are_long_quiet_runs_inside_the_recording():
    hop, noise = 640, torch.Generator().manual_seed(0)
    loud = lambda frames: torch.randn(frames * hop, generator=noise)  # noqa: E731
    silence = lambda frames: torch.zeros(frames * hop)  # noqa: E731
    wav = torch.cat([silence(10), loud(20), silence(12), loud(5), silence(3), loud(7), silence(9)])
    # leading and trailing silence are not pauses; the 3-frame one is too short for 8
    assert pauses(wav, hop, min_pause_frames=8) == [(30, 42)]
    assert pauses(wav, hop, min_pause_frames=3) == [(30, 42), (47, 50)]


def test_pauses_are_blank_and_the_speech_around_them_is_encoded_on_its_own(asr, ctc_run):
    first, second = [path for path, _ in manifest(ctc_run / "train.csv")[:2]]
    wav = concatenate(asr, [first, second], pause_seconds=0.6)
    hop, edge = frame_samples(asr), SPEECH_EDGE_FRAMES
    ((pause_start, pause_end),) = pauses(wav, hop, min_pause_frames=round(0.3 * 16000 / hop))
    stitched = long_form_log_probs(asr, wav, chunk_seconds=30, context_seconds=5)
    assert stitched.shape[0] == math.ceil(len(wav) / hop)
    blank = asr.decoding_function.blank_index
    assert (stitched[pause_start + edge : pause_end - edge].argmax(dim=1) == blank).all()
    # the speech after the pause is encoded without the first utterance
    second_piece = asr.encode_batch(wav[None, (pause_end - edge) * hop :], torch.ones(1))[0]
    torch.testing.assert_close(stitched[pause_end - edge :], second_piece, atol=1e-4, rtol=1e-4)
    whole = asr.encode_batch(wav[None], torch.ones(1))[0]
    assert not torch.allclose(stitched[pause_end - edge :], whole[pause_end - edge :], atol=1e-4)


def test_frame_shift_is_the_feature_hop_times_the_front_end_subsampling(asr):
    assert frame_samples(asr) == 160 * 4  # 10 ms at 16 kHz, two stride-2 CNN blocks


# The tiny model of the CI runs is far too weak for this one: it transcribes utterances differently as
# soon as other speech precedes them, windows or no windows. It needs a trained model, e.g. the demo's.
@pytest.mark.skipif("LONG_FORM_MODEL" not in os.environ, reason="set LONG_FORM_MODEL=<a CTC inference folder>")
def test_long_form_wer_of_utterances_end_to_end_is_that_of_the_utterances_one_by_one():
    asr = load_asr(os.environ["LONG_FORM_MODEL"])
    utterances = demo_utterances()[:100]  # about 2 minutes
    references = [words for _, words in utterances]
    separate = word_error_rate(references, [asr.transcribe_file(path).split() for path, _ in utterances])
    wav = concatenate(asr, [path for path, _ in utterances], pause_seconds=0.3)
    long_form = transcribe_long(asr, wav, chunk_seconds=10, context_seconds=3, batch_size=4).text.split()
    assert abs(word_error_rate([sum(references, [])], [long_form]) - separate) < 3


def demo_utterances(splits=("test", "dev")):
    """(audio path, words) of the demo's held-out utterances, from the LibriSpeech transcript files."""
    utterances = []
    for split in splits:
        for folder, _, files in sorted(os.walk(os.path.join(ROOT, "demo", "LibriSpeech", split))):
            for name in sorted(f for f in files if f.endswith(".trans.txt")):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    for line in f:
                        uid, words = line.split(" ", 1)
                        utterances.append((os.path.join(folder, uid + ".flac"), words.split()))
    return utterances


def measure(argv=None):
    """Long-form WER, peak memory and time of transcribe.py on a recording of at least --minutes made of
    the demo's held-out utterances (repeated as needed), against the WER of the utterances one by one."""
    parser = argparse.ArgumentParser(description=measure.__doc__)
    parser.add_argument("--model", required=True, help="a CTC inference folder")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--pause_seconds", type=float, default=0.3, help="silence between the utterances")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the recording is written")
    args, transcribe_options = parser.parse_known_args(argv)
    asr = load_asr(args.model)
    utterances, seconds = [], 0.0
    for utterance in itertools.cycle(demo_utterances()):
        if seconds >= 60 * args.minutes:
            break
        utterances.append(utterance)
        seconds += soundfile.info(utterance[0]).duration
    references = [words for _, words in utterances]
    separate = [asr.transcribe_file(path).split() for path, _ in utterances]

    os.makedirs(args.workdir, exist_ok=True)
    recording = os.path.join(args.workdir, "long_form_recording.wav")
    wav = concatenate(asr, [path for path, _ in utterances], args.pause_seconds)
    soundfile.write(recording, wav.numpy(), asr.audio_normalizer.sample_rate)
    start = time.time()
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "transcribe.py"), "--model", args.model, recording, *transcribe_options],
        capture_output=True, text=True, check=True,
    )
    seconds = time.time() - start
    long_form = proc.stdout.split("\t", 1)[1].split()
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"{len(wav) / asr.audio_normalizer.sample_rate / 60:.1f} min, {len(utterances)} utterances: "
        f"WER one by one {word_error_rate(references, separate):.2f} %, "
        f"long-form {word_error_rate([sum(references, [])], [long_form]):.2f} %; "
        f"transcribe.py peak RSS {peak_mib:.0f} MiB, {seconds:.0f} s"
    )


if __name__ == "__main__":
    measure()
