"""Training-step benchmark of ConMamba and Conformer layers or encoders over audio length.

For every (mode, model, length) cell it times one training step (forward, a scalar loss, backward)
on random features: the median over ``--repeats`` steps after ``--warmup`` steps, with the peak
GPU memory of those steps. Results go to ``results.csv`` / ``results.json`` (with the environment
and command line), PNG plots when matplotlib is installed, and a markdown table on stdout.

    python bench/benchmark.py --smoke --device cpu --out /tmp/bench          # seconds, any machine
    python bench/benchmark.py --what all --size ctc_large --dtype bf16 --out bench/h100

See bench/README.md for the columns and the timing method.
"""

import argparse
import csv
import datetime
import gc
import importlib.metadata
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from speechbrain.lobes.models.transformer.Conformer import ConformerEncoder, ConformerEncoderLayer  # noqa: E402
from speechbrain.nnet.activations import Swish  # noqa: E402
from speechbrain.nnet.attention import RelPosEncXL  # noqa: E402

from modules.mamba import scan_cuda  # noqa: E402
from modules.mamba.scan import pick_backend  # noqa: E402
from modules.models.conmamba import ConMambaEncoder, ConMambaEncoderLayer  # noqa: E402
from modules.training.cuda_graphs import GraphedEncoding  # noqa: E402

logger = logging.getLogger("benchmark")

FRAME_SECONDS = 0.04  # one encoder frame after the 4x-subsampling front-end

SIZES = {  # the recipes' encoder sizes
    "ctc_large": dict(d_model=256, num_layers=18, d_ffn=1024, nhead=4),
    "s2s_large": dict(d_model=512, num_layers=12, d_ffn=2048, nhead=8),
    "s2s_small": dict(d_model=144, num_layers=12, d_ffn=1024, nhead=4),
}

MODELS = {
    "conmamba": "ConMamba, BiMamba-1 mixer (d_state 16, d_conv 4, expand 2), GELU",
    "conmamba2": "ConMamba, bidirectional Mamba-2 mixer (d_state 64, expand 2, headdim <= 64), GELU",
    "conformer_relpos": "SpeechBrain Conformer, RelPosMHAXL attention + RelPosEncXL embeddings, Swish",
    "conformer_sdpa": "SpeechBrain Conformer, RoPEMHA attention (PyTorch SDPA), Swish",
}

COMPILED = "+compile"  # model-name suffix: the same module through torch.compile (default mode)
GRAPHED = "+graphs"  # model-name suffix: its training steps replayed as CUDA graphs (modules/training/cuda_graphs.py)
BACKEND_SEPARATOR = ":"  # conmamba:triton, conmamba:mamba_ssm: the scan back-end (modules/mamba/scan.py)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# one thread: on a shared CPU, a descheduled OpenMP thread stalls multi-threaded ops for whole time slices
SMOKE = dict(
    seconds=[0.4, 0.8], batch=2, repeats=2, warmup=1, threads=1, d_model=32, num_layers=2, d_ffn=64, nhead=4,
    kernel_size=7,
)
DEFAULTS = dict(seconds=[5, 12, 30, 60, 120], batch=8, repeats=10, warmup=3, threads=None)


def mamba_config(model_name, d_model):
    """The ``mamba_config`` of a ConMamba model name; ``conmamba:BACKEND`` picks the scan back-end."""
    model_name, _, backend = model_name.partition(BACKEND_SEPARATOR)
    if model_name == "conmamba":
        return {"mixer": "mamba", "d_state": 16, "d_conv": 4, "expand": 2, "bidirectional": True,
                "scan_backend": backend or "auto"}
    # headdim must divide expand * d_model (e.g. 288 for d_model 144, hence headdim 32 there)
    return {"mixer": "mamba2", "d_state": 64, "expand": 2, "headdim": math.gcd(2 * d_model, 64), "bidirectional": True}


class ConMambaBench(nn.Module):
    """One ConMamba layer or a ConMamba encoder, called as ``model(x, padding_mask) -> y``."""

    def __init__(self, model_name, what, size, dropout):
        super().__init__()
        common = dict(
            d_model=size["d_model"],
            d_ffn=size["d_ffn"],
            kernel_size=size["kernel_size"],
            activation=nn.GELU,
            dropout=dropout,
            mamba_config=mamba_config(model_name, size["d_model"]),
        )
        self.single_layer = what == "layer"
        if self.single_layer:
            self.net = ConMambaEncoderLayer(**common)
        else:
            self.net = ConMambaEncoder(num_layers=size["num_layers"], **common)

    def forward(self, x, padding_mask):
        """x (batch, time, d_model); padding_mask (batch, time), True at padded frames."""
        if self.single_layer:
            return self.net(x, (~padding_mask).sum(dim=1), padding_mask)
        return self.net(x, src_key_padding_mask=padding_mask)[0]


class ConformerBench(nn.Module):
    """One Conformer layer or a Conformer encoder (with its positional embedding, if any)."""

    def __init__(self, model_name, what, size, dropout):
        super().__init__()
        relpos = model_name == "conformer_relpos"
        common = dict(
            d_model=size["d_model"],
            d_ffn=size["d_ffn"],
            nhead=size["nhead"],
            kernel_size=size["kernel_size"],
            activation=Swish,
            dropout=dropout,
            attention_type="RelPosMHAXL" if relpos else "RoPEMHA",
        )
        self.pos = RelPosEncXL(size["d_model"]) if relpos else None
        if what == "layer":
            self.net = ConformerEncoderLayer(**common)
        else:
            self.net = ConformerEncoder(num_layers=size["num_layers"], **common)

    def forward(self, x, padding_mask):
        """x (batch, time, d_model); padding_mask (batch, time), True at padded frames."""
        pos_embs = self.pos(x) if self.pos is not None else None
        return self.net(x, src_key_padding_mask=padding_mask, pos_embs=pos_embs)[0]


def build_model(model_name, what, size, dropout):
    """The benchmarked module for a model name and mode ("layer" or "encoder"); a name ending in
    ``+compile`` is the same module through ``torch.compile`` (compiled during the warm-up steps), one
    ending in ``+graphs`` replays its training steps as CUDA graphs (recorded during the warm-up steps)."""
    base_name = model_name.removesuffix(COMPILED).removesuffix(GRAPHED)
    bench_class = ConMambaBench if base_name.startswith("conmamba") else ConformerBench
    model = bench_class(base_name, what, size, dropout)
    if model_name.endswith(GRAPHED):
        model.forward = GraphedEncoding(model, encode=model.forward, frame_multiple=1, batch_multiple=1)
    return torch.compile(model) if model_name.endswith(COMPILED) else model


def time_training_step(model, x, padding_mask, device, dtype, warmup, repeats):
    """Median and spread of forward+backward milliseconds, and peak MiB (None on CPU)."""
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=dtype, enabled=cuda and dtype != torch.float32)
    times = []
    for step in range(warmup + repeats):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
            if step == warmup:
                torch.cuda.reset_peak_memory_stats(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        with autocast:
            y = model(x, padding_mask)
        (y.float() ** 2).mean().backward()
        del y  # so that the next step's peak memory does not hold this output
        if cuda:
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            elapsed = (time.perf_counter() - start) * 1e3
        if step >= warmup:
            times.append(elapsed)
    peak_mib = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return statistics.median(times), min(times), max(times), peak_mib


def utterance_frames(batch, frames, ragged):
    """Valid frames of each utterance: all ``frames`` long, or with ``ragged`` spread evenly from half
    of ``frames`` to all of it (the longest first), as in a batch of LibriSpeech-like lengths."""
    if not ragged or batch == 1:
        return torch.full((batch,), frames)
    return torch.linspace(frames, max(1, frames // 2), batch).round().long()


def run_cell(what, model_name, seconds, batch, args, size, device, dtype):
    """Builds one model, times it at one length and returns the result row ("OOM" on out-of-memory)."""
    frames = max(1, round(seconds / FRAME_SECONDS))
    row = dict(what=what, model=model_name, seconds=seconds, frames=frames, batch=batch, **size)
    row.update(dtype=args.dtype, device=device.type, status="ok", parameters=None)
    row.update(time_ms=None, time_ms_min=None, time_ms_max=None, peak_mib=None, audio_s_per_s=None)
    torch.manual_seed(0)
    try:
        model = build_model(model_name, what, size, args.dropout).to(device).train()
        row["parameters"] = sum(p.numel() for p in model.parameters())
        x = torch.randn(batch, frames, size["d_model"], device=device)
        lengths = utterance_frames(batch, frames, args.ragged).to(device)
        padding_mask = torch.arange(frames, device=device) >= lengths[:, None]
        median, fastest, slowest, peak = time_training_step(
            model, x, padding_mask, device, dtype, args.warmup, args.repeats
        )
        row.update(time_ms=median, time_ms_min=fastest, time_ms_max=slowest, peak_mib=peak)
        row["audio_s_per_s"] = lengths.sum().item() * FRAME_SECONDS / (median / 1e3)
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    model = x = padding_mask = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def environment(device):
    """Versions, hardware and kernel availability, recorded in results.json."""
    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    cuda = device.type == "cuda"
    return dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch.__version__,
        speechbrain=version("speechbrain"),
        mamba_ssm=version("mamba-ssm"),
        causal_conv1d=version("causal-conv1d"),
        default_scan_backend=pick_backend("auto", cuda, scan_cuda.available, has_initial_state=False),
        triton=version("triton"),
        gpu=torch.cuda.get_device_name(device) if cuda else None,
        cuda=torch.version.cuda if cuda else None,
        cpu_threads=torch.get_num_threads(),
    )


def median_ms(step, device, warmup, repeats):
    """Median wall-clock milliseconds of ``step()`` over ``repeats`` calls after ``warmup`` untimed ones,
    synchronising the GPU around each call."""
    times = []
    for call in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if call >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def write_results(rows, args, device):
    """``results.csv`` (a row per cell) and ``results.json`` (with the environment and the settings) in ``args.out``."""
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(environment=environment(device), settings=vars(args), results=rows), f, indent=2)


def markdown_tables(rows):
    """One markdown table per mode: a row per model, a column per length."""
    tables = []
    for what in dict.fromkeys(r["what"] for r in rows):
        cells = [r for r in rows if r["what"] == what]
        lengths = list(dict.fromkeys((r["seconds"], r["batch"]) for r in cells))
        first = cells[0]
        layers = 1 if what == "layer" else first["num_layers"]
        lines = [
            f"{what}: d_model {first['d_model']}, {layers} layer(s), d_ffn {first['d_ffn']}, "
            f"{first['dtype']} on {first['device']}. Cell: median fwd+bwd ms / peak MiB / audio s per s.",
            "",
            "| model | " + " | ".join(f"{s:g} s (b {b})" for s, b in lengths) + " |",
            "|---" * (len(lengths) + 1) + "|",
        ]
        for model_name in dict.fromkeys(r["model"] for r in cells):
            by_length = {(r["seconds"], r["batch"]): r for r in cells if r["model"] == model_name}
            lines.append(f"| {model_name} | " + " | ".join(format_cell(by_length[k]) for k in lengths) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def format_cell(row):
    """``ms / MiB / audio-s per s`` for a markdown cell; "-" where not measured."""
    if row["status"] != "ok":
        return row["status"]
    memory = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
    return f"{row['time_ms']:.1f} / {memory} / {row['audio_s_per_s']:.0f}"


def write_plots(rows, out_dir):
    """``<mode>_time.png`` and ``<mode>_memory.png`` (when measured); skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: plots skipped")
        return
    ok = [r for r in rows if r["status"] == "ok"]
    for what in dict.fromkeys(r["what"] for r in ok):
        for key, label, name in (("time_ms", "fwd+bwd time (ms)", "time"), ("peak_mib", "peak memory (MiB)", "memory")):
            cells = [r for r in ok if r["what"] == what and r[key] is not None]
            if not cells:
                continue
            figure, axes = plt.subplots(figsize=(6, 4))
            for model_name in dict.fromkeys(r["model"] for r in cells):
                points = [(r["seconds"], r[key]) for r in cells if r["model"] == model_name]
                axes.plot(*zip(*points), marker="o", label=model_name)
            first = cells[0]
            title = f"{what}, d_model {first['d_model']}, {first['dtype']} on {first['device']}"
            axes.set(xlabel="audio length (s)", ylabel=label, title=title)
            axes.grid(alpha=0.3)
            axes.legend()
            figure.tight_layout()
            figure.savefig(os.path.join(out_dir, f"{what}_{name}.png"), dpi=120)
            plt.close(figure)


def parse_args(argv=None):
    """Command-line options; ``--smoke`` changes the defaults, explicit options still win."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="models (append +compile for torch.compile, e.g. conmamba+compile, or +graphs for CUDA graphs; "
        "conmamba:BACKEND picks the "
        "scan back-end of modules/mamba/scan.py, e.g. conmamba:mamba_ssm):\n"
        + "\n".join(f"  {k:17} {v}" for k, v in MODELS.items()),
    )
    parser.add_argument("--what", choices=["layer", "encoder", "all"], default="all")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, see below")
    parser.add_argument("--seconds", help="comma-separated audio lengths (default 5,12,30,60,120)")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, help="utterances per step (default 8)")
    batch.add_argument("--audio-per-batch", type=float, help="seconds of audio per step: batch = budget // length")
    parser.add_argument("--size", choices=[*SIZES, "custom"], default="ctc_large")
    parser.add_argument("--d-model", type=int, help="overrides the size preset (required with custom)")
    parser.add_argument("--num-layers", type=int, help="encoder layers (encoder mode)")
    parser.add_argument("--d-ffn", type=int)
    parser.add_argument("--nhead", type=int, help="Conformer attention heads")
    parser.add_argument("--kernel-size", type=int, help="convolution module kernel (default 31)")
    parser.add_argument("--dropout", type=float, default=0.1, help="as in the recipes (default 0.1)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="CUDA autocast dtype (default bf16); CPU runs fp32")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (--smoke: 1)")
    parser.add_argument("--repeats", type=int, help="timed steps per cell (default 10)")
    parser.add_argument("--warmup", type=int, help="untimed steps per cell (default 3)")
    parser.add_argument("--out", help="directory for results.csv, results.json and plots")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few repeats, for tests")
    parser.add_argument("--ragged", action="store_true",
                        help="utterances from half the length to the full length in each batch (padding costs count); "
                        "audio s per s counts valid audio only")
    args = parser.parse_args(argv)

    defaults = SMOKE if args.smoke else DEFAULTS
    args.seconds = [float(s) for s in args.seconds.split(",")] if args.seconds else defaults["seconds"]
    if args.batch is None and args.audio_per_batch is None:
        args.batch = defaults["batch"]
    args.repeats = args.repeats or defaults["repeats"]
    args.warmup = defaults["warmup"] if args.warmup is None else args.warmup
    args.threads = args.threads or defaults["threads"]
    args.models = args.models.split(",")
    base_names = {m.removesuffix(COMPILED).removesuffix(GRAPHED).partition(BACKEND_SEPARATOR)[0] for m in args.models}
    unknown = base_names - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda but CUDA is not available")
        args.dtype = args.dtype or "bf16"
    else:
        if any(m.endswith(GRAPHED) for m in args.models):
            parser.error(f"{GRAPHED} records CUDA graphs: it needs --device cuda")
        if args.dtype not in (None, "fp32"):
            logger.warning("CPU runs in fp32 (no autocast); --dtype %s ignored", args.dtype)
        args.dtype = "fp32"

    shape_keys = ("d_model", "num_layers", "d_ffn", "nhead", "kernel_size")
    size = dict(SIZES.get(args.size, {}), kernel_size=31)
    if args.smoke:
        size = {k: SMOKE[k] for k in shape_keys}
    for key in shape_keys:
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    missing = {"d_model", "num_layers", "d_ffn", "nhead"} - size.keys()
    if missing:
        parser.error(f"--size custom needs --{', --'.join(sorted(k.replace('_', '-') for k in missing))}")
    args.size_config = size
    return args


def main(argv=None):
    """Runs every cell, then writes the results and prints the markdown table."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    modes = ["layer", "encoder"] if args.what == "all" else [args.what]

    rows = []
    for what in modes:
        for model_name in args.models:
            for seconds in args.seconds:
                batch = args.batch or max(1, int(args.audio_per_batch // seconds))
                row = run_cell(what, model_name, seconds, batch, args, args.size_config, device, dtype)
                logger.info("%-7s %-16s %6g s  b %-3d %s", what, model_name, seconds, batch, format_cell(row))
                rows.append(row)

    if args.out:
        write_results(rows, args, device)
        write_plots(rows, args.out)
        logger.info("wrote %s", args.out)
    print(markdown_tables(rows))


if __name__ == "__main__":
    main()
