"""Our Triton depthwise convolutions alone, forward + backward, at CTC-large 12 s (batch 70, 300 frames).

* ``mixer``: the BiMamba mixers' convolution + SiLU, width 4, 512 channels in, both directions out
  (:func:`modules.mamba.conv_triton.directional_conv_silu`);
* ``module``: the ConMamba layer's convolution module, width 31 centred, 256 channels
  (:func:`modules.mamba.conv_triton.depthwise_conv`).

Prints the median milliseconds (``triton.testing.do_bench``) of the forward and of forward + backward
at the module's tile sizes; ``--sweep`` first times every tile (frames x channels), warps of the first
backward kernel and, for the wide convolution, tiles a program walks, and prints the fastest.

    python bench/conv_kernels.py
    python bench/conv_kernels.py --sweep
"""

import argparse
import itertools
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.mamba import conv_triton  # noqa: E402

BATCH, FRAMES = 70, 300


def cases():
    """{name: (x, weight, bias, call)} with bf16 activations and float32 parameters, all full length."""
    lengths = torch.full((BATCH,), FRAMES, device="cuda", dtype=torch.int32)

    def tensors(channels, out_channels, width):
        return (torch.randn(BATCH, FRAMES, channels, device="cuda", dtype=torch.bfloat16, requires_grad=True),
                torch.randn(out_channels, width, device="cuda", requires_grad=True),
                torch.randn(out_channels, device="cuda", requires_grad=True))

    return {
        "mixer (width 4, SiLU, 2 directions)": (
            *tensors(512, 1024, 4), lambda x, w, b: conv_triton.directional_conv_silu(x, w, b, lengths, 2)),
        "module (width 31, centred)": (
            *tensors(256, 256, 31), lambda x, w, b: conv_triton.depthwise_conv(x, w, b, lengths, 15)),
    }


def median_ms(x, weight, bias, call):
    """Median milliseconds of the forward alone and of forward + backward."""
    from triton.testing import do_bench

    grad = torch.randn_like(call(x, weight, bias))

    def forward_backward():
        x.grad = weight.grad = bias.grad = None
        call(x, weight, bias).backward(grad)

    with torch.no_grad():
        forward = do_bench(lambda: call(x, weight, bias), warmup=10, rep=100, return_mode="median")
    return forward, do_bench(forward_backward, warmup=10, rep=100, return_mode="median")


def sweep(name, case):
    """Times each (frames, channels, gradient warps, tiles a wide program walks); prints the five fastest."""
    frames_of = conv_triton._frames_per_gradient_program
    timed = []
    for frames, channels, warps, tiles in itertools.product((16, 32, 64), (32, 64, 128), (1, 2, 4), (1, 2, 4)):
        if tiles > 1 and "width 4" in name:  # narrow convolutions walk whole rows anyway
            continue
        with mock.patch.multiple(conv_triton, BLOCK_T=frames, BLOCK_C=channels, GRADIENT_WARPS=warps,
                                 _frames_per_gradient_program=lambda time, width: frames_of(time, width) * tiles):
            timed.append((median_ms(*case), frames, channels, warps, tiles))
    for (forward, total), frames, channels, warps, tiles in sorted(timed, key=lambda row: row[0][1])[:5]:
        print(f"  {frames} frames x {channels} channels, {warps} gradient warps, {tiles} tiles a wide program: "
              f"forward {forward:.3f} ms, forward + backward {total:.3f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="time every tile size first")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; tiles {conv_triton.BLOCK_T} frames x "
          f"{conv_triton.BLOCK_C} channels, {conv_triton.GRADIENT_WARPS} gradient warps")
    for name, case in cases().items():
        forward, total = median_ms(*case)
        print(f"{name}: forward {forward:.3f} ms, forward + backward {total:.3f} ms")
        if args.sweep:
            sweep(name, case)


if __name__ == "__main__":
    main()
