"""Mamba decoder: batch invariance, recurrent decoding against the full decoder, published size."""

import torch

from modules.models.mamba_decoder import MambaDecoder, packing_index

TOLERANCE = dict(rtol=1e-9, atol=1e-10)
D_MODEL = 16


def make_decoder():
    torch.manual_seed(0)
    return MambaDecoder(num_layers=2, d_model=D_MODEL, d_ffn=32, mamba_config={"d_state": 8}).double().eval()


def randn(*shape, seed):
    return torch.randn(*shape, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def padding_mask(lengths, time):
    return torch.arange(time) >= lengths[:, None]


def test_packing_puts_each_rows_memory_padding_after_its_target():
    index = packing_index(torch.tensor([3, 1]), memory_time=3, target_time=2)
    # concat([memory, target]) positions: memory 0..2, target 3..4
    assert index.tolist() == [[0, 1, 2, 3, 4], [0, 3, 4, 1, 2]]


@torch.no_grad()
def test_utterance_alone_and_in_a_padded_batch_give_the_same_outputs():
    decoder = make_decoder()
    memory, target = randn(1, 7, seed=1), randn(1, 5, seed=2)
    alone, _ = decoder(target, memory)

    batch_memory, batch_target = 10 * randn(2, 12, seed=3), 10 * randn(2, 9, seed=4)  # padding is noise
    batch_memory[1, :7], batch_target[1, :5] = memory[0], target[0]
    memory_lengths = torch.tensor([12, 7])
    target_mask = padding_mask(torch.tensor([9, 5]), 9)
    in_batch, _ = decoder(
        batch_target,
        batch_memory,
        tgt_key_padding_mask=target_mask,
        memory_key_padding_mask=padding_mask(memory_lengths, 12),
    )
    torch.testing.assert_close(in_batch[1:, :5], alone, **TOLERANCE)


@torch.no_grad()
def test_cached_decoding_equals_the_full_decoder_on_each_prefix_also_after_reordering():
    decoder = make_decoder()
    memory, memory_lengths = randn(3, 10, seed=5), torch.tensor([10, 4, 7])
    memory_mask = padding_mask(memory_lengths, 10)
    tokens = randn(3, 8, seed=6)
    cache = decoder.init_cache(memory, memory_lengths)
    for t in range(8):
        if t == 4:  # beam search: keep rows 2, 0, 0
            index = torch.tensor([2, 0, 0])
            cache = decoder.reorder_cache(cache, index)
            memory, memory_mask, tokens = memory[index], memory_mask[index], tokens[index]
        stepped = decoder.step(tokens[:, t : t + 1], cache)
        full, _ = decoder(tokens[:, : t + 1], memory, memory_key_padding_mask=memory_mask)
        torch.testing.assert_close(stepped, full[:, -1:], **TOLERANCE)


def test_small_conmambamamba_decoder_has_the_published_parameter_count():
    """2.35 M in the decoder of the published S2S conmambamamba_small (d_model 144, 4 layers, d_ffn 1024).

    Per layer: 2 Mamba mixers (145,440 each) + FFN (296,080) + 3 LayerNorms (864); plus the final LayerNorm.
    """
    decoder = MambaDecoder(num_layers=4, d_model=144, d_ffn=1024, mamba_config={"bidirectional": True})
    count = sum(parameter.numel() for parameter in decoder.parameters())
    assert count == 2_351_584
    assert abs(count - 2.35e6) / 2.35e6 < 0.005
