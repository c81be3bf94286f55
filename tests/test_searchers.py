"""Beam search with the Mamba decoder's recurrent cache is the uncached beam search, made cheaper.

The reference is SpeechBrain's ``S2STransformerBeamSearcher``, which re-runs the whole decoder on the
prefix at every step; ``S2SMambaBeamSearcher`` scans the encoder output once and then feeds one token
per step. On a randomly initialised tiny model (float64, so that near-ties cannot flip), both must
return the same hypotheses with the same scores, with joint CTC scoring and utterances of different
lengths in one batch.
"""

import pytest
import torch
from speechbrain.decoders.scorer import CTCScorer, ScorerBuilder
from speechbrain.decoders.seq2seq import S2STransformerBeamSearcher
from speechbrain.lobes.models.transformer.Transformer import NormalizedEmbedding, PositionalEncoding
from speechbrain.nnet.linear import Linear

from modules.models.conmamba import ConMambaEncoder
from modules.models.mamba_decoder import MambaDecoder
from modules.models.seq2seq import Seq2SeqModel
from modules.models.speech_encoder import SpeechEncoder
from modules.search import S2SMambaBeamSearcher

D_MODEL, VOCAB, FEATURES = 32, 20, 40
BOS, EOS, BLANK = 1, 2, 0


@pytest.fixture(scope="module")
def tiny_model():
    """(model, seq_lin, ctc_lin) with random weights, in float64 and eval mode."""
    torch.manual_seed(0)
    model = Seq2SeqModel(
        encoder=SpeechEncoder(
            FEATURES, D_MODEL, ConMambaEncoder(num_layers=1, d_model=D_MODEL, d_ffn=64, kernel_size=5)
        ),
        decoder=MambaDecoder(num_layers=2, d_model=D_MODEL, d_ffn=64, mamba_config={"d_state": 8}),
        tgt_embedding=NormalizedEmbedding(D_MODEL, VOCAB),
        positional_encoding=PositionalEncoding(D_MODEL),
    )
    seq_lin = Linear(input_size=D_MODEL, n_neurons=VOCAB)
    ctc_lin = Linear(input_size=D_MODEL, n_neurons=VOCAB)
    return model.double().eval(), seq_lin.double().eval(), ctc_lin.double().eval()


def search(searcher_class, model, seq_lin, ctc_lin, encoder_out, wav_lens):
    """Top-4 hypotheses of a beam-4 joint CTC/attention search: (hyps, lengths, scores, log_probs)."""
    scorer = ScorerBuilder(
        full_scorers=[CTCScorer(ctc_fc=ctc_lin, blank_index=BLANK, eos_index=EOS)],
        weights={"ctc": 0.4},
    )
    searcher = searcher_class(
        modules=[model, seq_lin],
        bos_index=BOS,
        eos_index=EOS,
        min_decode_ratio=0.0,
        max_decode_ratio=1.0,
        beam_size=4,
        scorer=scorer,
        using_eos_threshold=False,
        length_normalization=True,
        temperature=1.15,
        return_topk=True,
        topk=4,
    )
    with torch.no_grad():
        return searcher(encoder_out, wav_lens)


def encode(model, wav_lens):
    """Encoder output (3, 16, D_MODEL) of random features for utterances of relative lengths wav_lens."""
    torch.manual_seed(1)
    with torch.no_grad():
        return model.encode(torch.randn(len(wav_lens), 16, FEATURES, dtype=torch.float64), wav_lens)


def test_cached_search_equals_uncached_search(tiny_model):
    model, seq_lin, ctc_lin = tiny_model
    wav_lens = torch.tensor([1.0, 0.5, 0.75], dtype=torch.float64)
    encoder_out = encode(model, wav_lens)

    hyps, lengths, scores, log_probs = search(S2SMambaBeamSearcher, *tiny_model, encoder_out, wav_lens)
    ref_hyps, ref_lengths, ref_scores, ref_log_probs = search(
        S2STransformerBeamSearcher, *tiny_model, encoder_out, wav_lens
    )

    assert hyps.shape[-1] > 3  # the search ran for several steps
    assert torch.equal(lengths, ref_lengths)
    assert torch.equal(hyps, ref_hyps)
    torch.testing.assert_close(scores, ref_scores)
    torch.testing.assert_close(log_probs, ref_log_probs)


def test_cached_search_never_reruns_the_decoder_on_a_prefix(tiny_model, monkeypatch):
    model, seq_lin, ctc_lin = tiny_model
    wav_lens = torch.tensor([1.0, 0.5, 0.75], dtype=torch.float64)
    encoder_out = encode(model, wav_lens)

    def fail(*args, **kwargs):
        raise AssertionError("the cached search called the full decoder")

    monkeypatch.setattr(model.decoder, "forward", fail)
    hyps, *_ = search(S2SMambaBeamSearcher, *tiny_model, encoder_out, wav_lens)
    assert hyps.shape[:2] == (3, 4)
