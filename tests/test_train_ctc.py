"""End-to-end check of train_CTC.py: a tiny ConMamba trained on a slice of the demo corpus.

The run prepares the data, trains the tokenizer, trains a few epochs, averages the best
checkpoints and decodes the test slice; the training loss must fall and the WER file must exist.
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATA = os.path.join(ROOT, "demo", "LibriSpeech")
DEMO_YAML = os.path.join(ROOT, "hparams", "CTC", "demo_conmamba.yaml")

# A model small enough to train in seconds on a CPU.
TINY_MODEL = [
    "--d_model=64",
    "--d_ffn=128",
    "--num_encoder_layers=1",
    "--kernel_size=7",
    "--d_state=4",
    "--cnn_channels=(8, 8)",
    "--cnn_output_size=160",  # 8 channels x (80 mels / 4)
]


def run_recipe(output_folder, *overrides):
    """Runs train_CTC.py on the demo config from tmp space; returns the finished process."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "train_CTC.py"),
        DEMO_YAML,
        f"--data_folder={DEMO_DATA}",
        f"--output_folder={output_folder}",
        "--noprogressbar",
        *TINY_MODEL,
        *overrides,
    ]
    return subprocess.run(
        cmd, cwd=output_folder, capture_output=True, text=True, timeout=300
    )


def train_losses(train_log):
    """Per-epoch training losses from SpeechBrain's train_log.txt."""
    with open(train_log, encoding="utf-8") as f:
        return [float(x) for x in re.findall(r"train loss: ([0-9.e+-]+)", f.read())]


def test_tiny_training_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    proc = run_recipe(
        out,
        "--select_n_sentences=[32, 8, 8]",
        "--number_of_epochs=12",
        "--n_warmup_steps=10",
        "--max_batch_length_train=8",
        "--lr_adam=0.005",
        # No augmentation: the model should fit the slice quickly.
        "--num_fea_augmentations=0",
        "--speed_changes=[100]",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    losses = train_losses(out / "train_log.txt")
    assert len(losses) == 12
    assert losses[-1] < 0.6 * losses[0], losses

    wer_file = out / "wer_test.txt"
    assert wer_file.is_file()
    assert "%WER" in wer_file.read_text(encoding="utf-8")
    assert re.search(r"Test WER on test: [0-9.]+ %", proc.stdout), proc.stdout[-2000:]
