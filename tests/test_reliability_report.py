"""Running the tests leaves a clone clean: the reliability rows go to the ignored results/RELIABILITY.md, and the
tracked RELIABILITY.md changes only with --write-reliability."""

import os
import subprocess
import sys

import reliability_report
from recipe_runs import ROOT

# A fast test that records a row of the report
RECORDING_TEST = "tests/test_checkpoints.py::test_disk_full_while_saving_keeps_previous_checkpoint"
ROW = "| disk full (ENOSPC) while writing a checkpoint |"


def test_a_test_run_writes_its_rows_outside_the_tracked_report():
    with open(reliability_report.REPORT_PATH, "rb") as f:
        tracked = f.read()
    mtime = os.stat(reliability_report.REPORT_PATH).st_mtime_ns

    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", RECORDING_TEST],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )

    assert proc.returncode == 0, proc.stdout[-3000:]
    with open(reliability_report.REPORT_PATH, "rb") as f:
        assert f.read() == tracked
    assert os.stat(reliability_report.REPORT_PATH).st_mtime_ns == mtime
    status = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", reliability_report.SCRATCH_REPORT_PATH],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    assert status.startswith("!! "), status  # written, and ignored by git
    with open(reliability_report.SCRATCH_REPORT_PATH, encoding="utf-8") as f:
        assert ROW in f.read()
