"""The BiMamba scan alone, forward + backward: our Triton kernel against mamba_ssm's CUDA kernel.

Both get the same bf16 data of a ConMamba layer (u, delta, B, C, z after the projections; A, D and
the step-size bias in float32), with every utterance at full length:

* ``triton``: :func:`modules.mamba.scan.directional_scan`, both directions in one launch, reversal,
  softplus(delta + bias), the D skip, the SiLU(z) gate and the mean of the directions fused;
* ``mamba_ssm``: one call of ``selective_scan_cuda`` over both directions as two B/C groups, inputs
  already reversed and laid out (batch, channels, time), gating and the mean left out (so it does
  less than ours).

For each it prints the median milliseconds (``triton.testing.do_bench``) of the forward and of
forward + backward, the bandwidth over the least bytes a scan must move (``bench/scan_floor.py``'s
count) as a share of a measured device-to-device copy, and the exponentials per second (one per
(batch, channel, frame, state) forward and one in the backward recomputation).

    python bench/scan_kernels.py                       # the three shapes of the issue, H200 figures
    python bench/scan_kernels.py --sweep               # first time block sizes (the defaults come from it)
    python bench/scan_kernels.py --host                # host time per call instead, eager against custom ops

``--host`` measures what an eager training step is bound by: the host microseconds a call of our scan
and of our convolution costs, forward and forward + backward, at a tiny shape (2 utterances of 32
frames, so the GPU never makes the host wait), through the eager autograd Function that eager code
calls and through the custom ops that compiled code calls (:mod:`modules.mamba.eager_autograd`).
"""

import argparse
import json
import os
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.scan_floor import floor_counts  # noqa: E402
from modules.mamba import conv_triton, scan_cuda, scan_triton  # noqa: E402
from modules.mamba.scan import directional_scan  # noqa: E402

SHAPES = {  # name: (batch, frames, channels per direction): ~850 s (CTC) or ~500 s (S2S) of audio
    "CTC-large 12 s": (70, 300, 512),
    "S2S-large 12 s": (41, 300, 1024),
    "CTC-large 60 s": (14, 1500, 512),
}
STATE = 16


def layer_inputs(batch, frames, dim):
    """bf16 activations in the mixer's (batch, time, channels) layout, float32 parameters, with gradients."""
    channels = 2 * dim

    def randn(*shape, scale=1.0, shift=0.0):
        return (scale * torch.randn(*shape, device="cuda") + shift).to(torch.bfloat16).requires_grad_()

    return dict(
        u=randn(batch, frames, channels),
        delta=randn(batch, frames, channels, scale=0.5, shift=-1.0),
        B=randn(batch, frames, 2, STATE),
        C=randn(batch, frames, 2, STATE),
        z=randn(batch, frames, dim),
        A=(-torch.arange(1, STATE + 1, device="cuda", dtype=torch.float32)).repeat(channels, 1).requires_grad_(),
        D=torch.ones(channels, device="cuda", requires_grad=True),
        delta_bias=torch.full((channels,), -2.0, device="cuda", requires_grad=True),
    )


def ours(inputs):
    return directional_scan(**inputs, directions=2, scale=0.5, backend="triton")


def mamba_ssm_inputs(inputs):
    """The same data for the CUDA kernel: (batch, channels, time), B/C (batch, groups, state, time)."""
    plain = {name: t.detach() for name, t in inputs.items()}
    converted = dict(
        u=plain["u"].transpose(1, 2).contiguous(),
        delta=plain["delta"].transpose(1, 2).contiguous(),
        B=plain["B"].permute(0, 2, 3, 1).contiguous(),
        C=plain["C"].permute(0, 2, 3, 1).contiguous(),
        A=plain["A"],
        D=plain["D"],
        delta_bias=plain["delta_bias"],
    )
    return {name: t.requires_grad_() for name, t in converted.items()}


def mamba_ssm(inputs):
    return scan_cuda.selective_scan_cuda_op(**inputs, delta_softplus=True)


def median_ms(function, inputs, rep=300):
    """Median milliseconds of the forward alone and of forward + backward."""
    from triton.testing import do_bench

    out = function(inputs)
    grad = torch.randn_like(out)

    def forward():
        with torch.no_grad():
            function(inputs)

    def forward_backward():
        for tensor in inputs.values():
            tensor.grad = None
        function(inputs).backward(grad)

    return (do_bench(forward, warmup=25, rep=rep, return_mode="median"),
            do_bench(forward_backward, warmup=25, rep=rep, return_mode="median"))


def copy_bandwidth():
    from triton.testing import do_bench

    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return 2 * source.numel() / (do_bench(lambda: target.copy_(source), return_mode="median") / 1e3)


def report(name, shape, results, bandwidth):
    batch, frames, dim = shape
    counts = floor_counts(batch, 2 * dim, frames, STATE, 2, 2)
    exps = 2 * counts["exps"]  # one pass forward, one recomputation in the backward
    print(f"\n{name}: batch {batch}, {frames} frames, 2 x {dim} channels, state {STATE}, bf16")
    print("| scan | forward ms | fwd+bwd ms | fwd+bwd share of copy bandwidth | exp/s (fwd+bwd) |")
    print("|---|---|---|---|---|")
    for label, (forward, total) in results.items():
        share = (counts["forward_bytes"] + counts["backward_bytes"]) / (total / 1e3) / bandwidth
        print(f"| {label} | {forward:.3f} | {total:.3f} | {share:.1%} | {exps / (total / 1e3):.3g} |")
    if "mamba_ssm" in results and "triton" in results:
        print(f"ratio mamba_ssm / triton, fwd+bwd: {results['mamba_ssm'][1] / results['triton'][1]:.2f}x")


def apply_config(config):
    """Sets the kernels' block sizes from a dict with keys FORWARD and BACKWARD (as --sweep writes)."""
    scan_triton.FORWARD = dict(config["FORWARD"])
    scan_triton.BACKWARD = dict(config["BACKWARD"])


def sweep():
    """Times every program shape of each pass on every shape; returns the fastest one summed over the shapes.

    BLOCK_T (the checkpoint interval) is not swept: it trades the backward's speed for memory."""
    configs = [dict(BLOCK_D=d, num_warps=w, SPLIT=split)
               for d, w, split in ((16, 1, 1), (32, 1, 1), (32, 1, 2), (32, 1, 4), (64, 1, 2), (64, 2, 2))]
    configs += [dict(configs[1], maxnreg=cap) for cap in (224, 200)]  # 9 or 10 one-warp programs a multiprocessor
    totals = {}  # (pass, index) -> ms summed over the shapes
    for name, shape in SHAPES.items():
        inputs = layer_inputs(*shape)
        for index, config in enumerate(configs):
            apply_config(dict(FORWARD=config, BACKWARD=configs[1]))
            forward = median_ms(ours, inputs, rep=100)[0]
            apply_config(dict(FORWARD=configs[1], BACKWARD=config))
            forward_alone, total = median_ms(ours, inputs, rep=100)
            backward = total - forward_alone
            totals["forward", index] = totals.get(("forward", index), 0.0) + forward
            totals["backward", index] = totals.get(("backward", index), 0.0) + backward
            print(f"sweep {name}: {config}: forward {forward:.3f} ms, backward {backward:.3f} ms", flush=True)
    best = {pass_: configs[min(range(len(configs)), key=lambda i: totals[pass_, i])] for pass_ in ("forward", "backward")}
    best = dict(FORWARD=best["forward"], BACKWARD=best["backward"])
    print(f"best: {json.dumps(best)}")
    return best


def host_us(function, calls=200):
    """Mean host microseconds of ``calls`` calls issued back to back, without waiting for the GPU."""
    for _ in range(5):
        function()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def host_overhead():
    """Host microseconds a call of the scan and of the convolution, eager Function against custom op."""
    inputs = layer_inputs(2, 32, 512)
    lengths = torch.tensor([32, 20], device="cuda", dtype=torch.int32)
    grad = torch.randn(2, 32, 512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 32, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(1024, 4, device="cuda", requires_grad=True)
    bias = torch.randn(1024, device="cuda", requires_grad=True)

    def scan():
        return directional_scan(**inputs, lengths=lengths, directions=2, scale=0.5, backend="triton")

    def convolution():
        return conv_triton.directional_conv_silu(x, weight, bias, lengths, 2)

    print("| call (2 x 32 frames, 2 x 512 channels) | eager Function: fwd / fwd+bwd us | custom op: fwd / fwd+bwd us |")
    print("|---|---|---|")
    for name, function, grad_out in (("scan", scan, grad), ("convolution", convolution, torch.cat([grad, grad], -1))):
        cells = []
        for through_ops in (False, True):
            picked = (lambda op, eager: op) if through_ops else (lambda op, eager: eager)
            with mock.patch.object(scan_triton, "pick", picked), mock.patch.object(conv_triton, "pick", picked):
                with torch.no_grad():
                    forward = host_us(function)
                total = host_us(lambda: function().backward(grad_out))
            cells.append(f"{forward:.0f} / {total:.0f}")
        print(f"| {name} | {cells[0]} | {cells[1]} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="time block sizes first and use the fastest")
    parser.add_argument("--save-config", help="with --sweep: write the fastest configuration to this JSON file")
    parser.add_argument("--host", action="store_true", help="host time per call at a tiny shape, nothing else")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.host:
        return host_overhead()
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; device-to-device copy {bandwidth / 1e9:.0f} GB/s")
    if args.sweep:
        config = sweep()
        apply_config(config)
        if args.save_config:
            with open(args.save_config, "w") as f:
                json.dump(config, f)
    print(f"BLOCK_T {scan_triton.BLOCK_T}, forward {scan_triton.FORWARD}, backward {scan_triton.BACKWARD}")
    for name, shape in SHAPES.items():
        inputs = layer_inputs(*shape)
        results = {"triton": median_ms(ours, inputs)}
        if scan_cuda.available:
            results["mamba_ssm"] = median_ms(mamba_ssm, mamba_ssm_inputs(inputs))
        report(name, shape, results, bandwidth)


if __name__ == "__main__":
    main()
