"""The recipes' CTC loss: SpeechBrain's ``ctc_loss``, on our Triton kernels for CUDA tensors.

PyTorch's CUDA ``ctc_loss`` makes the host wait for the GPU about ten times a training step (it copies
lengths and offsets between them), so the host cannot queue the next step's work while the GPU runs
this one. :mod:`.ctc_triton` computes the same loss with the lengths left on the device. On the CPU
there is nothing to wait for, and SpeechBrain's loss runs.
"""

from speechbrain.nnet.losses import ctc_loss as speechbrain_ctc_loss


def ctc_loss(log_probs, targets, input_lens, target_lens, blank_index, reduction="mean"):
    """SpeechBrain's ``speechbrain.nnet.losses.ctc_loss``: same arguments (log_probs (batch, time, vocab),
    relative lengths) and result, float32 on CUDA whatever the input's dtype."""
    if log_probs.is_cuda:
        from .ctc_triton import triton_ctc_loss  # imports Triton only where it runs

        return triton_ctc_loss(log_probs, targets, input_lens, target_lens, blank_index, reduction)
    return speechbrain_ctc_loss(log_probs, targets, input_lens, target_lens, blank_index, reduction)
