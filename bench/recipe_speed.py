"""How fast a real recipe trains: seconds per training epoch and how busy the GPU is meanwhile.

    python bench/recipe_speed.py train_CTC.py hparams/CTC/conmamba_large.yaml --data_folder D --number_of_epochs 2
    python bench/recipe_speed.py --syncs train_CTC.py ...   # also: where the training steps wait for the GPU
    python bench/recipe_speed.py --profile 45:3 train_CTC.py ...   # also: operators of steps 45-47
    python bench/recipe_speed.py --settle 8 train_CTC.py ...   # steady figures from each epoch's step 9

Runs the training script in this process, unchanged (any recipe built on ``RecipeBrain``), and times each
epoch's training stage from the start of its first step to the end of its last, the GPU's queued work
included. On CUDA it samples NVML's utilisation every 50 ms (the share of the last sampling period in
which a kernel ran) and reports its mean over each training stage: below 100 % the GPU waited for the
host (data loading, Python, launches, synchronisations).

The last column counts the buckets of batch shapes whose CUDA graphs (``cuda_graphs: True``, forward
and backward, of each graphed module) were recorded during each epoch, at their first batch, and the
host time the recordings took out of the epoch.

Each epoch's first steps wait for the loader's workers to start and read their first batches, a fixed
cost of each epoch that a small corpus's few steps magnify (a LibriSpeech epoch has thousands of steps).
So the rate and utilisation are also given for the steady part of each epoch: after its first
``--settle`` steps.

With ``--syncs`` every host-device synchronisation made inside a training step is counted by the line
of code that made it (``torch.cuda.set_sync_debug_mode``); a sync stops the host from queueing work
ahead of the GPU. So is every read of pageable host memory onto the GPU, before which the driver may
wait for the GPU (CUDA Runtime API reference, "API synchronization behavior"), a wait that the sync
debug mode does not report; every ATen call then goes through Python, so such a run's times are not
the recipe's. ``bench/profile_recipe.py`` shows what the GPU does during the steps.
"""

import argparse
import contextlib
import os
import runpy
import sys
import threading
import time
import traceback
import warnings
from collections import Counter

import speechbrain as sb
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from modules.training.cuda_graphs import installed_graphs  # noqa: E402
from modules.training.recipe import RecipeBrain  # noqa: E402


class UtilisationSampler(threading.Thread):
    """(time, GPU utilisation %) every ``period`` seconds through NVML, while running."""

    def __init__(self, device_index=0, period=0.05):
        super().__init__(daemon=True)
        import pynvml  # nvidia-ml-py, present wherever the NVIDIA driver is

        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        self.read = lambda: pynvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
        self.period, self.samples, self.running = period, [], True

    def run(self):
        while self.running:
            self.samples.append((time.perf_counter(), self.read()))
            time.sleep(self.period)

    def mean_between(self, start, end):
        """Mean utilisation of the samples taken in [start, end], or None."""
        inside = [value for moment, value in self.samples if start <= moment <= end]
        return sum(inside) / len(inside) if inside else None


def call_site():
    """The innermost line of repository or SpeechBrain code (outside bench/) on the caller's stack."""
    stack = traceback.extract_stack()[:-2]
    ours = [f for f in stack if f.filename.startswith(ROOT) and "bench" not in f.filename]
    library = [f for f in stack if f"{os.sep}speechbrain{os.sep}" in f.filename]
    frame = (ours or library or stack)[-1]
    return f"{os.path.relpath(frame.filename, ROOT)}:{frame.lineno} {frame.line}"


def pageable_upload(func, args, kwargs):
    """Whether the ATen call ``func(*args, **kwargs)`` reads a tensor of pageable host memory onto a GPU:
    a copy to a GPU (``_to_copy``, ``copy_``) or an operation of GPU tensors given a CPU one (e.g. an
    index), 0-dim CPU tensors aside (passed as values)."""
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]  # lists too (indices)
    if func is torch.ops.aten._to_copy.default:
        to_gpu = torch.device(kwargs.get("device") or tensors[0].device).type == "cuda"
    else:
        to_gpu = any(t.device.type == "cuda" for t in tensors)
    return to_gpu and any(t.device.type == "cpu" and t.dim() > 0 and not t.is_pinned() for t in tensors)


class PageableUploads(TorchDispatchMode):
    """Counts in ``sites`` the ATen calls that read pageable host memory onto a GPU (:func:`pageable_upload`),
    by :func:`call_site`."""

    def __init__(self, sites):
        super().__init__()
        self.sites = sites

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if pageable_upload(func, args, kwargs):
            self.sites[call_site()] += 1
        return func(*args, **kwargs)


class SyncCounter:
    """Counts, while active, the host-device synchronisations (``torch.cuda.set_sync_debug_mode``) and the
    reads of pageable host memory onto the GPU (:class:`PageableUploads`; the driver may first wait for
    the GPU, which the sync debug mode does not report), each by the line of code that made it."""

    def __init__(self):
        self.sites, self.uploads, self.active, self.steps = Counter(), Counter(), False, 0

    def __enter__(self):
        self.active = True
        torch.cuda.set_sync_debug_mode("warn")
        self.mode = PageableUploads(self.uploads)
        self.mode.__enter__()

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        torch.cuda.set_sync_debug_mode("default")
        self.active = False

    def record(self, message, category, filename, lineno, file=None, line=None):
        if not (self.active and "synchroniz" in str(message)):
            return self.show(message, category, filename, lineno, file, line)
        self.sites[call_site()] += 1

    def install(self):
        self.show = warnings.showwarning
        warnings.showwarning = self.record
        warnings.simplefilter("always")


PHASES = ("compute_forward", "compute_objectives", "optimizers_step")


class StepProfiler:
    """torch.profiler over training steps ``first`` .. ``first + count - 1`` (counted over the whole run,
    from 1): the operators by host time spent in them, and by GPU time."""

    def __init__(self, first, count):
        self.first, self.count, self.step, self.profiler, self.tables = first, count, 0, None, []

    def before_step(self):
        self.step += 1
        if self.step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()

    def after_step(self):
        if self.profiler is not None and self.step == self.first + self.count - 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.stop()
            averages = self.profiler.key_averages()
            self.tables.append(f"profile of steps {self.first}-{self.step}, by host time:")
            self.tables.append(averages.table(sort_by="self_cpu_time_total", row_limit=25))
            if torch.cuda.is_available():
                self.tables.append("by GPU time:")
                self.tables.append(averages.table(sort_by="self_device_time_total", row_limit=15))
            self.profiler = None


def instrument(epochs, syncs, profiler=None):
    """Wraps RecipeBrain's training step and stage end to time each epoch's training stage, and the
    brain's hooks to time how long the host spends issuing each phase of a step (without waiting)."""
    fit_batch, on_stage_end = RecipeBrain.fit_batch, RecipeBrain.on_stage_end
    current = {}

    def timed(phase, method):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                if current:
                    current[phase] += time.perf_counter() - start

        return run

    def timed_fit_batch(brain, batch):
        now = time.perf_counter()
        if not current:
            current.update(epoch=brain.hparams.epoch_counter.current, start=now, steps=0, between=0.0, step=0.0,
                           step_ends=[], waits=[])
            current.update({phase: 0.0 for phase in PHASES}, last=now)
            for phase in PHASES:
                if not hasattr(getattr(brain, phase), "__wrapped_phase__"):
                    setattr(brain, phase, timed(phase, getattr(brain, phase)))
                    getattr(brain, phase).__wrapped_phase__ = True
        current["between"] += now - current["last"]  # the loader's next batch, the loop's bookkeeping
        current["waits"].append(current["between"])
        if profiler is not None:
            profiler.before_step()
        with syncs if syncs is not None else contextlib.nullcontext():
            loss = fit_batch(brain, batch)
        if profiler is not None:
            profiler.after_step()
        current["last"] = time.perf_counter()
        current["step"] += current["last"] - now
        current["steps"] += 1
        current["step_ends"].append(current["last"])
        if syncs is not None:
            syncs.steps += 1
        return loss

    def timed_on_stage_end(brain, stage, *args, **kwargs):
        if stage == sb.Stage.TRAIN and current:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            graphs = installed_graphs(brain.modules)
            recorded = (sum(len(g.graphs) for g in graphs), sum(g.recording_seconds for g in graphs))
            epochs.append(dict(current, end=time.perf_counter(), recorded=recorded))
            current.clear()
        return on_stage_end(brain, stage, *args, **kwargs)

    RecipeBrain.fit_batch, RecipeBrain.on_stage_end = timed_fit_batch, timed_on_stage_end


def report(epochs, sampler, syncs, profiler=None, settle=5):
    """The results as text lines; the steady columns leave out each epoch's first ``settle`` steps."""

    def utilisation(start, end):
        mean = sampler.mean_between(start, end) if sampler else None
        return f"{mean:.0f} %" if mean is not None else "n/a"

    lines = list(profiler.tables) if profiler is not None else []
    lines += [
        "| epoch | training steps | seconds | steps/s | mean GPU utilisation | steady steps/s | steady GPU utilisation "
        "| buckets recorded as CUDA graphs (host s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    before = (0, 0.0)  # graphs recorded and their host time up to the previous epoch
    for e in epochs:
        seconds = e["end"] - e["start"]
        row = f"| {e['epoch']} | {e['steps']} | {seconds:.2f} | {e['steps'] / seconds:.2f} | "
        row += utilisation(e["start"], e["end"])
        if e["steps"] > settle:
            settled = e["step_ends"][settle - 1] if settle else e["start"]
            row += f" | {(e['steps'] - settle) / (e['end'] - settled):.2f} | {utilisation(settled, e['end'])} |"
        else:
            row += " | n/a | n/a |"
        graphs, recording = (now - then for now, then in zip(e["recorded"], before))
        row += f" {graphs} ({recording:.1f} s) |"
        before = e["recorded"]
        lines.append(row)
    if epochs:
        e = epochs[-1]
        per_step = {phase: 1e3 * e[phase] / e["steps"] for phase in PHASES}
        per_step["backward and the rest of the step"] = 1e3 * (e["step"] - sum(e[p] for p in PHASES)) / e["steps"]
        per_step["between steps (loader, loop)"] = 1e3 * e["between"] / e["steps"]
        wall = 1e3 * (e["end"] - e["start"]) / e["steps"]
        lines.append(f"host time per step of epoch {e['epoch']}, without waiting for the GPU unless a phase syncs "
                     f"(wall {wall:.1f} ms a step):")
        lines += [f"  {ms:7.1f} ms  {phase}" for phase, ms in per_step.items()]
        if e["steps"] > settle:
            steady = e["between"] - (e["waits"][settle - 1] if settle else 0.0)
            lines.append(f"  {1e3 * steady / (e['steps'] - settle):7.1f} ms  between steps after the first {settle}")
    if syncs is not None:
        steps = syncs.steps or 1
        titles = {
            f"host-device synchronisations inside training steps, per step ({steps} steps):": syncs.sites,
            "reads of pageable host memory onto the GPU inside training steps, per step (the driver may wait for "
            "the GPU first):": syncs.uploads,
        }
        for title, sites in titles.items():
            lines.append(title)
            lines += [f"  {count / steps:6.2f}  {site}" for site, count in sites.most_common()] or ["  none"]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--syncs", action="store_true", help="count the synchronisations of the training steps")
    parser.add_argument("--profile", metavar="FIRST:COUNT", help="profile COUNT training steps from step FIRST (of the "
                        "run, from 1): the operators by host time and by GPU time")
    parser.add_argument("--settle", type=int, default=5, metavar="N", help="the steady columns leave out each "
                        "epoch's first N steps (default 5), which wait for the loader's workers to start")
    parser.add_argument("script", help="the training script, e.g. train_CTC.py")
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="its yaml file and overrides")
    args = parser.parse_args()

    epochs = []
    syncs = None
    if args.syncs and torch.cuda.is_available():
        syncs = SyncCounter()
        syncs.install()
    profiler = StepProfiler(*(int(n) for n in args.profile.split(":"))) if args.profile else None
    instrument(epochs, syncs, profiler)
    sampler = UtilisationSampler() if torch.cuda.is_available() else None
    if sampler:
        sampler.start()
    sys.argv = [args.script, *args.arguments]
    try:
        runpy.run_path(args.script, run_name="__main__")
    finally:
        if sampler:
            sampler.running = False
        print("\n".join(report(epochs, sampler, syncs, profiler, args.settle)), flush=True)


if __name__ == "__main__":
    main()
