"""Latency and real-time factor of streaming CTC recognition (modules/inference/streaming.py) by chunk size.

A causal ConMamba CTC model (random weights from a yaml, or a trained inference folder) transcribes
``--seconds`` of audio chunk by chunk. For each chunk size it prints the compute time per chunk
(median and 90th percentile over the chunks, after one warm-up utterance), the real-time factor
(compute time / audio time) and the algorithmic latency (chunk + front-end lookahead), plus the
median latency including compute.

    python bench/streaming.py --device cpu --threads 2                       # causal large config
    python bench/streaming.py --hparams hparams/CTC/demo_conmamba_causal.yaml
    python bench/streaming.py --inference-folder results/.../inference --device cuda
"""

import argparse
import os
import statistics
import sys
import time

import torch
from hyperpyyaml import load_hyperpyyaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modules.inference.streaming import StreamingCTC  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(args):
    """The streamer of a trained inference folder, or of the yaml's model with random weights."""
    if args.inference_folder:
        return StreamingCTC.from_inference_folder(args.inference_folder, args.device)
    with open(args.hparams, encoding="utf-8") as f:
        hparams = load_hyperpyyaml(f, {"data_folder": "unused", "output_folder": "/tmp/bench_streaming"})
    normalize = hparams["normalize"]  # global statistics from random audio, as a trained model has some
    normalize(hparams["compute_features"](torch.randn(1, 16000)), torch.ones(1), epoch=0)
    return StreamingCTC.from_hparams(hparams).to(args.device)


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_utterance(streamer, audio, chunk, device):
    """Seconds of compute for each chunk of one utterance, the final flush included in the last."""
    times = []
    chunks = audio.split(chunk)
    for index, piece in enumerate(chunks):
        synchronize(device)
        start = time.perf_counter()
        streamer.transcribe_chunk(piece)
        if index == len(chunks) - 1:
            streamer.finish()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hparams", default=os.path.join(ROOT, "hparams", "CTC", "conmamba_large_causal.yaml"))
    parser.add_argument("--inference-folder", help="a trained causal model's <output_folder>/inference")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per utterance")
    parser.add_argument("--chunk-ms", default="160,320,640", help="comma-separated chunk durations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    streamer = build(args)
    rate = streamer.sample_rate
    audio = 0.1 * torch.randn(int(args.seconds * rate), generator=torch.Generator().manual_seed(0))
    parameters = sum(p.numel() for p in streamer.modules.parameters()) / 1e6
    print(f"model: {args.inference_folder or os.path.relpath(args.hparams, ROOT)} ({parameters:.1f} M parameters), "
          f"device {args.device}, {args.threads} threads, {args.seconds:g} s of audio")
    print(f"encoder frame {streamer.frame_ms:g} ms, front-end lookahead {streamer.lookahead_ms:g} ms\n")
    print("| chunk (ms) | compute per chunk, median / p90 (ms) | RTF | chunk + lookahead (ms) | + compute (ms) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for chunk_ms in [int(c) for c in args.chunk_ms.split(",")]:
        chunk = rate * chunk_ms // 1000
        time_utterance(streamer, audio, chunk, args.device)  # warm-up
        times = time_utterance(streamer, audio, chunk, args.device)
        median = 1000 * statistics.median(times)
        p90 = 1000 * statistics.quantiles(times, n=10)[-1] if len(times) > 1 else median
        algorithmic = chunk_ms + streamer.lookahead_ms
        rtf = sum(times) / args.seconds
        print(f"| {chunk_ms} | {median:.1f} / {p90:.1f} | {rtf:.3f} | {algorithmic:g} | {algorithmic + median:.0f} |")


if __name__ == "__main__":
    main()
