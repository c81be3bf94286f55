"""Attention encoder-decoder for joint CTC/attention ASR, assembled from modules built in the yaml.

    CNN features -> SpeechEncoder (Conformer, ConMamba, ...)   -> encoder_out (CTC head outside)
    tokens -> NormalizedEmbedding + sinusoidal positions -> decoder(target, encoder_out) -> (seq head outside)

The decoder is SpeechBrain's ``TransformerDecoder`` or our ``MambaDecoder``; both take the same
arguments, so swapping encoder or decoder is a yaml change. Like SpeechBrain's ``TransformerASR``,
``forward`` is the teacher-forced training pass and ``decode`` also serves the uncached beam search
(``S2STransformerBeamSearcher`` calls ``model.decode(prefix, encoder_out, enc_lens)``); ``init_cache``,
``decode_step`` and ``reorder_cache`` serve the recurrent search of decoders that have a cache
(``modules.search``). With the Conformer encoder and Transformer decoder this is exactly
SpeechBrain's ``TransformerASR`` (tests/test_s2s_hparams.py).
"""

import torch
import torch.nn as nn
from speechbrain.dataio.dataio import length_to_mask
from speechbrain.lobes.models.transformer.Transformer import get_lookahead_mask

from modules.models.initialization import xavier_normal_matrices


class Seq2SeqModel(nn.Module):
    """Speech encoder + autoregressive decoder over embedded target tokens.

    Arguments
    ---------
    encoder : torch.nn.Module
        ``encoder(src, wav_lens)`` -> (batch, time, d_model), e.g. ``modules.models.speech_encoder.SpeechEncoder``.
    decoder : torch.nn.Module
        Called like SpeechBrain's ``TransformerDecoder``; its first output is (batch, target_time, d_model).
        ``TransformerDecoder`` also returns attention maps, ``MambaDecoder`` returns None in their place.
    tgt_embedding : torch.nn.Module
        Token embedding (batch, target_time) -> (batch, target_time, d_model), e.g. ``NormalizedEmbedding``.
    positional_encoding : speechbrain.lobes.models.transformer.Transformer.PositionalEncoding
        Absolute sinusoidal positions added to the embedded target (its ``pe`` buffer is read at an
        offset when decoding one token at a time).
    xavier_init : bool
        Xavier-normal initialisation of every matrix, as SpeechBrain's ``TransformerASR`` (and hence the
        published Conformer and ConMamba recipes) does, except inside Mamba mixers, which keep Mamba's
        own initialisation (:func:`modules.models.initialization.xavier_normal_matrices`;
        ``ConMambaEncoder(xavier_init=True)`` restores the published quirk for the encoder).

    Example
    -------
    >>> from speechbrain.lobes.models.transformer.Transformer import NormalizedEmbedding, PositionalEncoding
    >>> from modules.models.conmamba import ConMambaEncoder
    >>> from modules.models.mamba_decoder import MambaDecoder
    >>> from modules.models.speech_encoder import SpeechEncoder
    >>> model = Seq2SeqModel(
    ...     encoder=SpeechEncoder(40, 32, ConMambaEncoder(num_layers=1, d_model=32, d_ffn=64, kernel_size=5)),
    ...     decoder=MambaDecoder(num_layers=1, d_model=32, d_ffn=64),
    ...     tgt_embedding=NormalizedEmbedding(32, 10),
    ...     positional_encoding=PositionalEncoding(32),
    ... )
    >>> encoder_out = model.encode(torch.randn(2, 12, 40), torch.tensor([1.0, 0.5]))
    >>> model.decode(torch.randint(10, (2, 3)), encoder_out, torch.tensor([12, 6]))[0].shape
    torch.Size([2, 3, 32])
    """

    def __init__(self, encoder, decoder, tgt_embedding, positional_encoding, xavier_init=True):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.tgt_embedding = tgt_embedding
        self.positional_encoding = positional_encoding
        if xavier_init:
            xavier_normal_matrices(self)

    def forward(self, src, wav_lens, tokens):
        """Teacher-forced training pass (through ``forward``, so that DDP sees it).

        src: front-end output (batch, time, ...); wav_lens (batch,) relative lengths; tokens
        (batch, target_time) starting with bos. Returns encoder_out (batch, time, d_model) and
        decoder_out (batch, target_time, d_model).
        """
        encoder_out = self.encode(src, wav_lens)
        frames = torch.round(wav_lens * encoder_out.shape[1])
        memory_padding = torch.arange(encoder_out.shape[1], device=encoder_out.device) >= frames[:, None]
        return encoder_out, self.teacher_forced(tokens, encoder_out, memory_padding)

    def encode(self, src, wav_lens):
        """src: front-end output (batch, time, ...); wav_lens (batch,) relative. -> (batch, time, d_model)."""
        return self.encoder(src, wav_lens)

    def decode(self, tokens, encoder_out, enc_lens=None):
        """Teacher-forced decoding of whole prefixes.

        tokens (batch, target_time), starting with bos; encoder_out (batch, time, d_model);
        enc_lens (batch,) valid encoder frames, None if all are valid. Target padding needs no mask:
        it follows the valid tokens, which the causal decoder never lets see it.
        Returns (batch, target_time, d_model) and the last layer's cross-attention (None for decoders
        without attention).
        """
        memory_padding = None
        if enc_lens is not None:
            memory_padding = ~length_to_mask(enc_lens, max_len=encoder_out.shape[1]).bool()
        outputs = self._decoder_outputs(tokens, encoder_out, memory_padding)
        # TransformerDecoder: (output, self-attentions, cross-attentions); MambaDecoder: (output, None)
        cross_attention = outputs[2][-1] if len(outputs) == 3 else None
        return outputs[0], cross_attention

    def teacher_forced(self, tokens, encoder_out, memory_padding):
        """The decoder's output (batch, target_time, d_model) for tokens (batch, target_time) starting with
        bos, encoder_out (batch, time, d_model) and memory_padding (batch, time), True at padded frames:
        the training pass that :func:`modules.training.cuda_graphs.use_cuda_graphs` can record as one graph."""
        return self._decoder_outputs(tokens, encoder_out, memory_padding)[0]

    def _decoder_outputs(self, tokens, encoder_out, memory_padding):
        """The decoder's outputs over the embedded tokens, causally masked."""
        return self.decoder(
            self._embed(tokens),
            encoder_out,
            tgt_mask=get_lookahead_mask(tokens),
            memory_key_padding_mask=memory_padding,
        )

    def init_cache(self, encoder_out, enc_lens):
        """Decoder cache after reading the encoder output (batch, time, d_model) of valid lengths enc_lens."""
        return self.decoder.init_cache(encoder_out, enc_lens)

    def decode_step(self, tokens, position, cache):
        """Decodes tokens (batch,) at target position ``position`` -> (batch, d_model); updates ``cache``."""
        return self.decoder.step(self._embed(tokens[:, None], position), cache).squeeze(1)

    def reorder_cache(self, cache, index):
        """Cache rows selected by index (new_batch,), e.g. the surviving beams' predecessors."""
        return self.decoder.reorder_cache(cache, index)

    def _embed(self, tokens, start=0):
        """tokens (batch, target_time) -> embeddings + sinusoidal positions start, start + 1, ..."""
        positions = self.positional_encoding.pe[:, start : start + tokens.shape[1]]
        return self.tgt_embedding(tokens) + positions
