"""Word n-gram language model estimated from training transcripts, written in ARPA format for KenLM.

The CTC recipes decode with SpeechBrain's ``CTCBeamSearcher``, which scores words with a KenLM model
(``kenlm_model_path``). KenLM's pip package queries models but has no estimator (``lmplz`` is a separate
C++ build), so :func:`estimate_arpa` estimates one here: interpolated Kneser-Ney (Chen and Goodman, 1998)
with one absolute discount per order, D = n1 / (n1 + 2 n2), written in ARPA's backoff form (each listed
n-gram holds its interpolated probability, each context the weight given to the lower order), which
represents the interpolated model exactly. Nothing is downloaded.
"""

import logging
import math
import os
from collections import Counter, defaultdict

from modules.training.checkpointing import atomic_write
from modules.training.data_checks import read_manifest

logger = logging.getLogger(__name__)
BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def estimate_arpa(sentences, order, arpa_path):
    """Estimates an interpolated Kneser-Ney word model of ``order`` from ``sentences`` (lists of words)
    and writes it to ``arpa_path``.

    Example
    -------
    >>> import kenlm, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "lm.arpa")
    >>> estimate_arpa([["the", "cat", "sat"], ["the", "dog", "sat"]], 2, path)
    >>> lm = kenlm.Model(path)
    >>> lm.score("the cat sat") > lm.score("sat cat the")
    True
    """
    if order < 2:
        raise ValueError(f"n-gram order must be at least 2 (KenLM loads no unigram model), not {order}")
    raw = Counter()
    for words in sentences:
        padded = [BOS] + list(words) + [EOS]
        for n in range(1, order + 1):
            raw.update(tuple(padded[i : i + n]) for i in range(len(padded) - n + 1))
    # Kneser-Ney counts: raw at the highest order; below it, the number of distinct words seen before the
    # n-gram (its continuation count), except for n-grams starting with <s>, which keep their raw counts
    counts = [dict() for _ in range(order + 1)]
    for n in range(order, 0, -1):
        grams = [gram for gram in raw if len(gram) == n]
        if n == order:
            counts[n] = {gram: raw[gram] for gram in grams}
        else:
            left_extensions = Counter(gram[1:] for gram in counts[n + 1])
            counts[n] = {gram: raw[gram] if gram[0] == BOS else left_extensions[gram] for gram in grams}
    bos_context = counts[1].pop((BOS,), None)  # <s> is a context, never predicted

    probs, backoffs = [dict() for _ in range(order + 1)], [dict() for _ in range(order + 1)]
    vocabulary = [gram[0] for gram in counts[1]] + [UNK]
    for n in range(1, order + 1):
        discount = _discount(counts[n])
        totals, types = defaultdict(int), defaultdict(int)
        for gram, count in counts[n].items():
            totals[gram[:-1]] += count
            types[gram[:-1]] += 1
        for context in totals:
            if n > 1:
                backoffs[n - 1][context] = discount * types[context] / totals[context]
        for gram, count in counts[n].items():
            context = gram[:-1]
            lower = 1.0 / len(vocabulary) if n == 1 else _probability(gram[1:], probs, backoffs)
            weight = discount * types[context] / totals[context]
            probs[n][gram] = max(count - discount, 0.0) / totals[context] + weight * lower
        if n == 1:  # the unigram mass set aside goes to every word uniformly, <unk> included
            probs[1][(UNK,)] = discount * types[()] / totals[()] / len(vocabulary)
    if bos_context is not None:
        probs[1][(BOS,)] = 0.0  # log10 -99 in the file
    _write_arpa(arpa_path, probs, backoffs, order)


def _discount(counts):
    """Absolute discount n1 / (n1 + 2 n2) of one order's counts (0.5 when the estimate is undefined)."""
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    return n1 / (n1 + 2 * n2) if n1 and n2 else 0.5


def _probability(gram, probs, backoffs):
    """P(last word | the words before it) of the (lower-order) model estimated so far."""
    if gram in probs[len(gram)]:
        return probs[len(gram)][gram]
    return backoffs[len(gram) - 1].get(gram[:-1], 1.0) * _probability(gram[1:], probs, backoffs)


def _write_arpa(path, probs, backoffs, order):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as f:  # renamed when complete: a killed run leaves no truncated model
        f.write("\\data\\\n")
        for n in range(1, order + 1):
            f.write(f"ngram {n}={len(probs[n])}\n")
        for n in range(1, order + 1):
            f.write(f"\n\\{n}-grams:\n")
            for gram, prob in sorted(probs[n].items()):
                log_prob = math.log10(prob) if prob > 0 else -99.0
                line = f"{log_prob:.6f}\t{' '.join(gram)}"
                if n < order and gram[-1] not in (EOS, UNK):
                    # every possible context gets a backoff (1 where it was never one), as KenLM's lmplz
                    # writes them: SpeechBrain reads the vocabulary from the unigrams that have one
                    line += f"\t{math.log10(backoffs[n].get(gram, 1.0)):.6f}"
                f.write(line + "\n")
        f.write("\n\\end\\\n")


def train_word_ngram(train_csv, order, arpa_path):
    """Word n-gram of ``order`` over the ``wrd`` column of ``train_csv`` (the training transcripts),
    written to ``arpa_path``; returns the path. Rows the manifest checks reject are left out (the
    recipe has already applied its ``bad_data`` policy to them)."""
    rows, _ = read_manifest(train_csv)
    sentences = [row["wrd"].split() for row in rows.values()]
    estimate_arpa(sentences, order, arpa_path)
    return arpa_path


def prepare_ngram_lm(train_csv, order, arpa_path):
    """The recipe's word LM file: estimated from ``train_csv`` unless ``arpa_path`` already exists (a run
    resumed, or a model the user brought), which is then used as it is."""
    if os.path.isfile(arpa_path):
        logger.info(f"Word {order}-gram LM: using {arpa_path}")
        return arpa_path
    train_word_ngram(train_csv, order, arpa_path)
    logger.info(f"Word {order}-gram LM estimated from the transcripts of {train_csv}: {arpa_path}")
    return arpa_path
