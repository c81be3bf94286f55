"""What the Triton scan kernels compile to on a Hopper GPU, without one: registers, spills and SASS counts.

Compiles ``modules/mamba/scan_triton.py``'s forward and backward kernels for sm_90 with the block sizes
in that module (the bf16, bidirectional, gated case of a ConMamba layer), then reads the cubin with the
``cuobjdump`` that Triton bundles. Registers a thread bound a program's occupancy; shuffles, barriers
and shared-memory instructions show where values cross lanes (the states should not); local loads and
stores are spills.

    python bench/scan_registers.py
"""

import collections
import glob
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from modules.mamba import scan_triton  # noqa: E402

OPCODES = ("SHFL", "BAR", "LDS", "STS", "LDL", "STL", "LDG", "STG", "REDG", "MUFU", "FFMA", "FMUL", "FADD")
UNIT_STRIDES = ("s_uc", "s_dc", "s_Bn", "s_Cn", "s_zc", "s_oc", "s_gc", "s_guc", "s_gBn", "s_gzc")
BF16_TENSORS = ("u_ptr", "delta_ptr", "B_ptr", "C_ptr", "z_ptr", "grad_out_ptr")


def signature(kernel, constants):
    """Argument types as a launch with bf16 activations would specialise them: unit channel strides
    become constants and the other integers are divisible by 16, as in a ConMamba layer."""
    types, values = {}, dict(constants)
    for name in kernel.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name in UNIT_STRIDES:
            types[name], values[name] = "constexpr", 1
        elif name == "lengths_ptr":
            types[name] = "*i32"
        elif name.endswith("_ptr"):
            types[name] = "*bf16" if name in BF16_TENSORS else "*fp32"
        else:
            types[name] = "fp32" if name == "scale" else "i32"
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
               if types[name] in ("*bf16", "*fp32", "*i32") or (types[name] == "i32" and name != "DIM")}
    return types, values, aligned


def compile_report(kernel, constants, num_warps, maxnreg=None):
    """(registers, spill bytes, SASS opcode counts) of ``kernel`` compiled for sm_90."""
    types, values, aligned = signature(kernel, constants)
    compiled = triton.compile(ASTSource(kernel, types, values, aligned), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "maxnreg": maxnreg})
    cuobjdump = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))[0]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", cubin.name], capture_output=True, text=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spills = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    opcodes = collections.Counter(re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))
    return registers, spills, {op: opcodes.get(op, 0) for op in OPCODES}


def reports():
    """{pass: (registers, spill bytes, opcode counts)} at the module's block sizes."""
    common = dict(N=16, BLOCK_T=scan_triton.BLOCK_T, BIDIRECTIONAL=True, HAS_D=True, HAS_BIAS=True,
                  SOFTPLUS=True, HAS_Z=True)
    forward, backward = scan_triton.FORWARD, scan_triton.BACKWARD
    return {
        "forward": compile_report(
            scan_triton.scan_forward_kernel,
            dict(common, h0_ptr=None, HAS_H0=False, ATOMIC_OUT=True, BLOCK_D=forward["BLOCK_D"], SPLIT=forward["SPLIT"]),
            forward["num_warps"], forward.get("maxnreg")),
        "backward": compile_report(
            scan_triton.scan_backward_kernel,
            dict(common, grad_last_ptr=None, HAS_GRAD_LAST=False, BLOCK_D=backward["BLOCK_D"], SPLIT=backward["SPLIT"],
                 SEGMENTED=False),
            backward["num_warps"], backward.get("maxnreg")),
    }


def main():
    print(f"Triton {triton.__version__}, sm_90; forward {scan_triton.FORWARD}, backward {scan_triton.BACKWARD}")
    for name, (registers, spills, opcodes) in reports().items():
        counts = ", ".join(f"{op} {n}" for op, n in opcodes.items())
        print(f"{name}: {registers} registers a thread, {spills} bytes of spills; SASS: {counts}")


if __name__ == "__main__":
    main()
