"""ConMamba encoder: padding invariance, causality, published sizes and initialisation switches."""

import torch

from modules.models.conmamba import ConMambaEncoder


def padded_batch(time=19, d_model=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([time, 11, 4])
    x = torch.randn(len(lengths), time, d_model, generator=g, dtype=torch.float64)
    mask = torch.arange(time) >= lengths[:, None]
    x[mask] = 1e3  # padding must not matter
    return x, lengths, mask


def test_utterance_alone_equals_utterance_in_padded_batch():
    torch.manual_seed(0)
    encoder = ConMambaEncoder(num_layers=2, d_model=32, d_ffn=64, kernel_size=7).double().eval()
    x, lengths, mask = padded_batch()
    batched, _ = encoder(x, src_key_padding_mask=mask)
    for row, length in enumerate(lengths.tolist()):
        alone, _ = encoder(x[row : row + 1, :length])
        assert torch.allclose(alone, batched[row : row + 1, :length], atol=1e-10)


def test_mamba2_encoder_is_also_padding_invariant():
    torch.manual_seed(0)
    config = {"mixer": "mamba2", "d_state": 8, "headdim": 16}
    encoder = ConMambaEncoder(2, 32, 64, kernel_size=7, mamba_config=config).double().eval()
    x, lengths, mask = padded_batch(seed=1)
    batched, _ = encoder(x, src_key_padding_mask=mask)
    for row, length in enumerate(lengths.tolist()):
        alone, _ = encoder(x[row : row + 1, :length])
        assert torch.allclose(alone, batched[row : row + 1, :length], atol=1e-10)


def test_causal_encoder_output_never_depends_on_future_frames():
    torch.manual_seed(0)
    encoder = ConMambaEncoder(2, 32, 64, kernel_size=7, causal=True).double().eval()
    x = torch.randn(1, 15, 32, dtype=torch.float64)
    changed = x.clone()
    changed[:, 10:] += torch.randn(1, 5, 32, dtype=torch.float64)
    assert torch.allclose(encoder(x)[0][:, :10], encoder(changed)[0][:, :10], atol=1e-12)
    assert not torch.allclose(encoder(x)[0][:, 10:], encoder(changed)[0][:, 10:])


def test_encoder_parameter_counts_match_published_encoders():
    """ConMamba encoders of the published S2S small/large yamls (9.93 M / 81.92 M); the CTC model's
    31.56 M is checked on the whole yaml model in test_ctc_hparams."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(ConMambaEncoder(12, 144, 1024)) / 9.93e6 - 1) < 0.005
    assert abs(count(ConMambaEncoder(12, 512, 2048)) / 81.92e6 - 1) < 0.005


def test_xavier_init_switch_overwrites_A_log_like_the_published_recipe():
    torch.manual_seed(0)
    default = ConMambaEncoder(1, 32, 64)
    quirk = ConMambaEncoder(1, 32, 64, xavier_init=True)
    A_log = default.layers[0].mixer.A_log
    assert torch.allclose(A_log[0], torch.log(torch.arange(1.0, 17.0)))  # S4D-real init
    assert quirk.layers[0].mixer.A_log.mean().abs() < 0.1  # A_log ~ N(0, small): A ~ -1
