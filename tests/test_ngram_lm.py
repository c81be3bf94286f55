"""Word n-gram LM decoding of the CTC recipes: the estimated model is a proper distribution that KenLM
loads, and SpeechBrain's CTCBeamSearcher fuses it (it changes the result where the acoustics are
ambiguous). The inference folder's copy is tested in test_inference.py."""

import math
import random

import kenlm
import pytest
import torch
from speechbrain.decoders.ctc import CTCBeamSearcher

from modules.training.ngram import estimate_arpa, prepare_ngram_lm

WORDS = "the cat dog sat ran on a mat".split()


def corpus(seed=0, sentences=200):
    rng = random.Random(seed)
    return [[rng.choice(WORDS) for _ in range(rng.randint(1, 7))] for _ in range(sentences)]


def state_after(model, words):
    state = kenlm.State()
    model.BeginSentenceWrite(state)
    for word in words:
        next_state = kenlm.State()
        model.BaseScore(state, word, next_state)
        state = next_state
    return state


@pytest.mark.parametrize("order", [2, 3, 4])
def test_every_context_gets_a_distribution_that_sums_to_one(order, tmp_path):
    path = str(tmp_path / "lm.arpa")
    estimate_arpa(corpus(), order, path)
    model = kenlm.Model(path)
    assert model.order == order
    outcomes = WORDS + ["</s>", "<unk>"]
    contexts = [[], ["the"], ["the", "cat"], ["mat", "mat", "on"], ["unseen"], ["the", "unseen", "dog"]]
    for context in contexts:
        state = state_after(model, context)
        total = sum(10 ** model.BaseScore(state, word, kenlm.State()) for word in outcomes)
        assert total == pytest.approx(1.0, abs=1e-4), context


def test_speechbrain_reads_the_whole_vocabulary_from_the_model(tmp_path):
    # CTCBeamSearcher takes its known words from the unigrams that have a backoff weight
    from speechbrain.integrations.decoders.kenlm_scorer import load_unigram_set_from_arpa

    path = str(tmp_path / "lm.arpa")
    sentences = corpus()
    estimate_arpa(sentences, 3, path)
    assert load_unigram_set_from_arpa(path) - {"<s>"} == {word for words in sentences for word in words}


def test_frequent_continuations_score_higher(tmp_path):
    path = str(tmp_path / "lm.arpa")
    estimate_arpa([["the", "cat", "sat"]] * 9 + [["the", "dog", "ran"]], 2, path)
    model = kenlm.Model(path)
    assert model.score("the cat sat") > model.score("the dog sat") > model.score("sat the the")


def test_prepare_estimates_once_from_the_training_transcripts(tmp_path):
    train_csv = tmp_path / "train.csv"
    train_csv.write_text("ID,duration,wav,spk_id,wrd\na,1.0,a.flac,1,THE CAT SAT\nb,1.0,b.flac,1,THE DOG SAT\n")
    path = str(tmp_path / "lm" / "words.arpa")
    prepare_ngram_lm(str(train_csv), 3, path)
    assert kenlm.Model(path).score("THE CAT SAT") > kenlm.Model(path).score("SAT CAT THE")
    written = (tmp_path / "lm" / "words.arpa").read_text()
    train_csv.write_text("ID,duration,wav,spk_id,wrd\na,1.0,a.flac,1,OTHER WORDS\n")
    prepare_ngram_lm(str(train_csv), 3, path)  # an existing model is used as it is (a resumed run)
    assert (tmp_path / "lm" / "words.arpa").read_text() == written


# Characters as the recipes' SentencePiece "char" tokenizer gives them: "▁" starts a word, 0 is the blank
VOCAB = ["<blank>", "▁", "t", "h", "e", "w", "c", "a", "s"]


def ambiguous_log_probs():
    """CTC log-probabilities of "▁the ▁cat" in which the acoustics slightly prefer "w" to "e"."""
    frames = []
    for symbol in "▁the▁cat":
        probs = torch.full((len(VOCAB),), 0.001)
        if symbol == "e":
            probs[VOCAB.index("w")], probs[VOCAB.index("e")] = 0.55, 0.44
        else:
            probs[VOCAB.index(symbol)] = 0.99
        frames.append(probs)
        blank = torch.full((len(VOCAB),), 0.001)
        blank[0] = 0.99
        frames.append(blank)
    probs = torch.stack(frames)
    return (probs / probs.sum(dim=1, keepdim=True)).log()[None]


def test_ctc_beam_search_fuses_the_word_lm(tmp_path):
    path = str(tmp_path / "lm.arpa")
    estimate_arpa([["the", "cat"], ["the", "cat", "sat"], ["a", "cat"]] * 5, 3, path)
    log_probs, lengths = ambiguous_log_probs(), torch.ones(1)
    options = dict(blank_index=0, vocab_list=VOCAB, beam_size=10, prune_history=False)

    without = CTCBeamSearcher(**options)(log_probs, lengths)[0][0]
    with_lm = CTCBeamSearcher(**options, kenlm_model_path=path, alpha=0.5, beta=1.5)(log_probs, lengths)[0][0]
    assert without.text == "thw cat"  # the acoustics alone
    assert with_lm.text == "the cat"  # the LM knows "the", not "thw"
    assert math.isfinite(with_lm.lm_score) and with_lm.lm_score != with_lm.score
