"""Discrete speech tokens for MADEON (arXiv 2411.06968), computed once and cached on disk.

    waveform -> features (SSL layer, CTC encoder layer or filterbanks) -> k-means unit per frame ->
    consecutive duplicates removed -> one character per unit, chr(0x4E00 + k) -> joint SentencePiece over
    speech and text

* Feature extractors: :class:`SSLFeatures` (the paper's WavLM-large layer 21, through SpeechBrain's
  HuggingFace integration), :class:`EncoderFeatures` (a layer of a CTC ConMamba encoder trained by
  train_CTC.py: the demo's offline stand-in for an SSL model), both loaded only when features are
  actually needed, and :class:`FbankFeatures` (self-contained, but its units follow the speaker).
* :class:`KMeans`: mini-batch k-means in PyTorch, streamed over utterances so that SSL features of a large
  training set never have to fit in memory.
* :class:`SpeechUnitTokenizer`: fits the k-means on a fraction of the training set and writes, for each
  split csv, a copy with a ``units`` column, and for the training csv one copy per speed-perturbation
  speed (MADEON's recipe trains the LM on three copies, 0.9/1.0/1.1). Everything lives in a folder named by
  a hash of the settings and of the training csv, so a second run (or another model with the same
  tokens) reuses it.
* :func:`train_joint_sentencepiece`: one unigram vocabulary over ``<startofspeech>units<generatetext> text``
  lines with the text repeated (x4 in the paper), the four special symbols user-defined.
"""

import csv
import hashlib
import json
import logging
import os
import random

import torch
import torch.nn as nn
from speechbrain.augment.time_domain import SpeedPerturb
from speechbrain.lobes.features import Fbank
from speechbrain.tokenizers.SentencePiece import SentencePiece

from modules.training.checkpointing import atomic_write
from modules.training.data_checks import read_checked_audio, read_csv
from modules.training.sentencepiece_models import train_sentencepiece

logger = logging.getLogger(__name__)

START_OF_TEXT, GENERATE_TEXT, START_OF_SPEECH, GENERATE_SPEECH = (
    "<startoftext>",
    "<generatetext>",
    "<startofspeech>",
    "<generatespeech>",
)
SPECIAL_SYMBOLS = [START_OF_TEXT, GENERATE_TEXT, START_OF_SPEECH, GENERATE_SPEECH]  # ESPnet's nlsyms order
UNIT_CHARACTER_OFFSET = 0x4E00  # unit k is written chr(0x4E00 + k), a CJK ideograph
# Names of the two training unit manifests: as recorded (the joint SentencePiece's text)
# and its copies at every speed of speed perturbation (the LM's training data)
TRAIN, SPEED_PERTURBED_TRAIN = "train", "train_sp"


def deduplicate(units):
    """Removes consecutive repeats: (frames,) -> (runs,)."""
    keep = torch.ones_like(units, dtype=torch.bool)
    keep[1:] = units[1:] != units[:-1]
    return units[keep]


def units_to_text(units):
    """Unit indices -> one character each, no separator."""
    return "".join(chr(UNIT_CHARACTER_OFFSET + int(unit)) for unit in units)


def sequence_text(units, words, text_repeats=1):
    """The model's text line: ``<startofspeech>units<generatetext> words`` (words repeated for SentencePiece)."""
    return START_OF_SPEECH + units + GENERATE_TEXT + (" " + words) * text_repeats


def prompt_text(units):
    """The decoding prompt: the speech prefix up to, not including, ``<generatetext>``."""
    return START_OF_SPEECH + units


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
        from modules.inference import load_asr  # not at the top: modules.inference imports this module

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


class KMeans(nn.Module):
    """Mini-batch k-means (Sculley's update): each batch moves a centroid to the running mean of all the
    frames ever assigned to it. Initialised by k-means++ on the first batch."""

    def __init__(self, num_clusters, seed=0):
        super().__init__()
        self.num_clusters = num_clusters
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("centroids", torch.empty(0))
        self.register_buffer("counts", torch.empty(0))

    @torch.no_grad()
    def forward(self, frames):
        """Nearest centroid of each frame: (frames, dim) -> (frames,)."""
        distances = (self.centroids**2).sum(1) - 2 * frames @ self.centroids.T
        return distances.argmin(dim=1)

    @torch.no_grad()
    def partial_fit(self, frames):
        """One mini-batch update with frames (n, dim); n must be >= num_clusters for the first one."""
        if self.centroids.numel() == 0:
            self._init_plus_plus(frames)
        labels = self(frames)
        batch_counts = torch.bincount(labels, minlength=self.num_clusters).to(frames.dtype)
        sums = torch.zeros_like(self.centroids).index_add_(0, labels, frames)
        self.counts += batch_counts
        seen = self.counts > 0
        self.centroids[seen] += (sums[seen] - batch_counts[seen, None] * self.centroids[seen]) / self.counts[seen, None]

    def _init_plus_plus(self, frames):
        """k-means++: each new centroid drawn with probability proportional to the squared distance."""
        if len(frames) < self.num_clusters:
            raise ValueError(f"k-means needs at least {self.num_clusters} frames to start, got {len(frames)}")
        chosen = [torch.randint(len(frames), (1,), generator=self.generator).item()]
        distances = ((frames - frames[chosen[0]]) ** 2).sum(1)
        for _ in range(self.num_clusters - 1):
            chosen.append(torch.multinomial(distances.clamp(min=0) + 1e-12, 1, generator=self.generator).item())
            distances = torch.minimum(distances, ((frames - frames[chosen[-1]]) ** 2).sum(1))
        self.centroids = frames[chosen].clone()
        self.counts = torch.zeros(self.num_clusters, dtype=frames.dtype)

    def save(self, path):
        """Writes the fitted centroids and counts to ``path`` (atomically)."""
        with atomic_write(path, "wb") as f:
            torch.save(self.state_dict(), f)

    def load(self, path):
        """Loads centroids and counts written by :meth:`save` (the recipe's ``kmeans.pt``, an inference
        folder's ``kmeans.ckpt``), tensors only (``weights_only``). They are empty buffers until fitted,
        so this is not a plain state-dict load. Returns the k-means."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.centroids, self.counts = state["centroids"], state["counts"]
        return self


def file_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


class SpeechUnitTokenizer:
    """Turns LibriSpeech csv manifests into manifests with a ``units`` column, cached on disk.

    Arguments
    ---------
    features : SSLFeatures, EncoderFeatures or FbankFeatures
    num_clusters : int
        K of the k-means (2000 in the paper).
    kmeans_fraction : float
        Share of the training utterances the k-means is fitted on (0.1 in the paper).
    kmeans_epochs : int
        Passes over that share (each pass recomputes the features).
    kmeans_batch_frames : int
        Frames per mini-batch update.
    seed : int
    bad_data : str
        Audio that does not decode or is not at ``sample_rate`` Hz: "fail" raises naming the file, "skip"
        leaves the utterance out of the unit manifests (see :mod:`modules.training.data_checks`).
    sample_rate : int
    speeds : list of int
        Speed perturbation: the training set is tokenized once per speed, in % of the recorded speed
        (SpeechBrain's ``SpeedPerturb`` with that one speed), and the model trains on all the copies
        ([90, 100, 110] in the paper). The k-means is fitted on the recorded audio only.
    """

    def __init__(
        self, features, num_clusters, kmeans_fraction=0.1, kmeans_epochs=1, kmeans_batch_frames=10000, seed=0,
        bad_data="fail", sample_rate=16000, speeds=(100,),
    ):
        self.features = features
        self.num_clusters = num_clusters
        self.kmeans_fraction = kmeans_fraction
        self.kmeans_epochs = kmeans_epochs
        self.kmeans_batch_frames = kmeans_batch_frames
        self.seed = seed
        self.bad_data = bad_data
        self.sample_rate = sample_rate
        self.speeds = [int(speed) for speed in speeds]
        if not self.speeds or min(self.speeds) <= 0 or len(set(self.speeds)) != len(self.speeds):
            raise ValueError(
                f"Speed perturbation speeds (yaml key speed_perturb_speeds) must be distinct positive percentages, "
                f"e.g. [90, 100, 110] or [100] for none; got {speeds}"
            )
        self.perturbers = {speed: SpeedPerturb(sample_rate, speeds=[speed]) for speed in self.speeds if speed != 100}

    def settings(self, train_csv):
        """Everything the k-means and the units at the recorded speed depend on, the key of the cache
        folder. The speeds name the files of the perturbed copies instead: other speeds reuse the folder."""
        settings = dict(
            features=self.features.settings,
            num_clusters=self.num_clusters,
            kmeans_fraction=self.kmeans_fraction,
            kmeans_epochs=self.kmeans_epochs,
            kmeans_batch_frames=self.kmeans_batch_frames,
            seed=self.seed,
            train_csv=file_hash(train_csv),
        )
        if self.bad_data == "skip":  # only a skip run can leave utterances out
            settings["bad_data"] = "skip"
        return settings

    def _read_features(self, wav, speed=100):
        """Features of the audio file ``wav`` played at ``speed`` %, or None for audio skipped as unreadable."""
        audio = read_checked_audio(wav, self.sample_rate, self.bad_data)
        if audio is None:
            return None
        if speed != 100:
            audio = self.perturbers[speed](audio[None])[0]
        return self.features(audio)

    def __call__(self, train_csv, csv_files, save_folder):
        """Writes ``<save_folder>/units_<hash>/<name>_<csv hash>.csv`` for each csv and the training csv at
        each speed, reusing what exists.

        ``csv_files``: name -> csv path of the sets tokenized as recorded (valid, test). Returns name ->
        units csv path, with two more names: TRAIN, the training set as recorded (the text of the joint
        SentencePiece), and SPEED_PERTURBED_TRAIN, its copies at all ``speeds`` (the LM's training set).
        """
        settings = self.settings(train_csv)
        key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        folder = os.path.join(save_folder, f"units_{key}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "settings.json"), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)
        self._kmeans_model = None  # fitted or loaded when units are first computed
        outputs = {name: self._units(train_csv, path, folder, name) for name, path in csv_files.items()}
        outputs[TRAIN] = self._units(train_csv, train_csv, folder, TRAIN)
        outputs[SPEED_PERTURBED_TRAIN] = self._speed_perturbed(train_csv, folder)
        return outputs

    def _units(self, train_csv, csv_in, folder, name, speed=100):
        """The units manifest of ``csv_in`` at ``speed`` %, computed unless found in ``folder``."""
        tag = name if speed == 100 else f"{name}_speed{speed}"
        csv_out = os.path.join(folder, f"{tag}_{file_hash(csv_in)[:8]}.csv")  # the input's content names it
        if os.path.isfile(csv_out):
            logger.info(f"Speech units of {tag} found in {csv_out}")
            return csv_out
        if self._kmeans_model is None:
            self._kmeans_model = self._kmeans(train_csv, os.path.join(folder, "kmeans.pt"))
        rows, skipped = [], 0
        for row in read_csv(csv_in):
            features = self._read_features(row["wav"], speed)
            if features is None:
                skipped += 1
                continue
            units = units_to_text(deduplicate(self._kmeans_model(features)))
            if speed != 100:  # a copy of its own: an id of its own, the duration of the perturbed audio
                row = dict(row, ID=f"{row['ID']}-sp{speed}", duration=round(float(row["duration"]) * 100 / speed, 3))
            rows.append(dict(row, units=units))
        if skipped:
            logger.warning(f"Left {skipped} unreadable utterances of {csv_in} out of {csv_out} (bad_data: skip)")
        write_csv(rows, csv_out)
        return csv_out

    def _speed_perturbed(self, train_csv, folder):
        """The training units at all ``speeds`` in one manifest (the recorded ones alone for [100])."""
        copies = [self._units(train_csv, train_csv, folder, TRAIN, speed) for speed in self.speeds]
        if self.speeds == [100]:
            return copies[0]
        speeds = "-".join(map(str, self.speeds))
        csv_out = os.path.join(folder, f"{SPEED_PERTURBED_TRAIN}{speeds}_{file_hash(train_csv)[:8]}.csv")
        if not os.path.isfile(csv_out):
            write_csv([row for copy in copies for row in read_csv(copy)], csv_out)
        return csv_out

    def _kmeans(self, train_csv, path):
        """Loads the fitted k-means, or fits it on a random share of the training utterances as recorded."""
        kmeans = KMeans(self.num_clusters, self.seed)
        if os.path.isfile(path):
            return kmeans.load(path)
        rows = read_csv(train_csv)
        random.Random(self.seed).shuffle(rows)
        rows = rows[: max(1, round(self.kmeans_fraction * len(rows)))]
        logger.info(f"Fitting {self.num_clusters}-means on {len(rows)} utterances")
        for _ in range(self.kmeans_epochs):
            buffer, buffered = [], 0
            for row in rows:
                features = self._read_features(row["wav"])
                if features is None:
                    continue
                buffer.append(features)
                buffered += len(features)
                if buffered >= max(self.kmeans_batch_frames, self.num_clusters):
                    kmeans.partial_fit(torch.cat(buffer))
                    buffer, buffered = [], 0
            if buffer and (kmeans.centroids.numel() or buffered >= self.num_clusters):
                kmeans.partial_fit(torch.cat(buffer))
        kmeans.save(path)
        return kmeans


def write_csv(rows, path):
    """Writes a manifest through a temporary file: a run killed half-way leaves no file that looks finished."""
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["ID", "units"])
        writer.writeheader()
        writer.writerows(rows)


def train_joint_sentencepiece(
    units_csv, model_dir, vocab_size, text_repeats=4, max_piece_length=16, unk_index=0, eos_index=1
):
    """One SentencePiece unigram vocabulary over speech units and text, as in MADEON's released recipe.

    Each training line is ``<startofspeech>units<generatetext> text`` with the (lower-cased) text
    ``text_repeats`` times. Ids: ``<unk>`` = 0, the end token ``</s>`` = 1, then the four special
    symbols (``<generatetext>`` = 3, ``<startofspeech>`` = 4). No dummy prefix, so a line encodes
    directly as ``[<startofspeech>, units.., <generatetext>, ▁words..]``. Trained again only when the text or
    the options change (modules/training/sentencepiece_models.py).
    """
    train_sentencepiece(
        (sequence_text(row["units"], row["wrd"].lower(), text_repeats) for row in read_csv(units_csv)),
        model_dir,
        vocab_size,
        "unigram",
        text_name="sentencepiece_text.txt",
        character_coverage=1.0,
        user_defined_symbols=SPECIAL_SYMBOLS,
        max_sentencepiece_length=max_piece_length,
        unk_id=unk_index,
        bos_id=-1,
        eos_id=eos_index,
        pad_id=-1,
        add_dummy_prefix=False,
    )
    return SentencePiece(model_dir=model_dir, vocab_size=vocab_size, model_type="unigram")
