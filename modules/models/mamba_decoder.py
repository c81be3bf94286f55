"""Mamba decoder of ConMamba ("ConMambaMamba"): self-Mamba + CrossMamba + FFN, with a recurrent cache.

Layer (arXiv 2407.09732), pre-LayerNorm, dropout on every residual branch:

    x = x + Dropout(SelfMamba(LayerNorm(x)))
    x = x + Dropout(CrossMamba(LayerNorm(x), memory))
    x = x + Dropout(FFN(LayerNorm(x)))

CrossMamba has no attention: a unidirectional Mamba scans the encoder memory followed by the target and
keeps the outputs at the target positions, so the encoder reaches the target only through the recurrent
state. The published code concatenates the padded memory and the target, which puts a short
utterance's memory padding between its memory and its target. Here each row is packed as
[memory[:length], target, padding] by one gather, so a row's output does not depend on its batch.

Because the mixers are causal, decoding is recurrent: :meth:`MambaDecoder.init_cache`
scans each row's memory once, and :meth:`MambaDecoder.step` then costs O(1) in the prefix length.
"""

import torch
import torch.nn as nn
from speechbrain.nnet.normalization import LayerNorm

from modules.mamba.mamba import Mamba
from modules.models.conmamba import FeedForward


def packing_index(memory_lengths, memory_time, target_time):
    """Gather index (batch, memory_time + target_time) into concat([memory, target], time) that yields
    [memory[:length], target, memory padding] for each row."""
    positions = torch.arange(memory_time + target_time, device=memory_lengths.device)
    lengths = memory_lengths[:, None]
    in_memory = positions < lengths
    in_target = positions < lengths + target_time
    target_source = memory_time + positions - lengths  # the target is stored after all memory frames
    padding_source = positions - target_time
    return torch.where(in_memory, positions, torch.where(in_target, target_source, padding_source))


def gather_time(x, index):
    """x (batch, time, features) gathered along time with a (batch, new_time) index."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class MambaDecoderLayer(nn.Module):
    """One decoder layer over the target (batch, target_time, d_model); see the module docstring.

    ``mamba_config`` is passed to both mixers; ``bidirectional`` is dropped (the dict is shared with the
    encoder, and a decoder must be causal).
    """

    def __init__(self, d_model, d_ffn, activation=nn.GELU, dropout=0.1, mamba_config=None):
        super().__init__()
        config = dict(mamba_config or {})
        config.pop("bidirectional", None)
        if config.pop("mixer", "mamba") != "mamba":
            raise ValueError("MambaDecoder supports the Mamba-1 mixer only")
        self.self_mamba = Mamba(d_model, **config)
        self.cross_mamba = Mamba(d_model, **config)
        self.ffn = FeedForward(d_ffn=d_ffn, input_size=d_model, dropout=dropout, activation=activation)
        self.self_norm, self.cross_norm, self.ffn_norm = [LayerNorm(d_model, eps=1e-6) for _ in range(3)]
        self.self_dropout, self.cross_dropout, self.ffn_dropout = [nn.Dropout(dropout) for _ in range(3)]

    def forward(self, tgt, memory, memory_lengths):
        """tgt (batch, target_time, d_model); memory (batch, memory_time, d_model); memory_lengths (batch,)."""
        return self._residual_blocks(tgt, self.self_mamba, lambda x: self._cross_mamba(x, memory, memory_lengths))

    def step(self, tgt, self_cache, cross_cache):
        """One target token (batch, 1, d_model) with each mixer continuing from its cache."""
        return self._residual_blocks(
            tgt,
            lambda x: self.self_mamba.step(x, self_cache),
            lambda x: self.cross_mamba.step(x, cross_cache),
        )

    def _residual_blocks(self, x, self_mixer, cross_mixer):
        """The three pre-LN residual sub-blocks; the mixers are callables so that forward and step share them."""
        x = x + self.self_dropout(self_mixer(self.self_norm(x)))
        x = x + self.cross_dropout(cross_mixer(self.cross_norm(x)))
        return x + self.ffn_dropout(self.ffn(self.ffn_norm(x)))

    def _cross_mamba(self, tgt, memory, memory_lengths):
        """CrossMamba over each row's packed [memory, target]; returns the target positions' outputs."""
        memory_time, target_time = memory.shape[1], tgt.shape[1]
        packed = gather_time(torch.cat([memory, tgt], dim=1), packing_index(memory_lengths, memory_time, target_time))
        target_positions = memory_lengths[:, None] + torch.arange(target_time, device=tgt.device)
        return gather_time(self.cross_mamba(packed), target_positions)


class MambaDecoder(nn.Module):
    """A stack of :class:`MambaDecoderLayer` followed by a LayerNorm (eps 1e-6).

    ``forward`` takes the arguments of SpeechBrain's ``TransformerDecoder``; masks serve only to find
    lengths (True = padding): ``memory_key_padding_mask`` gives the memory lengths, target padding
    is harmless (it follows the target in causal scans), ``tgt_mask``, ``memory_mask`` and the
    positional embeddings are unused (the target's positional encoding is added by the caller).

    Example
    -------
    >>> decoder = MambaDecoder(num_layers=2, d_model=32, d_ffn=64)
    >>> memory_mask = torch.tensor([[False] * 9, [False] * 5 + [True] * 4])
    >>> output, _ = decoder(torch.randn(2, 4, 32), torch.randn(2, 9, 32), memory_key_padding_mask=memory_mask)
    >>> output.shape
    torch.Size([2, 4, 32])
    """

    def __init__(self, num_layers, d_model, d_ffn, activation=nn.GELU, dropout=0.1, mamba_config=None):
        super().__init__()
        self.layers = nn.ModuleList(
            MambaDecoderLayer(d_model, d_ffn, activation, dropout, mamba_config) for _ in range(num_layers)
        )
        self.norm = LayerNorm(d_model, eps=1e-6)

    def forward(
        self,
        tgt,
        memory,
        tgt_mask=None,
        memory_mask=None,
        tgt_key_padding_mask=None,
        memory_key_padding_mask=None,
        pos_embs_tgt=None,
        pos_embs_src=None,
    ):
        """tgt (batch, target_time, d_model); memory (batch, memory_time, d_model).

        Returns (output (batch, target_time, d_model), None); the None stands for attention maps.
        """
        memory_lengths = self._memory_lengths(memory, memory_key_padding_mask)
        output = tgt
        for layer in self.layers:
            output = layer(output, memory, memory_lengths)
        return self.norm(output), None

    @torch.no_grad()
    def init_cache(self, memory, memory_lengths=None):
        """Scans each row's valid memory once through every layer's CrossMamba.

        memory (batch, memory_time, d_model); memory_lengths (batch,) valid frames, None if all are.
        CrossMamba reads the memory as it is in every layer, so the layers' memory scans are
        independent. Returns a list with one (self_cache, cross_cache) per layer, each a
        (conv_state, ssm_state) pair; the self-Mamba caches start empty.
        """
        batch = memory.shape[0]
        cache = []
        for layer in self.layers:
            cross_cache = layer.cross_mamba.allocate_cache(batch, device=memory.device)
            layer.cross_mamba(memory, lengths=memory_lengths, cache=cross_cache)
            cache.append((layer.self_mamba.allocate_cache(batch, device=memory.device), cross_cache))
        return cache

    @torch.no_grad()
    def step(self, tgt, cache):
        """Decodes one target token (batch, 1, d_model) -> (batch, 1, d_model), updating ``cache`` in place.

        Layer by layer: layer l's CrossMamba input is the output of its own self-Mamba block.
        """
        output = tgt
        for layer, (self_cache, cross_cache) in zip(self.layers, cache):
            output = layer.step(output, self_cache, cross_cache)
        return self.norm(output)

    @staticmethod
    def reorder_cache(cache, index):
        """Selects rows of every cached state (beam search): index (new_batch,) into the batch axis."""
        return [
            tuple(tuple(state.index_select(0, index) for state in mixer_cache) for mixer_cache in layer_cache)
            for layer_cache in cache
        ]

    @staticmethod
    def _memory_lengths(memory, memory_key_padding_mask):
        """Valid frames per row (batch,) from a padding mask (True = padding), or the full length."""
        if memory_key_padding_mask is None:
            return torch.full((memory.shape[0],), memory.shape[1], device=memory.device)
        return (~memory_key_padding_mask).sum(dim=1)
