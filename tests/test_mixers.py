"""Mamba, BiMamba and Mamba-2 mixers: float64 reference, padding, gradients to both directions."""

import pytest
import torch
import torch.nn.functional as F

from modules.mamba.mamba import Mamba
from modules.mamba.mamba2 import Mamba2
from modules.mamba.selective_scan import cuda_kernel_available, selective_scan_ref

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference_bimamba(mixer, x):
    """BiMamba v2 as published (arXiv 2407.09732), one unpadded utterance (1, time, d_model):
    each direction is a separate sequential scan, the backward one on the time-flipped sequence."""
    x_in, z = mixer.in_proj(x).transpose(1, 2).chunk(2, dim=1)
    outputs = []
    for suffix in mixer.suffixes:
        flip = (lambda t: t.flip(-1)) if suffix else (lambda t: t)  # noqa: E731
        conv = getattr(mixer, "conv1d" + suffix)
        xc = F.silu(conv(F.pad(flip(x_in), (conv.kernel_size[0] - 1, 0))))
        dt, B, C = getattr(mixer, "x_proj" + suffix)(xc.transpose(1, 2)).split(
            [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1
        )
        dt_proj = getattr(mixer, "dt_proj" + suffix)
        y = selective_scan_ref(
            xc, dt_proj.weight @ dt.transpose(1, 2), -torch.exp(getattr(mixer, "A_log" + suffix)),
            B.transpose(1, 2), C.transpose(1, 2), getattr(mixer, "D" + suffix), flip(z),
            dt_proj.bias, delta_softplus=True,
        )
        outputs.append(flip(y))
    return mixer.out_proj((sum(outputs) / len(outputs)).transpose(1, 2))


def random_lengths_batch(batch=4, time=23, d_model=32, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, time + 1, (batch,), generator=g)
    lengths[0] = time
    return torch.randn(batch, time, d_model, generator=g, dtype=dtype), lengths


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_fp32_mixer_matches_float64_reference_on_each_utterance(bidirectional, device, no_tf32):
    torch.manual_seed(0)
    reference = Mamba(32, bidirectional=bidirectional).double()
    mixer = Mamba(32, bidirectional=bidirectional).to(device)
    mixer.load_state_dict(reference.state_dict())
    x, lengths = random_lengths_batch()
    x.requires_grad_()
    x32 = x.detach().float().to(device).requires_grad_()
    out = mixer(x32, lengths.to(device))
    for row, length in enumerate(lengths.tolist()):
        ref = reference_bimamba(reference, x[row : row + 1, :length])
        valid = out[row : row + 1, :length]
        assert ((valid.double().cpu() - ref).norm() / ref.norm()).item() < 1e-5
        # gradient of a loss over this utterance's valid frames, w.r.t. its input
        weights = torch.randn_like(ref)
        (grad_ref,) = torch.autograd.grad((ref * weights).sum(), x)
        (grad,) = torch.autograd.grad((valid * weights.float().to(device)).sum(), x32, retain_graph=True)
        assert ((grad.double().cpu() - grad_ref).norm() / grad_ref.norm()).item() < 1e-5


@pytest.mark.parametrize("mixer_class", [Mamba, Mamba2])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_utterance_alone_equals_utterance_in_padded_batch(mixer_class, bidirectional):
    torch.manual_seed(0)
    kwargs = dict(d_state=8, headdim=16, ngroups=2) if mixer_class is Mamba2 else {}
    mixer = mixer_class(32, bidirectional=bidirectional, **kwargs).double()
    x, lengths = random_lengths_batch(seed=1)
    x[torch.arange(x.shape[1]) >= lengths[:, None]] = 1e3  # padding must not matter
    batched = mixer(x, lengths)
    for row, length in enumerate(lengths.tolist()):
        alone = mixer(x[row : row + 1, :length], lengths[row : row + 1])
        assert torch.allclose(alone, batched[row : row + 1, :length], atol=1e-12)


@pytest.mark.parametrize("mixer_class", [Mamba, Mamba2])
def test_every_parameter_of_both_directions_gets_a_gradient(mixer_class):
    kwargs = dict(d_state=8, headdim=16) if mixer_class is Mamba2 else {}
    mixer = mixer_class(32, bidirectional=True, **kwargs)
    x, lengths = random_lengths_batch(dtype=torch.float32)
    mixer(x, lengths).pow(2).mean().backward()
    for name, parameter in mixer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_bidirectional_output_depends_on_future_frames_and_causal_does_not():
    torch.manual_seed(0)
    x, _ = random_lengths_batch(batch=1, dtype=torch.float32)
    changed = x.clone()
    changed[:, -1] += 1.0
    for bidirectional, should_change in [(False, False), (True, True)]:
        mixer = Mamba(32, bidirectional=bidirectional)
        difference = (mixer(x) - mixer(changed))[:, :-1].abs().max().item()
        assert (difference > 1e-6) == should_change


def test_mamba_parameter_names_match_mamba_ssm():
    names = {name for name, _ in Mamba(32).named_parameters()}
    assert names == {
        "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
        "dt_proj.bias", "A_log", "D", "out_proj.weight",
    }


def test_default_init_backward_dt_switch_keeps_pytorch_default_dt_proj_b():
    torch.manual_seed(0)
    default = Mamba(64, bidirectional=True)
    quirk = Mamba(64, bidirectional=True, default_init_backward_dt=True)
    # Mamba's dt init gives softplus(bias) in [1e-3, 0.1]; PyTorch's default gives ~0.7
    assert F.softplus(default.dt_proj_b.bias).max() <= 0.1 + 1e-6
    assert F.softplus(quirk.dt_proj_b.bias).mean() > 0.3
    assert F.softplus(quirk.dt_proj.bias).max() <= 0.1 + 1e-6


@pytest.mark.skipif(not cuda_kernel_available(), reason="needs a GPU and the mamba_ssm kernel")
def test_compiled_bimamba_equals_eager_outputs_and_gradients_on_the_gpu(no_tf32):
    """torch.compile traces the mixer with the CUDA scan as one graph node; fusing the surrounding
    element-wise work must not change the function."""
    torch.manual_seed(0)
    mixer = Mamba(32, bidirectional=True).cuda()
    x, lengths = random_lengths_batch(dtype=torch.float32)
    x, lengths = x.cuda().requires_grad_(), lengths.cuda()
    results = []
    for module in (mixer, torch.compile(mixer, fullgraph=True)):
        mixer.zero_grad(set_to_none=True)
        x.grad = None
        out = module(x, lengths)
        (out * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
        results.append([out, x.grad] + [p.grad for p in mixer.parameters()])
    for eager, compiled in zip(*results):
        assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-5)
