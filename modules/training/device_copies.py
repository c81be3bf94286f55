"""Host tensors copied to the training device without making the host wait for the GPU.

The recipes draw some random numbers and lengths on the CPU (each utterance's speed, SpecAugment's
masks) and copy them to the batch's device. A copy from pageable host memory to a GPU may first wait
for the work already queued on the stream (CUDA Runtime API reference, "API synchronization
behavior": to stage pageable memory, "the driver may synchronize with the stream"), and
``torch.cuda.set_sync_debug_mode`` does not report such a wait. From page-locked memory the copy is
queued on the stream like a kernel, and the host goes on queueing the step.
"""

import torch


def to_device(tensor, device):
    """``tensor``, on the CPU, copied to ``device``; to a GPU through page-locked memory, without waiting
    for the GPU (PyTorch keeps the page-locked source until the GPU has read it)."""
    device = torch.device(device)
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
