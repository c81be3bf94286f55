"""``cuda_graphs: True`` (CTC and S2S yamls): the training steps of the speech encoder, of its CNN
front-end and (S2S) of the decoder's teacher-forced pass replay CUDA graphs.

What must hold: padding a batch up to its bucket changes no output and no gradient (ConMamba, the
Conformer, whose attention would give NaNs on a fully masked utterance, the strided front-end,
whose output is cut to the unpadded batch's frames, and the Transformer and Mamba decoders, whose
tokens and memory are both padded), one graph serves every batch of a bucket, shapes past
``max_graphs`` and steps without gradients run eager, and the state_dict keeps its names. On the CPU
a stand-in for the capture replays the eager method, so the padding, bucketing and gradients are those
of the real path; on a GPU the last tests record and replay real graphs against the eager modules,
under bf16 autocast, and check that the graphs of a module share one gradient buffer.
"""

import copy
import logging

import pytest
import torch
from speechbrain.lobes.models.transformer.Transformer import TransformerDecoder

from modules.models.conformer import ConformerEncoder
from modules.models.conmamba import ConMambaEncoder
from modules.models.front_end import ConvolutionFrontEnd
from modules.models.mamba_decoder import MambaDecoder
from modules.models.seq2seq import Seq2SeqModel
from modules.models.speech_encoder import SpeechEncoder
from modules.training.cuda_graphs import (
    FlatGradients,
    GraphedEncoding,
    GraphedTeacherForcing,
    installed_graphs,
    pad_batch,
    use_cuda_graphs,
)
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
    """Stands in for :class:`CapturedStep`: notes the shapes of the captures' first inputs, and replays
    by calling the eager function."""

    def __init__(self):
        self.shapes = []

    def __call__(self, function, params, inputs, pool, stream, gradient_buffer):
        self.shapes.append(tuple(inputs[0].shape))
        return EagerReplay(function)


class EagerReplay:
    """What :class:`Recorder` returns: the eager function, without a gradient buffer."""

    gradient_buffer = None

    def __init__(self, function):
        self.function = function

    def __call__(self, *inputs):
        return self.function(*inputs)


def front_end():
    """A CNN front-end shaped as the yamls' (two stride-2 blocks), at a tiny size, without dropout."""
    return ConvolutionFrontEnd([None, None, 12], num_blocks=2, num_layers_per_block=1, out_channels=(4, 4),
                               kernel_sizes=(3, 3), strides=(2, 2), residuals=(False, False), dropout=0.0)


DECODERS = {
    "mamba": lambda: MambaDecoder(num_layers=2, d_model=16, d_ffn=32, dropout=0.0),
    "transformer": lambda: TransformerDecoder(num_layers=2, nhead=2, d_ffn=32, d_model=16, dropout=0.0,
                                              normalize_before=True, causal=True),
}


def seq2seq(name):
    """A tiny encoder-decoder, shaped as the S2S yamls' (pre-LN causal decoder), without dropout."""
    from speechbrain.lobes.models.transformer.Transformer import NormalizedEmbedding, PositionalEncoding

    return Seq2SeqModel(speech_encoder("conmamba"), DECODERS[name](), NormalizedEmbedding(16, 10),
                        PositionalEncoding(16))


def decoder_batch(size, tokens, frames, seed=0):
    """Tokens (size, tokens) of a 10-token vocabulary, an encoder output (size, frames, 16) requiring
    gradients and its padding mask, the first row full."""
    generator = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(10, (size, tokens), generator=generator)
    encoder_out = torch.randn(size, frames, 16, generator=generator, requires_grad=True)
    lengths = torch.randint(1, frames + 1, (size,), generator=generator)
    lengths[0] = frames
    return token_ids, encoder_out, torch.arange(frames) >= lengths[:, None]


def batch(size, frames, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, frames, 12, generator=generator, requires_grad=True)
    lengths = torch.randint(1, frames + 1, (size,), generator=generator)
    lengths[0] = frames
    return x, lengths.float() / frames


def output_and_gradients(model, x, wav_lens):
    out = model(x, wav_lens)
    if isinstance(out, tuple):  # the front-end's (output, relative lengths)
        out, wav_lens = out
    valid = (torch.arange(out.shape[1]) < torch.round(wav_lens * out.shape[1])[:, None])
    valid = valid.view(valid.shape + (1,) * (out.dim() - 2))
    (out * valid * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out * valid, x.grad.clone(), grads


def assert_trained_alike(graphed, eager, tolerance, gradient_tolerance):
    """A graphed step's (output, input gradient or None, parameter gradients) against the eager step's."""
    torch.testing.assert_close(graphed[0], eager[0], atol=tolerance, rtol=tolerance)
    if eager[1] is not None:
        torch.testing.assert_close(graphed[1], eager[1], atol=tolerance, rtol=tolerance)
    assert graphed[2].keys() == eager[2].keys() and len(eager[2]) > 0
    for key in eager[2]:
        torch.testing.assert_close(graphed[2][key], eager[2][key], atol=gradient_tolerance,
                                   rtol=gradient_tolerance, msg=key)


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
    assert_trained_alike((out, x_grad, grads), expected, 1e-5, 1e-5)


def test_the_front_end_padded_to_its_bucket_changes_no_output_and_no_gradient():
    torch.manual_seed(0)
    eager = front_end().train()
    graphed = copy.deepcopy(eager)
    recorder = Recorder()
    graphed.encode = GraphedEncoding(graphed, output_frames=graphed.output_frames, frame_multiple=16,
                                     batch_multiple=4, capture=recorder)
    x, wav_lens = batch(3, 27)  # bucket: 4 utterances of 32 frames, 8 output frames cut to 7
    expected = output_and_gradients(eager, x, wav_lens)
    x.grad = None
    out, x_grad, grads = output_and_gradients(graphed, x, wav_lens)
    assert recorder.shapes == [(4, 32, 12)] and out.shape == expected[0].shape == (3, 7, 3, 4)
    assert_trained_alike((out, x_grad, grads), expected, 1e-5, 1e-5)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_teacher_forcing_padded_to_its_bucket_changes_no_output_and_no_gradient(name):
    torch.manual_seed(0)
    eager = seq2seq(name).train()
    graphed = copy.deepcopy(eager)
    recorder = Recorder()
    graphed.teacher_forced = GraphedTeacherForcing(graphed, token_multiple=8, frame_multiple=8, batch_multiple=4,
                                                   capture=recorder)
    tokens, encoder_out, memory_padding = decoder_batch(3, 5, 13)  # bucket: 4 rows, 8 tokens, 16 frames
    results = []
    for model in (eager, graphed):
        encoder_out.grad = None
        out = model.teacher_forced(tokens, encoder_out, memory_padding)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads = {key: p.grad.clone() for key, p in model.named_parameters() if p.grad is not None}
        results.append((out, encoder_out.grad.clone(), grads))
    eager_result, graphed_result = results
    assert recorder.shapes == [(4, 8)] and graphed_result[0].shape == eager_result[0].shape == (3, 5, 16)
    assert_trained_alike(graphed_result, eager_result, 1e-5, 1e-5)
    assert any(key.startswith("decoder.") for key in eager_result[2])


def test_one_graph_a_bucket_and_eager_past_max_graphs_or_without_gradients(caplog):
    model = speech_encoder("conmamba").train()
    recorder = Recorder()
    model.encode = GraphedEncoding(model, frame_multiple=8, batch_multiple=4, max_graphs=2, capture=recorder)
    for size, frames in [(3, 13), (4, 16), (2, 9), (5, 9)]:  # buckets (4, 16), (4, 16), (4, 16), (8, 16)
        model(*batch(size, frames))
    assert recorder.shapes == [(4, 16, 12), (8, 16, 12)]
    recording_seconds = model.encode.recording_seconds  # the host time of the recordings, for recipe_speed
    assert recording_seconds > 0 and installed_graphs(model) == [model.encode]
    with caplog.at_level(logging.INFO, logger="modules.training.cuda_graphs"):
        for _ in range(2):
            out = model(*batch(1, 30))  # a third bucket: eager, logged once
    assert out.shape == (1, 30, 16) and recorder.shapes == [(4, 16, 12), (8, 16, 12)]
    assert sum("max_graphs" in record.getMessage() for record in caplog.records) == 1
    with torch.no_grad():
        model(*batch(3, 40))
    model.eval()
    model(*batch(3, 40))
    assert len(recorder.shapes) == 2 and model.encode.recording_seconds == recording_seconds


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


def test_flat_gradients_gather_into_a_given_buffer_that_fits():
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in [(3, 4), (5,)]]
    grads = [torch.randn(3, 4), torch.randn(5)]
    buffer = torch.zeros(17)
    shared = FlatGradients(params, grads, buffer)
    assert shared.flat.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer, torch.cat([grads[0].reshape(-1), grads[1]]), rtol=0, atol=0)
    for unfit in (torch.zeros(16), torch.zeros(17, dtype=torch.float64)):  # another size or dtype: its own
        assert FlatGradients(params, grads, unfit).flat.data_ptr() != unfit.data_ptr()


def test_the_recipes_apply_one_speed_option_and_stay_eager_without_cuda_or_with_ddp(monkeypatch):
    hparams = dict(compile_layers=True, cuda_graphs=True, encoder=None, speech_encoder=None, CNN=None)
    with pytest.raises(ValueError, match="compile_layers and cuda_graphs"):
        speed_up_training(hparams)
    model, CNN = speech_encoder("conmamba"), front_end()
    eager, eager_CNN = model.encode, CNN.encode
    model_s2s = seq2seq("transformer")
    eager_teacher_forced = model_s2s.teacher_forced
    hparams = dict(hparams, compile_layers=False, speech_encoder=model, CNN=CNN)
    for cuda, ddp in [(False, False), (True, True)]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: ddp)
        speed_up_training(hparams, seq2seq=model_s2s)
        assert model.encode == eager and CNN.encode == eager_CNN
        assert model_s2s.teacher_forced == eager_teacher_forced
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    speed_up_training(hparams, seq2seq=model_s2s)
    assert isinstance(model.encode, GraphedEncoding) and model.encode.eager == eager
    assert isinstance(CNN.encode, GraphedEncoding) and CNN.encode.eager == eager_CNN
    assert CNN.encode.output_frames(128) == CNN.output_frames(128) == 32 == CNN.encode.frame_multiple // 4
    assert isinstance(model_s2s.teacher_forced, GraphedTeacherForcing)
    assert model_s2s.teacher_forced.eager == eager_teacher_forced
    installed = installed_graphs(torch.nn.ModuleList([model, CNN, model_s2s]))
    assert sorted(map(id, installed)) == sorted(map(id, [model.encode, CNN.encode, model_s2s.teacher_forced]))


def eager_and_graphed(build, *graphs, **options):
    """A model from ``build()`` on the GPU in training mode, and a copy whose training steps replay CUDA
    graphs (``use_cuda_graphs(copy, *graphs, **options)``)."""
    torch.manual_seed(0)
    eager = build().cuda().train()
    graphed = copy.deepcopy(eager)
    use_cuda_graphs(graphed, *graphs, **options)
    return eager, graphed


def bf16_step(model, masked_output, differentiable_input=None):
    """One training step on the GPU under bf16 autocast: ``masked_output(model)`` (padding zeroed), whose
    squares summed are back-propagated. -> (that output, detached, the input's gradient or None, the
    parameters' gradients, accumulated over steps). Nothing keeps the step's autograd graph after it
    (see CapturedStep)."""
    if differentiable_input is not None:
        differentiable_input.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = masked_output(model)
    out.float().square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), None if differentiable_input is None else differentiable_input.grad.clone(), grads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records CUDA graphs")
@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_replayed_graphs_train_like_the_eager_encoder(name):
    eager, graphed = eager_and_graphed(lambda: speech_encoder(name), frame_multiple=8, batch_multiple=4)
    for step, (size, frames) in enumerate([(3, 13), (4, 30), (2, 11), (3, 29), (3, 13)]):  # replays: 2 shapes
        x, wav_lens = batch(size, frames, seed=step)
        x, wav_lens = x.detach().cuda().requires_grad_(), wav_lens.cuda()
        valid = (torch.arange(frames, device="cuda") < torch.round(wav_lens * frames)[:, None]).unsqueeze(-1)
        eager_step, graphed_step = (bf16_step(m, lambda m: m(x, wav_lens) * valid, x) for m in (eager, graphed))
        assert_trained_alike(graphed_step, eager_step, 2e-2, 5e-2)
    graphs = graphed.encode.graphs.values()
    assert len(graphs) == 2 and len({step.gradient_buffer.data_ptr() for step in graphs}) == 1  # one shared


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records CUDA graphs")
def test_replayed_front_end_graphs_train_like_the_eager_front_end():
    eager, graphed = eager_and_graphed(front_end, output_frames=front_end().output_frames, frame_multiple=16,
                                       batch_multiple=4)

    def valid_output(model, x, wav_lens):
        out, out_lens = model(x, wav_lens)
        valid = torch.arange(out.shape[1], device="cuda") < torch.round(out_lens * out.shape[1])[:, None]
        return out * valid[..., None, None]

    for step, (size, frames) in enumerate([(3, 27), (4, 60), (2, 19), (3, 57), (3, 27)]):  # replays: 2 shapes
        x, wav_lens = batch(size, frames, seed=step)
        x, wav_lens = x.detach().cuda(), wav_lens.cuda()  # features: no gradient, as in the recipes
        eager_step, graphed_step = (bf16_step(m, lambda m: valid_output(m, x, wav_lens)) for m in (eager, graphed))
        assert_trained_alike(graphed_step, eager_step, 2e-2, 5e-2)
    assert len(graphed.encode.graphs) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records CUDA graphs")
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_replayed_teacher_forcing_graphs_train_like_the_eager_decoder(name):
    eager, graphed = eager_and_graphed(lambda: seq2seq(name), GraphedTeacherForcing, token_multiple=8,
                                       frame_multiple=8, batch_multiple=4)
    shapes = [(3, 5, 13), (4, 12, 30), (2, 3, 11), (3, 10, 29), (3, 5, 13)]  # replays: 2 buckets
    for step, (size, tokens, frames) in enumerate(shapes):
        token_ids, encoder_out, memory_padding = (t.detach().cuda() for t in decoder_batch(size, tokens, frames, step))
        encoder_out.requires_grad_()
        eager_step, graphed_step = (
            bf16_step(m, lambda m: m.teacher_forced(token_ids, encoder_out, memory_padding), encoder_out)
            for m in (eager, graphed)
        )
        assert_trained_alike(graphed_step, eager_step, 2e-2, 5e-2)
    graphs = graphed.teacher_forced.graphs.values()
    assert len(graphs) == 2 and len({step.gradient_buffer.data_ptr() for step in graphs}) == 1  # one shared
