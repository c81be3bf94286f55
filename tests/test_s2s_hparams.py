"""The S2S configs: published sizes, batch-matched within a size, faithful to SpeechBrain's Conformer
encoder-decoder, Mamba initialisation kept, demo configs load."""

import os

import pytest
import torch
import yaml
from hyperpyyaml import load_hyperpyyaml

from speechbrain.lobes.models.transformer.TransformerASR import TransformerASR
from speechbrain.nnet.activations import Swish

from modules.mamba.mamba import Mamba
from recipe_runs import ROOT, count_parameters, yaml_top_level

HPARAMS = os.path.join(ROOT, "hparams", "S2S")
MODELS = ("conformer", "conmamba", "conmambamamba")

# Parameter counts (millions) of the published yamls (github.com/xi-j/Mamba-ASR; arXiv 2407.09732 prints 15.0 for
# the small ConMambaMamba, the published yaml builds 14.57).
PARAMS_M = {
    "conformer_small.yaml": 13.33,
    "conmamba_small.yaml": 14.08,
    "conmambamamba_small.yaml": 14.57,
    "conformer_large.yaml": 109.14,
    "conmamba_large.yaml": 115.19,
    "conmambamamba_large.yaml": 122.92,
}

# Top-level keys of the "Encoder" and "Decoder" sections (and the output folder): the only ones
# allowed to differ between the three configs of a size.
MODEL_KEYS = {
    "output_folder",
    "d_state",
    "d_conv",
    "expand",
    "bidirectional",
    "nhead",
    "attention_type",
    "encoder",
    "positional_encoding",
    "decoder",
    "valid_search",
    "test_search",
}

# Batch and schedule of every model of a size: the published ConMamba yamls' values.
BATCH_SCHEDULE = {
    "small": {
        "max_batch_length_train": 900,
        "max_batch_ex": 128,
        "grad_accumulation_factor": 1,
        "n_warmup_steps": 25000,
        "lr_adam": 0.001,
        "number_of_epochs": 110,
    },
    "large": {
        "max_batch_length_train": 500,
        "max_batch_ex": 256,
        "grad_accumulation_factor": 8,
        "n_warmup_steps": 3750,
        "lr_adam": 0.0008,
        "number_of_epochs": 120,
    },
}


def load(name, tmp_path):
    with open(os.path.join(HPARAMS, name), encoding="utf-8") as f:
        return load_hyperpyyaml(f, {"data_folder": str(tmp_path), "output_folder": str(tmp_path)})


def top_level(name):
    return yaml_top_level(os.path.join(HPARAMS, name))


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_published_config_parameter_count(name, tmp_path):
    hparams = load(name, tmp_path)
    # Modules share submodules (ctc_lin is also in the CTC scorer): count each parameter once.
    n_params = count_parameters(hparams["modules"].values()) / 1e6
    assert n_params == pytest.approx(PARAMS_M[name], rel=0.005)


@pytest.mark.parametrize("size", ["small", "large"])
def test_configs_of_a_size_differ_only_in_encoder_and_decoder(size):
    configs = {model: top_level(f"{model}_{size}.yaml") for model in MODELS}
    reference = configs["conmamba"]
    for model, config in configs.items():
        assert set(config) ^ set(reference) <= MODEL_KEYS, model
        differing = {key for key in set(config) & set(reference) if config[key] != reference[key]}
        assert differing <= MODEL_KEYS, (model, differing - MODEL_KEYS)


@pytest.mark.parametrize("size", ["small", "large"])
def test_configs_of_a_size_share_batch_and_schedule(size):
    for model in MODELS:
        config = top_level(f"{model}_{size}.yaml")
        values = {key: yaml.safe_load(config[key][1]) for key in BATCH_SCHEDULE[size]}
        assert values == BATCH_SCHEDULE[size], model


@pytest.mark.parametrize("model", MODELS)
def test_demo_config_builds(model, tmp_path):
    hparams = load(f"demo_{model}.yaml", tmp_path)
    assert hparams["precision"] == "fp32"
    assert hparams["data_folder"] == str(tmp_path)


def test_xavier_initialisation_spares_the_mamba_mixers(tmp_path):
    # SpeechBrain's TransformerASR initialises every matrix xavier-normal; the mixers keep Mamba's
    # S4D initialisation A = -(1, ..., d_state).
    hparams = load("conmambamamba_small.yaml", tmp_path)
    mixers = [m for m in hparams["encoder_decoder"].modules() if isinstance(m, Mamba)]
    assert len(mixers) == 12 + 2 * 4  # one per encoder layer, two per decoder layer
    s4d = torch.log(torch.arange(1, hparams["d_state"] + 1, dtype=torch.float32))
    for mixer in mixers:
        for name, parameter in mixer.named_parameters():
            if name.startswith("A_log"):
                assert torch.equal(parameter.detach(), s4d.expand_as(parameter)), name


def test_conformer_config_computes_speechbrains_transformer_asr(tmp_path):
    # The published Conformer S2S model is SpeechBrain's TransformerASR; ours, assembled in the yaml,
    # must compute the same function with the same weights (tiny sizes; padded targets included).
    sizes = {"d_model": 32, "d_ffn": 64, "num_encoder_layers": 2, "num_decoder_layers": 2}
    with open(os.path.join(HPARAMS, "demo_conformer.yaml"), encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, {"output_folder": str(tmp_path), "output_neurons": 30, **sizes})
    ours = hparams["encoder_decoder"].eval()
    reference = TransformerASR(
        tgt_vocab=30,
        input_size=hparams["cnn_output_size"],
        d_model=32,
        nhead=hparams["nhead"],
        num_encoder_layers=2,
        num_decoder_layers=2,
        d_ffn=64,
        kernel_size=hparams["kernel_size"],
        activation=torch.nn.GELU,
        conformer_activation=Swish,
        encoder_module="conformer",
        attention_type="RelPosMHAXL",
        normalize_before=True,
        causal=False,
    ).eval()
    renamed = {  # prefixes of our parameter names -> TransformerASR's
        "encoder.input_projection.0.": "custom_src_module.layers.0.w.",
        "encoder.encoder.": "encoder.",
        "tgt_embedding.": "custom_tgt_module.layers.0.",
    }

    def reference_name(name):
        for prefix, reference_prefix in renamed.items():
            if name.startswith(prefix):
                return reference_prefix + name[len(prefix) :]
        return name

    reference_parameters = dict(reference.named_parameters())
    assert len(reference_parameters) == len(list(ours.parameters()))
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            parameter.copy_(reference_parameters[reference_name(name)])

    torch.manual_seed(0)
    src = torch.randn(3, 20, hparams["cnn_output_size"])
    tokens = torch.randint(3, 30, (3, 7))
    tokens[1, 5:] = 0  # padding
    # Whole utterances: on padded ones ours zeroes the convolution modules' padding and SpeechBrain's
    # does not (modules/models/conformer.py; tests/test_batch_invariance.py)
    wav_lens = torch.ones(3)
    with torch.no_grad():
        encoder_out, decoder_out = ours(src, wav_lens, tokens)
        reference_encoder_out, reference_decoder_out = reference(src, tokens, wav_lens)
    torch.testing.assert_close(encoder_out, reference_encoder_out)
    torch.testing.assert_close(decoder_out[0], reference_decoder_out[0])
    torch.testing.assert_close(decoder_out[1, :5], reference_decoder_out[1, :5])  # valid targets
    torch.testing.assert_close(decoder_out[2], reference_decoder_out[2])
