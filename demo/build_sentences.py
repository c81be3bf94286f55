#!/usr/bin/env python3
"""Build ``demo/sentences.txt``, the text of the synthetic demo corpus.

The sentences are short fragments of the King James Bible (public domain),
read with the ``bible`` command of the Debian ``bible-kjv`` package.  Verses
are cut into clauses at punctuation and normalised like LibriSpeech
transcripts (upper case, apostrophes kept, every other non-letter removed,
digits spelled out).  To keep the demo learnable by a tiny character CTC
model in a few CPU minutes, only fragments of 3 to 6 words whose words all
belong to the most frequent words of the text are kept, deduplicated, and a
seeded random subset of them is written, one per line, sorted.

Usage:
    python demo/build_sentences.py                   # writes demo/sentences.txt
    python demo/build_sentences.py --vocab-size 200 --count 1200 --seed 1234
"""

import argparse
import collections
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIBLE_RANGE = "gen1:1-rev22:21"

ONES = ("ZERO ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN ELEVEN TWELVE "
        "THIRTEEN FOURTEEN FIFTEEN SIXTEEN SEVENTEEN EIGHTEEN NINETEEN").split()
TENS = "_ _ TWENTY THIRTY FORTY FIFTY SIXTY SEVENTY EIGHTY NINETY".split()


def number_to_words(n):
    """Spell out a non-negative integer below one million."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else " " + ONES[n % 10])
    if n < 1000:
        rest = "" if n % 100 == 0 else " " + number_to_words(n % 100)
        return ONES[n // 100] + " HUNDRED" + rest
    rest = "" if n % 1000 == 0 else " " + number_to_words(n % 1000)
    return number_to_words(n // 1000) + " THOUSAND" + rest


def normalize(text):
    """LibriSpeech-style normalisation; returns a list of words."""
    text = re.sub(r"\d+", lambda m: " " + number_to_words(int(m.group())) + " ", text)
    text = re.sub(r"[^A-Z']+", " ", text.upper())
    words = (w.strip("'") for w in text.split())
    return [w for w in words if w]


def read_verses():
    """Return the text of every KJV verse (without its reference)."""
    if shutil.which("bible") is None:
        sys.exit("error: the 'bible' command is missing; install it with "
                 "'apt-get install bible-kjv'")
    out = subprocess.run(["bible", "-l1000", BIBLE_RANGE], check=True,
                         capture_output=True, text=True).stdout
    # Verse lines look like "  12 And God said, ..."; chapter headings have no number.
    return [m.group(1) for line in out.splitlines()
            if (m := re.match(r"^\s*\d+\s+(\S.*)$", line))]


def clauses(verses):
    """Cut verses at punctuation into normalised word lists."""
    for verse in verses:
        for piece in re.split(r"[,;:.?!()]+", verse):
            words = normalize(piece)
            if words:
                yield words


def select(fragments, vocab_size, min_words, max_words):
    """Keep unique fragments of the right length made of frequent words only."""
    freq = collections.Counter(w for f in fragments for w in f)
    vocab = {w for w, _ in freq.most_common(vocab_size)}
    kept = {" ".join(f) for f in fragments
            if min_words <= len(f) <= max_words and all(w in vocab for w in f)}
    return sorted(kept)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "sentences.txt")
    parser.add_argument("--vocab-size", type=int, default=200,
                        help="keep only the N most frequent words (default 200)")
    parser.add_argument("--min-words", type=int, default=3)
    parser.add_argument("--max-words", type=int, default=6)
    parser.add_argument("--count", type=int, default=1200,
                        help="number of sentences to write (default 1200)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    fragments = list(clauses(read_verses()))
    pool = select(fragments, args.vocab_size, args.min_words, args.max_words)
    chosen = sorted(random.Random(args.seed).sample(pool, min(args.count, len(pool))))
    args.out.write_text("\n".join(chosen) + "\n")
    vocab = {w for s in chosen for w in s.split()}
    print(f"{len(pool)} candidate fragments; wrote {len(chosen)} sentences "
          f"({len(vocab)} distinct words) to {args.out}")


if __name__ == "__main__":
    main()
