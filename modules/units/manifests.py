"""Speech units of LibriSpeech manifests for MADEON (arXiv 2411.06968), computed once and cached on disk.

    waveform -> features (SSL layer, CTC encoder layer or filterbanks; modules.units.features) -> k-means
    unit per frame (modules.units.kmeans) -> consecutive duplicates removed -> one character per unit,
    chr(0x4E00 + k) -> joint SentencePiece over speech and text (modules.units.tokens)

:class:`UnitManifestWriter` fits the k-means on a fraction of the training set and writes, for each
split csv, a copy with a ``units`` column, and for the training csv one copy per speed-perturbation
speed (MADEON's recipe trains the LM on three copies, 0.9/1.0/1.1). Everything lives in a folder named by
a hash of the settings and of the training csv, so a second run (or another model with the same
tokens) reuses it.
"""

import csv
import hashlib
import json
import logging
import os
import random

import torch
from speechbrain.augment.time_domain import SpeedPerturb

from modules.training.checkpointing import atomic_write
from modules.training.data_checks import read_checked_audio, read_csv
from modules.units.kmeans import KMeans
from modules.units.tokens import deduplicate, units_to_text

logger = logging.getLogger(__name__)

# Names of the two training unit manifests: as recorded (the joint SentencePiece's text)
# and its copies at every speed of speed perturbation (the LM's training data)
TRAIN, SPEED_PERTURBED_TRAIN = "train", "train_sp"


def file_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


class UnitManifestWriter:
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
