"""train_CTC.py under torchrun with two CPU processes (gloo): both ranks finish, one checkpoint."""

import os
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


def test_two_process_ddp_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free local port: parallel jobs must not collide
        "--nproc-per-node=2",
        os.path.join(ROOT, "train_CTC.py"),
        DEMO_YAML,
        "--distributed_backend=gloo",
        "--device=cpu",
        f"--data_folder={DEMO_DATA}",
        f"--output_folder={out}",
        "--noprogressbar",
        "--select_n_sentences=[16, 4, 4]",
        "--number_of_epochs=1",
        "--max_batch_length_train=6",
        *TINY_MODEL,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        cmd, cwd=out, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Only rank 0 writes checkpoints and the test report.
    ckpts = [d for d in os.listdir(out / "save") if d.startswith("CKPT+")]
    assert len(ckpts) == 1, ckpts
    assert (out / "wer_test.txt").is_file()
    assert proc.stdout.count("Test WER on test:") == 1, proc.stdout[-2000:]
