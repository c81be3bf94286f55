"""A training run killed again and again (SIGKILL, from outside) resumes to the same final state.

The tiny CTC model trains 2 epochs on a slice of the demo corpus, once without interruption and
once killed three times and resumed each time: during an optimizer step, during validation, and
half-way through writing a checkpoint's files (points drawn by a seeded generator). A driver runs
train_CTC.py and, at the chosen point, writes a marker file and waits; the test then kills it
with SIGKILL, so nothing of the run's own clean-up happens. The resumed run must end with the same
step counts and, the settings being deterministic (CPU, one thread, no loader workers), the same
parameters, optimizer state and random-generator states as the uninterrupted run; the
half-written checkpoint must never be taken for a valid one.
"""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from modules.training.checkpointing import SafeCheckpointer
from recipe_runs import CTC_DEMO_YAML, DEMO_DATA, ROOT, TINY_CTC_MODEL
from reliability_report import record

pytestmark = pytest.mark.reliability

CKPT_INTERVAL_STEPS = 2
OVERRIDES = [
    "--select_n_sentences=[24, 4, 4]",
    "--number_of_epochs=2",
    "--max_batch_length_train=6",
    f"--ckpt_interval_steps={CKPT_INTERVAL_STEPS}",
]

# Runs train_CTC.py in-process. $PAUSE_AT names a point where it writes $PAUSED_FILE and waits to
# be killed: "step:<n>" before optimizer step n is applied, "valid:<epoch>" at the first validation
# batch of that epoch, "save:<n>" half-way through the last file of the n-th checkpoint it writes.
DRIVER = """
import io, os, runpy, sys, time
import speechbrain as sb
import torch

kind, _, number = os.environ.get("PAUSE_AT", "").partition(":")
number = int(number or 0)

def pause():
    with open(os.environ["PAUSED_FILE"], "w") as f:
        f.write("paused")
    time.sleep(600)

optimizers_step = sb.Brain.optimizers_step
def pausing_optimizers_step(self):
    if kind == "step" and self.optimizer_step + 1 == number:
        pause()
    optimizers_step(self)

evaluate_batch = sb.Brain.evaluate_batch
def pausing_evaluate_batch(self, batch, stage):
    if kind == "valid" and stage == sb.Stage.VALID and self.hparams.epoch_counter.current == number:
        pause()
    return evaluate_batch(self, batch, stage)

saves = 0
torch_save = torch.save
def pausing_save(obj, path, *args, **kwargs):
    global saves
    if os.path.basename(path) == "optimizer.ckpt":  # the last file of a checkpoint
        saves += 1
        if kind == "save" and saves == number:
            data = io.BytesIO()
            torch_save(obj, data)
            with open(path, "wb") as f:
                f.write(data.getvalue()[: len(data.getvalue()) // 2])
            pause()
    torch_save(obj, path, *args, **kwargs)

sb.Brain.optimizers_step = pausing_optimizers_step
sb.Brain.evaluate_batch = pausing_evaluate_batch
torch.save = pausing_save
script = sys.argv[1]
sys.path.insert(0, os.path.dirname(script))
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def train(tmp_path, output_folder, pause_at=""):
    """Runs the training to its end, or with pause_at until it pauses there, then SIGKILLs it."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    paused = tmp_path / "paused"
    paused.unlink(missing_ok=True)
    log = tmp_path / f"log_{output_folder.name}_{pause_at.replace(':', '_') or 'end'}.txt"
    cmd = [
        sys.executable,
        str(driver),
        os.path.join(ROOT, "train_CTC.py"),
        CTC_DEMO_YAML,
        f"--data_folder={DEMO_DATA}",
        f"--output_folder={output_folder}",
        "--noprogressbar",
        *TINY_CTC_MODEL,
        *OVERRIDES,
    ]
    env = dict(os.environ, PAUSE_AT=pause_at, PAUSED_FILE=str(paused))
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while pause_at and not paused.exists() and proc.poll() is None:
                time.sleep(0.05)
            if pause_at and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=300)
        finally:
            proc.kill()
    expected = -signal.SIGKILL if pause_at else 0
    assert proc.returncode == expected, f"{pause_at}: " + log.read_text(encoding="utf-8")[-3000:]


def checkpoints(output_folder):
    """The checkpoints a checkpointer of the run considers valid."""
    return SafeCheckpointer(os.path.join(output_folder, "save")).list_checkpoints()


def final_checkpoint(output_folder):
    """The last end-of-epoch checkpoint."""
    return max((c for c in checkpoints(output_folder) if c.meta["end-of-epoch"]), key=lambda c: c.meta["unixtime"])


def training_state(ckpt):
    """Epoch and step counters saved in a checkpoint."""
    with open(ckpt.path / "brain.ckpt", encoding="utf-8") as f:
        brain = yaml.safe_load(f)
    optimizer = torch.load(ckpt.path / "optimizer.ckpt", weights_only=True)
    return {
        "epoch": int((ckpt.path / "counter.ckpt").read_text()),
        "optimizer_step": brain["optimizer_step"],
        "adam_steps": {int(s["step"]) for s in optimizer["state"].values()},
        "noam_steps": torch.load(ckpt.path / "noam_scheduler.ckpt", weights_only=True)["n_steps"],
    }


def max_abs_difference(a, b):
    """Largest difference between two nested structures of tensors and numbers (equal structure asserted)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max([max_abs_difference(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max([max_abs_difference(x, y) for x, y in zip(a, b)] or [0.0])
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert a == b
    return 0.0


def final_tensors(ckpt):
    """What a checkpoint holds besides counters: parameters, optimizer, normalizer and random states."""
    return {
        name: torch.load(ckpt.path / f"{name}.ckpt", weights_only=True)
        for name in ("model", "optimizer", "normalizer", "random_state")
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Output folder of the training run without interruption."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    train(tmp_path, tmp_path / "full")
    return tmp_path / "full"


def test_killed_three_times_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted):
    full = final_checkpoint(uninterrupted)
    full_state = training_state(full)
    steps_per_epoch = full_state["optimizer_step"] // 2
    assert full_state["epoch"] == 2 and full_state["adam_steps"] == {full_state["optimizer_step"]}

    rng = random.Random(0)
    saves_in_run = 1 + (steps_per_epoch // CKPT_INTERVAL_STEPS + 1)  # end of epoch 1, then epoch 2
    kills = [
        f"step:{rng.randint(1, steps_per_epoch)}",  # the first run, in epoch 1
        "valid:1",  # resumed in epoch 1: killed in its validation
        f"save:{rng.randint(1, saves_in_run)}",  # resumed at the end of epoch 1: killed while saving
    ]
    killed = tmp_path / "killed"
    for pause_at in kills:
        train(tmp_path, killed, pause_at)
        if pause_at.startswith("save"):
            save_folder = killed / "save"
            unfinished = [p for p in save_folder.iterdir() if p.name.startswith("unfinished-")]
            assert len(unfinished) == 1 and (unfinished[0] / "CKPT.yaml").exists()
            assert unfinished[0].name[len("unfinished-"):] not in {c.path.name for c in checkpoints(killed)}
            assert all(c.path.name.startswith("CKPT+") for c in checkpoints(killed))
    train(tmp_path, killed)

    resumed = final_checkpoint(killed)
    assert training_state(resumed) == full_state
    difference = max_abs_difference(final_tensors(resumed), final_tensors(full))
    assert difference <= 1e-6
    assert not any(p.name.startswith("unfinished-") for p in (killed / "save").iterdir())
    record(
        "training (CTC, tiny model) killed with SIGKILL during an optimizer step, during validation and while "
        "writing a checkpoint, resumed each time",
        f"kill points {', '.join(kills)} ({steps_per_epoch} steps per epoch); the half-written checkpoint was "
        f"never loaded; after 3 resumes: {full_state['optimizer_step']} optimizer steps, epoch 2, as uninterrupted; "
        f"parameters, optimizer, normalizer and random states equal to the uninterrupted run (max abs diff "
        f"{difference})",
    )


def test_corrupt_latest_checkpoint_resumes_from_the_previous_one(tmp_path, uninterrupted):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    latest = final_checkpoint(run)
    bad_file = latest.path / "model.ckpt"
    bad_file.write_bytes(bad_file.read_bytes()[:1000])  # truncated
    previous = max((c for c in checkpoints(run) if c != latest), key=lambda c: c.meta["unixtime"])

    train(tmp_path, run)  # the same 2 epochs: resumes, finishes, tests

    log = (tmp_path / "log_run_end.txt").read_text(encoding="utf-8")
    warning = f"Cannot load the checkpoint file {bad_file}"
    assert f"{warning}: RuntimeError: PytorchStreamReader failed" in log
    assert f"Falling back to the previous checkpoint {previous.path}" in log
    aside = latest.path.with_name(f"corrupt-{latest.path.name}")
    assert f"Moved the checkpoint that failed to load to {aside}" in log and (aside / "model.ckpt").exists()
    averaged = re.search(r"Averaged model over (\d+) of (\d+) checkpoints", log)
    assert averaged.group(1) == averaged.group(2)  # at test, only loadable checkpoints are averaged
    resumed = final_checkpoint(run)
    assert resumed.path != latest.path
    full = final_checkpoint(uninterrupted)
    assert training_state(resumed) == training_state(full)
    assert max_abs_difference(final_tensors(resumed), final_tensors(full)) <= 1e-6
    record(
        "latest checkpoint of a CTC training truncated, training started again",
        f"warning '{warning} ...', falls back to the previous (intra-epoch) checkpoint, redoes "
        f"{training_state(full)['optimizer_step'] - training_state(previous)['optimizer_step']} step(s) and ends "
        f"equal to the uninterrupted run; the bad checkpoint is renamed {aside.name}, out of the kept set, and the "
        f"test averages {averaged.group(1)} of {averaged.group(2)} checkpoints",
    )
