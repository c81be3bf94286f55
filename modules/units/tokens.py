"""Speech units written as text: one character per unit, chr(0x4E00 + k), consecutive duplicates
removed; the special symbols and the model's sequence ``<startofspeech>units<generatetext> text``; and
:func:`train_joint_sentencepiece`, one unigram vocabulary over ``<startofspeech>units<generatetext> text``
lines with the text repeated (x4 in the paper), the four special symbols user-defined.
"""

import torch
from speechbrain.tokenizers.SentencePiece import SentencePiece

from modules.training.data_checks import read_csv
from modules.training.sentencepiece_models import train_sentencepiece

START_OF_TEXT, GENERATE_TEXT, START_OF_SPEECH, GENERATE_SPEECH = (
    "<startoftext>",
    "<generatetext>",
    "<startofspeech>",
    "<generatespeech>",
)
SPECIAL_SYMBOLS = [START_OF_TEXT, GENERATE_TEXT, START_OF_SPEECH, GENERATE_SPEECH]  # ESPnet's nlsyms order
UNIT_CHARACTER_OFFSET = 0x4E00  # unit k is written chr(0x4E00 + k), a CJK ideograph


def deduplicate(units):
    """Removes consecutive repeats: (frames,) -> (runs,)."""
    keep = torch.ones_like(units, dtype=torch.bool)
    keep[1:] = units[1:] != units[:-1]
    return units[keep]


def units_to_text(units):
    """Unit indices -> one character each, no separator."""
    return "".join(chr(UNIT_CHARACTER_OFFSET + int(unit)) for unit in units)


def sequence_text(units, words, text_repeats=1):
    """The model's text line: ``<startofspeech>units<generatetext> words`` (words repeated for SentencePiece)."""
    return START_OF_SPEECH + units + GENERATE_TEXT + (" " + words) * text_repeats


def prompt_text(units):
    """The decoding prompt: the speech prefix up to, not including, ``<generatetext>``."""
    return START_OF_SPEECH + units


def train_joint_sentencepiece(
    units_csv, model_dir, vocab_size, text_repeats=4, max_piece_length=16, unk_index=0, eos_index=1
):
    """One SentencePiece unigram vocabulary over speech units and text, as in MADEON's released recipe.

    Each training line is ``<startofspeech>units<generatetext> text`` with the (lower-cased) text
    ``text_repeats`` times. Ids: ``<unk>`` = 0, the end token ``</s>`` = 1, then the four special
    symbols (``<generatetext>`` = 3, ``<startofspeech>`` = 4). No dummy prefix, so a line encodes
    directly as ``[<startofspeech>, units.., <generatetext>, ▁words..]``. Trained again only when the text or
    the options change (modules/training/sentencepiece_models.py).
    """
    train_sentencepiece(
        (sequence_text(row["units"], row["wrd"].lower(), text_repeats) for row in read_csv(units_csv)),
        model_dir,
        vocab_size,
        "unigram",
        text_name="sentencepiece_text.txt",
        character_coverage=1.0,
        user_defined_symbols=SPECIAL_SYMBOLS,
        max_sentencepiece_length=max_piece_length,
        unk_id=unk_index,
        bos_id=-1,
        eos_id=eos_index,
        pad_id=-1,
        add_dummy_prefix=False,
    )
    return SentencePiece(model_dir=model_dir, vocab_size=vocab_size, model_type="unigram")
