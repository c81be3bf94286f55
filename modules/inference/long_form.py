"""Long-form CTC transcription: recordings of any length in bounded memory, without losing words at
window boundaries.

Pauses come first: a stretch of at least ``min_pause_seconds`` more than 40 dB below the recording's
loudest frame is not encoded (its frames get the CTC blank, but for a little silence kept on each side of
the speech, as training utterances have), so a model trained on single utterances is not asked to carry
its state across sentences it never heard run together. The speech between pauses is encoded piece by
piece; a piece longer than ``chunk_seconds`` is cut into overlapping windows: each window is a central
chunk (``chunk_seconds``) with ``context_seconds`` of audio on each side. Every window is encoded on its own, only the CTC
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


SPEECH_EDGE_FRAMES = 2  # silence frames kept on each side of the speech between pauses


def pauses(wav, hop, min_pause_frames, quiet_db=-40.0):
    """(first, end) output frames (of ``hop`` samples) of each pause of ``wav``: a run of at least
    ``min_pause_frames`` frames whose energy is ``quiet_db`` or more below the loudest frame's, not at
    the start or the end of the recording."""
    frames = wav[: len(wav) // hop * hop].view(-1, hop)
    level = 10 * torch.log10(frames.pow(2).mean(dim=1) + 1e-10)
    quiet = (level < level.max() + quiet_db).tolist() + [False]
    spans, run_start = [], None
    for frame, is_quiet in enumerate(quiet):
        if is_quiet and run_start is None:
            run_start = frame
        elif not is_quiet and run_start is not None:
            if run_start > 0 and frame < len(quiet) - 1 and frame - run_start >= min_pause_frames:
                spans.append((run_start, frame))
            run_start = None
    return spans


@torch.no_grad()
def long_form_log_probs(asr, wav, chunk_seconds=30.0, context_seconds=5.0, batch_size=1, min_pause_seconds=0.3):
    """CTC log-probabilities (frames, vocab) of a whole recording wav (samples,): blank in the pauses
    (none with ``min_pause_seconds=None``), the speech between them encoded piece by piece, window by
    window within a piece."""
    hop = frame_samples(asr)
    rate = asr.audio_normalizer.sample_rate
    chunk = max(1, round(chunk_seconds * rate / hop))
    context = round(context_seconds * rate / hop)
    spans = [] if min_pause_seconds is None else pauses(wav, hop, round(min_pause_seconds * rate / hop))
    pieces, start = [], 0
    for pause_start, pause_end in spans:
        end = pause_start + SPEECH_EDGE_FRAMES
        pieces.append(windowed_log_probs(asr, wav[start * hop : end * hop], hop, chunk, context, batch_size)[: end - start])
        start = max(end, pause_end - SPEECH_EDGE_FRAMES)
        blank = torch.full((start - end, pieces[-1].shape[1]), float("-inf"), device=pieces[-1].device)
        blank[:, asr.decoding_function.blank_index] = 0.0
        pieces.append(blank)
    pieces.append(windowed_log_probs(asr, wav[start * hop :], hop, chunk, context, batch_size))
    return torch.cat(pieces)


def windowed_log_probs(asr, wav, hop, chunk, context, batch_size):
    """CTC log-probabilities of wav, encoded in windows of ``chunk`` output frames with ``context`` frames
    on each side; batch_size windows are encoded together (the last one of a batch padded, with its
    true length)."""
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


def transcribe_long(asr, wav, chunk_seconds=30.0, context_seconds=5.0, batch_size=1, min_pause_seconds=0.3):
    """Transcribes a recording of any length with a CTC ``EncoderASR`` whose decoding function is a
    CTC beam searcher; returns its best ``CTCHypothesis`` (``text``, ``text_frames``)."""
    log_probs = long_form_log_probs(asr, wav, chunk_seconds, context_seconds, batch_size, min_pause_seconds)
    hypotheses = asr.decoding_function(log_probs[None], torch.ones(1, device=log_probs.device))
    return hypotheses[0][0]
