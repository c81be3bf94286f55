"""Inference folders: a trained run packaged for SpeechBrain's ``speechbrain.inference`` interfaces.

At the end of training each recipe writes ``<output_folder>/inference/`` (:func:`export_inference_folder`):

* ``hyperparams.yaml``: the model-building keys of the run's own saved ``hyperparams.yaml`` (those the
  paradigm's inference keys refer to, with everything they need), then the inference keys of
  ``hparams/inference/<paradigm>.yaml`` (modules, decoding, tokenizer, pretrainer, ``interface``);
* ``model.ckpt``: the average of the best checkpoints that the test decoded with;
* ``ngram_lm.arpa``: the word LM of a CTC model's beam search, when it has one;
* ``tokenizer.ckpt``; ``normalizer.ckpt`` (feature statistics) or, for decoder-only models, ``kmeans.ckpt``,
  and ``unit_encoder/``, a copy of the CTC model's inference folder when the speech units are a layer
  of a trained CTC encoder (:class:`modules.units.features.EncoderFeatures`);
* ``modules/``, a copy of the ``modules`` package, whose classes ``hyperparams.yaml`` builds, and ``custom.py``,
  which names the interface class ``ASR`` for SpeechBrain's ``foreign_class``: the folder loads from any
  working directory, without this repository (the code shipped in the folder, SpeechBrain's way).

The folder loads offline with the class its yaml names (:func:`load_asr`): SpeechBrain's ``EncoderASR``
(CTC) and ``EncoderDecoderASR`` (joint CTC/attention), searching each utterance's exact frames, or
``MadeonASR`` (decoder-only over speech units), all in :mod:`modules.inference.interfaces`; or, from
anywhere, ``foreign_class(source=folder, savedir=folder, pymodule_file="custom.py", classname="ASR")``.
A folder is code (its ``hyperparams.yaml`` builds objects, ``modules/`` is imported): load only folders
you trust.
"""

import importlib
import io
import logging
import os
import re
import shutil

import ruamel.yaml
import torch
from hyperpyyaml import load_hyperpyyaml

from modules.training.checkpointing import CheckpointLoadError, errors_naming, weights_only_loading

logger = logging.getLogger(__name__)
UNIT_ENCODER = "unit_encoder"  # where a decoder-only folder keeps the CTC model its units come from
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # modules/, copied into each inference folder
TEMPLATES = os.path.join(os.path.dirname(PACKAGE), "hparams", "inference")
CODE_FILE = "custom.py"  # SpeechBrain's default pymodule_file
NGRAM_LM = "ngram_lm.arpa"  # where a CTC folder keeps the word LM of its beam search

# Folders written before modules/ was grouped into packages name the old dotted paths in their
# hyperparams.yaml: here every path a yaml named then, and where it lives now. load_asr replaces them
# before parsing (such a folder's own modules/ copy keeps the old layout, for foreign_class elsewhere).
MOVED_PATHS = {
    "modules.checkpointing.SafeCheckpointer": "modules.training.checkpointing.SafeCheckpointer",
    "modules.conformer.ConformerEncoder": "modules.models.conformer.ConformerEncoder",
    "modules.conmamba.ConMambaEncoder": "modules.models.conmamba.ConMambaEncoder",
    "modules.decoder_only_search.DecoderOnlyBeamSearcher": "modules.search.DecoderOnlyBeamSearcher",
    "modules.decoder_only_search.FullSequenceScorer": "modules.search.FullSequenceScorer",
    "modules.decoder_only_search.RecurrentScorer": "modules.search.RecurrentScorer",
    "modules.encoder_decoder.EncoderDecoderASR": "modules.models.seq2seq.Seq2SeqModel",
    "modules.front_end.ConvolutionFrontEnd": "modules.models.front_end.ConvolutionFrontEnd",
    "modules.front_end.WaveformEncoder": "modules.models.front_end.WaveformEncoder",
    "modules.inference.ExactLengthsEncoderASR": "modules.inference.interfaces.ExactLengthsEncoderASR",
    "modules.inference.ExactLengthsEncoderDecoderASR": "modules.inference.interfaces.ExactLengthsEncoderDecoderASR",
    "modules.inference.MadeonASR": "modules.inference.interfaces.MadeonASR",
    "modules.inference.complete": "modules.inference.folders.complete",
    "modules.inference.load_kmeans": "modules.inference.folders.load_kmeans",
    "modules.inference.load_model_strictly": "modules.inference.folders.load_model_strictly",
    "modules.madeon.MadeonLM": "modules.models.madeon.MadeonLM",
    "modules.madeon.TransformerDecoderOnly": "modules.models.madeon.TransformerDecoderOnly",
    "modules.mamba_decoder.MambaDecoder": "modules.models.mamba_decoder.MambaDecoder",
    "modules.searchers.S2SMambaBeamSearcher": "modules.search.S2SMambaBeamSearcher",
    "modules.speech_encoder.SpeechEncoder": "modules.models.speech_encoder.SpeechEncoder",
    "modules.speech_tokenizer.EncoderFeatures": "modules.units.features.EncoderFeatures",
    "modules.speech_tokenizer.FbankFeatures": "modules.units.features.FbankFeatures",
    "modules.speech_tokenizer.KMeans": "modules.units.kmeans.KMeans",
    "modules.speech_tokenizer.SSLFeatures": "modules.units.features.SSLFeatures",
    "modules.speech_tokenizer.SpeechUnitTokenizer": "modules.units.manifests.UnitManifestWriter",
    "modules.streaming.StreamableFbank": "modules.inference.streaming.StreamableFbank",
}


def export_inference_folder(hparams, paradigm, tokenizer_file, kmeans_file=None):
    """Writes ``<output_folder>/inference/`` after the test (main process only); returns its path.

    hparams: the run's loaded hyperparams, whose ``model`` holds the averaged weights the test used;
    paradigm: ``CTC``, ``S2S`` or ``decoder_only`` (the name of the template in hparams/inference/);
    tokenizer_file: the SentencePiece model; kmeans_file: the speech units' k-means (decoder-only).
    """
    folder = os.path.join(hparams["output_folder"], "inference")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(TEMPLATES, f"{paradigm}.yaml"), encoding="utf-8") as f:
        template = f.read()
    with open(os.path.join(hparams["output_folder"], "hyperparams.yaml"), encoding="utf-8") as f:
        training_yaml = f.read()
    hyperparams_yaml = inference_yaml(training_yaml, template)
    unit_features = hparams.get("unit_features")
    if getattr(unit_features, "settings", {}).get("kind") == "encoder":  # bundle the unit encoder
        bundled = os.path.abspath(os.path.join(folder, UNIT_ENCODER))
        shutil.copytree(unit_features.source, bundled, dirs_exist_ok=True)
        hyperparams_yaml = hyperparams_yaml.replace(f"source: {unit_features.source}\n", f"source: {bundled}\n")
    ngram_lm, bundled = hparams.get("ngram_lm_file"), os.path.abspath(os.path.join(folder, NGRAM_LM))
    if ngram_lm:  # bundle the word LM of the CTC beam search
        shutil.copyfile(ngram_lm, bundled)
        hyperparams_yaml = hyperparams_yaml.replace(f"ngram_lm_file: {ngram_lm}\n", f"ngram_lm_file: {bundled}\n")
    elif os.path.exists(bundled):  # an earlier export's: this model decodes without it
        os.remove(bundled)
    with open(os.path.join(folder, "hyperparams.yaml"), "w", encoding="utf-8") as f:
        f.write(hyperparams_yaml)

    state = {name: value.detach().cpu() for name, value in hparams["model"].state_dict().items()}
    torch.save(state, os.path.join(folder, "model.ckpt"))
    shutil.copyfile(tokenizer_file, os.path.join(folder, "tokenizer.ckpt"))
    if "normalize" in hparams:
        hparams["normalize"]._save(os.path.join(folder, "normalizer.ckpt"))
    if kmeans_file is not None:
        shutil.copyfile(kmeans_file, os.path.join(folder, "kmeans.ckpt"))
    ship_code(folder, re.search(r"^interface: (\S+)", template, flags=re.MULTILINE).group(1))
    if hparams.get("lm_file"):
        logger.warning(f"{folder} decodes without the language model of lm_file: it is not exported")
    logger.info(f"Inference folder written: {folder}")
    return folder


def ship_code(folder, interface):
    """Copies the ``modules`` package's Python files to ``<folder>/modules/`` and writes ``<folder>/custom.py``,
    which imports the interface class as ``ASR``: SpeechBrain's ``foreign_class`` puts the folder on
    ``sys.path`` and loads it, so that the yaml's ``modules.*`` classes are found anywhere."""
    shutil.copytree(
        PACKAGE, os.path.join(folder, "modules"), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        dirs_exist_ok=True,
    )
    module_name, class_name = interface.rsplit(".", 1)
    with open(os.path.join(folder, CODE_FILE), "w", encoding="utf-8") as f:
        f.write(
            '"""The interface of this inference folder, for SpeechBrain\'s foreign_class (modules/ holds the code\n'
            'that hyperparams.yaml builds the model from):\n\n'
            "    from speechbrain.inference.interfaces import foreign_class\n"
            '    asr = foreign_class(source=folder, savedir=folder, pymodule_file="custom.py", classname="ASR")\n'
            '"""\n\n'
            f"from {module_name} import {class_name} as ASR  # noqa: F401\n"
        )


def inference_yaml(training_yaml, template):
    """The training keys that the template refers to (``!ref <key>``), dumped with every object they
    share, followed by the template. The saved training yaml has its references resolved, so objects
    are shared through YAML anchors, which the dump re-anchors at their first use."""
    yaml = ruamel.yaml.YAML()
    yaml.width = 4096
    training = yaml.load(training_yaml)
    template_keys = set(re.findall(r"^(\w+):", template, flags=re.MULTILINE))
    wanted = set(re.findall(r"!ref <(\w+)>", template)) - template_keys
    missing = sorted(wanted - set(training))
    if missing:
        raise KeyError(f"The training hyperparams lack the keys {missing} that the inference keys need")
    kept = ruamel.yaml.comments.CommentedMap((key, training[key]) for key in training if key in wanted)
    model_keys = io.StringIO()
    yaml.dump(kept, model_keys)
    header = "# Model-building keys of the training run's hyperparams.yaml\n"
    return header + model_keys.getvalue() + "\n" + template


class InferenceFolderError(RuntimeError):
    """An inference folder that cannot be loaded; the message names the folder or the file."""


def current_paths(yaml_text):
    """The yaml text with each dotted path of :data:`MOVED_PATHS` replaced by where it lives now."""
    return re.sub(r"(?<![\w.])modules(?:\.\w+)+", lambda match: MOVED_PATHS.get(match[0], match[0]), yaml_text)


def load_asr(folder, device="cpu"):
    """The interface of an inference folder (the class its yaml's ``interface`` names), on ``device``.

    Files are used in place (``savedir`` is the folder itself): nothing is copied, linked or downloaded.
    A bundled unit encoder is used from the folder's own copy, wherever the folder has been moved.
    Torch files load with ``weights_only=True`` whatever torch's default, and ``model.ckpt`` strictly.
    The folder's ``hyperparams.yaml`` builds objects, i.e. runs code: load only folders you trust.
    A folder written before modules/ was grouped into packages loads too (:data:`MOVED_PATHS`).
    Raises :class:`InferenceFolderError` naming the file that fails.
    """
    hparams_file = os.path.join(folder, "hyperparams.yaml")
    if not os.path.isfile(hparams_file):
        raise InferenceFolderError(
            f"{folder} is not an inference folder (no hyperparams.yaml): give <output_folder>/inference "
            "of a finished training run"
        )
    try:
        with open(hparams_file, encoding="utf-8") as f:
            hparams_text = current_paths(f.read())
        interface = ruamel.yaml.YAML().load(hparams_text)["interface"]
        module_name, class_name = interface.rsplit(".", 1)
        cls = getattr(importlib.import_module(module_name), class_name)
    except Exception as error:
        raise InferenceFolderError(f"Cannot read the interface class of {hparams_file}: {error}") from error
    folder = os.path.abspath(folder)
    overrides = {}
    if os.path.isfile(os.path.join(folder, NGRAM_LM)):  # the folder's own copy, wherever it was moved
        overrides["ngram_lm_file"] = os.path.join(folder, NGRAM_LM)
    try:
        with weights_only_loading():
            asr = from_hparams_text(cls, folder, hparams_text, device, overrides)
    except CheckpointLoadError as error:
        raise InferenceFolderError(str(error)) from error
    except Exception as error:
        raise InferenceFolderError(
            f"Cannot load the inference folder {folder}: {type(error).__name__}: {error}"
        ) from error
    if os.path.isdir(os.path.join(folder, UNIT_ENCODER)):
        asr.mods.unit_features.source = os.path.join(folder, UNIT_ENCODER)
    return asr


def from_hparams_text(cls, folder, hparams_text, device, overrides):
    """SpeechBrain's ``cls.from_hparams(source=folder, savedir=folder, ...)``, which reads the yaml from
    the folder's file, here from ``hparams_text`` (its paths made current): builds the yaml's objects,
    loads the pretrainer's files in place and returns the interface on ``device``."""
    hparams = load_hyperpyyaml(hparams_text, overrides)
    hparams["savedir"] = folder
    pretrainer = hparams["pretrainer"]
    pretrainer.set_collect_in(folder)
    pretrainer.collect_files(default_source=folder)
    pretrainer.load_collected()
    return cls(modules=hparams["modules"], hparams=hparams, run_opts={"device": device})


def complete(partial, **kwargs):
    """Calls a yaml ``!name:`` object with its remaining arguments (e.g. a test searcher with its scorer)."""
    return partial(**kwargs)


def load_model_strictly(model, path):
    """Pretrainer hook: the model's parameters, every key present (SpeechBrain's own hook loads
    non-strictly, so a model.ckpt missing keys would load and fail later, or not at all)."""
    with errors_naming(path):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)


def load_kmeans(kmeans, path):
    """Pretrainer hook: k-means centroids (:meth:`modules.units.kmeans.KMeans.load`)."""
    kmeans.load(path)
