"""Registers, spills and instruction mix of the 1D scan kernels (N <= 16), compiled for a GPU
target without a GPU: Triton's own ptxas and nvdisasm, which ship in its wheel.

    python benchmarks/sass_selective_scan.py [--arch 90] [--set FIELD=VALUE ...] [--gate] [--inference]

Each kernel is compiled with the constexprs and launch options that ``scan_fwd`` and ``scan_bwd``
give it under the ScanConfig ``default_config(16)`` with the ``--set`` changes (for example
``--set out_block_t=2 out_maxnreg=None``), every pointer and length marked 16-divisible as at
L = 65,536, dim 512 (so loads vectorise as they would there). The table gives, per kernel, the
registers per thread, the bytes of stack a thread spills to (local memory), the static
instruction count and its most frequent opcodes. No timing: what a change does to the registers
can be seen here before it is timed on a GPU (benchmarks/tune_selective_scan.py). The Triton
installed here may not be the one on the GPU machine, whose ptxas may allocate differently.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mambapath.kernels.selective_scan import triton_module  # noqa: E402

# integer arguments that are not multiples of 16 at the reference shape (counts, not lengths)
_NOT_DIVISIBLE = {"n_state", "n_sub", "n_chunks", "seg_pos", "n_seg", "stride_Bn", "dim_per_group", "n_dblocks",
                  "n_items", "seg_len", "stride_scratch"}
_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_kernel(kernel, constexprs: dict, options: dict, arch: int):
    signature, attrs = {}, {}
    for i, param in enumerate(kernel.params):
        if param.name in constexprs:
            signature[param.name] = "constexpr"
            continue
        signature[param.name] = "*fp32" if param.name.endswith("_ptr") else "i32"
        if param.name not in _NOT_DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                       constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resources(compiled) -> tuple[int, int, collections.Counter]:
    """(registers, stack bytes, opcode counts) of a compiled kernel's cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_TOOLS / "cuobjdump", "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_TOOLS / "nvdisasm", "-c", cubin], capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    opcodes = collections.Counter(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass,
                                             re.M))
    return registers, stack, opcodes


def kernel_variants(module, config, gate: bool, inference: bool):
    """(name, kernel, constexprs, launch options) of every N = 16 kernel a call runs."""
    def options(maxnreg, num_warps):
        return dict(num_warps=num_warps, **({} if maxnreg is None else dict(maxnreg=maxnreg)))

    def columns(block_t):
        return dict(J0=0, J1=block_t, JS=1)

    out_block_t = config.block_t if config.out_block_t is None else config.out_block_t
    common = dict(HAS_DBIAS=True, SOFTPLUS=True, REVERSE=False, MASK_N=False, BN=16)
    flags = dict(HAS_D=True, HAS_Z=gate, HAS_H0=False)
    fwd = dict(common, BD=config.block_d)
    yield ("forward, chunk states", module._scan_fwd_kernel,
           dict(fwd, **{k: False for k in flags}, STATE_ONLY=True, SAVE_SEG=False, PREFETCH=config.prefetch_state,
                BT=config.block_t, **columns(config.block_t)), options(config.maxnreg, config.num_warps))
    yield ("forward, outputs", module._scan_fwd_kernel,
           dict(fwd, **flags, STATE_ONLY=False, SAVE_SEG=not inference, PREFETCH=config.prefetch_out,
                BT=out_block_t, **columns(out_block_t)), options(config.out_maxnreg, config.num_warps))
    if inference:
        return
    yield ("adjoint", module._chunk_adjoint_kernel,
           dict(fwd, HAS_Z=gate, BT=config.block_t, **columns(config.block_t)),
           options(config.maxnreg, config.num_warps))
    yield ("gradients", module._scan_bwd_kernel,
           dict(common, HAS_D=True, HAS_Z=gate, HAS_DLAST=False, FAST_REDUCE=config.fast_reduce, LANES_D=32,
                BD=config.bwd_block_d, BT=config.bwd_block_t, **columns(config.bwd_block_t)),
           options(config.bwd_maxnreg, config.bwd_num_warps))


def parse_changes(items: list[str], fields: set[str]) -> dict:
    """FIELD=VALUE strings -> {field: int, bool or None}; ValueError naming the bad item."""
    changes = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(sorted(fields))}")
        if text in ("None", "True", "False"):
            changes[name] = {"None": None, "True": True, "False": False}[text]
        elif re.fullmatch(r"-?\d+", text):
            changes[name] = int(text)
        else:
            raise ValueError(f"--set {item!r}: the value must be an integer, True, False or None")
    return changes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="ScanConfig changes (ints, True/False, None)")
    parser.add_argument("--gate", action="store_true", help="with the gate z")
    parser.add_argument("--inference", action="store_true", help="the forward of a call without gradients")
    args = parser.parse_args(argv)
    module = triton_module(False)
    base = module.default_config(16, False)
    try:
        changes = parse_changes(args.set, {field.name for field in dataclasses.fields(base)})
    except ValueError as err:
        parser.error(str(err))
    config = dataclasses.replace(base, **changes)
    try:  # the checks a call makes on its config (sub-tile lengths, segments)
        module._plan(1, 512, 65536, 16, 1, config, torch.device("cpu"))
    except ValueError as err:
        parser.error(f"--set {' '.join(args.set)}: {err}")
    print(f"sm_{args.arch}, Triton {triton.__version__}, {config}")
    print(f"{'kernel':<22} {'regs':>5} {'stack B':>8} {'instrs':>7}  most frequent opcodes")
    for name, kernel, constexprs, options in kernel_variants(module, config, args.gate, args.inference):
        registers, stack, opcodes = resources(compile_kernel(kernel, constexprs, options, args.arch))
        top = ", ".join(f"{op} {n}" for op, n in opcodes.most_common(6))
        print(f"{name:<22} {registers:>5} {stack:>8} {sum(opcodes.values()):>7}  {top}", flush=True)


if __name__ == "__main__":
    main()
