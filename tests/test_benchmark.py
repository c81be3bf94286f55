"""End-to-end run of bench/benchmark.py in its --smoke mode (tiny shapes, CPU)."""

import csv
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["conmamba", "conmamba2", "conformer_relpos", "conformer_sdpa"]


def test_smoke_run_writes_one_row_per_cell(tmp_path):
    command = [sys.executable, "bench/benchmark.py", "--smoke", "--device", "cpu", "--out", str(tmp_path)]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr

    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    results = json.loads((tmp_path / "results.json").read_text())
    cells = [(r["what"], r["model"], float(r["seconds"])) for r in rows]
    expected = [(what, model, seconds) for what in ("layer", "encoder") for model in MODELS for seconds in (0.4, 0.8)]
    assert sorted(cells) == sorted(expected)
    assert len(results["results"]) == len(rows)
    for row in rows:
        assert row["status"] == "ok"
        assert float(row["time_ms"]) > 0 and float(row["audio_s_per_s"]) > 0
        assert row["peak_mib"] == ""  # not measured on CPU
    assert results["environment"]["mamba_ssm_kernels_used"] is False
    assert "--smoke" in results["environment"]["command"]
    assert "| conmamba |" in completed.stdout
