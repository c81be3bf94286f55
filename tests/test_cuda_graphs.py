"""``cuda_graphs: True`` (CTC and S2S yamls): the speech encoder's training steps replay CUDA graphs.

What must hold: padding a batch up to its bucket changes no output and no gradient (ConMamba, and the
Conformer, whose attention would give NaNs on a fully masked utterance), one graph serves every batch
of a bucket, shapes past ``max_graphs`` and steps without gradients run eager, and the state_dict keeps
its names. On the CPU a stand-in for the capture returns the eager ``encode`` as it
is, so the padding, bucketing and gradients are those of the real path; on a GPU the last test
records and replays real graphs against the eager encoder, under bf16 autocast.
"""

import copy
import logging

import pytest
import torch

from modules.models.conformer import ConformerEncoder
from modules.models.conmamba import ConMambaEncoder
from modules.models.speech_encoder import SpeechEncoder
from modules.training.cuda_graphs import FlatGradients, GraphedEncoding, pad_batch, use_cuda_graphs
from modules.training.recipe import speed_up_training

ENCODERS = {
    "conmamba": lambda: ConMambaEncoder(2, 16, 32, 5, dropout=0.0),
    "conformer": lambda: ConformerEncoder(
        num_layers=2, d_model=16, d_ffn=32, nhead=2, kernel_size=5, attention_type="RelPosMHAXL", dropout=0.0
    ),
}


def speech_encoder(name):
    from speechbrain.nnet.attention import RelPosEncXL

    positions = RelPosEncXL(16) if name == "conformer" else None
    return SpeechEncoder(12, 16, ENCODERS[name](), positional_encoding=positions, dropout=0.0)


class Recorder:
    """Stands in for :class:`CapturedStep`: counts the captures, returns the eager ``encode``."""

    def __init__(self):
        self.shapes = []

    def __call__(self, encode, params, x, padding_mask, pool, stream):
        self.shapes.append(tuple(x.shape))
        return encode


def batch(size, frames, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, frames, 12, generator=generator, requires_grad=True)
    lengths = torch.randint(1, frames + 1, (size,), generator=generator)
    lengths[0] = frames
    return x, lengths.float() / frames


def output_and_gradients(model, x, wav_lens):
    out = model(x, wav_lens)
    valid = (torch.arange(x.shape[1]) < torch.round(wav_lens * x.shape[1])[:, None]).unsqueeze(-1)
    (out * valid * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out * valid, x.grad.clone(), grads


def test_pad_batch_masks_added_frames_and_keeps_one_frame_of_added_utterances():
    x, mask = torch.ones(2, 3, 4), torch.tensor([[False] * 3, [False, False, True]])
    padded, padded_mask = pad_batch(x, mask, 4, 5)
    assert padded.shape == (4, 5, 4) and padded[:2, :3].eq(1).all() and padded[2:].eq(0).all()
    assert padded[:, 3:].eq(0).all()
    assert padded_mask.tolist() == [[False] * 3 + [True] * 2, [False, False] + [True] * 3,
                                    [False] + [True] * 4, [False] + [True] * 4]


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_padding_to_the_bucket_changes_no_output_and_no_gradient(name):
    torch.manual_seed(0)
    eager = speech_encoder(name).train()
    graphed = copy.deepcopy(eager)
    keys = list(graphed.state_dict())
    recorder = Recorder()
    graphed.encode = GraphedEncoding(graphed, frame_multiple=8, batch_multiple=4, capture=recorder)
    assert list(graphed.state_dict()) == keys
    x, wav_lens = batch(3, 13)  # bucket: 4 utterances of 16 frames
    expected = output_and_gradients(eager, x, wav_lens)
    x.grad = None
    out, x_grad, grads = output_and_gradients(graphed, x, wav_lens)
    assert recorder.shapes == [(4, 16, 12)]
    assert out.shape == expected[0].shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_grad, expected[1], atol=1e-5, rtol=1e-5)
    assert grads.keys() == expected[2].keys()
    for key in grads:
        torch.testing.assert_close(grads[key], expected[2][key], atol=1e-5, rtol=1e-5, msg=key)


def test_one_graph_a_bucket_and_eager_past_max_graphs_or_without_gradients(caplog):
    model = speech_encoder("conmamba").train()
    recorder = Recorder()
    model.encode = GraphedEncoding(model, frame_multiple=8, batch_multiple=4, max_graphs=2, capture=recorder)
    for size, frames in [(3, 13), (4, 16), (2, 9), (5, 9)]:  # buckets (4, 16), (4, 16), (4, 16), (8, 16)
        model(*batch(size, frames))
    assert recorder.shapes == [(4, 16, 12), (8, 16, 12)]
    with caplog.at_level(logging.INFO, logger="modules.training.cuda_graphs"):
        for _ in range(2):
            out = model(*batch(1, 30))  # a third bucket: eager, logged once
    assert out.shape == (1, 30, 16) and recorder.shapes == [(4, 16, 12), (8, 16, 12)]
    assert sum("max_graphs" in record.getMessage() for record in caplog.records) == 1
    with torch.no_grad():
        model(*batch(3, 40))
    model.eval()
    model(*batch(3, 40))
    assert len(recorder.shapes) == 2


def test_flat_gradients_set_then_accumulate_the_parameters_gradients_and_skip_unused_ones():
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in [(3, 4), (5,), (2,)]]
    grads = [torch.randn(3, 4), torch.randn(5), None]  # the third parameter is unused
    flat = FlatGradients(params, grads)
    flat.add_to_parameters()
    torch.testing.assert_close(params[0].grad, grads[0], rtol=0, atol=0)
    torch.testing.assert_close(params[1].grad, grads[1], rtol=0, atol=0)
    assert params[2].grad is None
    params[1].grad = None  # an optimizer step zeroed it
    flat.flat.mul_(2)  # the next replay overwrites the buffer: the gradients handed out stay
    flat.add_to_parameters()
    torch.testing.assert_close(params[0].grad, 3 * grads[0])  # accumulated, as autograd does
    torch.testing.assert_close(params[1].grad, 2 * grads[1])
    with pytest.raises(ValueError, match="one dtype"):
        FlatGradients(params[:2], [grads[0], grads[1].double()])


def test_the_recipes_apply_one_speed_option_and_stay_eager_without_cuda_or_with_ddp(monkeypatch):
    hparams = dict(compile_layers=True, cuda_graphs=True, encoder=None, speech_encoder=None)
    with pytest.raises(ValueError, match="compile_layers and cuda_graphs"):
        speed_up_training(hparams)
    model = speech_encoder("conmamba")
    eager = model.encode
    for cuda, ddp in [(False, False), (True, True)]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: ddp)
        speed_up_training(dict(hparams, compile_layers=False, speech_encoder=model))
        assert model.encode == eager
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    speed_up_training(dict(hparams, compile_layers=False, speech_encoder=model))
    assert isinstance(model.encode, GraphedEncoding) and model.encode.eager == eager


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records CUDA graphs")
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_replayed_graphs_train_like_the_eager_encoder(name):
    torch.manual_seed(0)
    eager = speech_encoder(name).cuda().train()
    graphed = copy.deepcopy(eager)
    use_cuda_graphs(graphed, frame_multiple=8, batch_multiple=4)
    for step, (size, frames) in enumerate([(3, 13), (4, 30), (2, 11), (3, 29), (3, 13)]):  # replays: 2 shapes
        x, wav_lens = batch(size, frames, seed=step)
        x, wav_lens = x.detach().cuda().requires_grad_(), wav_lens.cuda()
        results = []
        for model in (eager, graphed):  # gradients accumulate over the steps
            x.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x, wav_lens)
            valid = (torch.arange(frames, device="cuda") < torch.round(wav_lens * frames)[:, None]).unsqueeze(-1)
            (out.float() * valid).square().sum().backward()
            grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
            results.append((out * valid, x.grad.clone(), grads))
        (out, x_grad, grads), (out_graphed, x_grad_graphed, grads_graphed) = results
        torch.testing.assert_close(out_graphed, out, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(x_grad_graphed, x_grad, atol=2e-2, rtol=2e-2)
        assert grads_graphed.keys() == grads.keys()
        for key in grads:
            torch.testing.assert_close(grads_graphed[key], grads[key], atol=5e-2, rtol=5e-2, msg=key)
        del results, out, out_graphed  # a step's autograd graph must not outlive it (see CapturedStep)
    assert len(graphed.encode.graphs) == 2
