"""Selective-scan and SSD back-ends against the float64 sequential reference."""

import pytest
import torch

from modules.mamba.selective_scan import SelectiveScanTorch, selective_scan, selective_scan_ref
from modules.mamba.ssd import ssd_scan

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def relative_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def scan_inputs(batch=2, dim=12, time=37, state=8, groups=2, device="cpu", dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype)  # noqa: E731
    inputs = dict(
        u=rand(batch, dim, time),
        delta=0.5 * rand(batch, dim, time),
        A=-torch.rand(dim, state, generator=generator, dtype=dtype) * 2 - 0.1,
        B=rand(batch, groups, state, time),
        C=rand(batch, groups, state, time),
        D=rand(dim),
        z=rand(batch, dim, time),
        delta_bias=rand(dim),
    )
    return {k: v.to(device).requires_grad_() for k, v in inputs.items()}


def run_with_grads(scan, inputs, **kwargs):
    inputs = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out = scan(**inputs, delta_softplus=True, **kwargs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    (out * weights).sum().backward()
    return out, {k: v.grad for k, v in inputs.items()}


@pytest.mark.parametrize("device", DEVICES)
def test_fp32_backend_matches_float64_reference_outputs_and_gradients(device):
    inputs = scan_inputs()
    ref_out, ref_grads = run_with_grads(selective_scan_ref, inputs)
    fp32 = {k: v.detach().float().to(device) for k, v in inputs.items()}
    out, grads = run_with_grads(selective_scan, fp32)
    assert relative_error(out.cpu(), ref_out) < 1e-5
    for name, grad in grads.items():
        assert relative_error(grad.cpu(), ref_grads[name]) < 1e-5, name


def test_torch_backend_with_many_chunks_matches_reference(monkeypatch):
    """Chunk boundaries (state carried forward, adjoint carried backward) change nothing."""
    monkeypatch.setattr(SelectiveScanTorch, "CHUNK_ELEMENTS", 2 * 12 * 8 * 5)  # chunks of 5 steps
    inputs = scan_inputs()
    ref_out, ref_grads = run_with_grads(selective_scan_ref, inputs)
    out, grads = run_with_grads(selective_scan, inputs)
    assert relative_error(out, ref_out) < 1e-12
    for name, grad in grads.items():
        assert relative_error(grad, ref_grads[name]) < 1e-12, name


def test_torch_backend_passes_gradcheck_in_float64(monkeypatch):
    monkeypatch.setattr(SelectiveScanTorch, "CHUNK_ELEMENTS", 1 * 4 * 3 * 4)  # chunks of 4 steps
    inputs = scan_inputs(batch=1, dim=4, time=6, state=3)
    order = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    h0 = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: SelectiveScanTorch.apply(*a[:8], True, a[8]), [inputs[k] for k in order] + [h0]
    )


def test_single_group_inputs_equal_grouped_inputs():
    inputs = scan_inputs(groups=1)
    squeezed = dict(inputs, B=inputs["B"][:, 0], C=inputs["C"][:, 0])
    assert torch.allclose(selective_scan(**inputs), selective_scan(**squeezed))


def test_scan_in_two_halves_with_carried_state_equals_whole_scan():
    inputs = {k: v.detach() for k, v in scan_inputs().items()}
    whole, last = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    split = 20
    first = {k: (v[..., :split] if v.dim() > 2 else v) for k, v in inputs.items()}
    second = {k: (v[..., split:] if v.dim() > 2 else v) for k, v in inputs.items()}
    out1, state = selective_scan(**first, delta_softplus=True, return_last_state=True)
    out2, last2 = selective_scan(**second, delta_softplus=True, initial_state=state, return_last_state=True)
    assert torch.allclose(torch.cat([out1, out2], -1), whole)
    assert torch.allclose(last2, last)


@pytest.mark.parametrize("device", DEVICES)
def test_ssd_scan_matches_per_head_reference(device):
    """A Mamba-2 head is a block of channels sharing one step size and one scalar decay."""
    g = torch.Generator().manual_seed(1)
    batch, time, heads, headdim, groups, state = 2, 29, 4, 8, 2, 16
    x = torch.randn(batch, time, heads, headdim, generator=g, dtype=torch.float64)
    dt = torch.randn(batch, time, heads, generator=g, dtype=torch.float64)
    A = -torch.rand(heads, generator=g, dtype=torch.float64) * 4
    B = torch.randn(batch, time, groups, state, generator=g, dtype=torch.float64)
    C = torch.randn(batch, time, groups, state, generator=g, dtype=torch.float64)
    D = torch.randn(heads, generator=g, dtype=torch.float64)
    dt_bias = torch.randn(heads, generator=g, dtype=torch.float64)
    per_group = heads // groups
    ref = []
    for h in range(heads):
        ref.append(
            selective_scan_ref(
                x[:, :, h].transpose(1, 2),
                dt[:, :, h, None].expand(-1, -1, headdim).transpose(1, 2),
                A[h].expand(headdim, state),
                B[:, :, h // per_group].transpose(1, 2),
                C[:, :, h // per_group].transpose(1, 2),
                D=D[h].expand(headdim),
                delta_bias=dt_bias[h].expand(headdim),
                delta_softplus=True,
            ).transpose(1, 2)
        )
    ref = torch.stack(ref, dim=2)
    args = [t.float().to(device) for t in (x, dt, A, B, C)]
    out = ssd_scan(*args, D=D.float().to(device), dt_bias=dt_bias.float().to(device), chunk_size=16)
    # The Triton SSD kernels multiply float32 tiles in TF32 (about 3 decimal digits), so on the GPU
    # the bound is TF32's; the PyTorch back-end is held to float32's.
    assert relative_error(out.cpu(), ref) < (5e-3 if device == "cuda" else 1e-5)


def test_cuda_scan_op_traces_as_one_graph_with_shapes_and_gradient_dtypes_of_the_kernel():
    """The custom ops around the CUDA kernel, checked where no GPU is needed: on "meta" tensors their
    shape functions give the kernel's output and gradient shapes/dtypes, and torch.compile traces a
    scan and its backward as one graph (fullgraph=True fails on any graph break)."""
    from modules.mamba.scan_cuda import selective_scan_cuda_op

    batch, dim, time, state = 2, 8, 2049, 4  # two 2048-step chunks of saved states
    meta = dict(device="meta", requires_grad=True)
    u, delta = (torch.randn(batch, dim, time, dtype=torch.bfloat16, **meta) for _ in range(2))
    A, D = torch.randn(dim, state, **meta), torch.randn(dim, **meta)
    B = torch.randn(batch, 2, state, time, dtype=torch.bfloat16, **meta)
    C = torch.randn(batch, state, time, dtype=torch.bfloat16, **meta)  # one group, no group axis

    def loss(u, delta, A, B, C, D):
        out, last_state = selective_scan_cuda_op(u, delta, A, B, C, D, delta_softplus=True, return_last_state=True)
        assert out.shape == u.shape and out.dtype == torch.bfloat16
        assert last_state.shape == (batch, dim, state) and last_state.dtype == torch.float32
        return out.float().sum()

    torch.compile(loss, fullgraph=True, backend="aot_eager")(u, delta, A, B, C, D).backward()
    for tensor in (u, delta, A, B, C, D):
        assert tensor.grad.shape == tensor.shape and tensor.grad.dtype == tensor.dtype

