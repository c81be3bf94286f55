"""Recurrent inference of the unidirectional Mamba-2 mixer against its parallel forward, in float64."""

import pytest
import torch

from modules.mamba.mamba2 import Mamba2

TOLERANCE = dict(rtol=1e-7, atol=1e-9)


@pytest.fixture(params=[False, True], ids=["gated", "rmsnorm"])
def mixer(request):
    torch.manual_seed(0)
    return Mamba2(32, d_state=8, headdim=16, ngroups=2, chunk_size=4, rmsnorm=request.param).double().eval()


def inputs(batch=3, time=11, d_model=32, seed=1):
    return torch.randn(batch, time, d_model, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@torch.no_grad()
def test_steps_over_a_sequence_equal_the_full_forward(mixer):
    hidden = inputs()
    cache = mixer.allocate_inference_cache(hidden.shape[0])
    stepped = torch.cat([mixer.step(hidden[:, t : t + 1], cache) for t in range(hidden.shape[1])], dim=1)
    torch.testing.assert_close(stepped, mixer(hidden), **TOLERANCE)


@torch.no_grad()
def test_chunks_forwarded_with_a_cache_equal_the_full_forward(mixer):
    hidden = inputs()
    cache = mixer.allocate_inference_cache(hidden.shape[0])
    chunks = [mixer(chunk, cache=cache) for chunk in hidden.split([5, 1, 2, 3], dim=1)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), mixer(hidden), **TOLERANCE)


@torch.no_grad()
def test_padded_prefix_of_different_lengths_then_steps_equal_the_full_forward(mixer):
    """The cache holds each row's state after its own last valid prefix frame, not after the padding."""
    hidden, prefix_lengths = inputs(), torch.tensor([6, 2, 0])
    full = mixer(hidden)
    prefix = hidden[:, :6].clone()
    prefix[1, 2:] = 100.0  # padding that must not leak into the cache
    cache = mixer.allocate_inference_cache(3)
    prefix_out = mixer(prefix, lengths=prefix_lengths, cache=cache)
    for row, length in enumerate(prefix_lengths):
        torch.testing.assert_close(prefix_out[row, :length], full[row, :length], **TOLERANCE)
    for offset in range(4):
        position = prefix_lengths + offset
        token = hidden[torch.arange(3), position].unsqueeze(1)
        expected = full[torch.arange(3), position].unsqueeze(1)
        torch.testing.assert_close(mixer.step(token, cache), expected, **TOLERANCE)


@torch.no_grad()
def test_cache_reordered_on_the_batch_axis_continues_each_selected_row(mixer):
    hidden, index = inputs(), torch.tensor([2, 0, 0])
    cache = mixer.allocate_inference_cache(3)
    mixer(hidden[:, :7], cache=cache)
    cache = tuple(state.index_select(0, index) for state in cache)
    stepped = mixer.step(hidden[index, 7:8], cache)
    torch.testing.assert_close(stepped, mixer(hidden[index])[:, 7:8], **TOLERANCE)


def test_bidirectional_mixer_refuses_a_cache():
    with pytest.raises(ValueError):
        Mamba2(32, d_state=8, headdim=16, bidirectional=True).allocate_inference_cache(2)


def test_summed_directions_are_twice_the_averaged_ones():
    torch.manual_seed(0)
    mean = Mamba2(32, d_state=8, headdim=16, rmsnorm=False, bidirectional=True).double()
    summed = Mamba2(32, d_state=8, headdim=16, rmsnorm=False, bidirectional=True, combine="sum").double()
    summed.load_state_dict(mean.state_dict())
    hidden = inputs()
    # out_proj has no bias and the gate is linear in y, so the sum is exactly twice the mean
    torch.testing.assert_close(summed(hidden), 2 * mean(hidden), **TOLERANCE)
