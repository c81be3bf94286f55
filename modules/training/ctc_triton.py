"""Our Triton CTC loss: SpeechBrain's ``ctc_loss`` without a single host-device synchronisation.

PyTorch's CUDA ``F.ctc_loss`` copies lengths and target offsets between host and device about ten times
a training step, which stalls a CUDA-graphed loop. Here the lengths stay device tensors and launches are
sized from shapes only (batch, time, vocabulary, longest target), never from values.

One program an utterance, its lanes along the S = 2 L + 1 states of the extended labels (blank, y_1,
blank, ..., y_L, blank), in log space and float32. The forward pass runs alpha through the row's frames,
reading the states shifted by one and two lanes back from the previous frame's row of alpha, which it
keeps (batch, time, S) for the backward; ``nll = -logsumexp`` of the last two states. The backward walks
the frames in reverse with beta (shifted through a small scratch row) and forms the state posteriors
``gamma_t(s) = exp(alpha_t(s) + beta_t(s) + nll)``. It returns the exact gradient with respect to
``log_probs[b, t, v]``, ``-sum_{s: l'_s = v} gamma_t(s)``, not PyTorch's ``exp(lp) - gamma`` (right only
after a log_softmax's backward). Blank states are summed by one reduction; label states per symbol, by a
segmented scan over the target's labels sorted once (``tl.sort``), each symbol's sum stored once: no
atomics, a deterministic gradient. Padded frames, infeasible rows (loss 0, as ``zero_infinity=True``)
and symbols outside the target get 0. ``log_probs`` (batch, time, vocab) is read in place, any strides
and float dtype.

:func:`modules.training.ctc.ctc_loss`, which the recipes name, runs these kernels on CUDA tensors. On CPU
tensors they run under Triton's interpreter (``TRITON_INTERPRET=1`` when Triton is imported), which is how
CI tests them.
"""

import torch
import triton
import triton.language as tl

REDUCTIONS = ("mean", "sum", "none", "batch", "batchmean")
NEG_INF = tl.constexpr(float("-inf"))
KEY_PAD = tl.constexpr(2**31 - 1)  # sort key of the label lanes past a row's target: after every real one


def _warps(block_s):
    """Warps a program: 64 states a warp, at most 8. On an H200, forward + backward (with the log_softmax)
    at the CTC recipe's shape (70 x 320 frames, 31 symbols, 200 labels: BLOCK_S 512) took 2.10, 1.23,
    0.96 and 0.89 ms with 1, 2, 4 and 8 warps, against about 1.3 ms for F.ctc_loss (one sweep, 20 steps
    each)."""
    return max(1, min(8, block_s // 64))


@triton.jit
def _logaddexp3(a, b, c):
    """log(exp a + exp b + exp c), -inf where all three are."""
    m = tl.maximum(tl.maximum(a, b), c)
    finite = m != NEG_INF
    m = tl.where(finite, m, 0.0)
    total = tl.exp(a - m) + tl.exp(b - m) + tl.exp(c - m)
    return tl.where(finite, m + tl.log(tl.where(finite, total, 1.0)), NEG_INF)


@triton.jit
def _row_lengths(input_lens_ptr, target_lens_ptr, b, time, max_target):
    """Frames and labels of utterance b, clamped into the tensors' shapes."""
    frames = tl.minimum(tl.maximum(tl.load(input_lens_ptr + b), 0), time)
    labels = tl.minimum(tl.maximum(tl.load(target_lens_ptr + b), 0), max_target)
    return frames, labels


@triton.jit
def _extended_labels(target_row, s, labels, blank, s_tl):
    """For states s (BLOCK_S,): the symbol l'_s, whether s is a state of the row, whether it is a label
    state, whether s - 2 -> s is allowed (a label unlike l'_{s-2}), and whether s -> s + 2 is."""
    states = 2 * labels + 1
    valid = s < states
    is_label = valid & (s % 2 == 1)
    j = (s - 1) // 2  # label index of an odd state
    label = tl.load(target_row + j * s_tl, mask=is_label, other=blank).to(tl.int32)
    before = tl.load(target_row + (j - 1) * s_tl, mask=is_label & (j >= 1), other=blank).to(tl.int32)
    after = tl.load(target_row + (j + 1) * s_tl, mask=is_label & (j + 1 < labels), other=blank).to(tl.int32)
    skip_into = is_label & (j >= 1) & (label != before)
    skip_from = is_label & (j + 1 < labels) & (label != after)
    return label, valid, is_label, skip_into, skip_from


@triton.jit
def _run_sum(value_a, label_a, value_b, label_b):
    """Combine of a segmented sum over sorted labels: (sum of the run of equal labels that ends the
    range, its label). Associative on sorted sequences, where equal ends mean b is one run."""
    return tl.where(label_a == label_b, value_a + value_b, value_b), label_b


@triton.jit
def ctc_forward_kernel(
    lp_ptr, targets_ptr, input_lens_ptr, target_lens_ptr, alpha_ptr, nll_ptr,
    time, max_target, blank,
    s_lb, s_lt, s_lv, s_tb, s_tl, s_ab, s_at,
    BLOCK_S: tl.constexpr,
):
    """One program an utterance: log-alpha of every valid frame into alpha (batch, time, 2L + 1) and the
    negative log-likelihood into nll (batch,), +inf where no alignment exists."""
    b = tl.program_id(0)
    frames, labels = _row_lengths(input_lens_ptr, target_lens_ptr, b, time, max_target)
    states = 2 * labels + 1
    s = tl.arange(0, BLOCK_S)
    label, valid, _, skip_into, _ = _extended_labels(targets_ptr + b.to(tl.int64) * s_tb, s, labels, blank, s_tl)
    lp_lane = lp_ptr + b.to(tl.int64) * s_lb + label * s_lv
    alpha_lane = alpha_ptr + b.to(tl.int64) * s_ab + s

    # frame 0: a path starts at the first blank or the first label
    lp = tl.load(lp_lane, mask=valid & (frames > 0), other=NEG_INF).to(tl.float32)
    alpha = tl.where(s < 2, lp, NEG_INF)
    tl.store(alpha_lane, alpha, mask=valid & (frames > 0))
    lp = tl.load(lp_lane + s_lt, mask=valid & (frames > 1), other=NEG_INF).to(tl.float32)
    for t in range(1, frames):
        lp_next = tl.load(lp_lane + (t + 1) * s_lt, mask=valid & (t + 1 < frames), other=NEG_INF)  # a frame ahead
        tl.debug_barrier()  # frame t - 1's row is stored by every thread
        previous = alpha_lane + (t - 1) * s_at
        alpha_1 = tl.load(previous - 1, mask=valid & (s >= 1), other=NEG_INF)
        alpha_2 = tl.load(previous - 2, mask=skip_into, other=NEG_INF)
        alpha = _logaddexp3(alpha, alpha_1, alpha_2) + lp
        tl.store(alpha_lane + t * s_at, alpha, mask=valid)
        lp = lp_next.to(tl.float32)

    # a path ends in the last blank or the last label
    ends = tl.where(valid & (s >= states - 2), alpha, NEG_INF)
    m = tl.max(ends, 0)
    finite = m != NEG_INF
    m = tl.where(finite, m, 0.0)
    log_likelihood = tl.where(finite, m + tl.log(tl.where(finite, tl.sum(tl.exp(ends - m), 0), 1.0)), NEG_INF)
    # no frames: the empty alignment, of probability 1 for an empty target and 0 otherwise
    log_likelihood = tl.where(frames > 0, log_likelihood, tl.where(labels == 0, 0.0, NEG_INF))
    tl.store(nll_ptr + b, -log_likelihood)


@triton.jit
def ctc_backward_kernel(
    lp_ptr, targets_ptr, input_lens_ptr, target_lens_ptr, alpha_ptr, nll_ptr, grad_nll_ptr, grad_ptr, scratch_ptr,
    time, max_target, blank,
    s_lb, s_lt, s_lv, s_tb, s_tl, s_ab, s_at, s_gn, s_gb, s_gt, s_gv,
    BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One program an utterance: grad[b, t, v] = -grad_nll[b] sum_{s: l'_s = v} gamma_t(s) at its valid
    frames (grad comes zeroed; padded frames and infeasible rows are left so)."""
    b = tl.program_id(0)
    frames, labels = _row_lengths(input_lens_ptr, target_lens_ptr, b, time, max_target)
    states = 2 * labels + 1
    nll = tl.load(nll_ptr + b)
    frames = tl.where(nll == float("inf"), 0, frames)  # no alignment: zero_infinity's gradient is 0
    scale = -tl.load(grad_nll_ptr + b * s_gn).to(tl.float32)
    s = tl.arange(0, BLOCK_S)
    target_row = targets_ptr + b.to(tl.int64) * s_tb
    label, valid, is_label, _, skip_from = _extended_labels(target_row, s, labels, blank, s_tl)
    # states that emit the blank: the blank states, and label states of a target that holds the blank's id
    # (our tokenizers' <unk> is the blank): their symbol's gradient is one sum, stored once
    emits_blank = valid & (label == blank)
    lp_lane = lp_ptr + b.to(tl.int64) * s_lb + label * s_lv
    alpha_lane = alpha_ptr + b.to(tl.int64) * s_ab + s
    grad_row = grad_ptr + b.to(tl.int64) * s_gb
    # two (e, gamma) row pairs, alternating by frame: one barrier a frame keeps reads and writes apart
    scratch = scratch_ptr + b.to(tl.int64) * (4 * BLOCK_S)

    # the target's labels sorted (key: symbol, then position), so that equal symbols form runs
    k = tl.arange(0, BLOCK_L)
    in_target = k < labels
    symbol = tl.load(target_row + k * s_tl, mask=in_target, other=0).to(tl.int32)
    key = tl.sort(tl.where(in_target, symbol * BLOCK_L + k, KEY_PAD))
    in_target = key != KEY_PAD
    sorted_symbol = key // BLOCK_L
    sorted_state = 2 * (key % BLOCK_L) + 1
    remaining, _ = tl.associative_scan((tl.full([BLOCK_L], 1, tl.int32), sorted_symbol), 0, _run_sum, reverse=True)
    run_end = in_target & (remaining == 1) & (sorted_symbol != blank)  # the last of its run stores the run's sum

    beta_end = tl.where(valid & (s >= states - 2), 0.0, NEG_INF)  # frame T_b - 1: the two final states
    last = frames - 1
    lp = tl.load(lp_lane + last * s_lt, mask=valid & (frames > 0), other=NEG_INF).to(tl.float32)
    alpha = tl.load(alpha_lane + last * s_at, mask=valid & (frames > 0), other=NEG_INF)
    e = tl.full([BLOCK_S], NEG_INF, tl.float32)  # lp_{t+1}(l'_s) + beta_{t+1}(s)
    for i in range(frames):
        t = last - i
        lp_before = tl.load(lp_lane + (t - 1) * s_lt, mask=valid & (t > 0), other=NEG_INF)  # a frame ahead
        alpha_before = tl.load(alpha_lane + (t - 1) * s_at, mask=valid & (t > 0), other=NEG_INF)
        later = scratch + ((t + 1) % 2) * (2 * BLOCK_S)
        e_1 = tl.load(later + s + 1, mask=valid & (s + 1 < states) & (i > 0), other=NEG_INF)
        e_2 = tl.load(later + s + 2, mask=skip_from & (i > 0), other=NEG_INF)
        beta = tl.where(i == 0, beta_end, _logaddexp3(e, e_1, e_2))
        e = lp + beta
        gamma = tl.exp(alpha + beta + nll)
        frame_grad = grad_row + t * s_gt
        tl.store(frame_grad + blank * s_gv, (scale * tl.sum(tl.where(emits_blank, gamma, 0.0), 0)).to(
            grad_ptr.dtype.element_ty))
        here = scratch + (t % 2) * (2 * BLOCK_S)
        tl.store(here + s, e, mask=valid)
        tl.store(here + BLOCK_S + s, gamma, mask=valid)
        tl.debug_barrier()  # this frame's e and gamma are stored by every thread
        gamma_sorted = tl.load(here + BLOCK_S + sorted_state, mask=in_target, other=0.0)
        run, _ = tl.associative_scan((gamma_sorted, sorted_symbol), 0, _run_sum)
        tl.store(frame_grad + sorted_symbol * s_gv, (scale * run).to(grad_ptr.dtype.element_ty),
                 mask=run_end)
        lp = lp_before.to(tl.float32)
        alpha = alpha_before


def _launch_sizes(max_target):
    states = 2 * max_target + 1
    return triton.next_power_of_2(states), max(2, triton.next_power_of_2(max_target))


def _ctc_forward(log_probs, targets, input_lengths, target_lengths, blank):
    batch, time, _ = log_probs.shape
    max_target = targets.shape[1]
    block_s, block_l = _launch_sizes(max_target)
    if log_probs.shape[2] * block_l >= 2**31 - 1:  # the backward's sort keys: symbol * BLOCK_L + position
        raise ValueError(f"vocabulary {log_probs.shape[2]} x {block_l} label lanes overflows int32 sort keys")
    alpha = torch.empty(batch, time, 2 * max_target + 1, device=log_probs.device, dtype=torch.float32)
    nll = torch.empty(batch, device=log_probs.device, dtype=torch.float32)
    if batch > 0:
        ctc_forward_kernel[(batch,)](
            log_probs, targets, input_lengths, target_lengths, alpha, nll,
            time, max_target, blank,
            *log_probs.stride(), *targets.stride(), *alpha.stride()[:2],
            BLOCK_S=block_s, num_warps=_warps(block_s),
        )
    return nll, alpha


def _ctc_backward(grad_nll, log_probs, targets, input_lengths, target_lengths, alpha, nll, blank):
    batch, time, vocab = log_probs.shape
    max_target = targets.shape[1]
    block_s, block_l = _launch_sizes(max_target)
    grad = torch.zeros(batch, time, vocab, device=log_probs.device, dtype=log_probs.dtype)
    scratch = torch.empty(batch, 4 * block_s, device=log_probs.device, dtype=torch.float32)
    if batch > 0:
        ctc_backward_kernel[(batch,)](
            log_probs, targets, input_lengths, target_lengths, alpha, nll, grad_nll, grad, scratch,
            time, max_target, blank,
            *log_probs.stride(), *targets.stride(), *alpha.stride()[:2], grad_nll.stride(0), *grad.stride(),
            BLOCK_S=block_s, BLOCK_L=block_l, num_warps=_warps(block_s),
        )
    return grad


class CTCFunction(torch.autograd.Function):
    """Per-utterance CTC negative log-likelihood (batch,), float32, 0 where infeasible; absolute lengths."""

    @staticmethod
    def forward(ctx, log_probs, targets, input_lengths, target_lengths, blank):
        nll, alpha = _ctc_forward(log_probs, targets, input_lengths, target_lengths, blank)
        ctx.save_for_backward(log_probs, targets, input_lengths, target_lengths, alpha, nll)
        ctx.blank = blank
        return torch.where(nll == float("inf"), 0.0, nll)  # zero_infinity

    @staticmethod
    def backward(ctx, grad_nll):
        log_probs, targets, input_lengths, target_lengths, alpha, nll = ctx.saved_tensors
        grad = _ctc_backward(grad_nll.float(), log_probs, targets, input_lengths, target_lengths, alpha, nll,
                             ctx.blank)
        return grad, None, None, None, None


def ctc_nll(log_probs, targets, input_lengths, target_lengths, blank_index):
    """CTC negative log-likelihood of each utterance (batch,), float32, with ABSOLUTE integer lengths
    (device tensors: nothing is copied to the host); 0 and no gradient where no alignment exists."""
    device = log_probs.device
    input_lengths = input_lengths.to(device=device, dtype=torch.int32)
    target_lengths = target_lengths.to(device=device, dtype=torch.int32)
    return CTCFunction.apply(log_probs, targets.to(device), input_lengths, target_lengths, int(blank_index))


def _reduce(nll, target_lengths, reduction):
    """The reductions of SpeechBrain's ctc_loss over F.ctc_loss's (zero_infinity) per-utterance losses."""
    if reduction == "mean":  # F.ctc_loss: each loss over its target length (at least 1), then the batch mean
        return (nll / target_lengths.clamp_min(1)).mean()
    if reduction == "sum":
        return nll.sum()
    if reduction == "none":
        return nll
    if reduction == "batchmean":
        return nll.sum() / nll.shape[0]
    if reduction == "batch":
        batch = nll.size(0)
        return nll.view(batch, -1).sum(1) / target_lengths.view(batch, -1).sum(1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, not {reduction!r}")


def triton_ctc_loss(log_probs, targets, input_lens, target_lens, blank_index, reduction="mean"):
    """SpeechBrain's ``speechbrain.nnet.losses.ctc_loss`` (same arguments and result: relative lengths,
    zero_infinity, the same reductions), on our kernels whatever the device (a CPU tensor needs
    ``TRITON_INTERPRET=1``); float32 whatever the input's dtype."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, not {reduction!r}")
    # absolute lengths as SpeechBrain rounds them, on the device
    input_lengths = (input_lens.to(log_probs.device) * log_probs.shape[1]).round().int()
    target_lengths = (target_lens.to(log_probs.device) * targets.shape[1]).round().int()
    nll = ctc_nll(log_probs, targets, input_lengths, target_lengths, blank_index)
    return _reduce(nll, target_lengths, reduction)
