"""The training step that does not wait for the GPU: the running loss (modules/training/running_mean.py),
RecipeBrain's use of it, its skipping of NaN steps on the device, host tensors copied to the device
(modules/training/device_copies.py), and bench/recipe_speed.py timing a real recipe."""

import collections
import os
import sys

import pytest
import speechbrain as sb
import torch
from recipe_runs import ROOT, run_tiny_ctc

from hyperpyyaml import load_hyperpyyaml

from modules.models.front_end import encoder_input
from modules.training.device_copies import to_device
from modules.training.recipe import RecipeBrain, audio_on_device
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


def queued_gpu_work():
    """An event that the GPU reaches after about a second of work queued now: still pending when the
    host comes back from calls that did not wait for the GPU."""
    torch.cuda._sleep(2_000_000_000)  # clock cycles
    event = torch.cuda.Event()
    event.record()
    return event


@pytest.mark.parametrize("device", DEVICES)
def test_to_device_copies_a_host_tensor_and_does_not_wait_for_the_gpu(device):
    host = torch.arange(6).view(2, 3)
    to_device(host, device)  # the first copy to a GPU sets up its page-locked memory
    pending = queued_gpu_work() if device == "cuda" else None
    copied = to_device(host, device)
    if pending is not None:
        assert not pending.query()  # a copy from pageable memory may wait for the queued work
    assert copied.device.type == device and copied.tolist() == host.tolist()


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


def brain_with_optimizer(fused, device):
    """A RecipeBrain training one Linear layer on ``device`` with AdamW, fused or not, at its first epoch."""
    brain = RecipeBrain(
        modules={"model": torch.nn.Linear(2, 2)},
        opt_class=lambda params: torch.optim.AdamW(params, lr=0.1, fused=fused),
        hparams={"epoch_counter": sb.utils.epoch_loop.EpochCounter(1), "noam_annealing": lambda optimizer: None},
        run_opts={"device": device, "skip_nonfinite_grads": True},
    )
    brain.init_optimizers()
    brain.hparams.epoch_counter.current = 1
    brain.nonfinite_count = 0
    return brain


def optimizer_step_with_gradient(brain, value):
    """Gives every parameter the gradient ``value`` and runs SpeechBrain's optimizer step; returns the
    parameters before it."""
    before = [p.detach().clone() for p in brain.modules.parameters()]
    for p in brain.modules.parameters():
        p.grad = torch.full_like(p, value)
    brain.optimizers_step()
    return before


def unchanged(brain, before):
    return all(torch.equal(p, b) for p, b in zip(brain.modules.parameters(), before))


@pytest.mark.parametrize("device", DEVICES)
def test_a_fused_optimizer_skips_a_nan_step_itself_and_the_host_counts_it_one_step_later(device, caplog):
    brain = brain_with_optimizer(fused=True, device=device)
    before = optimizer_step_with_gradient(brain, float("nan"))
    assert unchanged(brain, before)  # skipped by the fused step, from the device's flag
    assert brain.nonfinite_count == 0  # not read yet: the host did not wait for the GPU
    assert all(brain.optimizer.state[p]["step"] == 0 for p in brain.modules.parameters())
    before = optimizer_step_with_gradient(brain, 1.0)
    assert not unchanged(brain, before)  # a finite step updates
    assert brain.nonfinite_count == 1  # the previous step's fault, read at this step
    assert "Skipped optimizer step 1 (epoch 1): NaN or inf gradient" in caplog.text
    optimizer_step_with_gradient(brain, float("inf"))
    brain.on_stage_end(sb.Stage.TRAIN, None, epoch=1)  # the epoch's last step is counted at its end
    assert brain.nonfinite_count == 2
    assert "Skipped optimizer step 3 (epoch 1)" in caplog.text


@pytest.mark.parametrize("device", DEVICES)
def test_other_optimizers_have_the_host_drop_a_nan_step_at_once(device, caplog):
    brain = brain_with_optimizer(fused=False, device=device)
    before = optimizer_step_with_gradient(brain, float("nan"))
    assert unchanged(brain, before)
    assert brain.nonfinite_count == 1
    assert "Skipped optimizer step 1 (epoch 1): NaN or inf gradient" in caplog.text
    before = optimizer_step_with_gradient(brain, 1.0)
    assert not unchanged(brain, before) and brain.nonfinite_count == 1


@pytest.mark.parametrize("device", DEVICES)
def test_a_nan_loss_that_gradscaler_skipped_is_counted_one_step_later(device, caplog):
    brain = brain_with_optimizer(fused=True, device=device)  # fp16: check_gradients does not run
    for step, loss in enumerate([float("nan"), 1.0], start=1):
        brain.check_loss_isfinite(torch.tensor(loss, device=device))
        brain.optimizer_step = step  # SpeechBrain's count, after the step
        brain.on_fit_batch_end(None, None, None, should_step=True)
        assert brain.nonfinite_count == step - 1  # read at the next step, not at once
    assert "Skipped optimizer step 1 (epoch 1): NaN or inf loss" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_training_front_end_queues_its_work_without_waiting_for_the_gpu(tmp_path):
    with open(os.path.join(ROOT, "hparams", "CTC", "demo_conmamba.yaml"), encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, {"output_folder": str(tmp_path), "data_folder": str(tmp_path)})
    device = torch.device("cuda")
    CNN, normalize = hparams["CNN"].to(device).train(), hparams["normalize"].to(device).train()
    examples = [dict(id=str(i), sig=torch.randn(length)) for i, length in enumerate([16000, 9000, 12345])]
    for resampler in hparams["speed_perturb"].resamplers:  # each builds its filter at its first call
        resampler.to(device)(torch.zeros(1, 16000, device=device))
    # the first step moves constants to the device and starts the normalizer's statistics (SpeechBrain's
    # update waits for the GPU: it ends after the first epochs); the second must not wait
    for epoch in (0, hparams["norm_update_until_epoch"]):
        batch = sb.dataio.batch.PaddedBatch(examples).pin_memory()
        pending = queued_gpu_work()
        torch.cuda.set_sync_debug_mode("error" if epoch else "default")
        try:
            wavs, wav_lens = audio_on_device(batch, device, hparams["speed_perturb"])
            src, src_lens = encoder_input(hparams["compute_features"], normalize, CNN, wavs, wav_lens,
                                          augment=hparams["fea_augment"], epoch=epoch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        if epoch:  # the sync debug mode misses the waits of copies from pageable memory; this sees them
            assert not pending.query()
        torch.cuda.synchronize()  # the next epoch reuses this one's page-locked memory
    assert src.shape[0] == 3 and src_lens.max() == 1.0


def test_recipe_speed_times_the_epochs_of_a_real_recipe(tmp_path):
    proc = run_tiny_ctc(
        str(tmp_path),
        "--number_of_epochs=2",
        "--test_beam_size=1",
        launcher=(os.path.join(ROOT, "bench", "recipe_speed.py"),),
    )
    lines = proc.stdout.splitlines()
    header = ("| epoch | training steps | seconds | steps/s | mean GPU utilisation | steady steps/s | steady GPU utilisation "
              "| buckets recorded as CUDA graphs (host s) |")
    table = lines[lines.index(header) :]
    epochs = [line.split("|")[1:-1] for line in table[2:4]]
    assert [int(e[0]) for e in epochs] == [1, 2]
    assert all(int(e[1]) > 0 and float(e[2]) > 0 and e[4].strip() == "n/a" for e in epochs)  # no GPU here
    # the steady rate leaves out each epoch's first 5 steps, which a tiny epoch may not have
    assert all(e[5].strip() == "n/a" if int(e[1]) <= 5 else float(e[5]) > 0 for e in epochs)
    assert all(e[7].strip() == "0 (0.0 s)" for e in epochs)  # graphs are recorded on a GPU only
    phases = table[table.index(next(line for line in table if line.startswith("host time per step"))) + 1 :]
    assert [line.split("ms  ")[1] for line in phases[:5]] == [
        "compute_forward", "compute_objectives", "optimizers_step", "backward and the rest of the step",
        "between steps (loader, loop)",
    ]
    steady = ["between steps after the first 5"] if int(epochs[-1][1]) > 5 else []
    assert [line.split("ms  ")[1] for line in phases[5:]] == steady
    assert float(phases[0].split("ms")[0]) > 0  # the forward takes host time


def test_recipe_speed_spots_reads_of_pageable_memory_onto_a_gpu():
    sys.path.insert(0, ROOT)
    from bench.recipe_speed import PageableUploads, pageable_upload

    aten = torch.ops.aten
    host, scalar = torch.arange(4), torch.tensor(2)
    assert pageable_upload(aten._to_copy.default, (host,), {"device": torch.device("cuda"), "non_blocking": True})
    assert not pageable_upload(aten._to_copy.default, (host,), {"dtype": torch.float})  # stays on the CPU
    assert not pageable_upload(aten._to_copy.default, (scalar,), {"device": torch.device("cuda")})  # a value
    assert not pageable_upload(aten.add.Tensor, (host, host), {})  # CPU work
    if torch.cuda.is_available():
        gpu = torch.zeros(4, device="cuda")
        assert pageable_upload(aten.copy_.default, (gpu, host), {})
        assert pageable_upload(aten.index.Tensor, (gpu, [host]), {})  # indices, in a list, copied to the GPU
        assert not pageable_upload(aten.copy_.default, (gpu, host.pin_memory()), {})
        sites = collections.Counter()
        with PageableUploads(sites):
            host.to("cuda", non_blocking=True)
            to_device(host, "cuda")  # through page-locked memory: not counted
        assert list(sites.values()) == [1] and 'host.to("cuda", non_blocking=True)' in next(iter(sites))
