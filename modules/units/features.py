"""Feature extractors of the speech units, each ``wav (samples,) -> (frames, dim)``: :class:`SSLFeatures`
(the paper's WavLM-large layer 21, through SpeechBrain's HuggingFace integration), :class:`EncoderFeatures`
(a layer of a CTC ConMamba encoder trained by train_CTC.py: the demo's offline stand-in for an SSL
model), both loaded only when features are actually needed, and :class:`FbankFeatures`
(self-contained, but its units follow the speaker). Their ``settings`` key the unit cache
(:mod:`modules.units.manifests`).
"""

import os

import torch
import torch.nn as nn
from speechbrain.lobes.features import Fbank

from modules.inference.folders import load_asr
from modules.units.manifests import file_hash


class FbankFeatures(nn.Module):
    """Log-mel filterbanks with per-utterance mean/variance normalisation: the extractor that needs no
    model. Its units follow the voice as much as the phones (speaker-dependent).

    ``hop_length`` 20 ms gives 50 frames/s, the frame rate of the SSL models.
    """

    def __init__(self, sample_rate=16000, n_mels=80, n_fft=400, win_length=25, hop_length=20):
        super().__init__()
        options = dict(
            sample_rate=sample_rate, n_mels=n_mels, n_fft=n_fft, win_length=win_length, hop_length=hop_length
        )
        self.settings = dict(kind="fbank", **options)
        self.fbank = Fbank(**options)

    @torch.no_grad()
    def forward(self, wav):
        """wav (samples,) -> (frames, n_mels)."""
        feats = self.fbank(wav[None])[0]
        return (feats - feats.mean(0)) / (feats.std(0) + 1e-5)


class SSLFeatures(nn.Module):
    """Hidden states of one layer of a self-supervised model (e.g. WavLM-large layer 21, as in MADEON).

    ``source`` is a HuggingFace hub name or a local folder; the model is built on first use, so that
    runs with cached tokens never load (or download) it.
    """

    def __init__(self, source, layer, save_path="pretrained_models", device="cpu"):
        super().__init__()
        self.settings = dict(kind="ssl", source=source, layer=layer)
        self.source, self.layer, self.save_path, self.device = source, layer, save_path, device
        self.model = None

    @torch.no_grad()
    def forward(self, wav):
        """wav (samples,) -> (frames, hidden)."""
        if self.model is None:
            from speechbrain.integrations.huggingface.wavlm import WavLM

            self.model = WavLM(self.source, self.save_path, output_all_hiddens=True, freeze=True).to(self.device).eval()
        hiddens = self.model(wav[None].to(self.device))  # (layers + 1, 1, frames, hidden)
        return hiddens[self.layer, 0].float().cpu()


class EncoderFeatures(nn.Module):
    """Hidden states of one layer of a trained CTC ConMamba encoder: offline units that are phonetic
    and far less speaker-dependent than filterbank units, where no SSL model is at hand.

    ``source`` is the inference folder of a ``train_CTC.py`` run (``<output_folder>/inference``);
    ``layer`` counts the encoder's layers from 1 (the last one's output, through the encoder's final
    LayerNorm, feeds the CTC head). Frames are the encoder's: 40 ms behind the 4x subsampling
    front-end. The model is loaded on first use, so that runs with cached tokens never load it.
    """

    def __init__(self, source, layer, device="cpu"):
        super().__init__()
        self.source, self.layer, self.device = source, layer, device
        self.asr = None
        self.hidden = None  # the chosen layer's output, caught by a forward hook

    @property
    def settings(self):
        """Also the weights' hash: units made with another model of the same folder are not reused."""
        model_hash = file_hash(self._checked_file("model.ckpt"))[:12]
        return dict(kind="encoder", source=self.source, layer=self.layer, model=model_hash)

    def _checked_file(self, name):
        path = os.path.join(self.source, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Unit features: {self.source} is not the inference folder of a CTC model (no {name}). "
                "Train one first, e.g. `python train_CTC.py hparams/CTC/demo_conmamba.yaml`, which writes "
                "results/demo_conmamba/<seed>/inference, or set unit_encoder to another run's inference folder"
            )
        return path

    def _load(self):
        for name in ("hyperparams.yaml", "model.ckpt"):
            self._checked_file(name)
        asr = load_asr(self.source, self.device)
        try:
            layers = asr.mods.encoder.speech_encoder.encoder.layers
        except AttributeError:
            raise ValueError(f"{self.source} holds no CTC speech encoder (train_CTC.py inference folder)") from None
        if not 1 <= self.layer <= len(layers):
            raise ValueError(
                f"Unit features: layer {self.layer} asked, the encoder of {self.source} has layers 1-{len(layers)}"
            )
        layers[self.layer - 1].register_forward_hook(lambda module, inputs, output: setattr(self, "hidden", output))
        self.asr = asr

    @torch.no_grad()
    def forward(self, wav):
        """wav (samples,) -> (frames, d_model)."""
        if self.asr is None:
            self._load()
        self.asr.encode_batch(wav[None], torch.ones(1))
        return self.hidden[0].float().cpu()
