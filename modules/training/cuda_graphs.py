"""The training steps of a speech encoder, of its convolutional front-end and of an attention decoder's
teacher-forced pass replayed as CUDA graphs, one graph per bucketed batch shape.

Eager training steps of a ConMamba or Conformer encoder are bound by the host: Python, autograd and
some 3000 kernel launches a step take longer than the GPU takes to run them, so the GPU idles about
half the time (RESULTS.md). A CUDA graph records a module's forward and backward kernels once and
then replays them with one launch each, whatever their number.

A graph replays fixed shapes, so batches are padded up to buckets: frames to a multiple of
``frame_multiple``, utterances to a multiple of ``batch_multiple``, target tokens to a multiple of
``token_multiple``. Padding changes no result: padded frames are masked, a padded utterance is one
valid zero frame (a fully masked row would give attention NaNs), the causal decoder never lets a
token see the padding after it, and what the padding adds to the output is cut off before the loss,
so it receives no gradient. The graphs of one module are recorded by :class:`CapturedStep` and share
one memory pool: a graph's activations live only from its forward to its backward, within one
training step, so the graphs of other shapes may reuse that memory. They also share one buffer for
their parameters' gradients; each keeps its own inputs and outputs.

Only training steps (gradients on, module in training mode) run graphed, one call per backward;
validation, test and inference run eager.
"""

import logging
import time

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def round_up(size, multiple):
    """The smallest multiple of ``multiple`` that is at least ``size``."""
    return -(-size // multiple) * multiple


def pad_batch(x, padding_mask, batch, frames):
    """x (batch', time, ...) and its padding mask (batch', time), True at padded frames, padded to
    ``batch`` utterances of ``frames`` frames: zeros, masked; each added utterance has one valid frame."""
    extra_rows, extra_frames = batch - x.shape[0], frames - x.shape[1]
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, extra_frames, 0, extra_rows))
    padding_mask = F.pad(padding_mask, (0, extra_frames, 0, extra_rows), value=True)
    if extra_rows:
        padding_mask[-extra_rows:, 0] = False
    return x, padding_mask


def pad_tokens(tokens, batch, length):
    """Token ids (batch', length') padded with id 0 to (batch, length)."""
    return F.pad(tokens, (0, length - tokens.shape[1], 0, batch - tokens.shape[0]))


class CapturedStep:
    """The forward and backward CUDA graphs of ``function(*inputs)``, a tensor, at the shapes of ``inputs``;
    calling it with tensors of those shapes replays them as one autograd operation, which gives the
    gradients of the inputs that require them and adds those of the parameters among ``params`` that
    the function uses to their ``.grad``.

    It does what ``torch.cuda.make_graphed_callables`` does, whose captures failed in the recipes
    (PyTorch 2.11): it records in the process-wide mode, in which a CUDA call of any other thread,
    such as the loader's pin-memory thread allocating page-locked memory, invalidates the capture.
    Here only the recording thread's calls count (``capture_error_mode="thread_local"``).

    Warm-up and capture run on the side ``stream``, so kernels compile and cuBLAS makes its workspaces
    outside the graphs. Every capture must use the same ``pool`` and ``stream``: the allocator reuses
    a freed block only on the stream that allocated it, so graphs recorded on different streams could
    not share their activations' memory (each would keep its own, about 13 GiB for CTC-large at 12 s).
    The backward graph also gathers the parameter gradients into one flat buffer, ``gradient_buffer``
    when given one that fits, which each step copies once and hands out as views
    (:class:`FlatGradients`): letting autograd accumulate them would cost a clone or an addition per
    parameter, about 760 host operations a CTC-large step. The parameters' gradient hooks therefore do
    not run (the recipes' DDP runs stay eager).

    The previous step's autograd graph must be gone when a new shape is recorded (the recipes keep
    only detached losses): its parameter nodes would make the capture wait on the default stream,
    which invalidates it.
    """

    def __init__(self, function, params, inputs, pool, stream, gradient_buffer=None, warmup=2):
        self.inputs = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
        differentiable = tuple(t for t in self.inputs if t.requires_grad)
        params = tuple(p for p in params if p.requires_grad)
        record = dict(pool=pool, stream=stream, capture_error_mode="thread_local")
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                out = function(*self.inputs)
                grads = torch.autograd.grad(out, differentiable + params, torch.ones_like(out), allow_unused=True)
            # the parameters the function uses: the others would be inputs of every replay for nothing
            self.params = tuple(p for p, g in zip(params, grads[len(differentiable) :]) if g is not None)
            self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.forward_graph, **record):
                out = function(*self.inputs)
            self.grad_out = torch.empty_like(out)
            with torch.cuda.graph(self.backward_graph, **record):
                grads = torch.autograd.grad(out, differentiable + self.params, self.grad_out)
                self.grad_inputs = grads[: len(differentiable)]
                self.grad_params = FlatGradients(self.params, grads[len(differentiable) :], gradient_buffer)
        torch.cuda.current_stream().wait_stream(stream)
        self.out = out.detach()
        self.gradient_buffer = self.grad_params.flat

    def __call__(self, *inputs):
        return _Replay.apply(self, *inputs, *self.params)


class _Replay(torch.autograd.Function):
    """A :class:`CapturedStep`'s graphs as one autograd operation of its inputs and parameters."""

    @staticmethod
    def forward(ctx, step, *inputs_and_params):
        for static, value in zip(step.inputs, inputs_and_params):
            static.copy_(value)
        step.forward_graph.replay()
        ctx.step = step
        return step.out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        step = ctx.step
        step.grad_out.copy_(grad)
        step.backward_graph.replay()
        step.grad_params.add_to_parameters()
        grad_inputs = iter(step.grad_inputs)
        grads = tuple(next(grad_inputs) if t.requires_grad else None for t in step.inputs)
        return (None,) + grads + (None,) * len(step.params)  # the parameters' are given above


class FlatGradients:
    """Parameter gradients gathered into one flat buffer, ``flat``, and added to the parameters' ``.grad``
    by :meth:`add_to_parameters` (set where it is None), from one copy of the buffer: one copy and a
    few launches a step instead of one autograd accumulation (a clone or an addition) per parameter.

    Arguments
    ---------
    params : sequence of torch.nn.Parameter
        The parameters.
    grads : sequence of torch.Tensor or None
        Their gradients (None: unused, the parameter's ``.grad`` is left as it is), of one dtype.
    buffer : torch.Tensor, optional
        Where to gather them if it has their total size and dtype (the graphs of one module share
        one); else a new tensor.
    """

    def __init__(self, params, grads, buffer=None):
        self.params = [p for p, g in zip(params, grads) if g is not None]
        used = [g.reshape(-1) for g in grads if g is not None]
        dtypes = {g.dtype for g in used}
        if len(dtypes) > 1:
            raise ValueError(f"FlatGradients: the gradients must share one dtype, not {sorted(map(str, dtypes))}")
        self.sizes = [g.numel() for g in used]
        fits = buffer is not None and buffer.numel() == sum(self.sizes) and {buffer.dtype} == dtypes
        self.flat = (torch.cat(used, out=buffer) if fits else torch.cat(used)) if used else None

    def add_to_parameters(self):
        """Adds the buffer's current gradients to the parameters' ``.grad`` (gradients accumulate over
        steps as autograd's do); the buffer may then be overwritten."""
        if self.flat is None:
            return
        grads = self.flat.clone().split(self.sizes)
        accumulated, added = [], []
        for param, grad in zip(self.params, grads):
            if param.grad is None:
                param.grad = grad.view_as(param)
            else:
                accumulated.append(param.grad)
                added.append(grad.view_as(param))
        if accumulated:
            torch._foreach_add_(accumulated, added)


class BucketedGraphs:
    """A method of ``module`` whose training steps replay CUDA graphs, one :class:`CapturedStep` a bucket
    of input shapes; other calls run the method eager. Subclasses pad the inputs to their bucket and
    cut the output back; see the module docstring.

    Arguments
    ---------
    module : torch.nn.Module
        The module whose method is graphed (its parameters get the gradients).
    eager : callable
        The method, eager.
    max_graphs : int
        Buckets beyond this many run eager (logged once), bounding the graphs' memory.
    capture : callable
        ``capture(function, params, inputs, pool, stream, gradient_buffer)`` -> the replaying callable
        with a ``gradient_buffer`` attribute, :class:`CapturedStep`; the tests pass a stand-in to run
        the padding and bucketing on the CPU.
    """

    method = None  # the name of the graphed method, which use_cuda_graphs replaces

    def __init__(self, module, eager, max_graphs, capture):
        self.module, self.eager, self.max_graphs, self.capture = module, eager, max_graphs, capture
        self.graphs, self.pool, self.stream, self.gradient_buffer, self.full_logged = {}, None, None, None, False
        self.recording_seconds = 0.0  # the host time spent recording the graphs (bench/recipe_speed.py)

    def training_step(self):
        """Whether this call is part of a training step (gradients on, module in training mode)."""
        return torch.is_grad_enabled() and self.module.training

    def replay(self, bucket, inputs, pad):
        """The output for ``inputs``: the graphs of ``bucket`` replayed on ``pad()`` (the inputs padded to
        it), recorded at the bucket's first call; past ``max_graphs`` buckets, the eager method's."""
        device = inputs[0].device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        key = (bucket, autocast) + tuple((t.shape[2:], t.dtype, t.requires_grad) for t in inputs)
        graphed = self.graphs.get(key)
        if graphed is None and len(self.graphs) >= self.max_graphs:
            if not self.full_logged:
                logger.info("%s.%s: %d batch shapes have CUDA graphs (max_graphs); others train eager",
                            type(self.module).__name__, self.method, self.max_graphs)
                self.full_logged = True
            return self.eager(*inputs)
        padded = pad()
        if graphed is None:
            graphed = self.graphs[key] = self._capture(padded, autocast)
        return graphed(*padded)

    def _capture(self, inputs, autocast):
        """The graphs for the shapes of ``inputs``, recorded under the step's autocast state, without
        autocast's cache of cast weights (a graph would keep reading casts freed after the step)."""
        if self.pool is None and inputs[0].is_cuda:
            self.pool, self.stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        enabled, dtype = autocast
        start = time.perf_counter()
        with torch.autocast(inputs[0].device.type, dtype=dtype, enabled=enabled, cache_enabled=False):
            params = tuple(self.module.parameters())
            graphed = self.capture(self.eager, params, inputs, self.pool, self.stream, self.gradient_buffer)
        self.recording_seconds += time.perf_counter() - start
        self.gradient_buffer = graphed.gradient_buffer
        return graphed


class GraphedEncoding(BucketedGraphs):
    """``encode(x, padding_mask)`` of a :class:`modules.models.speech_encoder.SpeechEncoder` or a
    :class:`modules.models.front_end.ConvolutionFrontEnd`, graphed in training steps (:class:`BucketedGraphs`).
    Install with :func:`use_cuda_graphs`.

    Arguments
    ---------
    encoder : torch.nn.Module
        The module whose ``encode`` is graphed.
    encode : callable
        What to graph instead, ``encode(x, padding_mask)`` (e.g. the benchmarks' ``forward``).
    output_frames : callable
        The output frames of an input of that many frames (default: as many), to cut the padding off.
    frame_multiple, batch_multiple : int
        Bucket sizes (input frames, utterances): fewer graphs against more padded work.
    max_graphs, capture
        See :class:`BucketedGraphs`.
    """

    method = "encode"

    def __init__(self, encoder, encode=None, output_frames=None, frame_multiple=32, batch_multiple=8,
                 max_graphs=64, capture=CapturedStep):
        super().__init__(encoder, encode or encoder.encode, max_graphs, capture)
        self.output_frames = output_frames or (lambda frames: frames)
        self.frame_multiple, self.batch_multiple = frame_multiple, batch_multiple

    def __call__(self, x, padding_mask):
        if not self.training_step():
            return self.eager(x, padding_mask)
        batch, frames = x.shape[:2]
        bucket = (round_up(batch, self.batch_multiple), round_up(frames, self.frame_multiple))
        output = self.replay(bucket, (x, padding_mask), lambda: pad_batch(x, padding_mask, *bucket))
        return output[:batch, : self.output_frames(frames)]


class GraphedTeacherForcing(BucketedGraphs):
    """``teacher_forced(tokens, encoder_out, memory_padding)`` of a
    :class:`modules.models.seq2seq.Seq2SeqModel` (its decoder's training pass), graphed in training
    steps (:class:`BucketedGraphs`). Install with ``use_cuda_graphs(model, GraphedTeacherForcing)``.

    Arguments
    ---------
    model : torch.nn.Module
        The module whose ``teacher_forced`` is graphed.
    token_multiple, frame_multiple, batch_multiple : int
        Bucket sizes (target tokens, encoder frames, utterances).
    max_graphs, capture
        See :class:`BucketedGraphs`.
    """

    method = "teacher_forced"

    def __init__(self, model, token_multiple=16, frame_multiple=32, batch_multiple=8, max_graphs=64,
                 capture=CapturedStep):
        super().__init__(model, model.teacher_forced, max_graphs, capture)
        self.token_multiple, self.frame_multiple, self.batch_multiple = token_multiple, frame_multiple, batch_multiple

    def __call__(self, tokens, encoder_out, memory_padding):
        if not self.training_step():
            return self.eager(tokens, encoder_out, memory_padding)
        (batch, length), frames = tokens.shape, encoder_out.shape[1]
        padded_batch = round_up(batch, self.batch_multiple)
        bucket = (padded_batch, round_up(length, self.token_multiple), round_up(frames, self.frame_multiple))

        def pad():
            memory, padding = pad_batch(encoder_out, memory_padding, padded_batch, bucket[2])
            return pad_tokens(tokens, padded_batch, bucket[1]), memory, padding

        return self.replay(bucket, (tokens, encoder_out, memory_padding), pad)[:batch, :length]


def installed_graphs(module):
    """The :class:`BucketedGraphs` that :func:`use_cuda_graphs` installed on ``module`` or its submodules."""
    return [graphs for m in module.modules() for graphs in vars(m).values() if isinstance(graphs, BucketedGraphs)]


def use_cuda_graphs(module, graphs=GraphedEncoding, **options):
    """Makes the training steps of ``module``'s method ``graphs.method`` replay CUDA graphs (``graphs``,
    :class:`GraphedEncoding` or :class:`GraphedTeacherForcing`, with ``options``), in place, and returns
    True. Without CUDA, and in multi-process (DDP) runs, whose gradient hooks and communication streams
    the graphs have not been tested with, it stays eager (logged) and returns False. The state_dict does
    not change."""
    if not torch.cuda.is_available():
        logger.info("cuda_graphs: no CUDA device, the model trains eager")
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        logger.info("cuda_graphs: not used in multi-process (DDP) runs yet, the model trains eager")
        return False
    setattr(module, graphs.method, graphs(module, **options))
    return True
