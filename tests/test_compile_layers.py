"""``compile_layers: True`` (CTC and S2S yamls): each encoder layer through ``torch.compile``, in place.

What must hold: one compiled graph serves every layer, every batch shape (no recompilation as the
dynamic batches change) and a lower-precision first-layer input, the outputs and gradients are the
eager ones, steps without gradients (validation, test) run eager, and the state_dict keeps its names.
``aot_eager`` traces forward and backward as Inductor would, without generating code, so this runs on
the CPU (about a minute); the mixers take the Triton path (interpreted here), as on a GPU.
"""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from modules.models.conformer import ConformerEncoder
from modules.models.conmamba import ConMambaEncoder
from modules.training.recipe import compile_layers

pytest.importorskip("triton")

ENCODERS = {
    "conmamba": lambda: ConMambaEncoder(2, 16, 32, 5, dropout=0.0, mamba_config=dict(scan_backend="triton")),
    "conformer": lambda: ConformerEncoder(
        num_layers=2, d_model=16, d_ffn=32, nhead=2, kernel_size=5, attention_type="regularMHA", dropout=0.0
    ),
}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_one_graph_serves_every_layer_and_batch_shape(name):
    torch.manual_seed(0)
    eager = ENCODERS[name]()
    compiled = copy.deepcopy(eager)
    keys = list(compiled.state_dict())
    torch._dynamo.reset()
    counters.clear()
    compile_layers(compiled, backend="aot_eager", dynamic=True)
    assert list(compiled.state_dict()) == keys
    for batch, time in [(2, 20), (3, 17)]:  # over 16 frames: shorter inputs specialise the scan's chunking
        x = torch.randn(batch, time, 16)
        lengths = torch.randint(time // 2, time + 1, (batch,))
        lengths[0] = time
        mask = torch.arange(time)[None] >= lengths[:, None]
        outputs, grads = [], []
        for model in (eager, compiled):
            inputs = x.clone().requires_grad_()
            out = model(inputs, src_key_padding_mask=mask)[0]
            out.square().sum().backward()
            outputs.append(out)
            grads.append(inputs.grad)
        torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # validation: eager, any batch, no new graph
        single = torch.randn(1, 18, 16)
        torch.testing.assert_close(compiled(single)[0], eager(single)[0])
    compiled(x.bfloat16().requires_grad_(), src_key_padding_mask=mask)  # the front-end's dtype under autocast
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    for (key, eager_parameter), compiled_parameter in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(compiled_parameter.grad, eager_parameter.grad, rtol=1e-4, atol=1e-5, msg=key)
