"""Our Triton CTC loss (modules/training/ctc_triton.py; modules/training/ctc.py, which the recipes name,
runs it on CUDA) against SpeechBrain's ctc_loss, i.e. F.ctc_loss with zero_infinity, run in float64 on
the CPU: every reduction, both a zero and a nonzero blank, the loss and the logits' gradient through a
log_softmax; infeasible rows, padding, bf16 inputs, batch invariance, and (on a GPU) real shapes and the
absence of host-device synchronisations.

On a CPU-only machine the kernels run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), at tiny shapes; on a GPU they run compiled.
"""

import pytest
import torch
from speechbrain.nnet.losses import ctc_loss as speechbrain_ctc_loss

pytest.importorskip("triton")  # PyTorch's Linux wheels bring it; elsewhere the kernels cannot run

from modules.training.ctc import ctc_loss  # noqa: E402
from modules.training.ctc_triton import REDUCTIONS, triton_ctc_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def make_batch(frames, labels, time, vocab, max_target, blank, seed=0):
    """Random logits (batch, time, vocab) in float64 and targets (batch, max_target) without the blank,
    repeated symbols in row 0 (two in a row, so that its alignments need a blank between them) and
    garbage past each row's target; the lengths as given (absolute), and relative as SpeechBrain's."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(frames)
    logits = 2 * torch.randn(batch, time, vocab, generator=generator, dtype=torch.float64)
    symbols = torch.tensor([v for v in range(vocab) if v != blank])
    targets = symbols[torch.randint(len(symbols), (batch, max_target), generator=generator)]
    if max_target >= 3:
        targets[0, 1] = targets[0, 2] = targets[0, 0]
    frames, labels = torch.tensor(frames), torch.tensor(labels)
    targets[torch.arange(max_target) >= labels[:, None]] = -7  # never read
    return logits, targets, frames, labels, frames / time, labels / max(max_target, 1)


def reference(logits, targets, input_lens, target_lens, blank, reduction):
    """SpeechBrain's ctc_loss (F.ctc_loss, zero_infinity) of log_softmax(logits) in float64 on the CPU, and
    the gradient of a random weighting of it w.r.t. the logits."""
    logits = logits.detach().double().cpu().requires_grad_()
    loss = speechbrain_ctc_loss(logits.log_softmax(-1), targets.clamp_min(0), input_lens, target_lens, blank,
                                reduction)
    (loss * weights(loss)).sum().backward()
    return loss.detach(), logits.grad


def ours(logits, targets, input_lens, target_lens, blank, reduction, dtype=torch.float32, loss_fn=triton_ctc_loss):
    """Our loss of log_softmax(logits) cast to ``dtype`` on DEVICE, and the logits' gradient as above."""
    logits = logits.detach().float().to(DEVICE).requires_grad_()
    log_probs = logits.log_softmax(-1).to(dtype)
    loss = loss_fn(log_probs, targets.to(DEVICE), input_lens.to(DEVICE), target_lens.to(DEVICE), blank, reduction)
    (loss * weights(loss).to(loss.device)).sum().backward()
    return loss.detach().cpu().double(), logits.grad.cpu().double()


def weights(loss):
    """Fixed weights of the losses' entries (a scalar for a reduced loss), so that rows differ in scale."""
    return 0.5 + torch.arange(loss.numel(), dtype=loss.dtype).reshape(loss.shape) / 3


# rows: the full length with the longest target (repeated symbols), one frame with no label, one frame
# with one label, none with none, random ones, and the full length with no label
FRAMES = [10, 1, 1, 0, 7, 4, 10]
LABELS = [4, 0, 1, 0, 3, 2, 0]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # 'batch': inf x 0, interpreted
@pytest.mark.parametrize("blank", [0, 3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_speechbrain(blank, reduction):
    logits, targets, _, labels, input_lens, target_lens = make_batch(FRAMES, LABELS, 10, 6, 4, blank)
    loss, grad = ours(logits, targets, input_lens, target_lens, blank, reduction)
    expected, expected_grad = reference(logits, targets, input_lens, target_lens, blank, reduction)
    assert loss.shape == expected.shape
    if reduction == "batch":  # SpeechBrain divides each row by its target length: inf or NaN where that is 0
        assert torch.equal(torch.isfinite(loss), labels > 0) and torch.equal(torch.isfinite(expected), labels > 0)
        loss, expected = loss[labels > 0], expected[labels > 0]
        grad, expected_grad = grad[labels > 0], expected_grad[labels > 0]
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)
    assert grad.abs().max() > 1e-2  # the comparison is not between zeros


def test_large_vocabulary_and_long_target():
    """5000 symbols (the S2S recipes' BPE), a target of 12 labels (BLOCK_S 32) with many repeats."""
    vocab, blank = 5000, 4999
    logits, targets, _, _, input_lens, target_lens = make_batch([20, 17], [12, 9], 20, vocab, 12, blank)
    targets[0, 5:9] = targets[0, 3]
    targets[1, :6] = torch.tensor([8, 9, 8, 9, 8, 9])
    loss, grad = ours(logits, targets, input_lens, target_lens, blank, "none")
    expected, expected_grad = reference(logits, targets, input_lens, target_lens, blank, "none")
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_targets_holding_the_blank_id():
    """Our tokenizers' <unk> is the blank's id: a target holding it scores, as in F.ctc_loss, a label
    state that emits the blank, and the blank's gradient sums the blank and those label states."""
    logits, targets, _, _, input_lens, target_lens = make_batch([10, 8], [4, 3], 10, 6, 4, 0)
    targets[0, 1], targets[1, 0] = 0, 0
    loss, grad = ours(logits, targets, input_lens, target_lens, 0, "none")
    expected, expected_grad = reference(logits, targets, input_lens, target_lens, 0, "none")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_infeasible_rows_give_zero_loss_and_gradient():
    """Row 0: three equal labels need 5 frames, it has 4; row 1: four labels in 3 frames; row 2 feasible."""
    logits, targets, _, _, input_lens, target_lens = make_batch([4, 3, 6], [3, 4, 2], 6, 5, 4, 0)
    targets[0, :3] = 2
    loss, grad = ours(logits, targets, input_lens, target_lens, 0, "none")
    expected, expected_grad = reference(logits, targets, input_lens, target_lens, 0, "none")
    assert torch.equal(loss[:2], torch.zeros(2, dtype=loss.dtype))
    assert torch.equal(grad[:2], torch.zeros_like(grad[:2]))
    assert loss[2] > 0 and grad[2].abs().max() > 1e-2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_padding_is_never_read():
    """Garbage (NaN, +inf, huge) in the padded frames of log_probs and any ids in the padded target
    positions change neither the loss nor the gradient, which is 0 at padded frames."""
    logits, targets, frames, _, input_lens, target_lens = make_batch([8, 5, 2], [3, 1, 0], 8, 6, 3, 2)
    log_probs = logits.float().log_softmax(-1).to(DEVICE)
    padded = torch.arange(8, device=DEVICE)[None, :] >= frames.to(DEVICE)[:, None]
    dirty = log_probs.clone()
    dirty[padded] = torch.tensor([float("nan"), float("inf"), 1e30, 0.0, -1e30, 5.0], device=DEVICE)
    dirty_targets = targets.clone()
    garbage = torch.tensor([2, 10**6, -(10**6)])  # the blank, out of range both ways
    dirty_targets[targets < 0] = garbage.repeat(targets.numel())[: int((targets < 0).sum())]
    results = []
    for lp, tg in ((log_probs, targets.clamp_min(0)), (dirty, dirty_targets)):
        lp = lp.detach().requires_grad_()
        loss = triton_ctc_loss(lp, tg.to(DEVICE), input_lens.to(DEVICE), target_lens.to(DEVICE), 2, "none")
        (loss * weights(loss).to(DEVICE)).sum().backward()
        results.append((loss.detach(), lp.grad))
    (loss, grad), (dirty_loss, dirty_grad) = results
    assert torch.isfinite(loss).all() and loss.min() > 0
    assert torch.equal(loss, dirty_loss)
    assert torch.equal(grad, dirty_grad)
    assert torch.equal(grad[padded], torch.zeros_like(grad[padded]))


def test_bfloat16_log_probs():
    """bf16 log_probs are read as they are and computed in float32: the loss (float32) is the reference's
    of the same bf16 values; the gradient (bf16) is minus the state posteriors, which sum to 1 at each
    valid frame, and through the log_softmax it is the float64 reference's up to bf16's rounding."""
    logits, targets, frames, _, input_lens, target_lens = make_batch([9, 6, 3], [4, 2, 1], 9, 7, 4, 0)
    lp = logits.float().log_softmax(-1).to(torch.bfloat16).to(DEVICE).requires_grad_()
    loss = triton_ctc_loss(lp, targets.to(DEVICE), input_lens.to(DEVICE), target_lens.to(DEVICE), 0, "none")
    (loss * weights(loss).to(DEVICE)).sum().backward()
    assert loss.dtype == torch.float32 and lp.grad.dtype == torch.bfloat16
    expected = speechbrain_ctc_loss(lp.detach().cpu().double(), targets.clamp_min(0), input_lens, target_lens, 0,
                                    "none")
    torch.testing.assert_close(loss.cpu().double(), expected, rtol=1e-5, atol=1e-5)
    frame_sums = lp.grad.cpu().double().sum(-1)
    valid = torch.arange(9)[None, :] < frames[:, None]
    torch.testing.assert_close(frame_sums[valid], -weights(expected)[:, None].expand(-1, 9)[valid], rtol=1e-2, atol=0)
    assert torch.equal(frame_sums[~valid], torch.zeros_like(frame_sums[~valid]))

    loss, grad = ours(logits, targets, input_lens, target_lens, 0, "none", dtype=torch.bfloat16)
    expected, expected_grad = reference(logits, targets, input_lens, target_lens, 0, "none")
    torch.testing.assert_close(loss, expected, rtol=5e-3, atol=0)  # 2e-3 seen
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-2)  # 3e-3 seen


def test_batch_invariance():
    """A row's loss and gradient are those of the row alone, cut to its own length and target (other
    launch sizes: BLOCK_S 16 in the batch, 4 or 8 alone)."""
    logits, targets, frames, labels, input_lens, target_lens = make_batch([9, 4, 6], [4, 1, 2], 9, 6, 4, 1)

    def loss_and_gradient(logits, targets, input_lens, target_lens):
        log_probs = logits.float().log_softmax(-1).to(DEVICE).requires_grad_()
        loss = triton_ctc_loss(log_probs, targets.to(DEVICE), input_lens.to(DEVICE), target_lens.to(DEVICE), 1, "none")
        loss.sum().backward()
        return loss.detach(), log_probs.grad

    loss, grad = loss_and_gradient(logits, targets, input_lens, target_lens)
    for row, (f, n) in enumerate(zip(frames.tolist(), labels.tolist())):
        alone, alone_grad = loss_and_gradient(logits[row : row + 1, :f], targets[row : row + 1, :n], torch.ones(1),
                                              torch.ones(1))
        assert torch.equal(alone[0], loss[row])  # the same float32 operations, lane by lane
        torch.testing.assert_close(alone_grad[0], grad[row, :f], rtol=1e-6, atol=1e-7)
        assert torch.equal(grad[row, f:], torch.zeros_like(grad[row, f:]))


def test_dispatch_and_reduction_names():
    """The recipes' loss takes our kernels on CUDA tensors and SpeechBrain's loss on CPU ones. An
    unknown reduction is refused, as F.ctc_loss refuses it."""
    logits, targets, _, _, input_lens, target_lens = make_batch([5, 3], [2, 1], 5, 4, 2, 0)
    log_probs, targets = logits.float().log_softmax(-1), targets.clamp_min(0)
    expected = speechbrain_ctc_loss(log_probs, targets, input_lens, target_lens, 0)
    assert torch.equal(ctc_loss(log_probs, targets, input_lens, target_lens, 0), expected)
    if torch.cuda.is_available():
        args = log_probs.cuda(), targets.cuda(), input_lens.cuda(), target_lens.cuda(), 0
        assert torch.equal(ctc_loss(*args), triton_ctc_loss(*args))
    with pytest.raises(ValueError, match="reduction"):
        triton_ctc_loss(log_probs, targets, input_lens, target_lens, 0, "average")


@needs_cuda
@pytest.mark.parametrize("shape", [(70, 320, 31, 200), (16, 200, 5000, 80)], ids=["ctc_chars", "s2s_bpe"])
def test_real_shapes(shape):
    """The CTC recipe's characters (S = 401 states: BLOCK_S 512) and the S2S recipes' 5000 BPE units."""
    batch, time, vocab, max_target = shape
    generator = torch.Generator().manual_seed(1)
    frames = torch.randint(time // 2, time + 1, (batch,), generator=generator)
    frames[0] = time
    labels = torch.minimum(torch.randint(1, max_target + 1, (batch,), generator=generator), frames // 2)
    labels[0] = max_target
    logits, targets, frames, labels, input_lens, target_lens = make_batch(
        frames.tolist(), labels.tolist(), time, vocab, max_target, 0, seed=1)
    loss, grad = ours(logits, targets, input_lens, target_lens, 0, "none")
    their_loss, their_grad = ours(logits, targets, input_lens, target_lens, 0, "none", loss_fn=speechbrain_ctc_loss)
    expected, expected_grad = reference(logits, targets, input_lens, target_lens, 0, "none")
    assert torch.isfinite(expected).all()
    # float32 over hundreds of frames: as far from the float64 reference as F.ctc_loss in float32 on the GPU
    for mine, theirs, exact in ((loss, their_loss, expected), (grad, their_grad, expected_grad)):
        error, their_error = (mine - exact).abs().max().item(), (theirs - exact).abs().max().item()
        assert error <= 2 * their_error + 1e-6, (error, their_error)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=0)


@needs_cuda
def test_no_host_device_synchronisation():
    """Forward and backward, lengths and targets on the GPU: nothing waits for the device."""
    logits, targets, _, _, input_lens, target_lens = make_batch([30, 21, 9], [8, 5, 3], 30, 31, 8, 0)
    args = targets.cuda(), input_lens.float().cuda(), target_lens.float().cuda(), 0, "mean"
    x = logits.float().cuda().requires_grad_()
    ctc_loss(x.log_softmax(-1), *args).backward()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ctc_loss(x.log_softmax(-1), *args).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_cuda_graph_replay_reads_new_lengths():
    """Forward and backward captured in a CUDA graph, replayed on new logits, lengths and targets copied
    into the captured tensors: the lengths are read on the device, so the replay is the eager result."""
    logits, targets, _, _, input_lens, target_lens = make_batch([30, 21, 9], [8, 5, 3], 30, 31, 8, 0)
    new_logits, new_targets, _, _, new_input_lens, new_target_lens = make_batch([12, 30, 25], [2, 8, 6], 30, 31, 8,
                                                                                  0, seed=5)
    x = logits.float().cuda().requires_grad_()
    args = [targets.clamp_min(0).cuda(), input_lens.float().cuda(), target_lens.float().cuda()]

    def step():
        x.grad = None
        loss = ctc_loss(x.log_softmax(-1), *args, 0, "mean")
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles) outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    with torch.no_grad():
        x.copy_(new_logits.float().cuda())
    for captured, new in zip(args, (new_targets.clamp_min(0), new_input_lens.float(), new_target_lens.float())):
        captured.copy_(new.cuda())
    graph.replay()
    eager = new_logits.float().cuda().requires_grad_()
    expected = ctc_loss(eager.log_softmax(-1), *args, 0, "mean")
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, eager.grad, rtol=1e-6, atol=1e-7)
