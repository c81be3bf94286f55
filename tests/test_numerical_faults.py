"""Numerical faults: a NaN or inf loss or gradient skips its optimizer step and is counted; a fault that
persists stops the run with a clear message; under bf16 the state-space parameters and the scan state
stay in float32.

The CTC recipe runs in-process behind a driver (as in test_resume.py) that makes the CTC loss, or only
its gradient, NaN on the training batches listed in $NAN_FAULTS: "2:loss,5:gradient" (batch numbers from
1), or "all:loss" for every batch.
"""

import os

import pytest
import torch

import modules.mamba.selective_scan as scan_ops
from modules.mamba.mamba import Mamba
from modules.mamba.mamba2 import Mamba2
from recipe_runs import run_tiny_ctc
from reliability_report import record

pytestmark = pytest.mark.reliability

DRIVER = """
import os, runpy, sys
script = sys.argv[1]
sys.path.insert(0, os.path.dirname(script))  # the repository, whose modules the recipe imports
import modules.training.ctc
import torch

faults = dict(fault.split(":") for fault in os.environ["NAN_FAULTS"].split(","))
ctc_loss = modules.training.ctc.ctc_loss
train_batches = 0

def faulty_ctc_loss(*args, **kwargs):
    global train_batches
    loss = ctc_loss(*args, **kwargs)
    if not torch.is_grad_enabled():  # validation and test
        return loss
    train_batches += 1
    fault = faults.get("all", faults.get(str(train_batches)))
    if fault == "loss":
        return loss * float("nan")
    if fault == "gradient":
        loss.register_hook(lambda grad: grad * float("nan"))  # finite loss, NaN gradients
    return loss

modules.training.ctc.ctc_loss = faulty_ctc_loss  # before the yaml names it
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def run_with_nan(tmp_path, faults, returncode=0):
    """Trains the tiny CTC model one epoch with NaN injected; returns (output folder, the skipped-step
    warnings of log.txt, the lines the process printed)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    output = tmp_path / "output"
    output.mkdir()
    proc = run_tiny_ctc(
        output,
        "--select_n_sentences=[24, 4, 4]",
        "--number_of_epochs=1",
        "--max_batch_length_train=4",
        "--avg_checkpoints=1",
        launcher=[str(driver)],
        env=dict(os.environ, NAN_FAULTS=faults),
        returncode=returncode,
    )
    with open(output / "log.txt", encoding="utf-8") as f:
        skipped = [line for line in f if "Skipped optimizer step" in line]
    return output, skipped, (proc.stdout + proc.stderr).splitlines()


def trained_weights(output):
    """The model parameters of the end-of-epoch checkpoint."""
    (checkpoint,) = (output / "save").glob("CKPT*")
    return torch.load(checkpoint / "model.ckpt", weights_only=True)


def test_nan_loss_and_gradient_steps_are_skipped_counted_and_training_finishes(tmp_path):
    output, skipped, _ = run_with_nan(tmp_path, "2:loss,3:loss,5:gradient")
    assert len(skipped) == 3
    assert "step 2 (epoch 1): NaN or inf loss (1 of at most 3 skipped steps this epoch)" in skipped[0]
    assert "step 3 (epoch 1): NaN or inf loss (2 of at most 3 skipped steps this epoch)" in skipped[1]
    assert "step 5 (epoch 1): NaN or inf gradient (3 of at most 3 skipped steps this epoch)" in skipped[2]
    weights = trained_weights(output)
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert os.path.isfile(output / "wer_test.txt")
    record(
        "NaN loss on training batches 2 and 3, NaN gradient with a finite loss on batch 5 (tiny CTC, 1 epoch)",
        "steps skipped and counted in log.txt: "
        + "; ".join(f"'{line.split(' - ')[-1].strip()}'" for line in skipped)
        + f"; training and test finished (exit 0), all {len(weights)} saved weight tensors finite",
    )


def test_persistent_nan_stops_training_with_a_clear_message(tmp_path):
    output, skipped, printed = run_with_nan(tmp_path, "all:loss", returncode=1)
    assert len(skipped) == 3  # nonfinite_patience
    (message,) = {line for line in printed if line.startswith("FloatingPointError")}
    assert message.startswith("FloatingPointError: Training stopped: 4 optimizer steps of epoch 1 had a NaN")
    assert not list((output / "save").glob("CKPT*"))
    record(
        "NaN loss on every training batch (tiny CTC)",
        f"exit 1 after {len(skipped)} skipped steps, no checkpoint written; the error: '{message}'",
    )


def is_state_space(name):
    """A_log, D and the step-size bias of either direction: kept in float32 by mamba_ssm under bf16."""
    return name.removesuffix("_b") in ("A_log", "D", "dt_bias") or name in ("dt_proj.bias", "dt_proj_b.bias")


@pytest.mark.parametrize("mixer_class", [Mamba, Mamba2])
def test_bf16_autocast_keeps_state_space_parameters_and_scan_in_float32(mixer_class, monkeypatch):
    mixer = mixer_class(32, d_state=8, bidirectional=True)
    scan_dtypes = set()
    chunk_states = scan_ops._chunk_states

    def recording_chunk_states(A, delta_t, delta_u_t, B_t, h):
        decay, states = chunk_states(A, delta_t, delta_u_t, B_t, h)
        scan_dtypes.update({A.dtype, delta_t.dtype, h.dtype, decay.dtype, states.dtype})
        return decay, states

    monkeypatch.setattr(scan_ops, "_chunk_states", recording_chunk_states)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = mixer(torch.randn(2, 10, 32), torch.tensor([10, 7]))
    out.float().sum().backward()

    assert out.dtype == torch.bfloat16  # the projections did run in bf16
    assert scan_dtypes == {torch.float32}  # forward and backward recurrences
    state_space = {name: p for name, p in mixer.named_parameters() if is_state_space(name)}
    assert len(state_space) == 6  # A_log, D and the dt bias of both directions
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in state_space.values())
    record(
        f"bf16 autocast (CPU) through a bidirectional {mixer_class.__name__} mixer, forward and backward",
        f"{', '.join(sorted(state_space))} and their gradients float32; scan inputs, decays and states "
        f"{', '.join(sorted(str(d) for d in scan_dtypes))}; output {out.dtype}",
    )


def test_scan_returns_its_last_state_in_float32_for_bf16_inputs():
    batch, dim, state, time = 2, 4, 3, 5
    u, delta = torch.randn(batch, dim, time).bfloat16(), torch.rand(batch, dim, time).bfloat16()
    B, C = torch.randn(batch, state, time).bfloat16(), torch.randn(batch, state, time).bfloat16()
    A = -torch.rand(dim, state)
    out, last = scan_ops.selective_scan(u, delta, A, B, C, return_last_state=True)
    reference, reference_last = scan_ops.selective_scan_ref(
        u.double(), delta.double(), A.double(), B.double(), C.double(), return_last_state=True
    )
    assert out.dtype == torch.bfloat16
    assert last.dtype == torch.float32  # a decoding cache carries it without rounding to bf16
    torch.testing.assert_close(last.double(), reference_last, rtol=1e-5, atol=1e-6)
