"""A SpeechBrain ``Checkpointer`` that a killed job, a full disk or a bad file cannot mislead.

SpeechBrain 1.1.2 writes a checkpoint's ``CKPT.yaml`` first and its parameter files after, so a
job killed while saving leaves a folder that the next run takes for a valid checkpoint. Here a
checkpoint is written into ``unfinished-CKPT+...`` and renamed to ``CKPT+...`` (atomic) once
complete; a save that fails removes its folder, keeps the previous checkpoints and says why. A
file that cannot be loaded (truncated, garbage, another model's) is named in the error, and
recovery falls back to the previous checkpoint with a warning; the checkpoint that failed is renamed
``corrupt-CKPT+...``, out of the set of kept checkpoints. Every torch file is loaded with
``weights_only=True``, also through SpeechBrain's hooks, which call ``torch.load`` without the
argument (:func:`weights_only_loading`): torch's default would otherwise decide, and
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns it off. The checkpoints also
hold the random generators' states, so that a resumed run draws the same dropout and
augmentation as an uninterrupted one.
"""

import contextlib
import errno
import functools
import logging
import os
import random
import shutil

import numpy as np
import torch
from speechbrain.dataio.dataloader import SaveableDataLoader
from speechbrain.utils.checkpoints import (
    DEFAULT_LOAD_HOOKS,
    Checkpoint,
    Checkpointer,
    average_state_dicts,
    get_default_hook,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import ddp_barrier, if_main_process

logger = logging.getLogger(__name__)

UNFINISHED_PREFIX = "unfinished-"
CORRUPT_PREFIX = "corrupt-"
# torch's zip writer fails on a full disk without an errno ("[enforce fail at inline_container.cc:672] .
# unexpected pos ..."): a save is taken to have filled the disk if less than this is free when it fails
DISK_FULL_BYTES = 1 << 20


@contextlib.contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """Opens ``path`` + ``.partial`` for writing (``open``'s ``mode`` and keyword arguments; text is UTF-8)
    and renames it to ``path`` when the block ends: a run killed or failing half-way never leaves a
    truncated file under ``path`` (on an error the partial file is removed). Every file that the recipes
    write to be found again (manifests, tokenizer records and texts, k-means, word LMs) goes through here.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "record.json")
    >>> with atomic_write(path) as f:
    ...     _ = f.write("{}")
    >>> open(path).read()
    '{}'
    """
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    partial = f"{path}.partial"
    try:
        with open(partial, mode, **open_kwargs) as f:
            yield f
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


class CheckpointLoadError(RuntimeError):
    """A checkpoint file that cannot be loaded into its object."""


class SafeCheckpointer(Checkpointer):
    """``Checkpointer`` with atomic saves, named load errors, fallback to the previous checkpoint,
    and the random generators' states as the recoverable ``random_state``.

    Arguments are those of SpeechBrain's ``Checkpointer``.
    """

    def __init__(self, checkpoints_dir, recoverables=None, **kwargs):
        super().__init__(checkpoints_dir, recoverables, **kwargs)
        # Optional: checkpoints written before it existed still load.
        self.add_recoverable("random_state", RandomState(), optional_load=True)

    def save_checkpoint(self, meta={}, end_of_epoch=True, name=None, verbosity=logging.INFO):
        """Saves into an ``unfinished-`` folder and renames it to its checkpoint name when complete."""
        self._remove_unfinished()
        try:
            unfinished = super().save_checkpoint(meta, end_of_epoch, name, verbosity=logging.DEBUG)
            ddp_barrier()  # every process has written its files
        except Exception as error:
            save_error = self._save_error(error)  # before the clean-up frees the space the save filled
            self._remove_unfinished()
            raise save_error from error
        if unfinished is None:  # not the main process
            return None
        path = unfinished.path.with_name(unfinished.path.name[len(UNFINISHED_PREFIX):])
        if path.exists():  # a named checkpoint saved again
            shutil.rmtree(path)
        unfinished.path.rename(path)
        kind = "end-of-epoch" if end_of_epoch else "intra-epoch"
        logger.log(verbosity, f"Saved an {kind} checkpoint in {path}")
        paramfiles = {name: path / file.name for name, file in unfinished.paramfiles.items()}
        return Checkpoint(path, unfinished.meta, paramfiles)

    def recover_if_possible(self, importance_key=None, max_key=None, min_key=None, ckpt_predicate=None):
        """Loads the checkpoint SpeechBrain would pick; if a file of it cannot be loaded, warns and
        loads the next one in the same order (the previous one, or the next best by the key)."""
        candidates = self.find_checkpoints(importance_key, max_key, min_key, ckpt_predicate)
        if not candidates:
            logger.info("Would load a checkpoint here, but none found yet.")
            return None
        unloadable = []
        for checkpoint, fallback in zip(candidates, candidates[1:] + [None]):
            try:
                self.load_checkpoint(checkpoint)
            except CheckpointLoadError as error:
                if fallback is None:
                    raise
                logger.warning(f"{error}\nFalling back to the previous checkpoint {fallback.path}.")
                unloadable.append(checkpoint)
                continue
            self._set_aside(unloadable)
            return checkpoint

    def load_checkpoint(self, checkpoint):
        """Loads a checkpoint; a file that fails raises :class:`CheckpointLoadError` naming it.

        Data loader positions load last, so that a checkpoint failing half-way leaves no loader
        set to skip batches when the fallback checkpoint is an end-of-epoch one.
        """
        hooks = {}
        for name, obj in self.recoverables.items():
            hook = self.custom_load_hooks.get(name) or get_default_hook(obj, DEFAULT_LOAD_HOOKS)
            if hook is not None:
                hooks[name] = _naming_the_file(hook)
        own_hooks, own_order = self.custom_load_hooks, self.recoverables
        self.custom_load_hooks = hooks
        self.recoverables = dict(
            sorted(own_order.items(), key=lambda item: isinstance(item[1], SaveableDataLoader))
        )
        try:
            with weights_only_loading():
                super().load_checkpoint(checkpoint)
        finally:
            self.custom_load_hooks, self.recoverables = own_hooks, own_order

    def _set_aside(self, checkpoints):
        """Renames checkpoints that failed to load while an older one loaded to ``corrupt-CKPT+...``.

        Left in place, they would count among the ``num_to_keep`` kept checkpoints, pushing out a valid
        one, and be averaged at test. They are renamed, not deleted, so that they can be inspected.
        """
        if not checkpoints:
            return
        ddp_barrier()  # every process has loaded the fallback
        if not if_main_process():
            return
        for checkpoint in checkpoints:
            aside = checkpoint.path.with_name(CORRUPT_PREFIX + checkpoint.path.name)
            checkpoint.path.rename(aside)
            logger.warning(
                f"Moved the checkpoint that failed to load to {aside}: it no longer counts among the kept "
                "checkpoints. Delete it once inspected."
            )

    def _remove_unfinished(self):
        """Removes the folders of saves that did not finish (this run's or a killed run's)."""
        if if_main_process():
            for path in self.checkpoints_dir.glob(UNFINISHED_PREFIX + "*"):
                shutil.rmtree(path, ignore_errors=True)

    def _new_checkpoint_dirpath(self):
        """Where a new checkpoint is written: beside its final place, under an unfinished name."""
        path = super()._new_checkpoint_dirpath()
        return path.with_name(UNFINISHED_PREFIX + path.name)

    def _custom_checkpoint_dirpath(self, name):
        path = super()._custom_checkpoint_dirpath(name)
        return path.with_name(UNFINISHED_PREFIX + path.name)

    def _save_error(self, error):
        """The error to raise for a failed save: what failed, whether the disk is full, what is kept."""
        where = getattr(error, "filename", None) or self.checkpoints_dir
        disk_full = getattr(error, "errno", None) == errno.ENOSPC
        disk_full = disk_full or shutil.disk_usage(self.checkpoints_dir).free < DISK_FULL_BYTES
        previous = self.find_checkpoint()
        kept = f"previous checkpoint kept: {previous.path}" if previous else "no previous checkpoint"
        if disk_full:
            return OSError(errno.ENOSPC, f"Disk full while writing a checkpoint to {where}; {kept}")
        return RuntimeError(f"Could not write a checkpoint to {where} ({error}); {kept}")


def average_checkpoints(checkpoints, recoverable_name):
    """The average of a recoverable's parameters over the checkpoints (on the CPU), like
    SpeechBrain's ``average_checkpoints``, but a checkpoint whose file does not load is left out
    with a warning naming it, so that one bad file does not stop testing."""
    averaged = []

    def loadable():
        for checkpoint in checkpoints:
            path = checkpoint.paramfiles[recoverable_name]
            try:
                with errors_naming(path):
                    state_dict = torch.load(path, map_location="cpu", weights_only=True)
            except CheckpointLoadError as error:
                logger.warning(f"{error}\nLeft out of the checkpoint average.")
                continue
            averaged.append(checkpoint)
            yield state_dict

    state_dict = average_state_dicts(loadable())
    logger.info(f"Averaged {recoverable_name} over {len(averaged)} of {len(checkpoints)} checkpoints.")
    return state_dict


def _naming_the_file(hook):
    """The load hook with its errors turned into :class:`CheckpointLoadError` naming the file."""

    def load(obj, path, end_of_epoch):
        with errors_naming(path):
            hook(obj, path, end_of_epoch)

    return load


@contextlib.contextmanager
def weights_only_loading():
    """Makes every ``torch.load`` in the block load with ``weights_only=True``, and raise
    :class:`CheckpointLoadError` naming the file if it fails.

    SpeechBrain's checkpoint hooks and its ``Pretrainer`` call ``torch.load`` without ``weights_only``,
    so a pickled payload in a checkpoint or an inference folder would run wherever torch's default is
    off (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``). ``torch.load`` is swapped for the block: loading is
    single-threaded here.
    """
    load = torch.load

    @functools.wraps(load)
    def load_weights_only(f, *args, **kwargs):
        kwargs["weights_only"] = True
        with errors_naming(f):
            return load(f, *args, **kwargs)

    torch.load = load_weights_only
    try:
        yield
    finally:
        torch.load = load


@contextlib.contextmanager
def errors_naming(path):
    """Turns an error while loading ``path`` into :class:`CheckpointLoadError` naming the file and the likely cause."""
    try:
        yield
    except CheckpointLoadError:
        raise  # names its file already
    except Exception as error:
        raise CheckpointLoadError(
            f"Cannot load the checkpoint file {path}: {type(error).__name__}: {error}\n"
            "The file is truncated or corrupt, or was written by a different model or "
            "configuration (then train in a new output_folder)."
        ) from error


@register_checkpoint_hooks
class RandomState:
    """The states of Python's, NumPy's and torch's (CPU and CUDA) global random generators."""

    @mark_as_saver
    def save(self, path):
        """Saves the states as tensors and plain values, loadable with ``weights_only=True``."""
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(state, path)

    @mark_as_loader
    def load(self, path, end_of_epoch):
        """Restores the states; CUDA ones only where the same number of GPUs is visible."""
        del end_of_epoch  # the same either way
        state = torch.load(path, weights_only=True)
        random.setstate(state["python"])
        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda")
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
