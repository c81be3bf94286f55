"""train_LM.py: the demo-size Transformer LM of the encoder-decoder demos' shallow fusion, trained on
the training transcripts with the recipe's own tokenizer, loads into the recipe's LM scorer."""

import os
import re

import pytest
import torch
from hyperpyyaml import load_hyperpyyaml

from recipe_runs import ROOT, run_script, yaml_top_level
from test_config_checks import keys_read, parse
from train_S2S import build_test_scorer

DEMOS = ["demo_conmamba.yaml", "demo_conmambamamba.yaml", "demo_conformer.yaml"]


def test_required_hparams_are_the_keys_the_recipe_reads():
    import train_LM

    tree = parse("train_LM.py")
    read = keys_read(tree)
    shared = {"prepare_manifests", "train_tokenizer"}
    for definition in parse("modules/training/recipe.py").body:
        if getattr(definition, "name", None) in shared:
            read |= keys_read(definition)
    assert sorted(train_LM.REQUIRED_HPARAMS) == sorted(read)
    for name in DEMOS:
        missing = set(train_LM.REQUIRED_HPARAMS) - set(yaml_top_level(os.path.join(ROOT, "hparams", "S2S", name)))
        assert not missing, f"{name} lacks {missing}"


def test_trained_lm_lowers_perplexity_and_is_fused_at_test(tmp_path):
    out = tmp_path / "out"
    proc = run_script(
        "train_LM.py", "hparams/S2S/demo_conmamba.yaml", out,
        "--lm_number_of_epochs=3", "--lm_d_model=64", "--lm_d_ffn=128", "--lm_num_layers=1",
        "--select_n_sentences=[200, 20, 20]", cwd=tmp_path,
    )
    perplexities = [float(p) for p in re.findall(r"perplexity ([0-9.]+)", proc.stdout + proc.stderr)]
    assert len(perplexities) == 3 and perplexities[-1] < perplexities[0]
    lm_file = out / "lm" / "lm.ckpt"
    assert lm_file.is_file()

    # The S2S recipe's test scorer loads it into its own lm_model and fuses it with the CTC scorer
    overrides = {"output_folder": str(out), "lm_file": str(lm_file), "lm_d_model": 64, "lm_d_ffn": 128,
                 "lm_num_layers": 1}
    with open(os.path.join(ROOT, "hparams", "S2S", "demo_conmamba.yaml"), encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, overrides)
    scorer = build_test_scorer(hparams, torch.device("cpu"))
    assert scorer.weights["transformerlm"] == hparams["lm_weight"] > 0
    assert scorer.weights["ctc"] == hparams["ctc_weight_decode"] > 0
    lm = scorer.full_scorers["transformerlm"].lm
    saved = torch.load(lm_file, weights_only=True)
    assert all(torch.equal(lm.state_dict()[k], v) for k, v in saved.items())
