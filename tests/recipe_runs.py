"""What the recipe tests share: repository paths, the tiny CTC demo model, a runner for the
training scripts, and helpers that inspect configs and training logs.

Test files import it as ``recipe_runs``: pytest puts this folder on sys.path.
"""

import os
import re
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATA = os.path.join(ROOT, "demo", "LibriSpeech")
CTC_DEMO_YAML = os.path.join(ROOT, "hparams", "CTC", "demo_conmamba.yaml")

# A CTC model small enough to train in seconds on a CPU.
TINY_CTC_MODEL = [
    "--d_model=64",
    "--d_ffn=128",
    "--num_encoder_layers=1",
    "--kernel_size=7",
    "--d_state=4",
    "--cnn_channels=(8, 8)",
    "--cnn_output_size=160",  # 8 channels x (80 mels / 4)
]


def run_script(script, yaml_file, output_folder, *overrides, launcher=(), cwd=None, env=None, returncode=0, timeout=300):
    """Runs ROOT/<script> (through ``python <launcher>``) on the demo corpus with <yaml_file> (relative to
    ROOT or absolute), writing to output_folder and working there unless cwd is given; asserts the exit
    status and returns the finished process."""
    cmd = [
        sys.executable,
        *launcher,
        os.path.join(ROOT, script),
        os.path.join(ROOT, yaml_file),
        f"--data_folder={DEMO_DATA}",
        f"--output_folder={output_folder}",
        "--noprogressbar",
        *overrides,
    ]
    proc = subprocess.run(
        cmd, cwd=output_folder if cwd is None else cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_tiny_ctc(output_folder, *overrides, **options):
    """run_script of train_CTC.py on the ConMamba CTC demo config, with the tiny model."""
    return run_script("train_CTC.py", CTC_DEMO_YAML, output_folder, *TINY_CTC_MODEL, *overrides, **options)


def train_losses(train_log):
    """Per-epoch training losses from SpeechBrain's train_log.txt."""
    with open(train_log, encoding="utf-8") as f:
        return [float(x) for x in re.findall(r"train loss: ([0-9.e+-]+)", f.read())]


def count_parameters(modules):
    """Parameters of the given modules, each counted once even where modules share submodules."""
    unique = {id(p): p for m in modules for p in m.parameters()}
    return sum(p.numel() for p in unique.values())


def yaml_top_level(path):
    """Top-level yaml nodes as comparable plain values (tags kept, nothing built)."""

    def plain(node):
        if isinstance(node, yaml.MappingNode):
            value = {k.value: plain(v) for k, v in node.value}
        elif isinstance(node, yaml.SequenceNode):
            value = [plain(v) for v in node.value]
        else:
            value = node.value
        return node.tag, value

    with open(path, encoding="utf-8") as f:
        return plain(yaml.compose(f))[1]


# The tiny CTC run whose inference folder the inference tests share (tiny_ctc_run). It validates and
# tests on its own training slice: after seconds of training, held-out voices get empty transcripts,
# and the checkpoints kept (best valid WER) would be the empty ones.
TINY_CTC_INFERENCE_RUN = [
    "--select_n_sentences=[32, 8, 8]",
    "--number_of_epochs=16",
    "--n_warmup_steps=10",
    "--max_batch_length_train=8",
    "--lr_adam=0.005",
    "--num_fea_augmentations=0",
    "--speed_changes=[100]",
    "--avg_checkpoints=2",
    "--test_batch_size=1",
]
_SESSION_RUNS = {}


def tiny_ctc_run(tmp_path_factory):
    """Output folder of the tiny CTC run (made once per test session, shared by test files); its test
    set is the training slice, written to wer_train.txt."""
    if "ctc" not in _SESSION_RUNS:
        out = tmp_path_factory.mktemp("tiny_ctc_run")
        train_csv = out / "train.csv"
        run_tiny_ctc(out, *TINY_CTC_INFERENCE_RUN, f"--valid_csv={train_csv}", f"--test_csv=[{train_csv}]")
        _SESSION_RUNS["ctc"] = out
    return _SESSION_RUNS["ctc"]


def wer_file_hypotheses(wer_file):
    """{utterance id: hypothesis text} from a WER report that SpeechBrain's ErrorRateStats wrote."""
    with open(wer_file, encoding="utf-8") as f:
        blocks = f.read().split("=" * 80)
    hypotheses = {}
    for block in blocks:
        lines = block.strip().split("\n")
        if len(lines) == 4 and ", %WER" in lines[0]:
            words = [word.strip() for word in lines[3].split(";")]
            hypotheses[lines[0].split(",")[0]] = " ".join(w for w in words if w and w != "<eps>")
    return hypotheses
