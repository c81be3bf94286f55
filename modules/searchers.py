"""Beam search with a recurrent decoder cache.

SpeechBrain's ``S2STransformerBeamSearcher`` re-runs the decoder on the whole prefix at every step,
which for the Mamba decoder also re-scans the encoder memory: O(T + U) per step. Here the memory is
scanned once per utterance, each step feeds only the newest token, and the surviving beams' caches are
gathered by index, so a step costs O(1) in T and U. Everything else (scorers such as CTC and LM,
length normalisation, end of search) is SpeechBrain's ``S2SBeamSearcher``.
"""

import torch
from speechbrain.decoders.seq2seq import S2STransformerBeamSearcher


class S2SMambaBeamSearcher(S2STransformerBeamSearcher):
    """Beam search for a ``Seq2SeqModel`` whose decoder has a cache (``MambaDecoder``).

    Takes the arguments of ``S2STransformerBeamSearcher``: ``modules=[model, seq_lin]`` (``seq_lin`` a
    SpeechBrain ``Linear``), ``temperature``
    and those of ``S2SBeamSearcher`` (bos/eos, decode ratios, beam size, scorer, ...). The searcher's
    memory is (decoder cache of all batch * beam rows, position of the next target token).

    Example
    -------
    >>> from speechbrain.lobes.models.transformer.Transformer import NormalizedEmbedding, PositionalEncoding
    >>> from modules.models.conmamba import ConMambaEncoder
    >>> from modules.models.seq2seq import Seq2SeqModel
    >>> from modules.models.mamba_decoder import MambaDecoder
    >>> from modules.models.speech_encoder import SpeechEncoder
    >>> from speechbrain.nnet.linear import Linear
    >>> model = Seq2SeqModel(
    ...     encoder=SpeechEncoder(40, 32, ConMambaEncoder(num_layers=1, d_model=32, d_ffn=64, kernel_size=5)),
    ...     decoder=MambaDecoder(num_layers=1, d_model=32, d_ffn=64),
    ...     tgt_embedding=NormalizedEmbedding(32, 10),
    ...     positional_encoding=PositionalEncoding(32),
    ... ).eval()
    >>> searcher = S2SMambaBeamSearcher(
    ...     modules=[model, Linear(input_size=32, n_neurons=10)], bos_index=1, eos_index=2,
    ...     min_decode_ratio=0.0, max_decode_ratio=1.0, beam_size=3, using_eos_threshold=False,
    ... )
    >>> wav_lens = torch.tensor([1.0, 0.5])
    >>> hyps, _, _, _ = searcher(model.encode(torch.randn(2, 12, 40), wav_lens), wav_lens)
    >>> len(hyps)
    2
    """

    def _update_reset_memory(self, enc_states, enc_lens):
        """Scans each utterance's encoder output once, then gives each of its beams a copy of the cache.

        Overrides the hook of ``S2SBeamSearcher`` that sees the encoder output (``reset_mem`` gets only
        the number of rows).

        enc_states (batch, time, d_model) and enc_lens (batch,) valid frames, before beam expansion.
        """
        _, scorer_memory = super()._update_reset_memory(enc_states, enc_lens)
        cache = self.model.init_cache(enc_states, enc_lens)
        beams = torch.arange(enc_states.shape[0], device=enc_states.device)
        cache = self.model.reorder_cache(cache, beams.repeat_interleave(self.beam_size))
        return (cache, 0), scorer_memory

    def forward_step(self, inp_tokens, memory, enc_states, enc_lens):
        """Feeds the last tokens (batch * beam,) -> log-probabilities (batch * beam, vocab), new memory, no attention."""
        cache, position = memory
        output = self.model.decode_step(inp_tokens, position, cache)
        log_probs = self.softmax(self.fc(output) / self.temperature)
        return log_probs, (cache, position + 1), None

    def permute_mem(self, memory, index):
        """Keeps the caches of the surviving beams' predecessors, index (batch * beam,)."""
        cache, position = memory
        return self.model.reorder_cache(cache, index), position
