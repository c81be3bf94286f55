"""The selective scan against its physical floor: bytes it must move, FLOPs it must do, and the share
of the device's measured memory bandwidth it reaches.

For each shape the script counts the least traffic a scan can have (every input read once, every
output written once, the state kept on chip) and its arithmetic, times ``selective_scan``
(``modules/mamba/selective_scan.py``: the mamba_ssm kernel on a GPU, the PyTorch scan otherwise),
and measures the bandwidth of a large device-to-device copy. ``bytes / time`` over the copy
bandwidth says how far the scan is from being memory-bound at full speed; FLOPs per byte says
whether it could be compute-bound instead.

Two layouts per shape: one direction (``dim`` channels, one B/C group) and the one-scan BiMamba of
``modules/mamba/mamba.py`` (``2 * dim`` channels, B/C as two groups).

    python bench/scan_floor.py --smoke --device cpu               # tiny shapes, seconds (the test)
    python bench/scan_floor.py --d-models 256,512 --frames 500,1000,2000 --batch 16 --out results/floor

Counts, per scan of ``batch x channels x frames`` with ``state`` states and ``groups`` B/C groups,
``s`` bytes per input element (2 for bf16), gradients of B and C in float32 (as the kernel writes
them):

* forward bytes: u, delta, z read and out written (``4 s b c t``), B and C read (``2 s b g n t``),
  A, D and the delta bias (float32, negligible);
* backward bytes: u, delta, z, B, C and the output gradient read, du, ddelta, dz written
  (``7 s b c t + 2 s b g n t``) and dB, dC written in float32 (``8 b g n t``);
* forward FLOPs: ``6 b c t n`` for the recurrence and the readout (delta*A, delta*B*u, a*h + bu,
  C*h) plus one exp per ``(b, c, t, n)``, counted apart; the backward does about twice that.
"""

import argparse
import json
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.benchmark import DTYPES, median_ms, write_results  # noqa: E402
from modules.mamba.selective_scan import selective_scan  # noqa: E402

logger = logging.getLogger("scan_floor")


def floor_counts(batch, channels, frames, state, groups, element_bytes):
    """Least bytes moved and FLOPs done by a forward and a backward scan of this shape."""
    sequence = batch * channels * frames
    bc = batch * groups * state * frames
    return dict(
        forward_bytes=4 * element_bytes * sequence + 2 * element_bytes * bc,
        backward_bytes=7 * element_bytes * sequence + 2 * element_bytes * bc + 8 * bc,
        forward_flops=6 * sequence * state,
        backward_flops=12 * sequence * state,
        exps=sequence * state,
    )


def scan_inputs(batch, channels, frames, state, groups, dtype, device):
    """Random scan inputs of a Mamba mixer's shapes and ranges, with gradients."""
    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=device)).to(dtype).requires_grad_()

    u, z = randn(batch, channels, frames), randn(batch, channels, frames)
    delta = randn(batch, channels, frames, scale=0.5)
    B, C = randn(batch, groups, state, frames), randn(batch, groups, state, frames)
    A = (-torch.arange(1, state + 1, device=device, dtype=torch.float32)).repeat(channels, 1).requires_grad_()
    D = torch.ones(channels, device=device, requires_grad=True)
    delta_bias = torch.full((channels,), -3.0, device=device, requires_grad=True)
    return u, delta, A, B, C, D, z, delta_bias


def copy_bandwidth(device, mebibytes, warmup, repeats):
    """Bytes per second of a device-to-device copy (read + write) of ``mebibytes``."""
    source = torch.empty(mebibytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source), device, warmup, repeats)
    return 2 * source.numel() / (ms / 1e3)


def measure(batch, channels, frames, state, groups, dtype, device, warmup, repeats):
    """Forward and forward+backward milliseconds of one scan of this shape."""
    inputs = scan_inputs(batch, channels, frames, state, groups, dtype, device)
    grad = torch.randn(batch, channels, frames, device=device).to(dtype)

    def forward():
        with torch.no_grad():
            selective_scan(*inputs, delta_softplus=True)

    def forward_backward():
        for tensor in inputs:
            tensor.grad = None  # no accumulation into earlier gradients
        selective_scan(*inputs, delta_softplus=True).backward(grad)

    return median_ms(forward, device, warmup, repeats), median_ms(forward_backward, device, warmup, repeats)


def run(args):
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    element_bytes = torch.tensor([], dtype=dtype).element_size()
    bandwidth = copy_bandwidth(device, args.copy_mib, args.warmup, args.repeats)
    rows = []
    for d_model in args.d_models:
        dim = args.expand * d_model
        for frames in args.frames:
            for layout, channels, groups in (("one direction", dim, 1), ("BiMamba one scan", 2 * dim, 2)):
                counts = floor_counts(args.batch, channels, frames, args.state, groups, element_bytes)
                forward_ms, total_ms = measure(
                    args.batch, channels, frames, args.state, groups, dtype, device, args.warmup, args.repeats
                )
                backward_ms = total_ms - forward_ms
                row = dict(d_model=d_model, layout=layout, channels=channels, frames=frames, **counts)
                row["copy_GBps"] = round(bandwidth / 1e9, 1)
                row.update(
                    forward_ms=round(forward_ms, 4),
                    backward_ms=round(backward_ms, 4),
                    forward_GBps=round(counts["forward_bytes"] / forward_ms / 1e6, 1),
                    backward_GBps=round(counts["backward_bytes"] / backward_ms / 1e6, 1) if backward_ms > 0 else None,
                    forward_TFLOPs=round(counts["forward_flops"] / forward_ms / 1e9, 3),
                    flops_per_byte=round(counts["forward_flops"] / counts["forward_bytes"], 1),
                )
                row["forward_share_of_copy_bandwidth"] = round(row["forward_GBps"] * 1e9 / bandwidth, 4)
                # the backward time is a difference of two timings: on a loaded machine it can be <= 0,
                # and then it has no bandwidth (every row keeps the same columns for results.csv)
                row["backward_share_of_copy_bandwidth"] = (
                    round(row["backward_GBps"] * 1e9 / bandwidth, 4) if row["backward_GBps"] is not None else None
                )
                rows.append(row)
                logger.info(json.dumps(row))
    return bandwidth, rows


def markdown_table(bandwidth, rows):
    lines = [
        f"Device-to-device copy: {bandwidth / 1e9:.0f} GB/s (read + write).",
        "",
        "| d_model | layout | frames | forward MB (floor) | forward ms | GB/s | share of copy | "
        "backward MB (floor) | backward ms | GB/s | share of copy | FLOPs/byte |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['d_model']} | {r['layout']} | {r['frames']} | {r['forward_bytes'] / 1e6:.1f} | {r['forward_ms']:.3f} "
            f"| {r['forward_GBps']:.1f} | {r['forward_share_of_copy_bandwidth']:.1%} | {r['backward_bytes'] / 1e6:.1f} "
            f"| {r['backward_ms']:.3f} | {r['backward_GBps'] or 0:.1f} | {r['backward_share_of_copy_bandwidth'] or 0:.1%} "
            f"| {r['flops_per_byte']} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-models", default="256,512", help="comma-separated; channels = expand * d_model")
    parser.add_argument("--expand", type=int, default=2)
    parser.add_argument("--frames", default="500,1000,2000", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="scan input dtype (CPU: fp32)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--copy-mib", type=int, default=1024, help="size of the bandwidth probe")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help="directory for results.csv and results.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.d_models, args.frames, args.batch, args.state = "16", "32", 2, 4
        args.copy_mib, args.warmup, args.repeats = 8, 1, 1
    if args.device == "cpu":
        args.dtype = "fp32"
    args.d_models = [int(d) for d in args.d_models.split(",")]
    args.frames = [int(t) for t in args.frames.split(",")]
    return args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    bandwidth, rows = run(args)
    if args.out:
        write_results(rows, args, torch.device(args.device))
    print(markdown_table(bandwidth, rows))


if __name__ == "__main__":
    main()
