"""A speech encoder's training steps replayed as CUDA graphs, one graph per bucketed batch shape.

Eager training steps of a ConMamba or Conformer encoder are bound by the host: Python, autograd and
some 3000 kernel launches a step take longer than the GPU takes to run them, so the GPU idles about
half the time (RESULTS.md). A CUDA graph records the encoder's forward and backward kernels once and
then replays them with one launch each, whatever their number.

A graph replays fixed shapes, so batches are padded up to buckets: frames to a multiple of
``frame_multiple``, utterances to a multiple of ``batch_multiple``. Padding changes no result: padded
frames are masked, and a padded utterance is one valid zero frame (a fully masked row would give
attention NaNs), whose output is cut off before the loss, so it receives no gradient. The graphs are
recorded by :class:`CapturedStep` and share one memory pool: a graph's activations live
only from its forward to its backward, within one training step, so the graphs of other shapes may
reuse that memory. What each graph keeps is its inputs, outputs and its parameters' gradients.

Only training steps (gradients on, module in training mode) run graphed, one encoder call per
backward; validation, test and inference run eager.
"""

import logging

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


class CapturedStep:
    """The forward and backward CUDA graphs of ``encode(x, padding_mask)``, whose parameters are
    ``params``, at the shapes of ``x`` and ``padding_mask``; calling it replays them as one autograd
    operation.

    It does what ``torch.cuda.make_graphed_callables`` does, whose captures failed in the recipes
    (PyTorch 2.11): it records in the process-wide mode, in which a CUDA call of any other thread,
    such as the loader's pin-memory thread allocating page-locked memory, invalidates the capture.
    Here only the recording thread's calls count (``capture_error_mode="thread_local"``).

    Warm-up and capture run on the side ``stream``, so kernels compile and cuBLAS makes its workspaces
    outside the graphs. Every capture must use the same ``pool`` and ``stream``: the allocator reuses
    a freed block only on the stream that allocated it, so graphs recorded on different streams could
    not share their activations' memory (each would keep its own, about 13 GiB for CTC-large at 12 s).
    The backward graph also gathers the parameter gradients into one flat buffer, which each step
    copies once and hands out as views (:class:`FlatGradients`): letting autograd accumulate them
    would cost a clone or an addition per parameter, about 760 host operations a CTC-large step. The
    parameters' gradient hooks therefore do not run (the recipes' DDP runs stay eager).

    The previous step's autograd graph must be gone when a new shape is recorded (the recipes keep
    only detached losses): its parameter nodes would make the capture wait on the default stream,
    which invalidates it.
    """

    def __init__(self, encode, params, x, padding_mask, pool, stream, warmup=2):
        self.params = tuple(p for p in params if p.requires_grad)
        self.x, self.padding_mask = x.detach().clone().requires_grad_(x.requires_grad), padding_mask.clone()
        inputs = ((self.x,) if x.requires_grad else ()) + self.params
        record = dict(pool=pool, stream=stream, capture_error_mode="thread_local")
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                out = encode(self.x, self.padding_mask)
                torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)
            self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.forward_graph, **record):
                out = encode(self.x, self.padding_mask)
            self.grad_out = torch.empty_like(out)
            with torch.cuda.graph(self.backward_graph, **record):
                grads = torch.autograd.grad(out, inputs, self.grad_out, allow_unused=True)
                self.grad_x, grad_params = (grads[0], grads[1:]) if x.requires_grad else (None, grads)
                self.grad_params = FlatGradients(self.params, grad_params)
        torch.cuda.current_stream().wait_stream(stream)
        self.out = out.detach()

    def __call__(self, x, padding_mask):
        return _Replay.apply(self, x, padding_mask, *self.params)


class _Replay(torch.autograd.Function):
    """A :class:`CapturedStep`'s graphs as one autograd operation of x, padding_mask and the parameters."""

    @staticmethod
    def forward(ctx, step, x, padding_mask, *params):
        step.x.copy_(x)
        step.padding_mask.copy_(padding_mask)
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
        return (None, step.grad_x, None) + (None,) * len(step.params)  # the parameters' are given above


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
    """

    def __init__(self, params, grads):
        self.params = [p for p, g in zip(params, grads) if g is not None]
        used = [g for g in grads if g is not None]
        dtypes = {g.dtype for g in used}
        if len(dtypes) > 1:
            raise ValueError(f"FlatGradients: the gradients must share one dtype, not {sorted(map(str, dtypes))}")
        self.sizes = [g.numel() for g in used]
        self.flat = torch.cat([g.reshape(-1) for g in used]) if used else None

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


class GraphedEncoding:
    """``encode(x, padding_mask)`` of a :class:`modules.models.speech_encoder.SpeechEncoder` whose
    training steps replay CUDA graphs; see the module docstring. Install with :func:`use_cuda_graphs`.

    Arguments
    ---------
    encoder : torch.nn.Module
        The module whose ``encode`` is graphed (its parameters get the gradients).
    encode : callable
        What to graph, ``encode(x, padding_mask)`` (default ``encoder.encode``).
    frame_multiple, batch_multiple : int
        Bucket sizes: fewer graphs against more padded work.
    max_graphs : int
        Batch shapes beyond this many run eager (logged once), bounding the graphs' memory.
    capture : callable
        ``capture(encode, params, x, padding_mask, pool, stream)``, :class:`CapturedStep`; the tests
        pass a stand-in to run the padding and bucketing on the CPU.
    """

    def __init__(self, encoder, encode=None, frame_multiple=32, batch_multiple=8, max_graphs=64,
                 capture=CapturedStep):
        self.encoder, self.eager = encoder, encode or encoder.encode
        self.frame_multiple, self.batch_multiple, self.max_graphs = frame_multiple, batch_multiple, max_graphs
        self.capture = capture
        self.graphs, self.pool, self.stream, self.full_logged = {}, None, None, False

    def __call__(self, x, padding_mask):
        if not (torch.is_grad_enabled() and self.encoder.training):
            return self.eager(x, padding_mask)
        batch, frames = x.shape[:2]
        shape = (round_up(batch, self.batch_multiple), round_up(frames, self.frame_multiple))
        autocast = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        key = (shape, x.shape[2:], x.dtype, x.requires_grad, autocast)
        graphed = self.graphs.get(key)
        if graphed is None and len(self.graphs) >= self.max_graphs:
            if not self.full_logged:
                logger.info("%d batch shapes have CUDA graphs (max_graphs); others train eager", self.max_graphs)
                self.full_logged = True
            return self.eager(x, padding_mask)
        x_padded, mask_padded = pad_batch(x, padding_mask, *shape)
        if graphed is None:
            graphed = self.graphs[key] = self._capture(x_padded, mask_padded, autocast)
        return graphed(x_padded, mask_padded)[:batch, :frames]

    def _capture(self, x, padding_mask, autocast):
        """The graphs for the shapes of x and padding_mask, recorded under the step's autocast state,
        without autocast's cache of cast weights (a graph would keep reading casts freed after the step)."""
        if self.pool is None and x.is_cuda:
            self.pool, self.stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        enabled, dtype = autocast
        with torch.autocast(x.device.type, dtype=dtype, enabled=enabled, cache_enabled=False):
            params = tuple(self.encoder.parameters())
            return self.capture(self.eager, params, x, padding_mask, self.pool, self.stream)


def use_cuda_graphs(speech_encoder, **options):
    """Makes ``speech_encoder``'s training steps replay CUDA graphs (:class:`GraphedEncoding` with
    ``options``), in place. Without CUDA, and in multi-process (DDP) runs, whose gradient hooks and
    communication streams the graphs have not been tested with, it stays eager (logged). The
    state_dict does not change."""
    if not torch.cuda.is_available():
        logger.info("cuda_graphs: no CUDA device, the encoder trains eager")
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        logger.info("cuda_graphs: not used in multi-process (DDP) runs yet, the encoder trains eager")
        return
    speech_encoder.encode = GraphedEncoding(speech_encoder, **options)
