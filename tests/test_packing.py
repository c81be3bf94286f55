"""The Triton pack of a Mamba-1 mixer's directions against the PyTorch expression it replaces: every
packed tensor and every parameter's gradient, in float64 and bfloat16, with and without a convolution
bias, for shapes with partial channel blocks and ranks and widths that are not powers of two.

On a CPU-only machine the kernels run under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); on a GPU they run compiled.
"""

import pytest
import torch

pytest.importorskip("triton")  # PyTorch's Linux wheels bring it; elsewhere the kernels cannot run

from modules.mamba.mamba import Mamba  # noqa: E402
from modules.mamba.packing import pack_directions, pack_directions_torch  # noqa: E402
from modules.mamba.packing_triton import BLOCK_D  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def mixer(bidirectional, conv_bias, d_model=40, d_conv=3):
    """A mixer of 2 x 40 = 80 inner channels (two blocks and a part), rank 3, width 3, perturbed so
    that no two parameters are alike."""
    torch.manual_seed(0)
    module = Mamba(d_model, d_state=8, d_conv=d_conv, bidirectional=bidirectional, conv_bias=conv_bias)
    assert module.d_inner % BLOCK_D and module.dt_rank == 3
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return module.to(DEVICE)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("conv_bias", [True, False])
def test_the_triton_pack_and_its_gradients_match_the_pytorch_expression(bidirectional, conv_bias):
    module = mixer(bidirectional, conv_bias).double()
    expected = pack_directions_torch(module.directions)
    packed = pack_directions(module.directions, torch.float64, use_triton=True)
    generator = torch.Generator().manual_seed(1)
    weights = [None if t is None else torch.randn(t.shape, generator=generator, dtype=torch.float64).to(DEVICE)
               for t in expected]
    parameters = [p for name, p in module.named_parameters() if not name.startswith(("in_proj", "out_proj"))]
    for name, got, want in zip(packed._fields, packed, expected):
        assert (got is None) == (want is None), name
        if got is not None:
            assert got.shape == want.shape and got.dtype == want.dtype, name
            torch.testing.assert_close(got, want, msg=name)
    grads = []
    for result in (packed, expected):
        loss = sum((t * w).sum() for t, w in zip(result, weights) if t is not None)
        grads.append(torch.autograd.grad(loss, parameters))
    for parameter, got, want in zip(parameters, *grads):
        assert got.shape == parameter.shape and got.dtype == parameter.dtype
        torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)  # A is computed in float32 (scans read it so)


def test_the_matrices_are_packed_in_the_autocast_dtype():
    """Under bf16 autocast the two block-diagonal matrices are written in bf16, so that no cast follows;
    the rest stays float32, as the scan and the convolution read it."""
    module = mixer(True, True)
    packed = pack_directions(module.directions, torch.bfloat16, use_triton=True)
    expected = pack_directions_torch(module.directions)
    for name in ("x_proj_weight", "dt_proj_weight"):
        got, want = getattr(packed, name), getattr(expected, name)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=8e-3, atol=0)  # one bf16 rounding
    assert packed.A.dtype == packed.D.dtype == packed.conv_weight.dtype == torch.float32
    grad = torch.autograd.grad(packed.x_proj_weight.float().sum(), module.x_proj_b.weight)[0]
    assert grad.dtype == torch.float32 and torch.equal(grad, torch.ones_like(grad))


def test_the_block_diagonal_layout_feeds_each_direction_its_own_rows():
    """x_proj of the packed (batch, time, directions * dim) input: every direction's step-size input
    first, then each direction's B and C, each from its own weights and channels only."""
    module = mixer(True, True)
    packed = pack_directions(module.directions, torch.float32, use_triton=True)
    u = torch.randn(2, 5, 2 * module.d_inner, device=DEVICE, dtype=torch.float64)
    out = u @ packed.x_proj_weight.double().t()
    rank, state, dim = module.dt_rank, module.d_state, module.d_inner
    for g, direction in enumerate(module.directions):
        own = u[..., g * dim : (g + 1) * dim] @ direction.x_proj.weight.double().t()
        torch.testing.assert_close(out[..., g * rank : (g + 1) * rank], own[..., :rank])
        start = 2 * rank + g * 2 * state
        torch.testing.assert_close(out[..., start : start + 2 * state], own[..., rank:])
