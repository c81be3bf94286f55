"""train_CTC.py under torchrun with two CPU processes (gloo): both ranks finish, one checkpoint."""

import os

from recipe_runs import run_tiny_ctc


def test_two_process_ddp_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    proc = run_tiny_ctc(
        out,
        "--distributed_backend=gloo",
        "--device=cpu",
        "--select_n_sentences=[16, 4, 4]",
        "--number_of_epochs=1",
        "--max_batch_length_train=6",
        # --standalone: a free local port, so parallel jobs do not collide
        launcher=["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"],
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )

    # Only rank 0 writes checkpoints and the test report.
    ckpts = [d for d in os.listdir(out / "save") if d.startswith("CKPT+")]
    assert len(ckpts) == 1, ckpts
    assert (out / "wer_test.txt").is_file()
    assert proc.stdout.count("Test WER on test:") == 1, proc.stdout[-2000:]
