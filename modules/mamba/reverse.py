"""Length-aware time reversal, the padding-correct way to run a causal scan backwards.

Flipping a right-padded batch puts each short utterance's padding *before* its frames, so a backward
scan would read padding first and its outputs would depend on the rest of the batch. Instead each row
is reversed inside its own valid length and padding stays where it is (README, "Batch invariance").
"""

import torch


def reversal_index(lengths, time):
    """Per-row gather index (batch, time): valid frames reversed, padded frames left in place.

    ``lengths`` holds the number of valid frames of each row; None means every row is full.
    The index is its own inverse, so the same gather undoes the reversal.
    """
    steps = torch.arange(time, device=lengths.device)
    reversed_steps = lengths[:, None] - 1 - steps
    return torch.where(steps < lengths[:, None], reversed_steps, steps)


def reverse_time(x, index, dim):
    """Gathers ``x`` along ``dim`` with a (batch, time) index from :func:`reversal_index`."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    return x.gather(dim, index.view(shape).expand_as(x))
