"""benchmarks/sass_selective_scan.py: the 1D kernels compiled for sm_90 on a machine without a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import triton

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sass_selective_scan.py"
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

pytestmark = pytest.mark.skipif(not (TOOLS / "nvdisasm").exists() or not (TOOLS / "cuobjdump").exists(),
                                reason=f"this Triton wheel ships no nvdisasm/cuobjdump in {TOOLS}")


def run_script(*args: str) -> str:
    # a process of its own: this one may run Triton's interpreter, which cannot compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def rows(text: str) -> dict[str, tuple[int, int, int, str]]:
    found = {}
    for line in text.splitlines():
        match = re.match(r"^(forward, chunk states|forward, outputs|adjoint|gradients)\s+(\d+)\s+(\d+)\s+(\d+)\s+(.*)$",
                         line)
        if match:
            found[match.group(1)] = (int(match.group(2)), int(match.group(3)), int(match.group(4)), match.group(5))
    return found


def test_inference_forward_under_register_caps():
    """The forward of a call without gradients: two kernels, each within the register cap it was
    given (168 on the chunk-state pass by default, 128 on the output pass here); the chunk-state
    pass's most frequent opcodes include the exponentials of the decays (MUFU.EX2)."""
    out = run_script("--inference", "--set", "out_block_t=2", "out_maxnreg=128")
    found = rows(out)
    assert set(found) == {"forward, chunk states", "forward, outputs"}, out
    assert "out_block_t=2" in out and "out_maxnreg=128" in out
    assert found["forward, chunk states"][0] <= 168
    assert found["forward, outputs"][0] <= 128
    assert all(instructions > 100 for _, _, instructions, _ in found.values())
    assert "MUFU.EX2" in found["forward, chunk states"][3]


def test_refuses_an_unknown_field():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--inference", "--set", "no_such_field=1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0 and "no_such_field" in done.stderr
