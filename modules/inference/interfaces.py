"""The interfaces that inference folders name (their yaml's ``interface``): SpeechBrain's ``EncoderASR``
and ``EncoderDecoderASR`` searching each utterance's exact frames (:class:`ExactLengthsEncoderASR`,
:class:`ExactLengthsEncoderDecoderASR`), and :class:`MadeonASR`, decoder-only over speech units.
"""

import torch
from speechbrain.inference.ASR import EncoderASR, EncoderDecoderASR
from speechbrain.inference.interfaces import Pretrained

from modules.units.tokens import deduplicate, prompt_text, units_to_text


class MadeonASR(Pretrained):
    """Decoder-only ASR over discrete speech units (MADEON and its Transformer baseline), in the manner
    of SpeechBrain's ``SpeechLLMASR``: waveform -> unit features -> k-means units -> de-duplication ->
    unit characters -> prompt ``<startofspeech>units`` -> beam search -> text.

    The yaml gives the modules ``unit_features``, ``kmeans``, ``lm`` and the hparams ``tokenizer``
    (a ``SentencePieceProcessor``) and ``searcher`` (``DecoderOnlyBeamSearcher``).
    """

    HPARAMS_NEEDED = ["tokenizer", "searcher"]
    MODULES_NEEDED = ["unit_features", "kmeans", "lm"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer = self.hparams.tokenizer

    def prompt(self, wav):
        """One waveform (samples,) -> its prompt token ids, as the recipe's test prefix."""
        features = self.mods.unit_features(wav.float().to(self.device)).to(self.device)
        units = deduplicate(self.mods.kmeans(features))
        return self.tokenizer.encode_as_ids(prompt_text(units_to_text(units)))

    @torch.no_grad()
    def transcribe_batch(self, wavs, wav_lens):
        """wavs (batch, samples) padded, wav_lens (batch,) relative -> (texts, token id lists)."""
        samples = (wav_lens * wavs.shape[1]).round().long()
        prompts = [self.prompt(wav[:n]) for wav, n in zip(wavs, samples)]
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        prefix = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            prefix[row, : len(prompt)] = torch.tensor(prompt)
        tokens, _ = self.hparams.searcher(prefix, lengths)
        return [" ".join(self.tokenizer.decode_ids(t).split()) for t in tokens], tokens  # words, single-spaced

    def transcribe_file(self, path, **kwargs):
        """Transcribes one audio file (resampled to the model's rate, mixed to mono)."""
        wav = self.load_audio(path, **kwargs)
        return self.transcribe_batch(wav[None], torch.tensor([1.0]))[0][0]

    def forward(self, wavs, wav_lens):
        return self.transcribe_batch(wavs, wav_lens)


class ExactLengthsEncoderASR(EncoderASR):
    """SpeechBrain's ``EncoderASR`` whose CTC search reads each utterance's exact number of frames.

    SpeechBrain's ``transcribe_batch`` hands the search the waveforms' relative lengths, which round to
    one frame too few or too many for a short utterance padded next to a long one; the encoder
    (``modules.models.front_end.WaveformEncoder``) returns the exact ones, so a batch transcribes each file
    as it transcribes alone.
    """

    @torch.no_grad()
    def transcribe_batch(self, wavs, wav_lens):
        """wavs (batch, samples) padded, wav_lens (batch,) relative -> (texts, CTC hypotheses)."""
        log_probs, lengths = self.mods.encoder.encode(wavs.float().to(self.device), wav_lens.to(self.device))
        hypotheses = self.decoding_function(log_probs, lengths)
        return [nbest[0].text for nbest in hypotheses], hypotheses


class ExactLengthsEncoderDecoderASR(EncoderDecoderASR):
    """SpeechBrain's ``EncoderDecoderASR`` whose search reads each utterance's exact number of encoder
    frames (see :class:`ExactLengthsEncoderASR`)."""

    @torch.no_grad()
    def transcribe_batch(self, wavs, wav_lens):
        """wavs (batch, samples) padded, wav_lens (batch,) relative -> (texts, token id lists)."""
        encoder_out, lengths = self.mods.encoder.encode(wavs.float().to(self.device), wav_lens.to(self.device))
        tokens, _, _, _ = self.mods.decoder(encoder_out, lengths)
        return [self.tokenizer.decode_ids(t) for t in tokens], tokens
