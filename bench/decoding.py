"""Decoding-speed benchmark: beam search with and without the recurrent cache, per utterance.

* S2S (``--s2s-yamls``): the yaml's encoder-decoder decodes an encoder output of the given audio length
  with its joint CTC/attention scorer, once with the yaml's searcher and, for the Mamba decoder, once
  with SpeechBrain's ``S2STransformerBeamSearcher``, which re-runs the decoder on the whole prefix at
  every step (what decoding costs without the cache). The encoder runs once, outside the timing.
* MADEON (``--madeon-yamls``): ``DecoderOnlyBeamSearcher`` with ``RecurrentScorer`` (the prefix is
  scanned once, then one step per token) and with ``FullSequenceScorer`` (the model re-runs on the
  prefix and the text so far at every step).

Weights are random, so a search would stop at an arbitrary length: the number of generated tokens is
fixed instead, ``--tokens-per-second`` times the audio length (LibriSpeech reads at about 2.7 words
per second), and a MADEON prefix holds ``--units-per-second`` speech tokens per second. Times are
medians over ``--repeats`` searches after one warm-up, synchronised on the GPU.

    python bench/decoding.py --smoke --device cpu --out /tmp/decoding           # seconds, any machine
    python bench/decoding.py --seconds 5,30 --beam 10 --out bench/results_decoding
"""

import argparse
import json
import logging
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hyperpyyaml import load_hyperpyyaml  # noqa: E402
from speechbrain.decoders.scorer import ScorerBuilder  # noqa: E402
from speechbrain.decoders.seq2seq import S2STransformerBeamSearcher  # noqa: E402

from bench.benchmark import DTYPES, FRAME_SECONDS, median_ms, write_results  # noqa: E402
from modules.search import DecoderOnlyBeamSearcher, FullSequenceScorer, RecurrentScorer, S2SMambaBeamSearcher  # noqa: E402

logger = logging.getLogger("decoding")

FEATURE_SECONDS = 0.01  # Fbank hop; the CNN front-end subsamples 4x to FRAME_SECONDS
SMOKE_OVERRIDES = {  # tiny versions of the published models, for the CPU smoke test
    "s2s": {"d_model": 32, "d_ffn": 64, "num_encoder_layers": 1, "num_decoder_layers": 1, "output_neurons": 50},
    "madeon": {"d_model": 32, "num_blocks": 2, "num_layers": 2, "nhead": 2, "d_ffn": 64, "vocab_size": 60},
}


def load_yaml(path, overrides):
    """A recipe yaml built with placeholder folders (nothing is read or written there; the SSL model
    of the speech units is never loaded) and those of ``overrides`` that are top-level keys of the yaml."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with tempfile.TemporaryDirectory(prefix="decoding_bench_") as folder:
        overrides = dict(data_folder=folder, output_folder=folder, ssl_source=folder, **overrides)
        return load_hyperpyyaml(text, {key: value for key, value in overrides.items() if f"\n{key}:" in text})


def s2s_searches(hparams, beam, steps_ratio, ctc_weight):
    """{"cache" | "no cache": searcher} for the yaml's test search, its decode ratios set to steps_ratio;
    joint CTC/attention scores unless ctc_weight is 0 (attention only)."""
    scorer = None
    if ctc_weight > 0:
        scorer = ScorerBuilder(full_scorers=[hparams["ctc_scorer"]], weights={"ctc": ctc_weight})
    options = dict(
        hparams["test_search"].keywords,
        scorer=scorer,
        beam_size=beam,
        min_decode_ratio=steps_ratio,
        max_decode_ratio=steps_ratio,
    )
    searcher_class = hparams["test_search"].func
    if issubclass(searcher_class, S2SMambaBeamSearcher):
        return {"cache": searcher_class(**options), "no cache": S2STransformerBeamSearcher(**options)}
    return {"no cache": searcher_class(**options)}  # SpeechBrain's Transformer decoder has no cache


def bench_s2s(yaml_file, args, device, dtype):
    """Rows of search times of one S2S yaml, for every audio length."""
    hparams = load_yaml(yaml_file, SMOKE_OVERRIDES["s2s"] if args.smoke else {})
    model = torch.nn.ModuleList([hparams["CNN"], hparams["encoder_decoder"], hparams["ctc_lin"], hparams["seq_lin"]])
    model.to(device).eval()
    ctc_weight = hparams["ctc_weight_decode"] if args.ctc_weight is None else args.ctc_weight
    searches = s2s_searches(hparams, args.beam, args.tokens_per_second * FRAME_SECONDS, ctc_weight)
    rows = []
    for seconds in args.seconds:
        feats = torch.randn(1, round(seconds / FEATURE_SECONDS), hparams["n_mels"], device=device)
        wav_lens = torch.ones(1, device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            enc_out = hparams["encoder_decoder"].encode(hparams["CNN"](feats), wav_lens)
            for name, searcher in searches.items():
                hyps = []
                ms = median_ms(lambda: hyps.append(searcher(enc_out, wav_lens)[0]), device, 1, args.repeats)
                rows.append(
                    row("s2s", yaml_file, name, seconds, enc_out.shape[1], len(hyps[-1][0]), args.beam, ms, ctc_weight)
                )
    return rows


def bench_madeon(yaml_file, args, device, dtype):
    """Rows of search times of one decoder-only yaml, for every audio length."""
    hparams = load_yaml(yaml_file, SMOKE_OVERRIDES["madeon"] if args.smoke else {})
    lm = hparams["lm"].to(device).eval()
    first_unit = hparams["generate_text_index"] + 1
    scorers = {"cache": RecurrentScorer(lm), "no cache": FullSequenceScorer(lm)}
    if not hasattr(lm, "init_cache"):
        scorers.pop("cache")  # the Transformer baseline
    rows = []
    for seconds in args.seconds:
        units = round(seconds * args.units_per_second)
        prefix = torch.randint(first_unit, hparams["vocab_size"], (1, units + 1), device=device)
        prefix[0, 0] = hparams["generate_text_index"] + 1  # <startofspeech> (modules/units/tokens.py)
        lengths = torch.tensor([units + 1], device=device)
        steps = round(seconds * args.tokens_per_second)
        for name, scorer in scorers.items():
            # a positive length penalty keeps every search going to max_length
            searcher = DecoderOnlyBeamSearcher(
                scorer, hparams["generate_text_index"], hparams["eos_index"], args.beam, steps, length_penalty=1.0
            )
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                ms = median_ms(lambda: searcher(prefix, lengths), device, 1, args.repeats)
            rows.append(row("madeon", yaml_file, name, seconds, units + 1, steps, args.beam, ms, None))
    return rows


def row(kind, yaml_file, search, seconds, input_length, tokens, beam, ms, ctc_weight):
    """One result row; input_length is encoder frames (S2S) or prefix tokens (MADEON)."""
    return dict(
        kind=kind,
        yaml=os.path.relpath(yaml_file),
        search=search,
        ctc_weight=ctc_weight,
        audio_s=seconds,
        input_length=input_length,
        tokens=tokens,
        beam=beam,
        ms_per_utterance=round(ms, 2),
        ms_per_token=round(ms / max(tokens, 1), 3),
    )


def markdown_table(rows):
    """The rows as a markdown table, with the uncached/cached time ratio."""
    cached = {(r["yaml"], r["audio_s"]): r["ms_per_utterance"] for r in rows if r["search"] == "cache"}
    lines = [
        "| yaml | search | CTC weight | audio (s) | input length | tokens | beam | ms / utterance | ms / token "
        "| no cache / cache |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = cached.get((r["yaml"], r["audio_s"]))
        ratio = f"{r['ms_per_utterance'] / base:.1f}x" if base and r["search"] == "no cache" else ""
        ctc_weight = "" if r["ctc_weight"] is None else f"{r['ctc_weight']:g}"
        lines.append(
            f"| {r['yaml']} | {r['search']} | {ctc_weight} | {r['audio_s']:g} | {r['input_length']} | {r['tokens']} "
            f"| {r['beam']} | {r['ms_per_utterance']:.1f} | {r['ms_per_token']:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--s2s-yamls", default="hparams/S2S/conmambamamba_large.yaml,hparams/S2S/conmamba_large.yaml")
    parser.add_argument("--madeon-yamls", default="hparams/decoder_only/mamba_parallel.yaml,hparams/decoder_only/transformer.yaml")
    parser.add_argument("--seconds", default="5,30", help="comma-separated audio lengths")
    parser.add_argument("--beam", type=int, default=10)
    parser.add_argument("--ctc-weight", type=float, help="S2S CTC weight (default: the yaml's ctc_weight_decode; 0: attention only)")
    parser.add_argument("--tokens-per-second", type=float, default=3.0, help="generated tokens per second of audio")
    parser.add_argument("--units-per-second", type=float, default=25.0, help="MADEON prefix tokens per second")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="autocast dtype on CUDA")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="directory for results.csv and results.json")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 1 and 2 s, beam 2: for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.beam, args.repeats = "1,2", 2, 1
    args.seconds = [float(s) for s in args.seconds.split(",")]
    args.s2s_yamls = [y for y in args.s2s_yamls.split(",") if y]
    args.madeon_yamls = [y for y in args.madeon_yamls.split(",") if y]
    if args.device == "cpu" and args.dtype != "fp32":
        parser.error("the CPU path runs in fp32")
    return args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rows = []
    for yaml_file in args.s2s_yamls:
        rows += bench_s2s(yaml_file, args, device, dtype)
    for yaml_file in args.madeon_yamls:
        rows += bench_madeon(yaml_file, args, device, dtype)
    for r in rows:
        logger.info(json.dumps(r))
    if args.out:
        write_results(rows, args, device)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
