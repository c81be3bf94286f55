"""MADEON LMs and the Transformer baseline: causal text, bidirectional speech prefix, padding, caches."""

import pytest
import torch

from modules.models.madeon import MadeonLM, TransformerDecoderOnly, prefix_reversal_index
from modules.search import DecoderOnlyBeamSearcher, FullSequenceScorer, RecurrentScorer

VOCAB, GENERATE_TEXT, START_OF_SPEECH, EOS = 40, 3, 4, 1
MAMBA_FAMILIES = [
    (mixer, prefixing) for mixer in ("mamba", "mamba2") for prefixing in ("none", "parallel", "serial")
]
PREFIXED = {"parallel", "serial", "prefix_lm"}


def build(family, seed=0):
    """A tiny float64 model of one family, in eval mode."""
    torch.manual_seed(seed)
    kind, prefixing = family
    if kind == "transformer":
        model = TransformerDecoderOnly(
            VOCAB, 16, 2, nhead=2, d_ffn=32, prefix_lm=prefixing == "prefix_lm",
            relative_buckets=8 if prefixing == "prefix_lm" else 0, generate_text_index=GENERATE_TEXT,
        )
    else:
        config = {"d_state": 4, "expand": 2}
        if kind == "mamba2":
            config.update(headdim=8, d_state=8, chunk_size=4, rmsnorm=False)
        model = MadeonLM(VOCAB, 16, 2, kind, prefixing, config, generate_text_index=GENERATE_TEXT)
    return model.double().eval()


ALL_FAMILIES = MAMBA_FAMILIES + [("transformer", "causal"), ("transformer", "prefix_lm")]
ids = ["-".join(family) for family in ALL_FAMILIES]


def sequence(speech=7, text=5, seed=1):
    """[<startofspeech>, speech units, <generatetext>, text] as (1, time)."""
    g = torch.Generator().manual_seed(seed)
    units = torch.randint(6, VOCAB, (speech,), generator=g)
    words = torch.randint(6, VOCAB, (text,), generator=g)
    return torch.cat([torch.tensor([START_OF_SPEECH]), units, torch.tensor([GENERATE_TEXT]), words])[None]


def with_token(tokens, position, value=5):
    changed = tokens.clone()
    changed[0, position] = value
    return changed


def test_prefix_reversal_reverses_only_the_speech_units():
    index = prefix_reversal_index(torch.tensor([5, 1, 3]), 7)
    assert index.tolist() == [[0, 4, 3, 2, 1, 5, 6], [0, 1, 2, 3, 4, 5, 6], [0, 2, 1, 3, 4, 5, 6]]


@pytest.mark.parametrize("family", ALL_FAMILIES, ids=ids)
@torch.no_grad()
def test_changing_a_later_text_token_never_changes_earlier_outputs(family):
    model, tokens = build(family), sequence()
    position = tokens.shape[1] - 2  # a text token
    before, after = model(tokens), model(with_token(tokens, position))
    torch.testing.assert_close(before[:, :position], after[:, :position])
    assert not torch.allclose(before[:, position], after[:, position])


@pytest.mark.parametrize("family", ALL_FAMILIES, ids=ids)
@torch.no_grad()
def test_a_late_speech_token_reaches_earlier_speech_positions_only_with_prefixing(family):
    model, tokens = build(family), sequence()
    late_speech = 6  # position 7 is the last speech unit; 6 keeps one unit after it
    before, after = model(tokens), model(with_token(tokens, late_speech))
    changed = (before[:, 1:late_speech] - after[:, 1:late_speech]).abs().amax().item()
    if family[1] in PREFIXED:
        assert changed > 1e-6
    else:
        assert changed == 0.0


@pytest.mark.parametrize("family", ALL_FAMILIES, ids=ids)
@torch.no_grad()
def test_outputs_do_not_depend_on_padding_or_the_rest_of_the_batch(family):
    model = build(family)
    short, long = sequence(speech=5, text=3, seed=2), sequence(speech=9, text=6, seed=3)
    padded = torch.zeros_like(long)
    padded[:, : short.shape[1]] = short
    batch = torch.cat([long, padded])
    lengths = torch.tensor([long.shape[1], short.shape[1]])
    out = model(batch, lengths)
    torch.testing.assert_close(out[1:, : short.shape[1]], model(short))
    torch.testing.assert_close(out[:1], model(long))


@pytest.mark.parametrize("family", MAMBA_FAMILIES, ids=["-".join(f) for f in MAMBA_FAMILIES])
@torch.no_grad()
def test_prefix_cache_then_steps_give_the_logits_of_the_full_sequence(family):
    """Padded prefixes of different lengths scanned in one pass, then text tokens stepped one by one."""
    model = build(family)
    rows = [sequence(speech=9, text=4, seed=4), sequence(speech=4, text=4, seed=5)]
    prefix_lengths = torch.tensor([row.shape[1] - 5 for row in rows])  # up to <generatetext>, excluded
    prefix = torch.full((2, int(prefix_lengths.max())), 7)
    for i, row in enumerate(rows):
        prefix[i, : prefix_lengths[i]] = row[0, : prefix_lengths[i]]
    cache = model.init_cache(prefix, prefix_lengths)
    for offset in range(5):  # <generatetext>, then the text
        tokens = torch.stack([row[0, length + offset] for row, length in zip(rows, prefix_lengths)])
        stepped = model.step(tokens, cache)
        for i, row in enumerate(rows):
            expected = model(row)[0, prefix_lengths[i] + offset]
            torch.testing.assert_close(stepped[i], expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("family", MAMBA_FAMILIES, ids=["-".join(f) for f in MAMBA_FAMILIES])
def test_cached_beam_search_finds_the_hypotheses_of_full_reruns(family):
    model = build(family, seed=3)
    with torch.no_grad():  # a peaky, non-trivial distribution: the search must make real choices
        model.head.weight.mul_(20)
    prompts = [sequence(speech=s, text=0, seed=s)[:, :-1] for s in (8, 3, 6)]  # without <generatetext>
    lengths = torch.tensor([p.shape[1] for p in prompts])
    prefix = torch.zeros(3, int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        prefix[i, : p.shape[1]] = p[0]
    results = []
    for scorer in (RecurrentScorer(model), FullSequenceScorer(model)):
        search = DecoderOnlyBeamSearcher(scorer, GENERATE_TEXT, EOS, beam_size=3, max_length=6)
        results.append(search(prefix, lengths))
    (cached_hyps, cached_scores), (full_hyps, full_scores) = results
    assert cached_hyps == full_hyps
    assert any(len(hyp) > 0 for hyp in cached_hyps)
    torch.testing.assert_close(cached_scores, full_scores)


# ---- The published projection dropout (arXiv 2411.06968, released configs: projection_dropout_rate) ----


def dropped_in_training(family, p=0.5):
    """A tiny model of ``family`` with dropout p in training mode, run once; returns the first block's
    in_proj output after its dropout and the block's output minus its input (the dropped mixer output)."""
    torch.manual_seed(0)
    kind, prefixing = family
    config = {"d_state": 4, "expand": 2}
    if kind == "mamba2":
        config.update(headdim=8, d_state=8, chunk_size=4, rmsnorm=False)
    model = MadeonLM(VOCAB, 16, 1, kind, prefixing, config, generate_text_index=GENERATE_TEXT, dropout=p).train()
    block = model.blocks[0]
    seen = {}
    block.mixer.in_proj.register_forward_hook(lambda module, inputs, output: seen.setdefault("in_proj", output))
    block.register_forward_hook(lambda module, inputs, output: seen.setdefault("added", output - inputs[0]))
    tokens = torch.cat([sequence(speech=20, text=10, seed=s) for s in (1, 2)])
    with torch.no_grad():
        model(tokens)
    return seen["in_proj"], seen["added"]


def whole_zero(x, dim):
    """(rows all zero, rows without any zero) along ``dim`` of x."""
    zero = x == 0
    return zero.all(dim=dim), ~zero.any(dim=dim)


@pytest.mark.parametrize("prefixing", ["none", "parallel"])
def test_mamba_dropout_drops_whole_token_positions_of_in_proj_and_whole_channels_of_the_block(prefixing):
    in_proj, added = dropped_in_training(("mamba", prefixing))
    # in_proj output (batch, time, 2 d_inner): a token position is dropped in every channel or in none
    dropped, kept_positions = whole_zero(in_proj, dim=2)
    assert (dropped | kept_positions).all()
    assert dropped.any() and kept_positions.any()
    # block output (batch, time, d_model): a feature channel is dropped at every position or at none
    # (of the positions whose in_proj output was kept: the others' mixer output is zero in every channel)
    for row in range(added.shape[0]):
        dropped, kept = whole_zero(added[row, kept_positions[row]], dim=0)
        assert (dropped | kept).all()
        assert dropped.any() and kept.any()


def test_mamba2_dropout_is_element_wise():
    in_proj, added = dropped_in_training(("mamba2", "parallel"))
    for x in (in_proj, added):
        zero = x == 0
        assert 0.3 < zero.float().mean() < 0.7  # about p of the elements
        # neither whole positions nor whole channels: many rows along both axes are partly dropped
        for dim in (1, 2):
            dropped, kept = whole_zero(x, dim)
            assert (~dropped & ~kept).float().mean() > 0.5


@pytest.mark.parametrize("family", MAMBA_FAMILIES, ids=["-".join(f) for f in MAMBA_FAMILIES])
def test_dropout_is_off_in_eval_mode(family):
    model = build(family)
    tokens = sequence()
    for block in model.modules():
        if hasattr(block, "in_proj_dropout"):
            block.in_proj_dropout.dropout.p = block.dropout.dropout.p = 0.5
    torch.testing.assert_close(model(tokens), model(tokens))
    assert not (model(tokens) == 0).any()


def test_beam_search_never_returns_an_empty_transcript():
    # An LM whose first text token is almost surely <eos>: without a minimum length the best
    # hypothesis is empty, with min_length 1 (ESPnet's minlen, as MADEON decodes) it is not.
    model = build(("transformer", "causal"))
    with torch.no_grad():
        model.head.bias.zero_()
        model.head.bias[EOS] = 30.0
    prefix = sequence(speech=5, text=0)[:, :-1]
    lengths = torch.tensor([prefix.shape[1]])
    results = {}
    for min_length in (0, 1):
        search = DecoderOnlyBeamSearcher(
            FullSequenceScorer(model), GENERATE_TEXT, EOS, beam_size=3, max_length=5, min_length=min_length
        )
        results[min_length] = search(prefix, lengths)[0][0]
    assert results[0] == []
    assert len(results[1]) >= 1 and EOS not in results[1]
