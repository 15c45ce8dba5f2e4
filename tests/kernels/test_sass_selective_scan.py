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

pytestmark = pytest.mark.skipif(not all((TOOLS / tool).exists() for tool in ("ptxas", "nvdisasm", "cuobjdump")),
                                reason=f"this Triton wheel ships no ptxas/nvdisasm/cuobjdump in {TOOLS}")


def run_script(*args: str) -> subprocess.CompletedProcess:
    # a process of its own: this one may run Triton's interpreter, which cannot compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


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
    done = run_script("--inference", "--set", "out_block_t=2", "out_maxnreg=128")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    found = rows(out)
    assert set(found) == {"forward, chunk states", "forward, outputs"}, out
    assert "out_block_t=2" in out and "out_maxnreg=128" in out
    assert found["forward, chunk states"][0] <= 168
    assert found["forward, outputs"][0] <= 128
    assert all(instructions > 100 for _, _, instructions, _ in found.values())
    assert "MUFU.EX2" in found["forward, chunk states"][3]


@pytest.mark.parametrize("item,message", [
    ("no_such_field=1", "expected FIELD=VALUE with FIELD one of"),
    ("out_block_t", "expected FIELD=VALUE"),
    ("out_block_t=two", "must be an integer, True, False or None"),
    ("out_block_t=3", "out_block_t must be 2 or 4"),
])
def test_refuses_a_bad_change(item, message):
    """A bad --set item: argparse's usage error (exit 2) naming the item, no traceback."""
    done = run_script("--inference", "--set", item)
    assert done.returncode == 2 and item in done.stderr and message in done.stderr
    assert "Traceback" not in done.stderr
