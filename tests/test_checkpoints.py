"""Checkpoints survive a killed save, a full disk and bad files (modules/training/checkpointing.py).

Small in-process checkpointers of a linear layer; the kill/resume of a whole training is in
test_resume.py.
"""

import errno
import logging
import os
import random
import re
import subprocess

import numpy as np
import pytest
import torch

from modules.training.checkpointing import CheckpointLoadError, SafeCheckpointer, average_checkpoints
from recipe_runs import ROOT, yaml_top_level
from reliability_report import record

pytestmark = pytest.mark.reliability


def checkpointer(folder, layer):
    """A SafeCheckpointer in folder with the layer as its recoverable "model"."""
    return SafeCheckpointer(folder, recoverables={"model": layer})


def save(ckpt, layer, value):
    """Fills the layer with value and saves a checkpoint; returns it."""
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(value)
    return ckpt.save_checkpoint(meta={"value": value})


def loaded_value(layer):
    """The value every parameter of the layer holds (as filled by save)."""
    values = {p.unique().item() for p in layer.parameters()}
    assert len(values) == 1
    return values.pop()


def saved_checkpoints(folder):
    """Folder names of the checkpoints a new checkpointer in folder would consider."""
    return sorted(c.path.name for c in SafeCheckpointer(folder).list_checkpoints())


def test_interrupted_save_is_never_loaded(tmp_path):
    layer = torch.nn.Linear(3, 4)
    ckpt = checkpointer(tmp_path, layer)
    previous = save(ckpt, layer, 1.0)

    def die(path):
        torch.save({}, path)  # half the files written...
        raise SystemExit("killed")  # ...then the process ends, no clean-up

    ckpt.add_recoverable("late", torch.nn.Linear(1, 1), custom_save_hook=lambda obj, path: die(path))
    with pytest.raises(SystemExit):
        save(ckpt, layer, 2.0)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("unfinished-")]
    assert len(leftovers) == 1 and (tmp_path / leftovers[0] / "CKPT.yaml").exists()
    assert saved_checkpoints(tmp_path) == [previous.path.name]

    fresh = torch.nn.Linear(3, 4)
    assert checkpointer(tmp_path, fresh).recover_if_possible().path == previous.path
    assert loaded_value(fresh) == 1.0
    save(checkpointer(tmp_path, fresh), fresh, 3.0)
    assert not any(p.name.startswith("unfinished-") for p in tmp_path.iterdir())
    record(
        "checkpoint save interrupted after CKPT.yaml and part of the files (process exits, no clean-up)",
        f"the half-written folder stays as {leftovers[0]} and is never listed; recovery loads the previous "
        "checkpoint; the next save removes the leftover",
    )


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    layer = torch.nn.Linear(3, 4)
    ckpt = checkpointer(tmp_path, layer)
    previous = save(ckpt, layer, 1.0)
    previous_bytes = (previous.path / "model.ckpt").read_bytes()

    def full_disk(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as error:
        ckpt.save_and_keep_only(meta={"value": 2.0})
    monkeypatch.undo()

    message = str(error.value)
    assert error.value.errno == errno.ENOSPC
    assert "Disk full while writing a checkpoint to" in message and "model.ckpt" in message
    assert f"previous checkpoint kept: {previous.path}" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [previous.path.name]
    assert (previous.path / "model.ckpt").read_bytes() == previous_bytes
    fresh = torch.nn.Linear(3, 4)
    checkpointer(tmp_path, fresh).recover_if_possible()
    assert loaded_value(fresh) == 1.0
    record("disk full (ENOSPC) while writing a checkpoint", f"training stops with: {message}; the previous "
           "checkpoint is byte-identical and loads; no partial checkpoint folder is left")


CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: os.urandom(len(data)),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_falls_back_to_previous(tmp_path, caplog, corruption):
    layer = torch.nn.Linear(3, 4)
    ckpt = checkpointer(tmp_path, layer)
    save(ckpt, layer, 1.0)
    latest = save(ckpt, layer, 2.0)
    bad_file = latest.path / "model.ckpt"
    bad_file.write_bytes(CORRUPTIONS[corruption](bad_file.read_bytes()))

    fresh = torch.nn.Linear(3, 4)
    with caplog.at_level(logging.WARNING):
        loaded = checkpointer(tmp_path, fresh).recover_if_possible()
    assert loaded.meta["value"] == 1.0 and loaded_value(fresh) == 1.0
    warning = next(r.getMessage() for r in caplog.records if "Falling back" in r.getMessage())
    assert f"Cannot load the checkpoint file {bad_file}" in warning
    assert "Falling back to the previous checkpoint" in warning
    record(f"{corruption} model.ckpt in the latest checkpoint", f"warning: {warning.splitlines()[0][:160]} ...; "
           "recovery falls back to the previous checkpoint")


def test_corrupt_only_checkpoint_raises_naming_the_file(tmp_path):
    layer = torch.nn.Linear(3, 4)
    only = save(checkpointer(tmp_path, layer), layer, 1.0)
    bad_file = only.path / "model.ckpt"
    bad_file.write_bytes(bad_file.read_bytes()[:100])
    with pytest.raises(CheckpointLoadError, match=re.escape(f"Cannot load the checkpoint file {bad_file}")):
        checkpointer(tmp_path, torch.nn.Linear(3, 4)).recover_if_possible()


def test_checkpoint_average_leaves_out_a_corrupt_file(tmp_path, caplog):
    layer = torch.nn.Linear(3, 4)
    ckpt = checkpointer(tmp_path, layer)
    saved = [save(ckpt, layer, value) for value in (1.0, 2.0, 6.0)]
    bad_file = saved[-1].path / "model.ckpt"
    bad_file.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        averaged = average_checkpoints(saved, "model")
    assert {v.unique().item() for v in averaged.values()} == {1.5}
    assert f"Cannot load the checkpoint file {bad_file}" in caplog.text
    assert "Left out of the checkpoint average" in caplog.text


def test_checkpoint_of_another_model_raises_naming_the_file(tmp_path):
    layer = torch.nn.Linear(3, 4)
    saved = save(checkpointer(tmp_path, layer), layer, 1.0)
    with pytest.raises(CheckpointLoadError) as error:
        checkpointer(tmp_path, torch.nn.Linear(5, 4)).recover_if_possible()
    message = str(error.value)
    assert f"Cannot load the checkpoint file {saved.path / 'model.ckpt'}" in message
    assert "size mismatch" in message and "different model or configuration" in message
    record("checkpoint of another model (Linear(3, 4) loaded into Linear(5, 4))", " ".join(message.split())[:300])


class OpensAFile:
    """Unpickling it would create a file: code run by loading a checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("torch_default", ["weights only", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def test_checkpoint_loading_runs_no_pickled_code(tmp_path, monkeypatch, torch_default):
    """SpeechBrain's hooks call torch.load without weights_only: the environment variable turned torch's
    default off and the payload ran on resume."""
    if torch_default != "weights only":
        monkeypatch.setenv(*torch_default.split("="))
    layer = torch.nn.Linear(3, 4)
    saved = save(checkpointer(tmp_path, layer), layer, 1.0)
    marker = tmp_path / "code_ran"
    torch.save({"weight": OpensAFile(str(marker))}, saved.path / "model.ckpt")
    with pytest.raises(CheckpointLoadError, match="Weights only load failed"):
        checkpointer(tmp_path, torch.nn.Linear(3, 4)).recover_if_possible()
    assert not marker.exists()
    if torch_default != "weights only":
        record(
            "pickle payload in model.ckpt, resumed with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1",
            "not run: every torch.load of a checkpoint passes weights_only=True (also SpeechBrain's hooks'); "
            "CheckpointLoadError 'Weights only load failed' names the file",
        )


def test_random_state_is_restored(tmp_path):
    layer = torch.nn.Linear(3, 4)
    ckpt = checkpointer(tmp_path, layer)
    ckpt.save_checkpoint()

    def draws():
        return random.random(), np.random.rand(), torch.rand(3).tolist(), torch.nn.functional.dropout(
            torch.ones(8)
        ).tolist()

    expected = draws()
    draws()
    ckpt.recover_if_possible()
    assert draws() == expected


def test_every_recipe_yaml_uses_the_safe_checkpointer():
    recipes = ("CTC", "S2S", "decoder_only")
    yamls = [os.path.join(ROOT, "hparams", r, f) for r in recipes for f in os.listdir(os.path.join(ROOT, "hparams", r))]
    tags = {path: yaml_top_level(path)["checkpointer"][0] for path in yamls}
    assert len(tags) > 3 * 3
    assert set(tags.values()) == {"!new:modules.training.checkpointing.SafeCheckpointer"}, tags


def test_a_corrupt_checkpoint_leaves_the_kept_set_after_the_fallback(tmp_path, caplog):
    """Training keeps the 2 latest checkpoints; the latest is truncated; the run resumes from the previous
    one and saves again: the 2 kept must be the valid ones, and the test average must use both."""
    layer = torch.nn.Linear(3, 4)
    ckpt = checkpointer(tmp_path, layer)
    first, second = save(ckpt, layer, 1.0), save(ckpt, layer, 2.0)
    truncated = (second.path / "model.ckpt").read_bytes()[:100]
    (second.path / "model.ckpt").write_bytes(truncated)

    resumed = torch.nn.Linear(3, 4)
    ckpt = checkpointer(tmp_path, resumed)
    with caplog.at_level(logging.WARNING):
        assert ckpt.recover_if_possible().path == first.path
    with torch.no_grad():
        resumed.weight.fill_(3.0)
        resumed.bias.fill_(3.0)
    ckpt.save_and_keep_only(meta={"value": 3.0}, num_to_keep=2)

    kept = sorted(c.meta["value"] for c in ckpt.list_checkpoints())
    assert kept == [1.0, 3.0]
    aside = tmp_path / f"corrupt-{second.path.name}"
    assert (aside / "model.ckpt").read_bytes() == truncated  # renamed, not deleted
    assert f"Moved the checkpoint that failed to load to {aside}" in caplog.text
    averaged = average_checkpoints(ckpt.find_checkpoints(max_num_checkpoints=2), "model")
    assert {v.unique().item() for v in averaged.values()} == {2.0}
    record(
        "latest of 2 kept checkpoints truncated, training resumed and saved again (num_to_keep 2)",
        f"recovery falls back to the previous checkpoint and renames the bad one to corrupt-CKPT+<time>; kept "
        f"after the next save: the checkpoints of values {kept} (both valid), and the test average uses 2 of 2",
    )


@pytest.fixture
def small_filesystem(tmp_path):
    """A 512 KiB tmpfs mounted at tmp_path/small (needs root, as in CI); skips where it cannot be mounted."""
    folder = tmp_path / "small"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # torch may still hold the failed file open


def test_a_real_full_disk_is_reported_as_disk_full(small_filesystem):
    """torch raises '[enforce fail at inline_container.cc:672]' without an errno when the disk fills up."""
    layer = torch.nn.Linear(100, 100)  # a 40 KB checkpoint
    ckpt = checkpointer(small_filesystem, layer)
    previous = save(ckpt, layer, 1.0)
    ckpt.add_recoverable("big", torch.nn.Linear(400, 400))  # 640 KB more: does not fit

    with pytest.raises(OSError) as error:
        ckpt.save_and_keep_only(meta={"value": 2.0})

    message = str(error.value)
    assert error.value.errno == errno.ENOSPC, message
    assert "inline_container.cc" in repr(error.value.__cause__)
    assert message == f"[Errno 28] Disk full while writing a checkpoint to {small_filesystem}; previous checkpoint kept: {previous.path}"
    assert sorted(p.name for p in small_filesystem.iterdir()) == [previous.path.name]
    fresh = torch.nn.Linear(100, 100)
    checkpointer(small_filesystem, fresh).recover_if_possible()
    assert loaded_value(fresh) == 1.0
    record(
        "a real full disk (512 KiB tmpfs) while writing a checkpoint",
        f"torch raises {error.value.__cause__!r:.80} without an errno; training stops with: {message}; the previous "
        "checkpoint loads, no partial checkpoint folder is left",
    )
