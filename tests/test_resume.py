"""A training run killed mid-epoch resumes from its intra-epoch checkpoint without redoing work.

Three runs of the same 2-epoch training on a slice of the demo corpus: uninterrupted; killed
(``os._exit``, no clean-up) right after the first intra-epoch checkpoint of epoch 2; and the
same command again, which must resume there. The resumed run must end in the same state as the
uninterrupted one (optimizer steps, AdamW and Noam step counts, epoch) and the two pieces of the
interrupted run must add up to exactly the batches of the uninterrupted run.
"""

import os

import torch
import yaml

from recipe_runs import run_tiny_ctc

CRASH_CODE = 17
CKPT_INTERVAL_STEPS = 2

# Runs train_CTC.py in-process, counting training batches into $BATCH_COUNT_FILE.
# With $CRASH_IN_EPOCH set, the process dies right after the first intra-epoch
# checkpoint of that epoch, as a killed job would.
DRIVER = """
import atexit, os, runpy, sys
import speechbrain as sb

crash_epoch = int(os.environ.get("CRASH_IN_EPOCH", 0))
batches = 0

def write_count():
    with open(os.environ["BATCH_COUNT_FILE"], "w") as f:
        f.write(str(batches))

fit_batch = sb.Brain.fit_batch
def counting_fit_batch(self, batch):
    global batches
    batches += 1
    return fit_batch(self, batch)

save_intra_epoch_ckpt = sb.Brain._save_intra_epoch_ckpt
def save_then_crash(self):
    save_intra_epoch_ckpt(self)
    if self.hparams.epoch_counter.current == crash_epoch:
        write_count()
        os._exit(%d)

sb.Brain.fit_batch = counting_fit_batch
sb.Brain._save_intra_epoch_ckpt = save_then_crash
atexit.register(write_count)
script = sys.argv[1]
sys.path.insert(0, os.path.dirname(script))
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
""" % CRASH_CODE


def run_training(tmp_path, output_folder, crash_in_epoch=0):
    """Runs the 2-epoch training; returns (return code, number of training batches run)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    count_file = tmp_path / "batches.txt"
    env = dict(
        os.environ,
        CRASH_IN_EPOCH=str(crash_in_epoch),
        BATCH_COUNT_FILE=str(count_file),
    )
    run_tiny_ctc(
        output_folder,
        "--select_n_sentences=[24, 4, 4]",
        "--number_of_epochs=2",
        "--max_batch_length_train=6",
        f"--ckpt_interval_steps={CKPT_INTERVAL_STEPS}",
        launcher=[str(driver)],
        cwd=tmp_path,
        env=env,
        returncode=CRASH_CODE if crash_in_epoch else 0,
    )
    return int(count_file.read_text())


def checkpoints(output_folder):
    """CKPT.yaml meta of every checkpoint folder, with its path under "path"."""
    save = os.path.join(output_folder, "save")
    metas = []
    for name in sorted(os.listdir(save)):
        with open(os.path.join(save, name, "CKPT.yaml"), encoding="utf-8") as f:
            metas.append(dict(yaml.safe_load(f), path=os.path.join(save, name)))
    return metas


def training_state(ckpt_path):
    """Step counters saved in a checkpoint folder."""
    with open(os.path.join(ckpt_path, "brain.ckpt"), encoding="utf-8") as f:
        brain = yaml.safe_load(f)
    optimizer = torch.load(os.path.join(ckpt_path, "optimizer.ckpt"))
    adam_steps = {int(s["step"]) for s in optimizer["state"].values()}
    noam = torch.load(os.path.join(ckpt_path, "noam_scheduler.ckpt"))
    with open(os.path.join(ckpt_path, "counter.ckpt"), encoding="utf-8") as f:
        epoch = int(f.read())
    return {
        "brain_step": brain["step"],
        "optimizer_step": brain["optimizer_step"],
        "adam_steps": adam_steps,
        "noam_steps": noam["n_steps"],
        "epoch": epoch,
    }


def final_state(output_folder):
    """Training state of the last end-of-epoch checkpoint."""
    last = max(
        (c for c in checkpoints(output_folder) if c.get("end-of-epoch")),
        key=lambda c: c["epoch"],
    )
    return training_state(last["path"])


def test_resume_after_kill(tmp_path):
    full_batches = run_training(tmp_path, tmp_path / "full")
    full = final_state(tmp_path / "full")
    assert full["epoch"] == 2
    assert full["optimizer_step"] == full_batches  # no gradient accumulation
    assert full["adam_steps"] == {full_batches}

    interrupted = tmp_path / "interrupted"
    crash_batches = run_training(tmp_path, interrupted, crash_in_epoch=2)
    intra = [c for c in checkpoints(interrupted) if not c.get("end-of-epoch")]
    assert len(intra) == 1
    at_crash = training_state(intra[0]["path"])
    # Killed CKPT_INTERVAL_STEPS batches into epoch 2.
    assert at_crash["brain_step"] == CKPT_INTERVAL_STEPS
    assert at_crash["optimizer_step"] == crash_batches
    assert at_crash["adam_steps"] == {crash_batches}
    assert crash_batches == full_batches // 2 + CKPT_INTERVAL_STEPS

    resumed_batches = run_training(tmp_path, interrupted)
    # Nothing redone, nothing skipped, and the same final training state.
    assert crash_batches + resumed_batches == full_batches
    assert final_state(interrupted) == full
