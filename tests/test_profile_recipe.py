"""bench/profile_recipe.py: the summary of a recipe's profiler trace."""

import json
import os
import sys

from recipe_runs import ROOT, run_tiny_ctc

sys.path.insert(0, ROOT)

from bench.profile_recipe import busy_time, load_trace, summarize  # noqa: E402


def test_busy_time_counts_overlapping_kernels_once():
    assert busy_time([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20


def test_summary_of_a_gpu_trace(tmp_path):
    events = [
        {"ph": "X", "name": "ProfilerStep#1", "cat": "user_annotation", "ts": 0, "dur": 100, "tid": 1},
        {"ph": "X", "name": "ProfilerStep#2", "cat": "user_annotation", "ts": 100, "dur": 100, "tid": 1},
        {"ph": "X", "name": "scan", "cat": "kernel", "ts": 10, "dur": 40, "tid": 7},
        {"ph": "X", "name": "scan", "cat": "kernel", "ts": 110, "dur": 40, "tid": 7},
        {"ph": "X", "name": "gemm", "cat": "kernel", "ts": 30, "dur": 40, "tid": 8},  # overlaps the first scan
        {"ph": "X", "name": "late", "cat": "kernel", "ts": 500, "dur": 40, "tid": 7},  # after the steps
        {"ph": "X", "name": "enumerate(DataLoader)#_MultiProcessingDataLoaderIter.__next__", "cat": "user_annotation",
         "ts": 100, "dur": 30, "tid": 1},
        {"ph": "X", "name": "cudaStreamSynchronize", "cat": "cuda_runtime", "ts": 60, "dur": 10, "tid": 1},
        {"ph": "X", "name": "cudaLaunchKernel", "cat": "cuda_runtime", "ts": 80, "dur": 5, "tid": 1},  # no wait
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    lines = summarize(load_trace(str(tmp_path)))
    assert lines[0] == "2 steps, 0.1 ms a step"
    assert lines[1] == "GPU busy 50% of the steps"  # 60 + 40 us of the 200 us
    assert lines[2] == "host waiting for the data loader: 0.0 ms a step (15%)"  # 30 of the 200 us
    assert lines[3] == "host waiting for the GPU (synchronisations): 0.0 ms a step (5%)"
    assert lines[6].startswith("| scan | 0.04 | 40.0% | 1 |")
    assert lines[7].startswith("| gemm | 0.02 | 20.0% | 0.5 |")


def test_profiles_a_real_recipe_run_on_the_cpu(tmp_path):
    """SpeechBrain's --profile_training traces a few steps of train_CTC.py and stops; the summary lists
    the model's top-level operators."""
    run_tiny_ctc(str(tmp_path), "--number_of_epochs=1", "--profile_training", "--profile_warmup=1", "--profile_steps=2")
    logs = [os.path.join(d, "profiler_logs") for d, _, _ in os.walk(tmp_path) if os.path.isdir(os.path.join(d, "profiler_logs"))]
    assert logs, "no profiler_logs directory was written"
    lines = summarize(load_trace(logs[0]))
    assert lines[0].startswith("2 steps")
    assert lines[1] == "no GPU activity in the trace (a CPU run)"
    assert len(lines) > 4
