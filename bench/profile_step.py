"""Where one encoder training step spends its GPU time: torch.profiler over a few steps of a model of
``bench/benchmark.py``, the kernels grouped by name with their share of the step.

    python bench/profile_step.py --model conmamba --size ctc_large --seconds 12 --audio-per-batch 850
    python bench/profile_step.py --model conformer_sdpa --ragged --trace /tmp/trace.json   # Chrome trace too

Prints the step time (CUDA events), the GPU-busy share of it (the sum of kernel times over the wall
time; below 100 % the GPU waits for the host), and the top kernels by total time.
"""

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.benchmark import DTYPES, FRAME_SECONDS, SIZES, build_model, utterance_frames  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="conmamba", help="a model name of bench/benchmark.py")
    parser.add_argument("--size", choices=list(SIZES), default="ctc_large")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--audio-per-batch", type=float, default=850.0)
    parser.add_argument("--ragged", action="store_true", help="lengths from half to all of --seconds")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 3 warm-up steps)")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--trace", help="also write a Chrome trace here")
    args = parser.parse_args()

    size = dict(SIZES[args.size], kernel_size=31)
    frames = round(args.seconds / FRAME_SECONDS)
    batch = max(1, int(args.audio_per_batch // args.seconds))
    torch.manual_seed(0)
    model = build_model(args.model, "encoder", size, dropout=0.1).cuda().train()
    x = torch.randn(batch, frames, size["d_model"], device="cuda")
    lengths = utterance_frames(batch, frames, args.ragged).cuda()
    padding_mask = torch.arange(frames, device="cuda") >= lengths[:, None]

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=DTYPES[args.dtype]):
            y = model(x, padding_mask)
        (y.float() ** 2).mean().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        start.record()
        for _ in range(args.steps):
            step()
        end.record()
        torch.cuda.synchronize()
    step_ms = start.elapsed_time(end) / args.steps
    events = [e for e in profiler.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    busy_ms = sum(e.device_time_total for e in events) / 1e3 / args.steps
    print(f"{args.model}, {args.size}, {args.seconds:g} s x {batch}{' (ragged)' if args.ragged else ''}, {args.dtype}: "
          f"step {step_ms:.1f} ms, kernels {busy_ms:.1f} ms ({busy_ms / step_ms:.0%} of the step)")
    print("| kernel | ms per step | share | calls per step |\n|---|---|---|---|")
    for event in sorted(events, key=lambda e: -e.device_time_total)[: args.rows]:
        ms = event.device_time_total / 1e3 / args.steps
        print(f"| {event.key[:90]} | {ms:.2f} | {ms / step_ms:.1%} | {event.count // args.steps} |")
    if args.trace:
        profiler.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
