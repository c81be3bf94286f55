"""Recurrent inference of the unidirectional Mamba and Mamba-2 mixers against their parallel forward, in float64."""

import pytest
import torch

from modules.mamba.mamba import Mamba
from modules.mamba.mamba2 import Mamba2

MAMBA_TOLERANCE = dict(rtol=1e-9, atol=1e-10)
MAMBA2_TOLERANCE = dict(rtol=1e-7, atol=1e-9)
MAMBA2 = dict(d_state=8, headdim=16)

# id -> (mixer builder, d_model, tolerance)
MIXERS = {
    "mamba": (lambda: Mamba(16, d_state=8), 16, MAMBA_TOLERANCE),
    "mamba2-gated": (lambda: Mamba2(32, **MAMBA2, ngroups=2, chunk_size=4, rmsnorm=False), 32, MAMBA2_TOLERANCE),
    "mamba2-rmsnorm": (lambda: Mamba2(32, **MAMBA2, ngroups=2, chunk_size=4, rmsnorm=True), 32, MAMBA2_TOLERANCE),
}


def inputs(batch=3, time=11, d_model=16, seed=1):
    return torch.randn(batch, time, d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(params=MIXERS)
def case(request):
    """(float64 mixer in eval mode, inputs of its width, tolerance)."""
    build, d_model, tolerance = MIXERS[request.param]
    torch.manual_seed(0)
    return build().double().eval(), inputs(d_model=d_model), tolerance


@torch.no_grad()
def test_steps_over_a_sequence_equal_the_full_forward(case):
    mixer, hidden, tolerance = case
    cache = mixer.allocate_cache(hidden.shape[0])
    stepped = torch.cat([mixer.step(hidden[:, t : t + 1], cache) for t in range(hidden.shape[1])], dim=1)
    torch.testing.assert_close(stepped, mixer(hidden), **tolerance)


@torch.no_grad()
def test_chunks_forwarded_with_a_cache_equal_the_full_forward(case):
    mixer, hidden, tolerance = case
    cache = mixer.allocate_cache(hidden.shape[0])
    chunks = [mixer(chunk, cache=cache) for chunk in hidden.split([5, 1, 2, 3], dim=1)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), mixer(hidden), **tolerance)


@torch.no_grad()
def test_padded_prefix_of_different_lengths_then_steps_equal_the_full_forward(case):
    """The cache holds each row's state after its own last valid prefix frame, not after the padding."""
    mixer, hidden, tolerance = case
    prefix_lengths = torch.tensor([6, 2, 0])
    full = mixer(hidden)
    prefix = hidden[:, :6].clone()
    prefix[1, 2:] = 100.0  # padding that must not leak into the cache
    cache = mixer.allocate_cache(3)
    prefix_out = mixer(prefix, lengths=prefix_lengths, cache=cache)
    for row, length in enumerate(prefix_lengths):
        torch.testing.assert_close(prefix_out[row, :length], full[row, :length], **tolerance)
    for offset in range(4):
        position = prefix_lengths + offset
        token = hidden[torch.arange(3), position].unsqueeze(1)
        expected = full[torch.arange(3), position].unsqueeze(1)
        torch.testing.assert_close(mixer.step(token, cache), expected, **tolerance)


@torch.no_grad()
def test_cache_reordered_on_the_batch_axis_continues_each_selected_row(case):
    mixer, hidden, tolerance = case
    index = torch.tensor([2, 0, 0])
    cache = mixer.allocate_cache(3)
    mixer(hidden[:, :7], cache=cache)
    cache = tuple(state.index_select(0, index) for state in cache)
    stepped = mixer.step(hidden[index, 7:8], cache)
    torch.testing.assert_close(stepped, mixer(hidden[index])[:, 7:8], **tolerance)


@pytest.mark.parametrize(
    "build",
    [lambda: Mamba(16, bidirectional=True), lambda: Mamba2(32, **MAMBA2, bidirectional=True)],
    ids=["mamba", "mamba2"],
)
def test_bidirectional_mixer_refuses_a_cache(build):
    with pytest.raises(ValueError):
        build().allocate_cache(2)


def test_summed_directions_are_twice_the_averaged_ones():
    torch.manual_seed(0)
    mean = Mamba2(32, **MAMBA2, rmsnorm=False, bidirectional=True).double()
    summed = Mamba2(32, **MAMBA2, rmsnorm=False, bidirectional=True, combine="sum").double()
    summed.load_state_dict(mean.state_dict())
    hidden = inputs(d_model=32)
    # out_proj has no bias and the gate is linear in y, so the sum is exactly twice the mean
    torch.testing.assert_close(summed(hidden), 2 * mean(hidden), **MAMBA2_TOLERANCE)
