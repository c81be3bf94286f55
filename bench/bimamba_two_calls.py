"""One BiMamba layer: our one-scan bidirectional mixer against the reference-style two calls.

The reference style (published ConMamba) runs two ``mamba_ssm`` ``Mamba`` modules,
the second on the time-flipped input. Ours stacks both directions in one selective scan, eager and
through ``torch.compile``. Prints the forward+backward time (median of 20 after 3 warm-ups, CUDA
events) and peak memory, bf16 autocast, and the ratios to the two calls.
Needs a GPU with ``mamba_ssm`` installed.

    python bench/bimamba_two_calls.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mamba_ssm.modules.mamba_simple import Mamba as ReferenceMamba  # noqa: E402

from modules.mamba.mamba import Mamba  # noqa: E402
from modules.mamba.selective_scan import cuda_kernel_available  # noqa: E402


class TwoCallBiMamba(torch.nn.Module):
    """Two independent mixers, forward and on the flipped sequence, averaged."""

    def __init__(self, d_model):
        super().__init__()
        self.forward_mixer, self.backward_mixer = ReferenceMamba(d_model), ReferenceMamba(d_model)

    def forward(self, x, lengths=None):
        return 0.5 * (self.forward_mixer(x) + self.backward_mixer(x.flip(1)).flip(1))


def median_ms(step, repeats=20, warmup=3):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(batch=16):
    print(f"mamba_ssm kernels: {cuda_kernel_available()}")
    for d_model in (256, 512):
        for frames in (500, 1000, 2000):
            x = torch.randn(batch, frames, d_model, device="cuda", requires_grad=True)
            lengths = torch.full((batch,), frames, device="cuda")
            row = []
            ours = Mamba(d_model, bidirectional=True).cuda()
            mixers = [("two calls", TwoCallBiMamba(d_model).cuda()), ("one scan", ours), ("compiled", torch.compile(ours))]
            for name, mixer in mixers:

                def step():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        y = mixer(x, lengths)
                    y.float().pow(2).mean().backward()

                torch.cuda.reset_peak_memory_stats()
                row.append((name, median_ms(step), torch.cuda.max_memory_allocated() / 2**20))
            cells = "  ".join(f"{name} {ms:.2f} ms {mib:.0f} MiB" for name, ms, mib in row)
            ratios = " ".join(f"{ms / row[0][1]:.2f}" for _, ms, _ in row[1:])
            print(f"d={d_model} frames={frames} batch={batch}: {cells}  ratios to two calls {ratios}")


if __name__ == "__main__":
    main()
