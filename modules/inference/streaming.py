"""Streaming CTC recognition with a causal ConMamba: audio in chunks, a growing greedy transcript.

Chunk by chunk, the recognizer computes exactly what the whole utterance would give:

- the front-end (SpeechBrain's Fbank and ConvolutionFrontEnd, both with centred windows) is not
  causal, so an encoder frame is computed only once all the audio under its receptive field has
  arrived (a bounded lookahead, :attr:`StreamingCTC.lookahead_ms`); the audio that un-emitted frames
  still need is kept and the front-end re-run over it with each chunk;
- the global feature normalization is frame-wise;
- the causal encoder carries each layer's Mamba (conv, ssm) states and the convolution module's left
  context (:meth:`modules.models.conmamba.ConMambaEncoder.allocate_cache`).

The Fbank of a streaming model must be :class:`StreamableFbank`: SpeechBrain's clips each utterance
80 dB below its own loudest value, which is only known at the end.
"""

import torch
from speechbrain.lobes.features import Fbank

from modules.inference.folders import load_asr


class StreamableFbank(Fbank):
    """SpeechBrain's ``Fbank`` without the utterance-wide dB floor, so a frame depends on its window only.

    ``Filterbank`` clips log-mels at ``top_db`` (80) dB below the utterance's maximum; here the only
    floor left is the fixed ``amin`` of the log (-100 dB). Takes the arguments of ``Fbank``.
    """

    def __init__(self, **fbank_options):
        super().__init__(**fbank_options)
        self.compute_fbanks.top_db = float("inf")


class StreamingCTC:
    """Greedy CTC transcription of audio given in chunks, from a causal ConMamba CTC model.

    Arguments
    ---------
    compute_features, normalize, CNN, speech_encoder, ctc_lin : torch.nn.Module
        The trained modules of ``train_CTC.py`` (yaml keys of the same names); ``compute_features``
        a :class:`StreamableFbank`, ``normalize`` a global ``InputNormalization``, the encoder of
        ``speech_encoder`` a causal ``ConMambaEncoder``.
    tokenizer : sentencepiece.SentencePieceProcessor, optional
        Turns token ids into text; without it transcripts are lists of token ids.
    blank_index : int
        The CTC blank.

    Example
    -------
    >>> streamer = StreamingCTC.from_hparams(hparams, tokenizer)  # doctest: +SKIP
    >>> for chunk in audio.split(5120):  # 320 ms at 16 kHz  # doctest: +SKIP
    ...     print(streamer.transcribe_chunk(chunk))
    >>> text = streamer.finish()  # doctest: +SKIP
    """

    def __init__(self, compute_features, normalize, CNN, speech_encoder, ctc_lin, tokenizer=None, blank_index=0):
        if not isinstance(compute_features, StreamableFbank):
            raise ValueError(
                "streaming needs compute_features: !new:modules.inference.streaming.StreamableFbank in the yaml "
                "(SpeechBrain's Fbank clips each utterance relative to its loudest frame); "
                "see hparams/CTC/demo_conmamba_causal.yaml"
            )
        if normalize.norm_type != "global":
            raise ValueError(
                f"streaming needs a frame-wise normalization (norm_type: global), not {normalize.norm_type!r}"
            )
        if speech_encoder.positional_encoding is not None:
            raise ValueError("streaming needs an encoder without positional encoding (positional_encoding: null)")
        modules = dict(compute_features=compute_features, normalize=normalize, CNN=CNN)
        self.modules = torch.nn.ModuleDict(dict(modules, speech_encoder=speech_encoder, ctc_lin=ctc_lin)).eval()
        self.tokenizer = tokenizer
        self.blank_index = blank_index
        # Encoder frame k depends on the samples [stride * k - window // 2, stride * k - window // 2 + window).
        receptive_field = compute_features.get_filter_properties().with_on_top(CNN.get_filter_properties())
        self.stride = receptive_field.stride
        self.left_context = receptive_field.window_size // 2
        self.lookahead = receptive_field.window_size - self.left_context
        self.sample_rate = compute_features.compute_STFT.sample_rate
        self.reset()

    @property
    def lookahead_ms(self):
        """Audio needed past an encoder frame's centre before the frame is computed, in milliseconds."""
        return 1000 * self.lookahead / self.sample_rate

    @property
    def frame_ms(self):
        """Duration of one encoder frame (the front-end's stride), in milliseconds."""
        return 1000 * self.stride / self.sample_rate

    @classmethod
    def from_hparams(cls, hparams, tokenizer=None):
        """From the hparams (a mapping) of a CTC yaml, loaded and with the trained weights."""
        return cls(
            hparams["compute_features"],
            hparams["normalize"],
            hparams["CNN"],
            hparams["speech_encoder"],
            hparams["ctc_lin"],
            tokenizer,
            hparams["blank_index"],
        )

    @classmethod
    def from_inference_folder(cls, folder, device="cpu"):
        """From the inference folder of a ``train_CTC.py`` run (``<output_folder>/inference``)."""
        hparams = vars(load_asr(folder, device).hparams)
        return cls.from_hparams(hparams, hparams["tokenizer"])

    def to(self, device):
        """Moves the modules and the state to ``device``."""
        self.modules.to(device)
        # InputNormalization keeps its statistics in plain attributes that only its own to() moves
        self.modules.normalize.to(device)
        self.reset()
        return self

    def reset(self):
        """Forgets the current utterance."""
        device = self.modules.ctc_lin.w.weight.device
        self.audio = torch.zeros(0, device=device)  # the samples still needed, from sample audio_start on
        self.audio_start = 0  # a multiple of stride
        self.frames_done = 0
        self.cache = self.modules.speech_encoder.encoder.allocate_cache(1, device=device)
        self.tokens = []
        self.last_token = self.blank_index

    @torch.no_grad()
    def encode_chunk(self, audio, last=False):
        """Takes the next samples (time,) of the utterance, at the model's sample rate; returns the CTC
        log-probabilities (1, frames, vocabulary) of the encoder frames they complete (all the remaining
        ones if ``last``)."""
        self.audio = torch.cat([self.audio, audio.to(self.audio)])
        received = self.audio_start + len(self.audio)
        ready = None if last else (received - self.lookahead) // self.stride + 1  # frames complete so far
        if received == 0 or ready is not None and ready <= self.frames_done:
            return self._no_frames()

        feats = self.modules.compute_features(self.audio.unsqueeze(0))
        feats = self.modules.normalize(feats, torch.ones(1, device=feats.device))
        buffer_frame = self.audio_start // self.stride  # the encoder frame at the buffer's start
        end = None if last else ready - buffer_frame
        frames = self.modules.CNN(feats)[:, self.frames_done - buffer_frame : end].flatten(start_dim=2)
        if frames.shape[1] == 0:
            return self._no_frames()
        encoder = self.modules.speech_encoder
        encoded, _ = encoder.encoder(encoder.input_projection(frames), cache=self.cache)
        log_probs = self.modules.ctc_lin(encoded).log_softmax(dim=-1)

        self.frames_done += frames.shape[1]
        keep_from = max(0, self.stride * self.frames_done - self.left_context) // self.stride * self.stride
        self.audio = self.audio[keep_from - self.audio_start :]
        self.audio_start = keep_from
        return log_probs

    def _no_frames(self):
        return torch.zeros(1, 0, self.modules.ctc_lin.w.out_features, device=self.audio.device)

    def transcribe_chunk(self, audio):
        """Takes the next samples (time,) of the utterance; returns the transcript so far."""
        return self._decode(self.encode_chunk(audio))

    def finish(self):
        """Flushes the frames held back for lookahead; returns the final transcript and resets."""
        transcript = self._decode(self.encode_chunk(self.audio[:0], last=True))
        self.reset()
        return transcript

    def _decode(self, log_probs):
        """Greedy CTC over new frames, merging repeats across chunk boundaries; the transcript so far."""
        for token in log_probs[0].argmax(dim=-1).tolist():
            if token != self.last_token and token != self.blank_index:
                self.tokens.append(token)
            self.last_token = token
        if self.tokenizer is None:
            return list(self.tokens)
        return self.tokenizer.decode_ids(self.tokens)
