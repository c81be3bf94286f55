"""The training step that does not wait for the GPU: the running loss (modules/training/running_mean.py),
RecipeBrain's use of it, and bench/recipe_speed.py timing a real recipe."""

import os

import pytest
import speechbrain as sb
import torch
from recipe_runs import ROOT, run_tiny_ctc

from modules.training.recipe import RecipeBrain
from modules.training.running_mean import DeviceRunningMean

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_running_mean_is_one_value_late_and_exact_at_the_end(device):
    running = DeviceRunningMean()
    values = [2.0, float("nan"), 4.0, float("inf"), 9.0]
    returned = [running.add(torch.tensor(v, device=device)) for v in values]
    assert returned == [0.0, 2.0, 2.0, 3.0, 3.0]  # the mean of the finite values before each one
    assert running.mean() == 5.0


@pytest.mark.parametrize("device", DEVICES)
def test_running_mean_carries_on_a_saved_mean(device):
    running = DeviceRunningMean(start_mean=2.0, start_count=3)  # 3 steps of mean 2 before a restart
    running.add(torch.tensor(6.0, device=device, dtype=torch.bfloat16))
    assert running.mean() == 3.0


def tiny_brain():
    return RecipeBrain(modules={"model": torch.nn.Linear(2, 2)}, hparams={}, run_opts={"device": "cpu"})


def test_training_loss_of_an_epoch_is_the_exact_mean_of_its_finite_steps():
    brain = tiny_brain()
    brain.modules.train()
    shown = 0.0
    for step, loss in enumerate([1.0, 2.0, float("nan"), 6.0], start=1):
        brain.step = step
        shown = brain.update_average(torch.tensor(loss), shown)
    assert shown == 1.5  # the progress bar lags one step
    brain.on_stage_end(sb.Stage.TRAIN, shown, epoch=1)
    assert brain.train_stats["loss"] == 3.0
    assert brain.running_loss is None  # the next epoch starts afresh


def test_a_run_resumed_mid_epoch_keeps_the_losses_before_the_restart():
    brain = tiny_brain()
    brain.modules.train()
    brain.step = 5  # SpeechBrain restored step 4 and its average 2.0, then counted this step
    brain.update_average(torch.tensor(7.0), 2.0)
    brain.on_stage_end(sb.Stage.TRAIN, None, epoch=1)
    assert brain.train_stats["loss"] == 3.0  # (4 * 2 + 7) / 5


def test_validation_losses_keep_speechbrains_average():
    brain = tiny_brain()
    brain.modules.eval()
    brain.step = 2
    assert brain.update_average(torch.tensor(3.0), 1.0) == 2.0
    assert brain.running_loss is None


def test_recipe_speed_times_the_epochs_of_a_real_recipe(tmp_path):
    proc = run_tiny_ctc(
        str(tmp_path),
        "--number_of_epochs=2",
        "--test_beam_size=1",
        launcher=(os.path.join(ROOT, "bench", "recipe_speed.py"),),
    )
    lines = proc.stdout.splitlines()
    table = lines[lines.index("| epoch | training steps | seconds | steps/s | mean GPU utilisation |") :]
    epochs = [line.split("|")[1:-1] for line in table[2:4]]
    assert [int(e[0]) for e in epochs] == [1, 2]
    assert all(int(e[1]) > 0 and float(e[2]) > 0 and e[4].strip() == "n/a" for e in epochs)  # no GPU here
    phases = table[table.index(next(line for line in table if line.startswith("host time per step"))) + 1 :]
    assert [line.split("ms  ")[1] for line in phases] == [
        "compute_forward", "compute_objectives", "optimizers_step", "backward and the rest of the step",
        "between steps (loader, loop)",
    ]
    assert float(phases[0].split("ms")[0]) > 0  # the forward takes host time
