"""Turn a LibriSpeech-style corpus into SpeechBrain CSV manifests.

Expected layout (split names are free, e.g. ``train-clean-100`` or ``train``)::

    <data_folder>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt
    <data_folder>/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<NNNN>.flac

Each split becomes ``<save_folder>/<split>.csv`` with the columns
``ID,duration,wav,spk_id,wrd``. Transcripts are normalised here, and only
here, to LibriSpeech's convention (see ``normalize_transcript``). The keyword names of ``prepare_librispeech``
follow SpeechBrain's LibriSpeech recipes, so their yaml files work unchanged.

Example
-------
>>> prepare_librispeech(
...     "LibriSpeech", "results/data",
...     tr_splits=["train-clean-100"], dev_splits=["dev-clean"],
...     te_splits=["test-clean"],
... )  # doctest: +SKIP
"""

import argparse
import csv
import glob
import json
import logging
import multiprocessing
import os
import unicodedata

from modules.training.checkpointing import atomic_write
from modules.training.data_checks import BadDataError, audio_problem, check_policy

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
CSV_HEADER = ["ID", "duration", "wav", "spk_id", "wrd"]
OPTIONS_FILE = "librispeech_prepare.json"
# Below this many files, a process pool costs more than it saves.
PARALLEL_MIN_FILES = 2000
APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})


def prepare_librispeech(
    data_folder,
    save_folder,
    tr_splits=(),
    dev_splits=(),
    te_splits=(),
    select_n_sentences=None,
    merge_lst=(),
    merge_name=None,
    skip_prep=False,
    bad_data="fail",
):
    """Write one CSV manifest per split, and optionally their concatenation.

    Arguments
    ---------
    data_folder : str
        Folder holding the split folders (e.g. ``.../LibriSpeech``).
    save_folder : str
        Where the CSV files (and a record of the options used) are written.
    tr_splits, dev_splits, te_splits : list of str
        Split folder names; the three lists are treated alike.
    select_n_sentences : int or list of int or None
        Keep only the first N utterances of each split (one entry per split,
        in the order tr, dev, te; None keeps all). Handy for quick debugging.
    merge_lst : list of str
        Splits whose CSVs are concatenated into ``merge_name``.
    merge_name : str
        Name of the merged CSV (``.csv`` is appended unless already there).
    skip_prep : bool
        If True, do nothing (the CSVs are expected to exist).
    bad_data : str
        What to do with an utterance whose transcript is empty or whose audio
        is missing, empty, unreadable or not sampled at 16 kHz: ``"fail"``
        raises, ``"skip"`` leaves it out with a warning naming the file.

    Raises
    ------
    FileNotFoundError
        If ``data_folder`` or a split folder does not exist.
    BadDataError
        With ``bad_data="fail"``, if a transcript or audio file is missing,
        empty, unreadable or not sampled at 16 kHz; the message names the
        file and how to fix it.
    """
    if skip_prep:
        return
    check_policy(bad_data)
    splits = list(tr_splits) + list(dev_splits) + list(te_splits)
    n_sentences = _per_split(select_n_sentences, splits)
    merge_lst = list(merge_lst)
    merge_csv = _merge_csv_name(merge_lst, merge_name, splits)

    options = {
        "data_folder": os.path.abspath(data_folder),
        "splits": splits,
        "select_n_sentences": n_sentences,
        "merge_lst": merge_lst,
        "merge_name": merge_csv,
        "bad_data": bad_data,
        "transcripts": "normalized",  # manifests of earlier versions are rebuilt
    }
    csv_names = [f"{split}.csv" for split in splits]
    if merge_csv:
        csv_names.append(merge_csv)
    if _already_done(save_folder, csv_names, options):
        logger.info("Manifests in %s are up to date, skipping.", save_folder)
        return

    _check_split_folders(data_folder, splits)
    os.makedirs(save_folder, exist_ok=True)
    # Forget the previous options first: a rebuild stopped half way must not
    # leave old CSVs next to a record saying they match.
    options_path = os.path.join(save_folder, OPTIONS_FILE)
    if os.path.exists(options_path):
        os.remove(options_path)

    rows = {}
    for split, n in zip(splits, n_sentences):
        rows[split] = _split_rows(os.path.join(data_folder, split), n, bad_data)
        _write_csv(os.path.join(save_folder, f"{split}.csv"), rows[split])
        hours = sum(row[1] for row in rows[split]) / 3600
        logger.info("%s: %d utterances, %.2f hours.", split, len(rows[split]), hours)

    if merge_csv:
        merged = [row for split in merge_lst for row in rows[split]]
        _write_csv(os.path.join(save_folder, merge_csv), merged)
        logger.info("%s: merged %s.", merge_csv, ", ".join(merge_lst))

    with atomic_write(options_path, newline="") as f:
        json.dump(options, f, indent=2)


def _per_split(select_n_sentences, splits):
    """Return one sentence limit (or None) per split."""
    if select_n_sentences is None or isinstance(select_n_sentences, int):
        return [select_n_sentences] * len(splits)
    limits = list(select_n_sentences)
    if len(limits) != len(splits):
        raise ValueError(
            f"select_n_sentences has {len(limits)} entries but there are "
            f"{len(splits)} splits ({', '.join(splits)}): give one per split."
        )
    return limits


def _merge_csv_name(merge_lst, merge_name, splits):
    """Check the merge options and return the merged CSV's file name."""
    if not merge_lst:
        return None
    if not merge_name:
        raise ValueError("merge_lst is given but merge_name is not.")
    unknown = [split for split in merge_lst if split not in splits]
    if unknown:
        raise ValueError(
            f"merge_lst names {', '.join(unknown)}, which are not among the "
            f"splits to prepare ({', '.join(splits)})."
        )
    return merge_name if merge_name.endswith(".csv") else f"{merge_name}.csv"


def _already_done(save_folder, csv_names, options):
    """True if every CSV exists and was built with the same options."""
    options_path = os.path.join(save_folder, OPTIONS_FILE)
    if not os.path.isfile(options_path):
        return False
    if not all(os.path.isfile(os.path.join(save_folder, name)) for name in csv_names):
        return False
    with open(options_path, encoding="utf-8") as f:
        try:
            return json.load(f) == options
        except json.JSONDecodeError:
            return False


def _check_split_folders(data_folder, splits):
    """Fail early, listing what exists, if a folder is missing."""
    if not os.path.isdir(data_folder):
        raise FileNotFoundError(
            f"LibriSpeech data folder {data_folder} does not exist: set "
            "data_folder to the folder that holds the split folders."
        )
    for split in splits:
        split_folder = os.path.join(data_folder, split)
        if not os.path.isdir(split_folder):
            existing = sorted(
                name
                for name in os.listdir(data_folder)
                if os.path.isdir(os.path.join(data_folder, name))
            )
            raise FileNotFoundError(
                f"Split folder {split_folder} does not exist. Split folders "
                f"in {data_folder}: {', '.join(existing) or 'none'}."
            )


def _split_rows(split_folder, n_sentences=None, bad_data="fail"):
    """Return the manifest rows ``[ID, duration, wav, spk_id, wrd]`` of a split.

    An utterance that cannot be trained on raises BadDataError, or is
    left out with a warning naming its file if ``bad_data`` is ``"skip"``.
    """
    pattern = os.path.join(split_folder, "*", "*", "*.trans.txt")
    trans_files = sorted(glob.glob(pattern))
    if not trans_files:
        raise BadDataError(
            f"No transcript found in {split_folder} (looked for {pattern}): "
            "is it a LibriSpeech split folder?"
        )

    utterances, problems = [], []
    for trans_file in trans_files:
        for utterance in _read_transcripts(trans_file):
            if isinstance(utterance, BadDataError):
                _raise_or_collect(utterance, bad_data, problems)
            else:
                utterances.append(utterance)
    if n_sentences is not None:
        utterances = utterances[:n_sentences]

    durations = _read_durations([wav for _, wav, _, _ in utterances])
    rows = []
    for (utt_id, wav, spk_id, words), duration in zip(utterances, durations):
        if isinstance(duration, BadDataError):
            _raise_or_collect(duration, bad_data, problems)
        else:
            rows.append([utt_id, duration, wav, spk_id, words])
    for problem in problems:
        logger.warning("Left out an utterance: %s", problem)
    if problems:
        logger.warning(
            "%s: left out %d utterances (bad_data: skip).", split_folder, len(problems)
        )
    return rows


def _raise_or_collect(problem, bad_data, problems):
    """Raise ``problem`` if ``bad_data`` is ``"fail"``, else add it to ``problems``."""
    if bad_data == "fail":
        raise problem
    problems.append(problem)


def normalize_transcript(text):
    """A transcript in LibriSpeech's convention: upper case, single spaces, accents
    removed (``é`` -> ``E``) and typographic apostrophes (``’ ‘ ʼ```) written ``'``.

    Other characters (digits, punctuation, other scripts) are kept: a character
    tokenizer cannot fit them in the output layer, and the recipes then stop at
    start-up naming them and a transcript that has them. Write them out in
    ``modules.training.sentencepiece_models.ALPHABET`` (``42`` -> ``FORTY TWO``).
    """
    text = unicodedata.normalize("NFKD", text.translate(APOSTROPHES))
    text = "".join(char for char in text if not unicodedata.combining(char))
    return " ".join(text.upper().split())


def _read_transcripts(trans_file):
    """Return ``(ID, wav, spk_id, wrd)`` for each line of a chapter transcript,
    or a BadDataError for a line without words or audio."""
    chapter_folder = os.path.dirname(os.path.abspath(trans_file))
    spk_id = os.path.basename(os.path.dirname(chapter_folder))
    utterances = []
    with open(trans_file, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            utt_id, _, words = line.strip().partition(" ")
            words = normalize_transcript(words)
            wav = os.path.join(chapter_folder, f"{utt_id}.flac")
            if not words:
                utterances.append(BadDataError(
                    f"Empty transcript for {utt_id} in {trans_file}, line "
                    f"{line_number}: add the text or remove the line."
                ))
            elif not os.path.isfile(wav):
                utterances.append(BadDataError(
                    f"{trans_file}, line {line_number}: audio file {wav} is "
                    "missing. Restore it or remove the line."
                ))
            else:
                utterances.append((utt_id, wav, spk_id, words))
    return utterances


def _read_durations(wavs):
    """Return the duration in seconds (or a BadDataError) of each of
    ``wavs``, in parallel for big corpora."""
    processes = min(os.cpu_count() or 1, len(wavs) // PARALLEL_MIN_FILES)
    if processes < 2:
        return [_read_duration(wav) for wav in wavs]
    with multiprocessing.Pool(processes) as pool:
        return pool.map(_read_duration, wavs, chunksize=256)


def _read_duration(wav):
    """Return the duration of one audio file, or a BadDataError if it
    is not readable, non-empty 16 kHz audio (the check of training,
    ``modules.training.data_checks.audio_problem``)."""
    duration, problem = audio_problem(wav, SAMPLE_RATE)
    if problem is None:
        return duration
    return BadDataError(
        f"{problem[0].upper()}{problem[1:]}. Fix or replace it, or remove its transcript line."
    )


def _write_csv(path, rows):
    """Write a manifest with its header (atomically: an interrupted run never
    leaves a half-written file under ``path``)."""
    with atomic_write(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        writer.writerows(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_folder", help="folder holding the split folders")
    parser.add_argument("save_folder", help="where to write the CSV files")
    parser.add_argument(
        "--splits",
        nargs="+",
        required=True,
        help="split folders to prepare, e.g. train-clean-100 dev-clean",
    )
    parser.add_argument(
        "--bad_data",
        choices=["fail", "skip"],
        default="fail",
        help="stop at an unusable utterance (fail) or leave it out with a warning (skip)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare_librispeech(
        args.data_folder, args.save_folder, tr_splits=args.splits, bad_data=args.bad_data
    )
