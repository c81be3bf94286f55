"""A misspelled command-line override or a yaml lacking a key the recipe reads fails at start-up,
naming the key, before any data preparation or training (modules/training/hparams.py)."""

import ast
import importlib
import os
import re

import pytest

from modules.training.hparams import WHOLE_NUMBERS
from recipe_runs import ROOT, run_script, yaml_top_level
from reliability_report import record

RECIPES = {  # script: (its recipe folder under hparams/, its demo yaml, a key of that yaml)
    "train_CTC.py": ("CTC", "demo_conmamba.yaml", "num_encoder_layers"),
    "train_S2S.py": ("S2S", "demo_conmamba.yaml", "num_encoder_layers"),
    "train_decoder_only.py": ("decoder_only", "demo_mamba.yaml", "num_blocks"),
}


def required_hparams(script):
    """The script's REQUIRED_HPARAMS."""
    return importlib.import_module(os.path.splitext(script)[0]).REQUIRED_HPARAMS


def keys_read(tree):
    """Keys read as ``hparams["key"]`` or ``<...>.hparams.key`` in the syntax tree."""
    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "hparams":
            if isinstance(node.slice, ast.Constant):
                keys.add(node.slice.value)
        elif isinstance(node, ast.Attribute) and getattr(node.value, "attr", None) == "hparams":
            keys.add(node.attr)
    return keys


def parse(path):
    """Syntax tree of a file of the repository."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return ast.parse(f.read())


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_required_hparams_are_the_keys_the_recipe_reads(script):
    tree = parse(script)
    shared = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "modules.training.recipe"
        for alias in node.names
    }
    read = keys_read(tree)
    for definition in parse("modules/training/recipe.py").body:
        if getattr(definition, "name", None) in shared:
            read |= keys_read(definition)
    assert sorted(required_hparams(script)) == sorted(read)


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_every_shipped_yaml_has_the_required_keys(script):
    folder = os.path.join(ROOT, "hparams", RECIPES[script][0])
    for name in sorted(os.listdir(folder)):
        missing = set(required_hparams(script)) - set(yaml_top_level(os.path.join(folder, name)))
        assert not missing, f"{name} lacks {missing}"


def without_key(yaml_text, key):
    """The yaml text without the top-level key and its indented block."""
    return re.sub(rf"^{key}:.*\n(?:[ #].*\n|\n)*", "", yaml_text, count=1, flags=re.MULTILINE)


@pytest.mark.reliability
@pytest.mark.parametrize("script", sorted(RECIPES))
def test_misspelled_override_fails_before_any_work(tmp_path, script):
    folder, demo, key = RECIPES[script]
    misspelled = key[:-1] + "z"
    output = tmp_path / "out"
    proc = run_script(script, f"hparams/{folder}/{demo}", output, f"--{misspelled}=3", returncode=1, cwd=tmp_path)
    message = proc.stderr.strip().splitlines()[-1]
    assert f"--{misspelled} is not a hyperparameter of" in message
    assert f"did you mean --{key}?" in message
    assert not output.exists()  # no experiment folder, no data preparation
    record(f"misspelled command-line override --{misspelled}=3 ({script})", f"stops at start-up: {message}")


@pytest.mark.reliability
@pytest.mark.parametrize("script", sorted(RECIPES))
def test_yaml_missing_a_required_key_fails_before_any_work(tmp_path, script):
    folder, demo, _ = RECIPES[script]
    with open(os.path.join(ROOT, "hparams", folder, demo), encoding="utf-8") as f:
        text = f.read()
    broken = tmp_path / demo
    broken.write_text(without_key(text, "test_csv"), encoding="utf-8")  # read only after training
    assert "test_csv" not in yaml_top_level(broken)
    output = tmp_path / "out"
    proc = run_script(script, broken, output, returncode=1, cwd=tmp_path)
    message = proc.stderr.strip().splitlines()[-1]
    assert f"{broken} lacks the key(s) test_csv, which this recipe reads" in message
    assert not output.exists()
    record(f"yaml without the key test_csv ({script})", f"stops at start-up: {message}")


@pytest.mark.reliability
@pytest.mark.parametrize("override", ["--test_beam_size=abc", "--avg_checkpoints=abc", "--number_of_epochs=-1"])
def test_a_bad_whole_number_fails_before_any_work(tmp_path, override):
    """test_beam_size and avg_checkpoints are read only at test time: a whole epoch trained, then the test
    crashed; number_of_epochs -1 ended with 'No state dicts to average'."""
    key, value = override[2:].split("=")
    output = tmp_path / "out"
    proc = run_script("train_CTC.py", "hparams/CTC/demo_conmamba.yaml", output, override, returncode=1, cwd=tmp_path)
    message = proc.stderr.strip().splitlines()[-1]
    assert f"{key} must be a whole number of at least 1, not {value}: fix it in " in message
    assert message.endswith(f"or in the command line's --{key}")
    assert not output.exists()
    record(f"command-line override {override} (train_CTC.py)", f"stops at start-up: {message}")


def test_every_shipped_yaml_has_fitting_whole_numbers():
    for recipe in ("CTC", "S2S", "decoder_only"):
        folder = os.path.join(ROOT, "hparams", recipe)
        for name in sorted(os.listdir(folder)):
            top_level = yaml_top_level(os.path.join(folder, name))
            for key, least in WHOLE_NUMBERS.items():
                if key in top_level:
                    assert int(top_level[key][1]) >= least, (name, key)
