"""Our Triton depthwise convolutions against a float64 F.conv1d reference, outputs and every gradient:
the Mamba-1 mixers' convolution + SiLU (both directions, ragged lengths, strided bf16 inputs, and the
mixer using it) and the convolution module's plain centred or causal one.

On a CPU-only machine the kernels run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); on a GPU they run compiled, at the same tiny shapes plus a real one.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # PyTorch's Linux wheels bring it; elsewhere the kernels cannot run

from modules.mamba.conv_triton import (  # noqa: E402
    BLOCK_C,
    BLOCK_T,
    depthwise_conv,
    depthwise_conv_bwd,
    depthwise_conv_fwd,
    directional_conv_silu,
)
from modules.mamba.mamba import Mamba  # noqa: E402
from modules.models.conmamba import ConvolutionModule  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# two time tiles and three channel blocks of the kernels, the last of each partial
FRAMES, CHANNELS = BLOCK_T + 13, 2 * BLOCK_C + 6


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


def assert_matches(out, expected, inputs, tolerance):
    """Output and the gradients of ``inputs`` (x, weight, bias) against the float64 reference's."""
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    grads = torch.autograd.grad((out.double() * grad).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * grad).sum(), inputs)
    for name, got, want in zip(("x", "weight", "bias"), grads, expected_grads):
        scale = want.abs().max().item() + 1e-12
        assert (got.double() - want).abs().max().item() <= tolerance * scale, name


def check(batch, time, dim, directions, lengths, dtype, tolerance):
    x, weight, bias = conv_inputs(batch, time, dim, directions, dtype)
    lengths = torch.tensor(lengths, device=DEVICE, dtype=torch.int32)
    out = directional_conv_silu(x, weight, bias, lengths, directions)
    assert out.dtype == dtype and out.shape == (batch, time, directions * dim)
    assert_matches(out, reference(x, weight, bias, lengths, directions), (x, weight, bias), tolerance)


@pytest.mark.parametrize("directions", [1, 2])
def test_float32_matches_the_float64_reference_with_ragged_lengths(directions):
    check(3, FRAMES, CHANNELS, directions, [FRAMES, 1, 20], torch.float32, 1e-5)


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


def check_plain(batch, time, dim, width, left, lengths, dtype, tolerance):
    """:func:`depthwise_conv` against F.conv1d over the input zeroed past each row's length."""
    x, weight, bias = conv_inputs(batch, time, dim, 1, dtype, width=width)
    lengths = torch.tensor(lengths, device=DEVICE, dtype=torch.int32)
    out = depthwise_conv(x, weight, bias, lengths, left)
    masked = x.double() * (torch.arange(time, device=DEVICE) < lengths[:, None])[..., None]
    padded = F.pad(masked.transpose(1, 2), (left, width - 1 - left))
    expected = F.conv1d(padded, weight.double().unsqueeze(1), bias.double(), groups=dim).transpose(1, 2)
    assert out.dtype == dtype and out.shape == (batch, time, dim)
    assert_matches(out, expected, (x, weight, bias), tolerance)


@pytest.mark.parametrize("width,left", [(31, 15), (7, 3), (7, 6), (4, 0)], ids=["31-centred", "7-centred",
                                                                              "7-causal", "4-anticausal"])
def test_the_plain_convolution_matches_the_float64_reference(width, left):
    check_plain(3, FRAMES, CHANNELS, width, left, [FRAMES, 1, 20], torch.float32, 1e-5)


def test_the_plain_convolution_in_bfloat16_accumulates_in_float32():
    check_plain(2, 40, 16, 31, 15, [40, 23], torch.bfloat16, 2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes need the compiled kernels on a GPU")
def test_real_shapes_on_the_gpu():
    generator = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, 301, (70,), generator=generator)
    lengths[0] = 300
    check(70, 300, 512, 2, lengths.tolist(), torch.bfloat16, 2e-2)
    check_plain(70, 300, 256, 31, 15, lengths.tolist(), torch.bfloat16, 2e-2)


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


@pytest.mark.parametrize("causal", [False, True])
def test_the_convolution_module_on_triton_matches_the_torch_path(causal, no_tf32):
    """The ConMamba layer's convolution module in the (batch, time, channels) layout with this
    convolution, against its PyTorch path (masked input, F.conv1d): outputs and all gradients."""
    torch.manual_seed(0)
    modules = [ConvolutionModule(16, kernel_size=7, causal=causal, backend=backend).to(DEVICE)
               for backend in ("torch", "triton")]
    modules[1].load_state_dict(modules[0].state_dict())
    x = torch.randn(3, 13, 16, device=DEVICE, requires_grad=True)
    padding_mask = torch.arange(13, device=DEVICE) >= torch.tensor([13, 4, 9], device=DEVICE)[:, None]
    outs, grads = [], []
    for module in modules:
        out = module(x, padding_mask)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), [x, *module.parameters()]))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_custom_ops_agree_with_their_shape_functions():
    x, weight, bias = (t.detach() for t in conv_inputs(2, 9, 8, 2, torch.float32))
    lengths = torch.tensor([9, 4], device=DEVICE, dtype=torch.int32)
    torch.library.opcheck(depthwise_conv_fwd, (x, weight, bias, lengths, 2, 3, True))
    grad_out = torch.randn(2, 9, 16, device=DEVICE)
    torch.library.opcheck(depthwise_conv_bwd, (grad_out, x, weight, bias, lengths, 2, 3, True))
    plain_weight = weight[:8].clone()
    torch.library.opcheck(depthwise_conv_fwd, (x, plain_weight, bias[:8], lengths, 1, 1, False))
    torch.library.opcheck(depthwise_conv_bwd, (grad_out[..., :8], x, plain_weight, bias[:8], lengths, 1, 1, False))
