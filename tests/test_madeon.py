"""MADEON LMs and the Transformer baseline: causal text, bidirectional speech prefix, padding, caches."""

import pytest
import torch

from modules.decoder_only_search import DecoderOnlyBeamSearcher, FullSequenceScorer, RecurrentScorer
from modules.madeon import MadeonLM, TransformerDecoderOnly, prefix_reversal_index

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
