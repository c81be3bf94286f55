"""Bad data: manifest rows and audio files that cannot be trained on, for data preparation and training.

The yaml key ``bad_data`` of every training config says what happens to them: ``fail`` stops with an
error naming the file and the fix; ``skip`` leaves them out, logging each one and how many there were.
Rows are checked when a manifest is loaded (missing audio, zero or over-long duration, empty transcript);
audio that does not decode or has the wrong sample rate shows only when it is read, so the data loader
drops it from its batch. A batch left with no utterance stops the run all the same: skipping it on one
process would hang the others under DDP. Data preparation (librispeech_prepare.py) checks each audio file's
header with the same :func:`audio_problem`, and raises the same BadDataError.
"""

import csv
import logging
import os

import soundfile
import speechbrain as sb
from speechbrain.dataio.batch import PaddedBatch
from speechbrain.dataio.dataio import read_audio

logger = logging.getLogger(__name__)

BAD_DATA_POLICIES = ("fail", "skip")
MANIFEST_COLUMNS = ("ID", "duration", "wav", "wrd")  # the columns of a manifest that the recipes read
FIX = "Fix or remove it (and re-run data preparation), or set bad_data: skip to leave such utterances out."


class BadDataError(ValueError):
    """An utterance that cannot be trained on, met with ``bad_data: fail``."""


def check_policy(bad_data):
    """Raises unless ``bad_data`` is one of BAD_DATA_POLICIES."""
    if bad_data not in BAD_DATA_POLICIES:
        raise ValueError(f"bad_data must be one of {', '.join(BAD_DATA_POLICIES)}, not {bad_data!r}")


def read_csv(path):
    """The rows of a csv file, as dicts."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def row_problem(row, max_duration):
    """Why a manifest row (with ``wav``, ``duration`` and ``wrd``) cannot be trained on, or None."""
    if not os.path.isfile(row["wav"]):
        return f"audio file {row['wav']} is missing"
    duration = float(row["duration"])
    if duration <= 0:
        return f"audio file {row['wav']} is empty (duration {duration} s)"
    if max_duration is not None and duration > max_duration:
        return f"audio file {row['wav']} lasts {duration:.1f} s, more than max_duration ({max_duration} s)"
    if not row["wrd"].strip():
        return f"utterance {row['wav']} has an empty transcript"
    return None


def load_manifest(path, data_folder, bad_data, max_duration):
    """DynamicItemDataset of the usable rows of the csv manifest ``path``, with ``manifest_size`` the
    number of its rows.

    With ``bad_data: fail`` any unusable row (see :func:`read_manifest` and :func:`row_problem`) raises
    BadDataError naming the manifest, the rows and the files; with ``skip`` each is logged and left out,
    and the count is logged.
    """
    check_policy(bad_data)
    data, problems = read_manifest(path, data_folder)
    total = len(data) + len(problems)
    problems.update({utt_id: row_problem(row, max_duration) for utt_id, row in data.items()})
    problems = {where: problem for where, problem in problems.items() if problem}
    if problems and bad_data == "fail":
        listed = "; ".join(f"{where}: {problem}" for where, problem in list(problems.items())[:10])
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise BadDataError(f"{len(problems)} unusable utterances in {path}: {listed}{more}. {FIX}")
    for where, problem in problems.items():
        logger.warning(f"Skipping {where} of {path}: {problem}")
    if problems:
        logger.warning(f"Skipped {len(problems)} of {total} utterances of {path} (bad_data: skip)")
    dataset = sb.dataio.dataset.DynamicItemDataset({k: v for k, v in data.items() if k not in problems})
    dataset.manifest_size = total  # the utterances of the manifest, usable or not
    return dataset


def read_manifest(path, data_folder=None):
    """The rows of a csv manifest by utterance ID (``$data_root`` replaced by ``data_folder`` if given,
    durations as numbers), and {where: problem} for the rows that cannot be read: cut short or too long, a
    duration that is not a number, an ID already used on an earlier line (that row is kept).

    SpeechBrain's ``load_data_csv`` raises a bare KeyError, IndexError or "Duplicate id" for these,
    naming neither the file nor the line. A manifest without a column that the recipes read raises
    BadDataError naming it.
    """
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, skipinitialspace=True)
        header = next(reader, [])
        missing = [column for column in MANIFEST_COLUMNS if column not in header]
        if missing:
            raise BadDataError(
                f"{path} has no column {', '.join(missing)} (its header: {','.join(header)}); the recipes read "
                f"{', '.join(MANIFEST_COLUMNS)}. Restore the header, or prepare the manifests again."
            )
        rows, first_line, problems = {}, {}, {}
        for fields in reader:
            line = reader.line_num
            if not fields:
                continue
            if len(fields) != len(header):
                problems[f"line {line}"] = f"has {len(fields)} fields where the header has {len(header)}"
                continue
            row = dict(zip(header, fields))
            if data_folder is not None:
                row = {column: value.replace("$data_root", str(data_folder)) for column, value in row.items()}
            utt_id = row.pop("ID")
            where = f"{utt_id} (line {line})"
            if utt_id in rows:
                problems[where] = f"has the utterance ID of line {first_line[utt_id]}; IDs must be unique"
                continue
            try:
                row["duration"] = float(row["duration"])
            except ValueError:
                problems[where] = f"has the duration {row['duration']!r}, not a number of seconds"
                continue
            rows[utt_id], first_line[utt_id] = row, line
    return rows, problems


def audio_problem(wav, sample_rate):
    """Reads the header of the audio file ``wav``: returns (its duration in seconds, None), or (None, why it
    cannot be trained on) if it is missing, does not decode, is not at ``sample_rate`` Hz or is empty.

    The problem names the file (``audio file <wav> ...``); the caller adds what to do about it. Returned, not
    raised, so that data preparation can collect the problems of a whole split (from a process pool). The
    header is soundfile's, which SpeechBrain reads audio with (its own ``read_audio_info`` fails on an empty
    file).
    """
    try:
        info = soundfile.info(wav)
    except RuntimeError as error:
        problem = "is missing" if not os.path.isfile(wav) else f"cannot be decoded ({error})"
        return None, f"audio file {wav} {problem}"
    if info.samplerate != sample_rate:
        return None, (
            f"audio file {wav} is sampled at {info.samplerate} Hz, not {sample_rate} Hz "
            f"(resample it, e.g. sox in.flac -r {sample_rate} out.flac)"
        )
    if info.frames == 0:
        return None, f"audio file {wav} is empty"
    return info.frames / info.samplerate, None


def read_checked_audio(wav, sample_rate, bad_data):
    """The waveform of ``wav`` (samples,), multi-channel audio mixed down to mono as transcribe.py does;
    if it is missing, does not decode, is not at ``sample_rate`` Hz or is empty (:func:`audio_problem`),
    raises BadDataError naming the file (``bad_data: fail``) or logs it and returns None (``skip``: see
    collate_readable)."""
    _, problem = audio_problem(wav, sample_rate)
    if problem is None:
        try:
            audio = read_audio(wav)  # (samples, channels) if there are several
            return audio.mean(dim=1) if audio.dim() == 2 else audio
        except RuntimeError as error:
            problem = f"audio file {wav} cannot be decoded ({error})"
    if bad_data == "fail":
        raise BadDataError(f"{problem}. {FIX}")
    logger.warning(f"Skipping an utterance: {problem}")
    return None


def collate_readable(examples):
    """PaddedBatch of the examples that have no None item (audio read_checked_audio skipped)."""
    readable = [example for example in examples if None not in example.values()]
    if not readable:
        ids = ", ".join(str(example.get("id")) for example in examples)
        raise BadDataError(f"No utterance of a batch could be read ({ids}): see the warnings above. {FIX}")
    if len(readable) < len(examples):
        logger.warning(f"Dropped {len(examples) - len(readable)} of {len(examples)} utterances from a batch")
    return PaddedBatch(readable)
