"""The published-size CTC configs: they load, have the published sizes, and differ only in the encoder."""

import os
import re

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from modules.mamba.mamba import Mamba

from recipe_runs import ROOT, count_parameters, yaml_top_level

HPARAMS = os.path.join(ROOT, "hparams", "CTC")

# Published parameter counts (millions) of the whole model.
PARAMS_M = {"conmamba_large.yaml": 31.56, "conformer_large.yaml": 28.79}

# Top-level keys of the "Encoder" section, the only one allowed to differ.
ENCODER_KEYS = {
    "conmamba_large.yaml": {"d_state", "d_conv", "expand", "bidirectional"},
    "conformer_large.yaml": {"nhead", "attention_type"},
}
SHARED_ENCODER_KEYS = {"encoder", "positional_encoding"}


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_large_config_parameter_count(name, tmp_path):
    with open(os.path.join(HPARAMS, name), encoding="utf-8") as f:
        hparams = load_hyperpyyaml(
            f, {"data_folder": str(tmp_path), "output_folder": str(tmp_path)}
        )
    # Modules may share submodules (the encoder sits inside speech_encoder).
    n_params = count_parameters(hparams["modules"].values()) / 1e6
    assert n_params == pytest.approx(PARAMS_M[name], rel=0.005)


def top_level(name):
    return yaml_top_level(os.path.join(HPARAMS, name))


def test_large_configs_differ_only_in_encoder():
    conmamba = top_level("conmamba_large.yaml")
    conformer = top_level("conformer_large.yaml")
    assert set(conmamba) - set(conformer) == ENCODER_KEYS["conmamba_large.yaml"]
    assert set(conformer) - set(conmamba) == ENCODER_KEYS["conformer_large.yaml"]

    allowed = SHARED_ENCODER_KEYS | {"output_folder"}
    differing = {
        key
        for key in set(conmamba) & set(conformer)
        if conmamba[key] != conformer[key]
    }
    assert not differing - allowed, differing - allowed


def load_large(name, tmp_path):
    with open(os.path.join(HPARAMS, name), encoding="utf-8") as f:
        return load_hyperpyyaml(f, {"data_folder": str(tmp_path), "output_folder": str(tmp_path)})


@pytest.mark.parametrize("name", sorted(PARAMS_M))
def test_encoder_matrices_start_xavier_normal_as_published(name, tmp_path):
    # The published CTC models go through SpeechBrain's TransformerASR, which re-initialises every
    # matrix of the input projection and encoder xavier-normal (arXiv 2407.09732, released recipe).
    # Each family of matrices (one per parameter name, pooled over the 18 layers) must have xavier's
    # standard deviation within 10 %; PyTorch's defaults miss it by up to 6x (the depthwise convolution).
    speech_encoder = load_large(name, tmp_path)["speech_encoder"]
    mixers = [m for m in speech_encoder.modules() if isinstance(m, Mamba)]
    in_mixers = {id(p) for m in mixers for p in m.parameters()}
    families = {}
    for pname, parameter in speech_encoder.named_parameters():
        if parameter.dim() > 1 and id(parameter) not in in_mixers:
            families.setdefault(re.sub(r"layers\.\d+\.", "layers.*.", pname), []).append(parameter.detach())
    assert len(families) >= 7, sorted(families)  # projection, 2 FFNs x 2 linears, 3 convolution-module matrices
    for family, parameters in families.items():
        fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(parameters[0])
        xavier_std = (2.0 / (fan_in + fan_out)) ** 0.5
        measured = torch.cat([p.flatten() for p in parameters]).std().item()
        assert measured == pytest.approx(xavier_std, rel=0.1), family

    # The mixers keep Mamba's own initialisation: S4D-real A = -(1, ..., d_state).
    assert len(mixers) == (18 if name.startswith("conmamba") else 0)
    for mixer in mixers:
        for pname, parameter in mixer.named_parameters():
            if pname.startswith("A_"):
                s4d = torch.log(torch.arange(1, parameter.shape[-1] + 1, dtype=torch.float32))
                assert torch.equal(parameter.detach(), s4d.expand_as(parameter)), pname
