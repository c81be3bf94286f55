"""SentencePiece models that a killed run, a full disk or a changed corpus cannot leave stale.

SpeechBrain's ``SentencePiece`` writes its training text and model in place and reuses whatever it
finds: after a run killed while extracting the text, the next run trains on part of the corpus, and a
model cut short by a full disk fails to parse on every later run. :func:`train_sentencepiece` writes
the text and the model under temporary names and renames them when complete, and records beside the
model (``<model>.json``) a hash of the text and the trainer options: a model is reused only when the
record matches and it loads, otherwise it is trained again. The trainer gets keyword arguments (so a
path with a space is one path) and logs only its errors.
"""

import hashlib
import json
import logging
import os

import sentencepiece as spm

from modules.training.checkpointing import atomic_write

logger = logging.getLogger(__name__)

TRAINER_LOG_LEVEL = 2  # SentencePiece's minloglevel: errors only, no trainer dump
# LibriSpeech's transcripts are words of these characters: the alphabet of the character tokenizers
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ'"


def train_sentencepiece(lines, model_dir, vocab_size, model_type, text_name="train.txt", **trainer_options):
    """Path of the SentencePiece model ``<model_dir>/<vocab_size>_<model_type>.model`` of ``lines``.

    The folder's model is reused if it was trained on the same text with the same options; otherwise
    it is trained again. ``trainer_options`` are SentencePiece trainer options (``bos_id=1``, ...);
    ``vocab_size`` is passed on except for character models, whose size is that of their alphabet.
    Main process only (``run_on_main``): the model folder is shared.
    """
    os.makedirs(model_dir, exist_ok=True)
    prefix = os.path.join(model_dir, f"{vocab_size}_{model_type}")
    model_file, record_file = prefix + ".model", prefix + ".json"
    text_file = os.path.join(model_dir, text_name)
    options = dict(trainer_options, model_type=model_type)
    if model_type != "char":
        options["vocab_size"] = vocab_size
    digest = _write_text(text_file, lines)
    record = {"text_sha256": digest, "options": options}
    if _read_record(record_file) == record and _loads(model_file):
        logger.info(f"Tokenizer {model_file} is up to date")
        return model_file
    if os.path.exists(model_file):
        logger.info(f"Training the tokenizer again: {model_file} was not trained on {text_file} with these options")
    if os.path.exists(record_file):
        os.remove(record_file)  # no record may vouch for a model being replaced
    partial = prefix + ".partial"
    spm.SentencePieceTrainer.train(
        input=text_file, model_prefix=partial, minloglevel=TRAINER_LOG_LEVEL, **options
    )
    for extension in (".vocab", ".model"):
        os.replace(partial + extension, prefix + extension)
    with atomic_write(record_file) as f:
        f.write(json.dumps(record, indent=1, sort_keys=True) + "\n")
    logger.info(f"Trained the tokenizer {model_file} on {text_file}")
    return model_file


def _write_text(path, lines):
    """Writes the lines (one a line) to ``path``, atomically; returns the SHA-256 of the text."""
    digest = hashlib.sha256()
    with atomic_write(path) as f:
        for line in lines:
            text = line + "\n"
            f.write(text)
            digest.update(text.encode("utf-8"))
    return digest.hexdigest()


def _read_record(path):
    """The record of what the model was trained on, or None if missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _loads(model_file):
    """True if SentencePiece can load the model file."""
    try:
        spm.SentencePieceProcessor(model_file=model_file)
        return True
    except (OSError, RuntimeError):
        return False
