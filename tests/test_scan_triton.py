"""Our Triton scan against the float64 specification: outputs, every gradient, lengths, directions, states.

On a CPU-only machine the kernels run under Triton's interpreter (TRITON_INTERPRET=1, which
tests/conftest.py sets before anything imports Triton); on a GPU they run compiled, at the same
tiny shapes plus the real ones of ``test_real_shapes_on_the_gpu``.
"""

import pytest
import torch

pytest.importorskip("triton")  # PyTorch's Linux wheels bring it; elsewhere the kernels cannot run

from modules.mamba.scan import directional_scan, directional_scan_ref, pick_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def scan_inputs(batch, time, dim, state, directions, dtype, lengths, seed=0, initial_state=False, z=True):
    """Random inputs of a mixer's shapes and ranges, as leaf tensors of ``dtype`` (parameters float32).

    u, delta and z are views of wider buffers and B, C are permuted, like the projections' outputs.
    """
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=generator, dtype=torch.float64)

    channels = directions * dim
    tensors = dict(
        u=randn(batch, time, 2 * channels)[..., :channels],
        delta=randn(batch, time, channels, scale=0.5) - 1.0,
        B=randn(batch, directions, state, time).permute(0, 3, 1, 2),
        C=randn(batch, directions, state, time).permute(0, 3, 1, 2),
        A=-torch.rand(channels, state, generator=generator, dtype=torch.float64) * 4 - 0.1,
        D=randn(channels),
        delta_bias=randn(channels, scale=0.3),
    )
    if z:
        tensors["z"] = randn(batch, time, 3 * dim)[..., dim : 2 * dim]
    if initial_state:
        tensors["initial_state"] = randn(batch, channels, state)
    inputs = {}
    for name, tensor in tensors.items():
        parameter = name in ("A", "D", "delta_bias", "initial_state")
        inputs[name] = tensor.to(DEVICE, torch.float32 if parameter else dtype).requires_grad_()
    inputs["lengths"] = torch.tensor(lengths, device=DEVICE, dtype=torch.int32)
    return inputs


def run(scan, inputs, directions, scale):
    """Output, last state and the gradients of every input for one random loss on both, all in float64."""
    out, last = scan(**inputs, directions=directions, scale=scale, return_last_state=True)
    generator = torch.Generator().manual_seed(1)
    loss = (out.double() * torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device)).sum()
    loss = loss + (last.double() * torch.randn(last.shape, generator=generator, dtype=torch.float64).to(out.device)).sum()
    leaves = [t for t in inputs.values() if t.requires_grad]
    grads = torch.autograd.grad(loss, leaves)
    names = [name for name, t in inputs.items() if t.requires_grad]
    return out.double(), last.double(), {name: g.double() for name, g in zip(names, grads)}


def float64_copy(inputs):
    return {
        name: t.detach().double().requires_grad_() if t.is_floating_point() else t for name, t in inputs.items()
    }


def assert_close(actual, expected, tolerance, what):
    error = (actual - expected).norm() / expected.norm().clamp(min=1e-12)
    assert torch.isfinite(actual).all(), what
    assert error < tolerance, f"{what}: relative error {error:.2e}"


def check_against_reference(batch, time, dim, state, directions, lengths, dtype, tolerance, scale=0.5, **options):
    inputs = scan_inputs(batch, time, dim, state, directions, dtype, lengths, **options)
    out, last, grads = run(directional_scan_triton, inputs, directions, scale)
    out_ref, last_ref, grads_ref = run(directional_scan_ref, float64_copy(inputs), directions, scale)
    assert_close(out, out_ref, tolerance, "out")
    assert_close(last, last_ref, tolerance, "last state")
    for name in grads_ref:
        assert grads[name].shape == inputs[name].shape
        assert_close(grads[name], grads_ref[name], tolerance, f"d{name}")
    valid = torch.arange(time, device=DEVICE) < inputs["lengths"][:, None]
    assert (out[~valid] == 0).all(), "padded frames must give zero output"
    for name in ("u", "delta", "z"):
        if name in grads:
            assert (grads[name][~valid] == 0).all(), f"padded frames must get zero gradient ({name})"
    return inputs


def directional_scan_triton(**kwargs):
    return directional_scan(**kwargs, backend="triton")


@pytest.mark.parametrize("directions", [1, 2])
def test_float32_matches_the_float64_reference_with_ragged_lengths(directions, monkeypatch):
    # 37 frames: three chunks, the last one partial; 40 channels: two channel blocks, the last partial.
    # The backward keeps every other state of a chunk: rows end after an odd (37: 5 frames into the
    # last chunk) and an even (22: 6) number of a chunk's frames, after one frame, and on a chunk's end
    from modules.mamba import scan_triton

    monkeypatch.setattr(scan_triton, "SEGMENT_BELOW", 0)  # one time segment: programs walk whole rows
    check_against_reference(4, 37, 40, 4, directions, [37, 1, 16, 22], torch.float32, 1e-4)


@pytest.mark.parametrize("directions", [1, 2])
@pytest.mark.parametrize("chunks_per_segment", [1, 2])
def test_the_backward_over_time_segments_matches_the_reference(directions, chunks_per_segment, monkeypatch):
    """A launch with few programs splits each row into time segments walked at once: each starts from
    the adjoint the later segments send back (the last state's gradient included)."""
    from modules.mamba import scan_triton

    # 53 frames: four chunks; rows of four, one and two chunks (segments past a row's end are empty)
    programs = 3 * directions  # one channel block, 3 rows
    monkeypatch.setattr(scan_triton, "SEGMENT_BELOW", programs + 1)
    monkeypatch.setattr(scan_triton, "SEGMENTED_PROGRAMS", programs * 4 // chunks_per_segment)
    assert scan_triton._time_segments(4, programs) == (4 // chunks_per_segment, chunks_per_segment)
    check_against_reference(3, 53, 20, 4, directions, [53, 1, 30], torch.float32, 1e-4, initial_state=True)


@pytest.mark.parametrize("directions", [1, 2])
def test_states_split_over_programs_give_the_same_scan(directions, monkeypatch):
    """With SPLIT > 1 several programs share a channel block, each scanning part of the states and
    adding its partial sums (outputs, input gradients) into the same tensors."""
    from modules.mamba import scan_triton

    monkeypatch.setattr(scan_triton, "FORWARD", dict(scan_triton.FORWARD, SPLIT=4))
    monkeypatch.setattr(scan_triton, "BACKWARD", dict(scan_triton.BACKWARD, SPLIT=2))
    check_against_reference(3, 21, 40, 8, directions, [21, 1, 13], torch.float32, 1e-4, initial_state=True)


def test_initial_state_in_and_final_state_out_carry_gradients():
    check_against_reference(3, 21, 8, 4, 1, [21, 5, 17], torch.float32, 1e-4, initial_state=True)


def test_without_gate_sums_the_directions():
    check_against_reference(2, 19, 8, 4, 2, [19, 7], torch.float32, 1e-4, scale=1.0, z=False)


def test_bfloat16_inputs_accumulate_in_float32():
    # the reference sees the same bf16-rounded inputs in float64: what differs is the kernel's
    # float32 arithmetic and the bf16 rounding of its outputs and gradients
    check_against_reference(3, 40, 16, 8, 2, [40, 3, 33], torch.bfloat16, 2e-2)


def test_garbage_in_padded_frames_changes_nothing():
    lengths = [30, 12]
    clean = scan_inputs(2, 30, 8, 4, 2, torch.float32, lengths)
    dirty = {name: t.detach().clone().requires_grad_(t.requires_grad) for name, t in clean.items()}
    with torch.no_grad():
        for name in ("u", "delta", "z", "B", "C"):
            dirty[name][1, 12:] = 1e4  # would overflow the state if it entered a scan
    out_clean, last_clean, grads_clean = run(directional_scan_triton, clean, 2, 0.5)
    out_dirty, last_dirty, grads_dirty = run(directional_scan_triton, dirty, 2, 0.5)
    # the two directions and the state halves add into the output atomically, in an order that may
    # differ between runs on a GPU: equal up to rounding, where a leak of the 1e4s would be huge
    torch.testing.assert_close(out_dirty, out_clean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last_dirty, last_clean, rtol=0, atol=0)
    for name in grads_clean:
        torch.testing.assert_close(grads_dirty[name], grads_clean[name], rtol=1e-6, atol=1e-6)
    # padded frames receive exactly zero gradient (the kernel writes them: they are not pre-zeroed)
    for name in ("u", "delta", "z", "B", "C"):
        assert grads_dirty[name][1, 12:].eq(0).all(), name


def test_an_utterance_scans_the_same_alone_and_in_a_batch():
    inputs = scan_inputs(3, 45, 8, 4, 2, torch.float32, [45, 9, 30])
    batched = directional_scan_triton(**inputs, directions=2, scale=0.5)
    alone = {name: (t[1:2, :9] if t.dim() > 1 and t.shape[1] == 45 else t[1:2] if name in ("lengths",) else t)
             for name, t in inputs.items()}
    single = directional_scan_triton(**alone, directions=2, scale=0.5)
    torch.testing.assert_close(single[0], batched[1, :9], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes need the compiled kernels on a GPU")
@pytest.mark.parametrize("batch,time,dim", [(70, 300, 512), (41, 300, 1024), (14, 1500, 512)])
def test_real_shapes_on_the_gpu(batch, time, dim):
    generator = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, time + 1, (batch,), generator=generator)
    lengths[0] = time
    check_against_reference(batch, time, dim, 16, 2, lengths.tolist(), torch.bfloat16, 2e-2)


def test_state_size_must_be_a_power_of_two():
    inputs = scan_inputs(1, 4, 4, 3, 1, torch.float32, [4])
    with pytest.raises(ValueError, match="power of two"):
        directional_scan_triton(**inputs)



def test_the_dispatch_picks_the_documented_backend():
    # auto: PyTorch on the CPU, our Triton kernel on CUDA; mamba_ssm only when asked for
    assert pick_backend("auto", on_cuda=False, mamba_ssm_built=True, has_initial_state=False) == "torch"
    assert pick_backend("auto", on_cuda=True, mamba_ssm_built=True, has_initial_state=False) == "triton"
    assert pick_backend("auto", on_cuda=True, mamba_ssm_built=False, has_initial_state=False) == "triton"
    assert pick_backend("mamba_ssm", on_cuda=True, mamba_ssm_built=True, has_initial_state=False) == "mamba_ssm"
    # scans that continue from a state (streaming, decoding caches) never fall back to PyTorch on a GPU
    assert pick_backend("auto", on_cuda=True, mamba_ssm_built=True, has_initial_state=True) == "triton"
    assert pick_backend("mamba_ssm", on_cuda=True, mamba_ssm_built=True, has_initial_state=True) == "triton"
    assert pick_backend("torch", on_cuda=True, mamba_ssm_built=True, has_initial_state=False) == "torch"
    with pytest.raises(RuntimeError, match="pip install mamba-ssm"):
        pick_backend("mamba_ssm", on_cuda=True, mamba_ssm_built=False, has_initial_state=False)
    with pytest.raises(ValueError, match="scan_backend must be one of"):
        pick_backend("cuda", on_cuda=True, mamba_ssm_built=False, has_initial_state=False)


def test_the_kernels_trace_as_one_graph_node():
    """torch.compile(fullgraph=True) sees the kernels as custom ops with shape functions and a backward;
    their results and gradients are those of the eager path (an autograd Function, no custom op)."""
    inputs = scan_inputs(2, 12, 8, 4, 2, torch.float32, [12, 5], initial_state=True)
    compiled = torch.compile(directional_scan_triton, backend="aot_eager", fullgraph=True)
    out, last, grads = run(compiled, inputs, 2, 0.5)
    out_eager, last_eager, grads_eager = run(directional_scan_triton, inputs, 2, 0.5)
    torch.testing.assert_close(out, out_eager)
    torch.testing.assert_close(last, last_eager)
    for name in grads_eager:
        torch.testing.assert_close(grads[name], grads_eager[name], msg=name)


@pytest.mark.parametrize("used", ["out", "last"])
def test_a_loss_on_one_output_alone(used):
    """The backward gets None for the unused output (no tensor of zeros is made for it)."""
    inputs = scan_inputs(2, 13, 8, 4, 2, torch.float32, [13, 6], initial_state=True)
    results = []
    for scan, tensors in [(directional_scan_triton, inputs), (directional_scan_ref, float64_copy(inputs))]:
        out, last = scan(**tensors, directions=2, scale=0.5, return_last_state=True)
        loss = (out if used == "out" else last).double().square().sum()
        leaves = {name: t for name, t in tensors.items() if t.requires_grad}
        results.append(dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True))))
    for name, expected in results[1].items():
        if expected is None:  # z gets no gradient from the last state
            assert results[0][name] is None or not results[0][name].any(), name
        else:
            assert_close(results[0][name].double(), expected, 1e-4, f"d{name}")


def test_the_custom_ops_agree_with_their_shape_functions():
    """opcheck compares each op's real outputs with its registered fake ones (shapes, dtypes, strides,
    which torch.compile trusts) and checks the autograd registration."""
    from modules.mamba.scan_triton import directional_scan_bwd, directional_scan_fwd

    inputs = scan_inputs(2, 11, 8, 4, 2, torch.float32, [11, 6], initial_state=True)
    args = [inputs[name].detach() for name in ("u", "delta", "A", "B", "C", "D", "delta_bias", "z", "lengths",
                                                "initial_state")]
    args[2] = args[2].t().contiguous()  # the ops read A transposed, (state, channels)
    torch.library.opcheck(directional_scan_fwd, (*args, 2, 0.5, True))
    out, last, checkpoints = directional_scan_fwd(*args, 2, 0.5, True)
    grad_out, grad_last = torch.randn_like(out), torch.randn_like(last)
    torch.library.opcheck(directional_scan_bwd, (grad_out, grad_last, *args[:9], checkpoints, 2, 0.5, True))
