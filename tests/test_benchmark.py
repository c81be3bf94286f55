"""End-to-end runs of the benchmark scripts in their --smoke modes (tiny shapes, CPU)."""

import csv
import json
import math
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["conmamba", "conmamba2", "conformer_relpos", "conformer_sdpa"]


def smoke_run(script, out):
    """Runs ``bench/<script> --smoke --device cpu --out <out>``; returns (rows of results.csv, stdout)."""
    command = [sys.executable, f"bench/{script}", "--smoke", "--device", "cpu", "--out", str(out)]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f)), completed.stdout


def test_smoke_run_writes_one_row_per_cell(tmp_path):
    rows, stdout = smoke_run("benchmark.py", tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    cells = [(r["what"], r["model"], float(r["seconds"])) for r in rows]
    expected = [(what, model, seconds) for what in ("layer", "encoder") for model in MODELS for seconds in (0.4, 0.8)]
    assert sorted(cells) == sorted(expected)
    assert len(results["results"]) == len(rows)
    for row in rows:
        assert row["status"] == "ok"
        assert float(row["time_ms"]) > 0 and float(row["audio_s_per_s"]) > 0
        assert row["peak_mib"] == ""  # not measured on CPU
    assert results["environment"]["default_scan_backend"] == "torch"  # the CPU's back-end
    assert "--smoke" in results["environment"]["command"]
    assert "| conmamba |" in stdout


def test_decoding_smoke_run_times_cached_and_uncached_searches(tmp_path):
    rows, stdout = smoke_run("decoding.py", tmp_path)
    searches = {(r["yaml"], r["search"], float(r["audio_s"])) for r in rows}
    for seconds in (1.0, 2.0):
        # the Mamba decoders are timed with and without their cache, the Transformer ones without
        for yaml_file in ("hparams/S2S/conmambamamba_large.yaml", "hparams/decoder_only/mamba_parallel.yaml"):
            assert {(yaml_file, "cache", seconds), (yaml_file, "no cache", seconds)} <= searches
        assert ("hparams/S2S/conmamba_large.yaml", "no cache", seconds) in searches
        assert ("hparams/decoder_only/transformer.yaml", "cache", seconds) not in searches
    for row in rows:
        assert float(row["ms_per_utterance"]) > 0 and int(row["tokens"]) > 0
    assert "no cache / cache" in stdout


def test_scan_floor_smoke_run_counts_bytes_and_measures_bandwidth(tmp_path):
    (one, both), stdout = smoke_run("scan_floor.py", tmp_path)
    assert (one["layout"], both["layout"]) == ("one direction", "BiMamba one scan")
    # smoke shape: batch 2, 32 channels, 32 frames, 4 states, one B/C group, float32 (4 bytes)
    sequence, bc = 2 * 32 * 32, 2 * 1 * 4 * 32
    assert int(one["forward_bytes"]) == 4 * 4 * sequence + 2 * 4 * bc
    assert int(one["backward_bytes"]) == 7 * 4 * sequence + 2 * 4 * bc + 8 * bc
    assert int(one["forward_flops"]) == 6 * sequence * 4 and int(one["exps"]) == sequence * 4
    # both directions in one scan: twice the channels and two B/C groups, so exactly twice the floor
    for count in ("forward_bytes", "backward_bytes", "forward_flops"):
        assert int(both[count]) == 2 * int(one[count])
    # measured figures depend on the machine's load: only their form is checked, never their size
    for row in (one, both):
        for name in ("copy_GBps", "forward_ms", "forward_share_of_copy_bandwidth", "backward_share_of_copy_bandwidth"):
            if row[name] != "":  # the backward share is left out when the difference of two timings is <= 0
                assert math.isfinite(float(row[name])) and float(row[name]) >= 0, (name, row[name])
        assert math.isfinite(float(row["backward_ms"]))
    assert "Device-to-device copy" in stdout


def test_scan_floor_writes_its_rows_when_the_backward_timing_comes_out_negative(tmp_path, monkeypatch):
    """The backward time is forward+backward minus forward: on a loaded machine it can be negative, and
    every row must still have the same columns (results.csv failed on that in CI)."""
    sys.path.insert(0, ROOT)
    from bench import scan_floor

    monkeypatch.setattr(scan_floor, "measure", lambda *args, **kwargs: (2.0, 1.0))
    args = scan_floor.parse_args(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    bandwidth, rows = scan_floor.run(args)
    assert all(row["backward_share_of_copy_bandwidth"] is None for row in rows)
    scan_floor.write_results(rows, args, torch.device("cpu"))
    with open(tmp_path / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert "| -1.000 |" in scan_floor.markdown_table(bandwidth, rows)
