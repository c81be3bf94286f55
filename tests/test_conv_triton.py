"""Our Triton depthwise convolution + SiLU of the Mamba-1 mixers against a float64 F.conv1d reference:
outputs and every gradient, both directions, ragged lengths, strided bf16 inputs, and the mixer using it.

On a CPU-only machine the kernels run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); on a GPU they run compiled, at the same tiny shapes plus a real one.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # PyTorch's Linux wheels bring it; elsewhere the kernels cannot run

from modules.mamba.conv_triton import (  # noqa: E402
    directional_conv_silu,
    directional_conv_silu_bwd,
    directional_conv_silu_fwd,
)
from modules.mamba.mamba import Mamba  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(x, weight, bias, lengths, directions):
    """Direction 0 causal; direction 1 the causal convolution of each row reversed inside its length,
    i.e. anti-causal with flipped taps over x zeroed past the length (F.conv1d, in float64)."""
    batch, time, dim = x.shape
    width = weight.shape[1]
    x = x.double() * (torch.arange(time, device=x.device) < lengths[:, None])[..., None]
    x = x.transpose(1, 2)
    outs = []
    for g in range(directions):
        w, b = weight[g * dim : (g + 1) * dim].double(), bias[g * dim : (g + 1) * dim].double()
        padded = F.pad(x, (width - 1, 0) if g == 0 else (0, width - 1))
        outs.append(F.silu(F.conv1d(padded, (w if g == 0 else w.flip(-1)).unsqueeze(1), b, groups=dim)))
    return torch.cat(outs, 1).transpose(1, 2)


def conv_inputs(batch, time, dim, directions, dtype, seed=0, width=4):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, time, 3 * dim, generator=generator)[..., dim : 2 * dim]  # a strided view, like in_proj's
    weight = torch.randn(directions * dim, width, generator=generator) * 0.5
    bias = torch.randn(directions * dim, generator=generator) * 0.1
    return (x.to(DEVICE, dtype).requires_grad_(), weight.to(DEVICE).requires_grad_(),
            bias.to(DEVICE).requires_grad_())


def check(batch, time, dim, directions, lengths, dtype, tolerance):
    x, weight, bias = conv_inputs(batch, time, dim, directions, dtype)
    lengths = torch.tensor(lengths, device=DEVICE, dtype=torch.int32)
    out = directional_conv_silu(x, weight, bias, lengths, directions)
    expected = reference(x, weight, bias, lengths, directions)
    assert out.dtype == dtype and out.shape == (batch, time, directions * dim)
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad((out.double() * grad).sum(), (x, weight, bias))
    expected_grads = torch.autograd.grad((expected * grad).sum(), (x, weight, bias))
    for name, got, want in zip(("x", "weight", "bias"), grads, expected_grads):
        scale = want.abs().max().item() + 1e-12
        assert (got.double() - want).abs().max().item() <= tolerance * scale, name


@pytest.mark.parametrize("directions", [1, 2])
def test_float32_matches_the_float64_reference_with_ragged_lengths(directions):
    check(3, 37, 70, directions, [37, 1, 20], torch.float32, 1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    check(2, 19, 16, 2, [19, 7], torch.bfloat16, 2e-2)


def test_garbage_in_padded_frames_changes_nothing():
    x, weight, bias = conv_inputs(2, 20, 8, 2, torch.float32)
    lengths = torch.tensor([20, 11], device=DEVICE, dtype=torch.int32)
    noisy = x.detach().clone()
    noisy[1, 11:] = 1e4
    noisy.requires_grad_()
    clean_out = directional_conv_silu(x, weight, bias, lengths, 2)
    noisy_out = directional_conv_silu(noisy, weight, bias, lengths, 2)
    # the valid frames' outputs: padding never reaches them, in either direction
    torch.testing.assert_close(noisy_out[1, :11], clean_out[1, :11])
    (grad,) = torch.autograd.grad(noisy_out[:, :11].sum(), noisy)
    assert not grad[1, 11:].any()  # padded frames receive no gradient


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes need the compiled kernels on a GPU")
def test_real_shapes_on_the_gpu():
    generator = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, 301, (70,), generator=generator)
    lengths[0] = 300
    check(70, 300, 512, 2, lengths.tolist(), torch.bfloat16, 2e-2)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_mixer_on_triton_matches_the_torch_backend(bidirectional):
    """The mixer's Triton path (this convolution and the Triton scan) against its PyTorch path."""
    torch.manual_seed(0)
    torch_mixer = Mamba(16, d_state=4, bidirectional=bidirectional, scan_backend="torch").to(DEVICE)
    triton_mixer = Mamba(16, d_state=4, bidirectional=bidirectional, scan_backend="triton").to(DEVICE)
    triton_mixer.load_state_dict(torch_mixer.state_dict())
    hidden = torch.randn(3, 13, 16, device=DEVICE, requires_grad=True)
    lengths = torch.tensor([13, 4, 9], device=DEVICE)
    outs, grads = [], []
    for mixer in (torch_mixer, triton_mixer):
        out = mixer(hidden, lengths)
        valid = (torch.arange(13, device=DEVICE) < lengths[:, None])[..., None]
        loss = (out * valid).square().sum()
        grads.append(torch.autograd.grad(loss, [hidden, *mixer.parameters()]))
        outs.append(out * valid)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


def test_the_custom_ops_agree_with_their_shape_functions():
    x, weight, bias = (t.detach() for t in conv_inputs(2, 9, 8, 2, torch.float32))
    lengths = torch.tensor([9, 4], device=DEVICE, dtype=torch.int32)
    torch.library.opcheck(directional_conv_silu_fwd, (x, weight, bias, lengths, 2))
    grad_out = torch.randn(2, 9, 16, device=DEVICE)
    torch.library.opcheck(directional_conv_silu_bwd, (grad_out, x, weight, bias, lengths, 2))
