"""Where a real recipe's training steps spend their time: a summary of SpeechBrain's profiler trace.

SpeechBrain profiles any recipe: ``--profile_training --profile_warmup W --profile_steps S`` traces S
training steps (data loading, host code, kernels) after W warm-up ones into
``<output_folder>/profiler_logs/`` and stops the run. This reads that trace and prints the mean step
time, the share of it during which the GPU ran anything (below 100 % it waited for the host: data,
Python, launches, synchronisations), how long the host waited for the data loader and for the GPU,
and the largest kernels; for a CPU run, the largest top-level operators instead.

    python train_CTC.py hparams/CTC/conmamba_large.yaml --data_folder D --precision bf16 \\
        --profile_training --profile_warmup 10 --profile_steps 5
    python bench/profile_recipe.py results/conmamba_large/3402/profiler_logs
"""

import argparse
import glob
import gzip
import json
import os
from collections import defaultdict

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# What the host waits for: the loader's next batch, and the GPU (runtime calls that block until it is done)
HOST_WAITS = {
    "the data loader": lambda e: e.get("name", "").startswith("enumerate(DataLoader)"),
    "the GPU (synchronisations)": lambda e: e.get("cat") == "cuda_runtime"
    and e.get("name") in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                          "cudaMemcpyAsync"),
}


def load_trace(path):
    """The events of a Chrome trace file, or of the newest one in a directory."""
    if os.path.isdir(path):
        files = glob.glob(os.path.join(path, "*.json")) + glob.glob(os.path.join(path, "*.json.gz"))
        if not files:
            raise FileNotFoundError(f"no trace (*.json) in {path}: run the recipe with --profile_training first")
        path = max(files, key=os.path.getmtime)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def busy_time(intervals):
    """Total length of the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def top_level(events):
    """The operators not nested inside another one on the same thread."""
    outer = []
    for thread in {e.get("tid") for e in events}:
        reach = float("-inf")
        for event in sorted((e for e in events if e.get("tid") == thread), key=lambda e: (e["ts"], -e["dur"])):
            if event["ts"] >= reach:
                outer.append(event)
                reach = event["ts"] + event["dur"]
    return outer


def summarize(events, rows=20):
    """Step time, device-busy share and the largest kernels (or top-level CPU operators), as text lines."""
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    # the host's step spans (a CUDA trace repeats them on the GPU's timeline, as gpu_user_annotation)
    steps = [
        e for e in complete
        if e.get("name", "").startswith("ProfilerStep#") and e.get("cat") != "gpu_user_annotation"
    ]
    if not steps:
        raise ValueError("the trace has no ProfilerStep# spans: is it a trace of SpeechBrain's --profile_training?")
    window = (min(e["ts"] for e in steps), max(e["ts"] + e["dur"] for e in steps))
    inside = [e for e in complete if window[0] <= e["ts"] < window[1]]
    step_us = (window[1] - window[0]) / len(steps)
    device = [e for e in inside if e.get("cat") in DEVICE_CATEGORIES]
    lines = [f"{len(steps)} steps, {step_us / 1e3:.1f} ms a step"]
    if device:
        busy = busy_time((e["ts"], min(e["ts"] + e["dur"], window[1])) for e in device)
        lines.append(f"GPU busy {busy / (window[1] - window[0]):.0%} of the steps")
        listed, what = device, "kernel"
    else:
        lines.append("no GPU activity in the trace (a CPU run)")
        listed, what = top_level([e for e in inside if e.get("cat") == "cpu_op"]), "top-level operator"
    for waited, matches in HOST_WAITS.items():
        waits = busy_time((e["ts"], e["ts"] + e["dur"]) for e in inside if matches(e))
        share = waits / (window[1] - window[0])
        lines.append(f"host waiting for {waited}: {waits / len(steps) / 1e3:.1f} ms a step ({share:.0%})")
    totals, calls = defaultdict(float), defaultdict(int)
    for event in listed:
        totals[event["name"]] += event["dur"]
        calls[event["name"]] += 1
    lines.append(f"| {what} | ms a step | share of the step | calls a step |")
    lines.append("|---|---|---|---|")
    for name in sorted(totals, key=totals.get, reverse=True)[:rows]:
        ms = totals[name] / len(steps) / 1e3
        lines.append(f"| {name[:90]} | {ms:.2f} | {ms * 1e3 / step_us:.1%} | {calls[name] / len(steps):g} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", help="a trace file, or the profiler_logs directory (its newest trace)")
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    print("\n".join(summarize(load_trace(args.trace), args.rows)))


if __name__ == "__main__":
    main()
