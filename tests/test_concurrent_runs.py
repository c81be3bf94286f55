"""Two runs cannot share an output folder: the second stops at start-up naming the run that holds it, and the
lock of a run killed with SIGKILL does not block the next one (modules/training/recipe.py: lock_output_folder)."""

import os
import re
import signal
import subprocess
import sys

import pytest

from recipe_runs import ROOT, run_tiny_ctc
from reliability_report import record

pytestmark = pytest.mark.reliability

# Holds the output folder's lock as a training run does, then waits to be killed
HOLDER = """
import sys, time
from modules.training.recipe import lock_output_folder
lock_output_folder(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""
SHORT_RUN = ["--select_n_sentences=[16, 4, 4]", "--number_of_epochs=1", "--avg_checkpoints=1"]


def test_a_second_run_into_a_folder_in_use_stops_and_a_killed_run_leaves_no_lock(tmp_path):
    output = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(output)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = run_tiny_ctc(output, *SHORT_RUN, returncode=1)
        message = proc.stderr.strip().splitlines()[-1]
        assert f"OutputFolderInUse: The output folder {output} is in use by another run (pid {holder.pid} on " in message
        assert "give this run another --output_folder" in message
        assert not {"train.csv", "log.txt", "hyperparams.yaml"} & set(os.listdir(output))  # no preparation
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    assert f"pid {holder.pid}" in (output / "run.lock").read_text()  # the killed run's lock file is left...
    run_tiny_ctc(output, *SHORT_RUN)  # ...and is stale: this run trains
    assert (output / "wer_test.txt").is_file()
    holder_info = re.sub(r"\(pid \d+ on .*?\)", "(pid <pid> on <host>, started <time>)", message.split(": ", 1)[1])
    record(
        "a second train_CTC.py into an output folder in use, then the first run killed with SIGKILL and a run started",
        f"the second stops at start-up, before data preparation: '{holder_info}'; after the SIGKILL the lock file "
        "is left but stale, and the next run trains and tests",
    )
