"""Long-form CTC transcription: recordings of any length in bounded memory, without losing words at
window boundaries.

The recording is cut into overlapping windows: each window is a central chunk (``chunk_seconds``) with
``context_seconds`` of audio on each side. Every window is encoded on its own, only the CTC
log-probabilities of its central frames are kept (the context gives those frames what the encoder
would have seen in the whole recording), the central parts are concatenated into the log-probabilities
of the whole recording, and these are decoded once. No word is cut, since no decoding happens at a
window boundary; peak memory is that of one batch of windows.

Works with any ``speechbrain.inference.ASR.EncoderASR`` whose ``encode_batch`` returns CTC
log-probabilities (the inference folders of train_CTC.py). Encoder-decoder and decoder-only models
have no frame-synchronous output to stitch: transcribe.py refuses recordings longer than a chunk for them.
"""

import math

import torch
import torch.nn.functional as F


def frame_samples(asr):
    """Audio samples per encoder output frame: the feature hop x the front-end's subsampling
    (10 ms x 4 = 640 samples at 16 kHz in the recipes), the subsampling measured on a probe."""
    hop = asr.mods.encoder.compute_features.compute_STFT.hop_length
    probe_frames = 256
    with torch.no_grad():
        out = asr.encode_batch(torch.zeros(1, probe_frames * hop), torch.ones(1))
    return hop * round(probe_frames / out.shape[1])


def windows(num_frames, chunk_frames, context_frames):
    """(window start, window end, kept start, kept end) in output frames, covering 0..num_frames once
    with the kept (central) parts."""
    spans = []
    for start in range(0, num_frames, chunk_frames):
        end = min(start + chunk_frames, num_frames)
        spans.append((max(0, start - context_frames), min(num_frames, end + context_frames), start, end))
    return spans


@torch.no_grad()
def long_form_log_probs(asr, wav, chunk_seconds=30.0, context_seconds=5.0, batch_size=1):
    """CTC log-probabilities (frames, vocab) of a whole recording wav (samples,), window by window.

    batch_size windows are encoded together (the last one of a batch padded, with its true length).
    """
    hop = frame_samples(asr)
    rate = asr.audio_normalizer.sample_rate
    chunk = max(1, round(chunk_seconds * rate / hop))
    context = round(context_seconds * rate / hop)
    spans = windows(math.ceil(len(wav) / hop), chunk, context)
    kept = []
    for first in range(0, len(spans), batch_size):
        group = spans[first : first + batch_size]
        audio = [wav[lo * hop : hi * hop] for lo, hi, _, _ in group]
        longest = max(len(a) for a in audio)
        batch = torch.stack([F.pad(a, (0, longest - len(a))) for a in audio])
        lengths = torch.tensor([len(a) / longest for a in audio])
        log_probs = asr.encode_batch(batch, lengths)
        for row, (lo, _, start, end) in enumerate(group):
            if first + row == len(spans) - 1:  # the last chunk keeps every frame to the end of the audio
                end = lo + round(lengths[row].item() * log_probs.shape[1])
            kept.append(log_probs[row, start - lo : end - lo])
    return torch.cat(kept)


def transcribe_long(asr, wav, chunk_seconds=30.0, context_seconds=5.0, batch_size=1):
    """Transcribes a recording of any length with a CTC ``EncoderASR`` whose decoding function is a
    CTC beam searcher; returns its best ``CTCHypothesis`` (``text``, ``text_frames``)."""
    log_probs = long_form_log_probs(asr, wav, chunk_seconds, context_seconds, batch_size)
    hypotheses = asr.decoding_function(log_probs[None], torch.ones(1, device=log_probs.device))
    return hypotheses[0][0]
