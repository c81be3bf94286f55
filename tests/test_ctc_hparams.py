"""The published-size CTC configs: they load, have the published sizes, and differ only in the encoder."""

import os

import pytest
from hyperpyyaml import load_hyperpyyaml

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
