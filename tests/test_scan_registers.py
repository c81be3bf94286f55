"""The Triton scan's layout, as compiled for a Hopper GPU (no GPU needed): the states stay in registers.

A regression here (states spread across lanes, spills) is what made the first kernels slower than
mamba_ssm's. The compilation runs in a fresh interpreter, since this one may run Triton interpreted.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_forward_keeps_states_in_registers_and_nothing_spills():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    code = "import json; from bench.scan_registers import reports; print(json.dumps(reports()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    forward_registers, forward_spills, forward = results["forward"]
    assert forward_spills == 0 and results["backward"][1] == 0
    # sums over states stay inside a thread: no shuffles, barriers or shared memory in the forward
    assert forward["SHFL"] == forward["BAR"] == forward["LDS"] == forward["STS"] == 0
    assert forward["MUFU"] > 0 and forward_registers <= 255
    # the backward, capped at 224 registers (scan_triton.BACKWARD), keeps a dozen values in local memory;
    # many more would mean its states left the registers
    backward_registers, _, backward = results["backward"]
    assert backward_registers <= 224 and backward["LDL"] <= 16
