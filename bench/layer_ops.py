"""How many ATen operations one encoder layer dispatches in a training step, forward and backward.

An eager training step is bound by the host, which pays for every dispatched operation; this counts
them for a ConMamba layer and SpeechBrain's Conformer layers (``bench/benchmark.py``'s models, CTC-large
size, bf16 autocast on the CPU, two utterances of 32 frames). Our Triton scan and convolution are
called through their custom ops here, so that each counts as one operation (their own host work is
what ``python bench/scan_kernels.py --host`` times on a GPU); the Triton interpreter runs them.

    python bench/layer_ops.py
"""

import os
import sys
from collections import Counter
from unittest import mock

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: the kernels run on the CPU

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.benchmark import SIZES, build_model  # noqa: E402
from modules.mamba import conv_triton, scan_triton  # noqa: E402


class OperationCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while it is active, by name."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_layer(model_name):
    """(forward counter, backward counter) of one training step of one layer."""
    torch.manual_seed(0)
    size = dict(SIZES["ctc_large"], kernel_size=31)
    name = f"{model_name}:triton" if model_name == "conmamba" else model_name
    layer = build_model(name, "layer", size, dropout=0.1).train()
    x = torch.randn(2, 32, size["d_model"], requires_grad=True)
    padding_mask = torch.arange(32)[None] >= torch.tensor([32, 20])[:, None]
    through_ops = lambda op, eager: op  # noqa: E731
    with mock.patch.object(scan_triton, "pick", through_ops), mock.patch.object(conv_triton, "pick", through_ops):
        with torch.autocast("cpu", dtype=torch.bfloat16), OperationCounter() as forward:
            y = layer(x, padding_mask)
        loss = y.float().square().mean()
        with OperationCounter() as backward:
            loss.backward()
    return forward.counts, backward.counts


def main():
    print("| layer | forward | backward | most frequent |")
    print("|---|---|---|---|")
    for model_name in ("conmamba", "conformer_sdpa", "conformer_relpos"):
        forward, backward = count_layer(model_name)
        common = ", ".join(f"{op.removeprefix('aten.')} {n}" for op, n in (forward + backward).most_common(4))
        print(f"| {model_name} | {sum(forward.values())} | {sum(backward.values())} | {common} |")


if __name__ == "__main__":
    main()
