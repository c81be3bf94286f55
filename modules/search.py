"""Beam searches that step recurrent caches: the encoder-decoder's and the decoder-only model's.

:class:`S2SMambaBeamSearcher`: encoder-decoder beam search with a recurrent decoder cache. SpeechBrain's
``S2STransformerBeamSearcher`` re-runs the decoder on the whole prefix at every step, which for the Mamba
decoder also re-scans the encoder memory: O(T + U) per step. Here the memory is scanned once per
utterance, each step feeds only the newest token, and the surviving beams' caches are gathered by index,
so a step costs O(1) in T and U. Everything else (scorers such as CTC and LM, length normalisation, end
of search) is SpeechBrain's ``S2SBeamSearcher``.

:class:`DecoderOnlyBeamSearcher`: batched beam search for decoder-only ASR, the speech prefix is the
prompt, the text is generated. The search feeds ``<generatetext>`` after the prefix, then one token per
step, until ``<eos>`` or ``max_length`` tokens. It follows ESPnet's beam search as MADEON's released
recipe uses it: a hypothesis scores the sum of its token log-probabilities plus ``length_penalty`` per
token (``<eos>`` included), with no length normalisation and no end detection; at each step the best
``beam_size`` continuations of the live hypotheses are kept, those ending in ``<eos>`` leave the beam,
and the best finished hypothesis wins. All utterances and beams run as one batch of ``batch * beam_size``
rows.

Scorers hide how the next-token distribution is computed:

* :class:`RecurrentScorer` scans the prefix once into per-layer caches (``model.init_cache``), then costs
  one recurrent step per token (``model.step``); beams are reordered by ``index_select`` on the caches.
* :class:`FullSequenceScorer` re-runs the model on the whole sequence at every step: the reference the
  recurrent scorer must agree with, and the scorer of models without a cache (the Transformer baseline).
"""

import torch
import torch.nn.functional as F
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
    >>> from modules.models.mamba_decoder import MambaDecoder
    >>> from modules.models.seq2seq import Seq2SeqModel
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


class RecurrentScorer:
    """Next-token log-probabilities from a model's recurrent cache (``init_cache``, ``step``, ``reorder_cache``)."""

    def __init__(self, model):
        self.model = model

    def init(self, prefix, lengths):
        """State after the prefixes (batch, time) of valid lengths (batch,)."""
        return self.model.init_cache(prefix, lengths)

    def score(self, tokens, state):
        """Feeds tokens (rows,); returns log-probabilities (rows, vocab) and the new state."""
        return F.log_softmax(self.model.step(tokens, state).float(), dim=-1), state

    def reorder(self, state, index):
        return self.model.reorder_cache(state, index)


class FullSequenceScorer:
    """Next-token log-probabilities by running the model on each row's whole sequence so far.

    The state is the right-padded token matrix (rows, time) and the valid lengths (rows,).
    """

    def __init__(self, model):
        self.model = model

    def init(self, prefix, lengths):
        return prefix, lengths

    @torch.no_grad()
    def score(self, tokens, state):
        sequences, lengths = state
        rows = torch.arange(sequences.shape[0], device=sequences.device)
        sequences = torch.cat([sequences, sequences.new_zeros(sequences.shape[0], 1)], dim=1)
        sequences[rows, lengths] = tokens
        lengths = lengths + 1
        logits = self.model(sequences, lengths)[rows, lengths - 1]
        return F.log_softmax(logits.float(), dim=-1), (sequences, lengths)

    def reorder(self, state, index):
        sequences, lengths = state
        return sequences.index_select(0, index), lengths.index_select(0, index)


class DecoderOnlyBeamSearcher:
    """Batched beam search over prompts ``[<startofspeech>, speech units]``; see the module docstring.

    Arguments
    ---------
    scorer : RecurrentScorer or FullSequenceScorer
    bos_index : int
        ``<generatetext>``, fed first: its output is the first text token's distribution.
    eos_index : int
    beam_size, max_length : int
        Beam width; most tokens generated (``<eos>`` excluded).
    min_length : int
        Fewest tokens generated before ``<eos>`` may end a hypothesis; 1 (ESPnet's ``minlen``, as
        MADEON decodes) never returns an empty transcript.
    length_penalty : float
        Added to the score for every token; 0 ranks by log-probability alone. When it is <= 0 the
        search stops an utterance as soon as no live hypothesis can beat its best finished one
        (scores only fall), which gives the same result as running to ``max_length``.
    """

    def __init__(self, scorer, bos_index, eos_index, beam_size=10, max_length=100, length_penalty=0.0, min_length=1):
        if not 0 <= min_length <= max_length:
            raise ValueError(f"min_length ({min_length}) must lie between 0 and max_length ({max_length})")
        self.scorer = scorer
        self.min_length = min_length
        self.bos_index = bos_index
        self.eos_index = eos_index
        self.beam_size = beam_size
        self.max_length = max_length
        self.length_penalty = length_penalty

    @torch.no_grad()
    def __call__(self, prefix, lengths):
        """prefix (batch, time) right-padded, lengths (batch,) -> (best token lists, their scores (batch,))."""
        batch, beam, device = prefix.shape[0], self.beam_size, prefix.device
        state = self.scorer.init(prefix, lengths)
        state = self.scorer.reorder(state, torch.arange(batch, device=device).repeat_interleave(beam))
        tokens = torch.full((batch * beam,), self.bos_index, dtype=torch.long, device=device)
        scores = torch.full((batch, beam), float("-inf"), device=device)
        scores[:, 0] = 0.0  # every row starts as one hypothesis
        history = torch.zeros(batch * beam, 0, dtype=torch.long, device=device)
        finished = [[] for _ in range(batch)]  # (score, tokens) per utterance
        row_offset = torch.arange(batch, device=device)[:, None] * beam

        for step in range(self.max_length + 1):
            log_probs, state = self.scorer.score(tokens, state)
            vocab = log_probs.shape[-1]
            candidates = scores.view(-1, 1) + log_probs + self.length_penalty
            if step < self.min_length:  # too short to end
                candidates[:, self.eos_index] = float("-inf")
            if step == self.max_length:  # out of length: every live hypothesis must end here
                only_eos = torch.full_like(candidates, float("-inf"))
                only_eos[:, self.eos_index] = candidates[:, self.eos_index]
                candidates = only_eos
            scores, best = candidates.view(batch, beam * vocab).topk(beam, dim=1)
            origin = (row_offset + best // vocab).view(-1)
            tokens = (best % vocab).view(-1)
            history = torch.cat([history.index_select(0, origin), tokens[:, None]], dim=1)

            ended = (tokens == self.eos_index).view(batch, beam) & scores.isfinite()
            for row, slot in ended.nonzero().tolist():
                finished[row].append((scores[row, slot].item(), history[row * beam + slot, :-1].tolist()))
            scores = scores.masked_fill(ended, float("-inf"))
            if self._all_done(scores, finished):
                break
            state = self.scorer.reorder(state, origin)

        best = [max(hyps, key=lambda hyp: hyp[0]) if hyps else (float("-inf"), []) for hyps in finished]
        return [tokens for _, tokens in best], torch.tensor([score for score, _ in best])

    def _all_done(self, scores, finished):
        """True when no utterance can still change its best hypothesis."""
        live_best = scores.max(dim=1).values.tolist()
        for live, hyps in zip(live_best, finished):
            if live == float("-inf"):
                continue
            if self.length_penalty > 0 or not hyps or max(score for score, _ in hyps) < live:
                return False
        return True
