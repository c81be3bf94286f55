"""MADEON: decoder-only ASR language models over one sequence of speech units and text (arXiv 2411.06968).

A training sequence is ``[<startofspeech>, s_1 .. s_K, <generatetext>, w_1 .. w_M]`` and the model
predicts the text (and the end token) from everything before it. Pipeline:

    Embedding -> embedding span masking (training) -> N residual pre-LN mixer blocks -> LayerNorm -> head

*Speech prefixing* makes the speech span bidirectional while the text stays causal: a
backward scan reads ``[<startofspeech>, s_K .. s_1, <generatetext>, w_1 ..]``, i.e. the sequence with
positions 1 .. sp-1 reversed (speech token reversal, STR), and everything from ``<generatetext>`` on in
time order. Two variants:

* parallel: one mixer with shared in_proj/out_proj and per-direction conv/SSM parameters whose backward
  branch reads the STR sequence; the branches are summed (:class:`PrefixBiMamba`, :class:`PrefixBiMamba2`);
* serial: blocks of a forward mixer, STR, a backward mixer, STR (:class:`SerialBlock`).

STR is a per-row gather along time (:func:`prefix_reversal_index`), not a flattened element map. Because the
text is causal in both directions, decoding is recurrent: :meth:`MadeonLM.init_cache` scans the speech prefix
once (both directions) and :meth:`MadeonLM.step` adds one token in O(1).

:class:`TransformerDecoderOnly` is the paper's Transformer baseline (causal or prefix-LM).
"""

import math

import torch
import torch.nn as nn
from speechbrain.lobes.models.transformer.Transformer import TransformerEncoder

from modules.mamba.mamba import Mamba
from modules.mamba.mamba2 import Mamba2
from modules.mamba.reverse import reversal_index, reverse_time


def speech_end(tokens, generate_text_index, lengths=None):
    """Position of the first ``<generatetext>`` in each row (batch,); rows without one end at ``lengths``
    (the whole row is speech prefix, as at the start of decoding)."""
    batch, time = tokens.shape
    is_start = tokens == generate_text_index
    if lengths is None:
        lengths = torch.full((batch,), time, device=tokens.device)
    return torch.where(is_start.any(dim=1), is_start.int().argmax(dim=1), lengths)


def prefix_reversal_index(speech_end, time):
    """STR as a (batch, time) gather index: positions 1 .. speech_end-1 of each row reversed, position 0
    (``<startofspeech>``) and everything from ``speech_end`` on in place. Its own inverse."""
    inner = reversal_index((speech_end - 1).clamp(min=0), time - 1) + 1
    return torch.cat([torch.zeros_like(inner[:, :1]), inner], dim=1)


class SpeechPrefixing:
    """What the parallel speech-prefixing mixers share, before a bidirectional mixer class in the bases:
    summed branches, the backward branch reading the STR order, and recurrent decoding. A subclass
    gives ``scan_prefix`` (both branches over a prefix, from and into a cache) and ``step``."""

    recurrent_backward = True  # the backward branch reads the text in time order

    def __init__(self, d_model, **kwargs):
        super().__init__(d_model, bidirectional=True, combine="sum", **kwargs)

    def forward(self, hidden, lengths=None, cache=None, reverse_index=None):
        """hidden (batch, time, d_model); reverse_index (batch, time) from :func:`prefix_reversal_index`
        (default: the whole valid input is the speech prefix). With ``cache``, scans the prefix into it."""
        batch, time, _ = hidden.shape
        if lengths is None:
            lengths = torch.full((batch,), time, device=hidden.device)
        if reverse_index is None:
            reverse_index = prefix_reversal_index(lengths, time)
        if cache is None:
            return super().forward(hidden, lengths, reverse_index=reverse_index)
        return self.scan_prefix(hidden, lengths, cache, reverse_index)


class PrefixBiMamba(SpeechPrefixing, Mamba):
    """MADEON's parallel speech-prefixing Mamba mixer: a BiMamba whose backward branch
    reads the STR sequence, branches summed before the shared out_proj, and recurrent decoding.

    The cache (:meth:`Mamba.allocate_cache`) holds four states, (conv, ssm) of the forward branch then
    of the backward branch. After the prefix the backward branch has scanned the reversed speech, and
    each new text token advances both branches in time order, exactly as the training scan does past
    ``<generatetext>``.
    """

    def scan_prefix(self, hidden, lengths, cache, reverse_index):
        """Both branches over a prefix (batch, time, d_model), from and into ``cache``."""
        x, z = self.project(hidden)  # (batch, d_inner, time) each
        y = self.scan_direction(x, lengths, *cache[:2])
        x_backward = reverse_time(x, reverse_index, dim=2)
        y_backward = self.scan_direction(x_backward, lengths, *cache[2:], backward=True)
        return self.output(y + reverse_time(y_backward, reverse_index, dim=2), z)

    def step(self, hidden, cache):
        """One text token (batch, 1, d_model) through both branches, in time order."""
        x, z = self.project(hidden)  # (batch, d_inner, 1) each
        x = x[..., 0]
        y = self.step_direction(x, *cache[:2]) + self.step_direction(x, *cache[2:], backward=True)
        return self.output(y[..., None], z)


class PrefixBiMamba2(SpeechPrefixing, Mamba2):
    """MADEON's parallel speech-prefixing Mamba-2 mixer; see :class:`PrefixBiMamba`."""

    def scan_prefix(self, hidden, lengths, cache, reverse_index):
        """Both branches over a prefix (batch, time, d_model), from and into ``cache``."""
        z, xBC, dt = self.project(hidden)
        y = self.scan_direction(xBC, dt, lengths, *cache[:2])
        xBC_backward, dt_backward = reverse_time(xBC, reverse_index, dim=2), reverse_time(dt, reverse_index, dim=1)
        y_backward = self.scan_direction(xBC_backward, dt_backward, lengths, *cache[2:], backward=True)
        return self.output(y + reverse_time(y_backward, reverse_index, dim=1), z)

    def step(self, hidden, cache):
        """One text token (batch, 1, d_model) through both branches, in time order."""
        z, xBC, dt = self.project(hidden)
        y = self.step_direction(xBC[..., 0], dt[:, 0], *cache[:2])
        y = y + self.step_direction(xBC[..., 0], dt[:, 0], *cache[2:], backward=True)
        return self.output(y, z[:, 0]).unsqueeze(1)


class ProjectionDropout(nn.Module):
    """MADEON's ``projection_dropout_rate`` (arXiv 2411.06968 and its released configs), on
    a (batch, time, channels) tensor. ``kind``:

    * ``"tokens"``: whole token positions (every channel of a frame), Mamba-1 on the in_proj output;
    * ``"channels"``: whole feature channels for the whole sequence, Mamba-1 on the block output
      (both are the published ``Dropout1d`` on (batch, channels, time) and its transpose);
    * ``"elements"``: element-wise, Mamba-2 on both.
    """

    def __init__(self, p, kind):
        super().__init__()
        if kind not in ("tokens", "channels", "elements"):
            raise ValueError(f"projection dropout kind must be 'tokens', 'channels' or 'elements', not {kind!r}")
        self.kind = kind
        self.dropout = nn.Dropout(p) if kind == "elements" else nn.Dropout1d(p)

    def forward(self, x):
        if not self.training or self.dropout.p == 0:
            return x
        if self.kind == "channels":
            return self.dropout(x.transpose(1, 2)).transpose(1, 2)
        return self.dropout(x)  # Dropout1d on (batch, time, channels) drops whole time steps


# Per mixer, the published dropout of the in_proj output and of the block output
PROJECTION_DROPOUT = {Mamba: ("tokens", "channels"), Mamba2: ("elements", "elements")}


class ResidualBlock(nn.Module):
    """x + Dropout(Mixer(LayerNorm(x))): a pure mixer block, no MLP, as in MADEON.

    ``dropout`` is the published projection dropout (:class:`ProjectionDropout`): on the mixer's in_proj
    output (a forward hook, so the mixers stay the plain Mamba ones) and on the block's output, per
    token / per channel for Mamba-1 mixers, element-wise for Mamba-2 ones.
    """

    def __init__(self, d_model, mixer, dropout=0.0):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mixer = mixer
        in_proj_kind, output_kind = next(
            kinds for cls, kinds in PROJECTION_DROPOUT.items() if isinstance(mixer, cls)
        )
        self.in_proj_dropout = ProjectionDropout(dropout, in_proj_kind)
        self.dropout = ProjectionDropout(dropout, output_kind)
        mixer.in_proj.register_forward_hook(lambda module, inputs, output: self.in_proj_dropout(output))

    def forward(self, x, reverse_index=None, lengths=None, cache=None):
        """x (batch, time, d_model); ``reverse_index`` is read by prefixing mixers only."""
        return x + self.dropout(self.mixer(self.norm(x), lengths=lengths, cache=cache, reverse_index=reverse_index))

    def allocate_cache(self, batch_size):
        return self.mixer.allocate_cache(batch_size)

    def step(self, x, cache):
        return x + self.mixer.step(self.norm(x), cache)


class SerialBlock(nn.Module):
    """Serial speech prefixing: a forward residual mixer, STR, a backward residual mixer, STR.

    Nothing is shared between the two mixers. The cache is the forward mixer's states followed by the
    backward mixer's; text tokens step through both in time order.
    """

    def __init__(self, d_model, forward_mixer, backward_mixer, dropout=0.0):
        super().__init__()
        self.forward_block = ResidualBlock(d_model, forward_mixer, dropout)
        self.backward_block = ResidualBlock(d_model, backward_mixer, dropout)

    def forward(self, x, reverse_index, lengths=None, cache=None):
        """x (batch, time, d_model); reverse_index (batch, time) from :func:`prefix_reversal_index`."""
        forward_cache, backward_cache = (cache[:2], cache[2:]) if cache is not None else (None, None)
        x = self.forward_block(x, lengths=lengths, cache=forward_cache)
        x = self.backward_block(reverse_time(x, reverse_index, dim=1), lengths=lengths, cache=backward_cache)
        return reverse_time(x, reverse_index, dim=1)

    def allocate_cache(self, batch_size):
        return self.forward_block.allocate_cache(batch_size) + self.backward_block.allocate_cache(batch_size)

    def step(self, x, cache):
        return self.backward_block.step(self.forward_block.step(x, cache[:2]), cache[2:])


MIXERS = {"mamba": (Mamba, PrefixBiMamba), "mamba2": (Mamba2, PrefixBiMamba2)}


class MadeonLM(nn.Module):
    """Mamba / Mamba-2 decoder-only LM with optional speech prefixing.

    Arguments
    ---------
    vocab_size, d_model, num_blocks : int
        Joint speech+text vocabulary, width, number of blocks (a serial block holds two mixers).
    mixer : "mamba" or "mamba2"
    prefixing : "none", "parallel" or "serial"
    mixer_config : dict
        Keyword arguments of the mixer (d_state, d_conv, expand, headdim, rmsnorm, ...).
    generate_text_index : int
        Id of ``<generatetext>``, the end of the speech prefix.
    dropout : float
        The published projection dropout (``projection_dropout_rate``), on each mixer's in_proj output
        and on each block's output (:class:`ResidualBlock`, :class:`ProjectionDropout`).
    embedding_masking : nn.Module, optional
        Applied to the (batch, time, d_model) embeddings in training only, e.g. SpeechBrain's
        ``SpectrogramDrop`` zeroing 5 spans of 2-4 tokens (MADEON's setting).

    Example
    -------
    >>> lm = MadeonLM(50, 32, 2, prefixing="parallel", mixer_config={"d_state": 4}, generate_text_index=3)
    >>> lm(torch.randint(4, 50, (2, 9))).shape
    torch.Size([2, 9, 50])
    """

    def __init__(
        self,
        vocab_size,
        d_model,
        num_blocks,
        mixer="mamba",
        prefixing="none",
        mixer_config=None,
        generate_text_index=3,
        dropout=0.0,
        embedding_masking=None,
    ):
        super().__init__()
        if prefixing not in ("none", "parallel", "serial"):
            raise ValueError(f"prefixing must be 'none', 'parallel' or 'serial', not {prefixing!r}")
        self.prefixing = prefixing
        self.generate_text_index = generate_text_index
        self.embedding_masking = embedding_masking
        mixer_class, prefix_mixer_class = MIXERS[mixer]
        config = dict(mixer_config or {})

        def block():
            if prefixing == "serial":
                return SerialBlock(d_model, mixer_class(d_model, **config), mixer_class(d_model, **config), dropout)
            chosen = prefix_mixer_class if prefixing == "parallel" else mixer_class
            return ResidualBlock(d_model, chosen(d_model, **config), dropout)

        self.embedding = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList([block() for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._rescale_init(num_blocks)

    def _rescale_init(self, num_blocks):
        """GPT-2 style init of mamba_ssm (MADEON's ``init_rescale``): embeddings N(0, 0.02), each
        out_proj kaiming-uniform / sqrt(num_blocks) so the residual stream does not grow with depth."""
        nn.init.normal_(self.embedding.weight, std=0.02)
        for name, parameter in self.named_parameters():
            if name.endswith("out_proj.weight"):
                nn.init.kaiming_uniform_(parameter, a=math.sqrt(5))
                with torch.no_grad():
                    parameter /= math.sqrt(num_blocks)

    def _reverse_index(self, tokens, lengths):
        if self.prefixing == "none":
            return None
        return prefix_reversal_index(speech_end(tokens, self.generate_text_index, lengths), tokens.shape[1])

    def forward(self, tokens, lengths=None):
        """tokens (batch, time) -> logits (batch, time, vocab). Padding goes at the end of each row and
        changes nothing before it, so ``lengths`` is only needed for rows with no ``<generatetext>``."""
        reverse_index = self._reverse_index(tokens, lengths)
        x = self.embedding(tokens)
        if self.training and self.embedding_masking is not None:
            x = self.embedding_masking(x)
        for block in self.blocks:
            x = block(x, reverse_index=reverse_index)
        return self.head(self.norm(x))

    @torch.no_grad()
    def init_cache(self, prefix, lengths):
        """Scans the speech prefixes ``[<startofspeech>, s_1 .. s_K]`` (batch, time), right-padded to
        ``lengths``, in one parallel pass. Returns the per-block caches (tuples of (batch, ...) states)."""
        cache = [block.allocate_cache(prefix.shape[0]) for block in self.blocks]
        reverse_index = self._reverse_index(prefix, lengths)
        x = self.embedding(prefix)
        for block, block_cache in zip(self.blocks, cache):
            x = block(x, reverse_index=reverse_index, lengths=lengths, cache=block_cache)
        return cache

    @torch.no_grad()
    def step(self, tokens, cache):
        """Next-token logits (batch, vocab) after feeding tokens (batch,); updates ``cache`` in place."""
        x = self.embedding(tokens)[:, None]
        for block, block_cache in zip(self.blocks, cache):
            x = block.step(x, block_cache)
        return self.head(self.norm(x))[:, 0]

    @staticmethod
    def reorder_cache(cache, index):
        """Selects (and repeats) rows of every state: the beam reordering of a search."""
        return [tuple(state.index_select(0, index) for state in block_cache) for block_cache in cache]


def relative_position_bucket(relative_position, num_buckets=32, max_distance=128):
    """T5's bidirectional log-spaced buckets of key - query offsets: exact for small offsets, then
    logarithmic up to ``max_distance``; half the buckets for keys after the query."""
    half = num_buckets // 2
    bucket = (relative_position > 0).long() * half
    distance = relative_position.abs()
    max_exact = half // 2
    log_bucket = max_exact + (
        torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).long()
    return bucket + torch.where(distance < max_exact, distance, log_bucket.clamp(max=half - 1))


class TransformerDecoderOnly(nn.Module):
    """Transformer decoder-only baseline (arXiv 2411.06968, Section 5.1), causal or prefix-LM.

    Embedding -> span masking (training) -> input block (Linear, LayerNorm, dropout, ReLU) -> pre-LN
    Transformer layers (SpeechBrain's ``TransformerEncoder``) with a causal mask -> LayerNorm -> untied head
    with a bias. The input block and the head's bias are those of ESPnet's ``TransformerLM`` (its
    ``input_layer: linear`` encoder), which the published baseline uses: 38.6 M parameters at the
    paper's size (arXiv 2411.06968, Table 4). ``prefix_lm`` also lets every position attend to the
    whole speech prefix (keys before ``<generatetext>``), the Transformer counterpart of speech
    prefixing. Without positional encoding by default (NoPE, the paper's causal baseline);
    ``relative_buckets`` > 0 adds a T5 relative-position bias shared by all layers (the paper's
    Transformer-SP, which failed to train without one).

    Example
    -------
    >>> lm = TransformerDecoderOnly(50, 32, 2, nhead=4, d_ffn=64, prefix_lm=True, relative_buckets=8)
    >>> lm(torch.randint(4, 50, (2, 9))).shape
    torch.Size([2, 9, 50])
    """

    def __init__(
        self,
        vocab_size,
        d_model,
        num_layers,
        nhead,
        d_ffn,
        prefix_lm=False,
        relative_buckets=0,
        relative_max_distance=128,
        generate_text_index=3,
        dropout=0.0,
        embedding_masking=None,
    ):
        super().__init__()
        self.nhead = nhead
        self.prefix_lm = prefix_lm
        self.generate_text_index = generate_text_index
        self.relative_max_distance = relative_max_distance
        self.embedding_masking = embedding_masking
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.relative_bias = nn.Embedding(relative_buckets, nhead) if relative_buckets else None
        self.input_layer = nn.Sequential(
            nn.Linear(d_model, d_model), nn.LayerNorm(d_model), nn.Dropout(dropout), nn.ReLU()
        )
        self.encoder = TransformerEncoder(
            num_layers=num_layers, nhead=nhead, d_ffn=d_ffn, d_model=d_model, dropout=dropout, normalize_before=True
        )
        self.head = nn.Linear(d_model, vocab_size)

    def attention_mask(self, tokens, lengths=None):
        """Additive mask (batch * heads, time, time): 0 where a query may attend to a key, -inf elsewhere,
        plus the relative-position bias when there is one."""
        batch, time = tokens.shape
        positions = torch.arange(time, device=tokens.device)
        allowed = (positions[None, :] <= positions[:, None]).expand(batch, time, time)
        if self.prefix_lm:
            in_prefix = positions[None, :] < speech_end(tokens, self.generate_text_index, lengths)[:, None]
            allowed = allowed | in_prefix[:, None, :]
        mask = torch.zeros(batch, 1, time, time, device=tokens.device).masked_fill(~allowed[:, None], float("-inf"))
        if self.relative_bias is not None:
            buckets = relative_position_bucket(
                positions[None, :] - positions[:, None], self.relative_bias.num_embeddings, self.relative_max_distance
            )
            mask = mask + self.relative_bias(buckets).permute(2, 0, 1)[None]
        return mask.expand(batch, self.nhead, time, time).reshape(batch * self.nhead, time, time)

    def forward(self, tokens, lengths=None):
        """tokens (batch, time) -> logits (batch, time, vocab)."""
        x = self.embedding(tokens)
        if self.training and self.embedding_masking is not None:
            x = self.embedding_masking(x)
        x = self.input_layer(x)
        x, _ = self.encoder(x, src_mask=self.attention_mask(tokens, lengths).to(x.dtype))
        return self.head(x)
