#!/usr/bin/env python3
"""Transcribes audio files with a trained model: the inference folder a recipe writes at the end of
training (``<output_folder>/inference``, see modules/inference/folders.py), any paradigm.

> python transcribe.py --model results/demo_conmamba/3402/inference audio.flac more_audio/ --list files.txt

Inputs are audio files, folders (searched recursively for .wav .flac .ogg .opus .mp3) and, with
``--list``, text files of one path per line. Each transcript is written as ``<path><TAB><text>`` (to
stdout or ``--output``); ``--json`` writes a JSON list instead, with word start and end times (seconds)
for CTC models, from the CTC beam search's frame alignment (one frame per feature hop x front-end
subsampling: 40 ms in the recipes).

Audio is read with soundfile, mixed down to mono and resampled to the model's sample rate. A file that
cannot be transcribed (missing, unreadable, not audio, shorter than 40 ms, with NaN or infinite samples,
or one the model fails on) gets one error line on stderr and the others go on; a summary line counts the
failures. The exit status is 1 if any file failed, 2 if the model could not be loaded.

Recordings longer than ``--chunk_seconds`` (30 s) are transcribed by CTC models piece by piece between
pauses (``--min_pause_seconds``) and window by window within a piece (modules/inference/long_form.py: windows of
the chunk plus ``--context_seconds`` each side, log-probabilities stitched and decoded once), in
bounded memory. Encoder-decoder and decoder-only models decode a file
whole: longer files are refused with an error (raise ``--chunk_seconds`` to decode them whole anyway).
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from speechbrain.dataio import audio_io
from speechbrain.inference.ASR import EncoderASR
from tqdm import tqdm

from modules.inference.folders import InferenceFolderError, load_asr
from modules.inference.long_form import frame_samples, transcribe_long

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3")
MIN_SECONDS = 0.04  # shorter audio holds no word, and the recipes' front-ends cannot encode 10 ms of it


class TranscriptionError(Exception):
    """A file that cannot be transcribed; the message says why and what to do."""


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", help="audio files and folders (searched recursively)")
    parser.add_argument("--model", required=True, help="an inference folder: <output_folder>/inference")
    parser.add_argument("--list", action="append", default=[], help="text file of audio paths, one a line")
    parser.add_argument("--output", help="write the transcripts here instead of stdout")
    parser.add_argument("--json", action="store_true", help="JSON output, with word times for CTC models")
    parser.add_argument("--batch_size", type=int, default=8, help="files (or long-form windows) per batch")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--chunk_seconds", type=float, default=30.0, help="longer files go long-form (CTC)")
    parser.add_argument("--context_seconds", type=float, default=5.0, help="long-form context on each side")
    parser.add_argument(
        "--min_pause_seconds", type=float, default=0.3, help="long-form recordings are first cut at pauses this long"
    )
    parser.add_argument("--noprogressbar", action="store_true")
    args = parser.parse_args(argv)
    if not args.inputs and not args.list:
        parser.error("give audio files, folders or --list files")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here; use --device cpu")
    return args


def find_audio(inputs, list_files):
    """The paths to transcribe, in the order given; folders expand to their audio files, sorted."""
    paths = list(inputs)
    for list_file in list_files:
        with open(list_file, encoding="utf-8") as f:
            paths += [line.strip() for line in f if line.strip()]
    found = []
    for path in paths:
        if os.path.isdir(path):
            for folder, _, files in sorted(os.walk(path)):
                audio = sorted(name for name in files if name.lower().endswith(AUDIO_EXTENSIONS))
                found += [os.path.join(folder, name) for name in audio]
        else:
            found.append(path)
    return found


def read_audio(asr, path):
    """The waveform (samples,) at the model's sample rate, mono."""
    if not os.path.isfile(path):
        raise TranscriptionError("no such file")
    try:
        signal, rate = audio_io.load(path, channels_first=False)
    except RuntimeError as error:
        raise TranscriptionError(
            f"cannot read it as audio ({error.__cause__}); give a WAV, FLAC, OGG or MP3 file"
        ) from None
    if signal.shape[0] == 0:
        raise TranscriptionError("the audio is empty")
    if not torch.isfinite(signal).all():
        raise TranscriptionError("the audio has NaN or infinite samples; export it again from its source")
    wav = asr.audio_normalizer(signal, rate)
    if len(wav) < MIN_SECONDS * asr.audio_normalizer.sample_rate:
        raise TranscriptionError(
            f"too short ({signal.shape[0] / rate * 1000:.0f} ms): at least {MIN_SECONDS * 1000:.0f} ms of audio is needed"
        )
    return wav


def word_times(hypothesis, seconds_per_frame, duration):
    """[{word, start, end}] in seconds from a CTC hypothesis's frame alignment (text_frames: the first
    and last frame of each word), the end clipped to the audio's duration."""
    return [
        {
            "word": word,
            "start": round(start * seconds_per_frame, 3),
            "end": round(min((end + 1) * seconds_per_frame, duration), 3),
        }
        for word, (start, end) in hypothesis.text_frames
    ]


def model_failure(error):
    """The error line of a file that the model failed on."""
    return f"the model failed on it ({type(error).__name__}: {error})"


class Transcriber:
    """Batches short files through the interface's ``transcribe_batch``; long files of CTC models go
    long-form. Each result is a dict: path, text and, for CTC models, words with times."""

    def __init__(self, asr, args):
        self.asr, self.args = asr, args
        self.is_ctc = isinstance(asr, EncoderASR)
        self.rate = asr.audio_normalizer.sample_rate
        if self.is_ctc:
            self.seconds_per_frame = frame_samples(asr) / self.rate

    def transcribe(self, paths):
        """Yields (path, result or None, error message or None) for each path, in order."""
        for first in range(0, len(paths), self.args.batch_size):
            outcomes, short = {}, {}  # by position in the batch
            for i, path in enumerate(paths[first : first + self.args.batch_size]):
                try:
                    wav = read_audio(self.asr, path)
                    if len(wav) > self.args.chunk_seconds * self.rate:
                        outcomes[i] = (path, self.transcribe_long(path, wav), None)
                    else:
                        short[i] = (path, wav)
                except TranscriptionError as error:
                    outcomes[i] = (path, None, str(error))
                except Exception as error:  # noqa: BLE001 (reported per file, the other files go on)
                    outcomes[i] = (path, None, model_failure(error))
            if short:
                outcomes.update(zip(short, self.transcribe_each_if_failing(list(short.values()))))
            yield from (outcomes[i] for i in sorted(outcomes))

    def transcribe_each_if_failing(self, batch):
        """(path, result, error) for each (path, wav) of the batch; if the batch fails, each file is
        transcribed alone, so that a file the model fails on costs only its own transcript."""
        try:
            return [(result["path"], result, None) for result in self.transcribe_batch(batch)]
        except Exception as error:  # noqa: BLE001 (reported per file, the other files go on)
            if len(batch) == 1:
                return [(batch[0][0], None, model_failure(error))]
            return [outcome for item in batch for outcome in self.transcribe_each_if_failing([item])]

    def transcribe_batch(self, batch):
        """[(path, wav)] -> [result], through the interface's transcribe_batch on the padded batch."""
        longest = max(len(wav) for _, wav in batch)
        wavs = torch.stack([F.pad(wav, (0, longest - len(wav))) for _, wav in batch])
        lengths = torch.tensor([len(wav) / longest for _, wav in batch])
        texts, hypotheses = self.asr.transcribe_batch(wavs, lengths)
        results = []
        for row, (path, wav) in enumerate(batch):
            results.append({"path": path, "text": texts[row]})
            if self.is_ctc:
                words = word_times(hypotheses[row][0], self.seconds_per_frame, len(wav) / self.rate)
                results[-1]["words"] = words
        return results

    def transcribe_long(self, path, wav):
        if not self.is_ctc:
            raise TranscriptionError(
                f"longer than --chunk_seconds ({self.args.chunk_seconds:g} s): long-form transcription is for "
                "CTC models only; split the file, or raise --chunk_seconds to decode it whole"
            )
        hypothesis = transcribe_long(
            self.asr, wav, self.args.chunk_seconds, self.args.context_seconds, self.args.batch_size,
            self.args.min_pause_seconds,
        )
        words = word_times(hypothesis, self.seconds_per_frame, len(wav) / self.rate)
        return {"path": path, "text": hypothesis.text, "words": words}


def main(argv=None):
    args = parse_arguments(argv)
    paths = find_audio(args.inputs, args.list)
    try:
        asr = load_asr(args.model, device=args.device)
    except InferenceFolderError as error:
        print(f"transcribe.py: error: {error}", file=sys.stderr)
        return 2

    output = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    results, failed = [], 0
    progress = tqdm(total=len(paths), unit="file", disable=args.noprogressbar, file=sys.stderr)
    for path, result, error in Transcriber(asr, args).transcribe(paths):
        progress.update()
        if error is not None:
            failed += 1
            tqdm.write(f"transcribe.py: error: {path}: {error}", file=sys.stderr)
        elif args.json:
            results.append(result)
        else:
            print(f"{path}\t{result['text']}", file=output, flush=True)
    progress.close()
    if args.json:
        json.dump(results, output, indent=1, ensure_ascii=False)
        output.write("\n")
    if args.output:
        output.close()
    if failed:
        print(f"transcribe.py: {failed} of {len(paths)} files failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
