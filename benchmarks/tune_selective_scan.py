"""Tile-size sweep for the Triton selective scan: forward and forward+backward times of a few
ScanConfig candidates at a few WSI shapes (batch 1, float32, softplus, D, delta_bias), so the
defaults in kernels/selective_scan/chunk.py can be chosen from measurements.

    python benchmarks/tune_selective_scan.py

Same timing as bench_selective_scan.py (median of CUDA-event timings, L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selective_scan import Timer, make_inputs  # noqa: E402

SHAPES = [(512, 16, 65536), (128, 16, 262144), (512, 64, 65536)]


def candidates(module, n_state):
    C = module.ScanConfig
    carry16, carry64 = dict(block_c=16, carry_block_d=8), dict(block_c=16, carry_block_d=4)
    if n_state <= 16:
        return {
            "d32-t4-w4": C(block_d=32, block_t=4, num_warps=4, bwd_num_warps=4, max_sub=512, **carry16),
            "d32-t4-w2": C(block_d=32, block_t=4, num_warps=2, bwd_num_warps=2, max_sub=512, **carry16),
            "d32-t8-w4": C(block_d=32, block_t=8, num_warps=4, bwd_num_warps=4, **carry16),
        }
    return {
        "d32-t4-w4": C(block_d=32, block_t=4, num_warps=4, bwd_num_warps=4, max_sub=512, **carry64),
        "d32-t2-w4": C(block_d=32, block_t=2, num_warps=4, bwd_num_warps=4, max_sub=1024, **carry64),
        "d32-t4-w8": C(block_d=32, block_t=4, num_warps=8, bwd_num_warps=8, max_sub=512, **carry64),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    from mambapath.kernels.selective_scan import triton_module

    module = triton_module(False)
    timer = Timer(args.reps)
    print(f"{'dim':>5} {'N':>3} {'L':>8} {'config':>14} {'fwd ms':>8} {'f+b ms':>8}", flush=True)
    for dim, n_state, length in SHAPES:
        inputs = make_inputs(dim, n_state, length, False, torch.float32, "cuda")
        args_ = (inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
        kwargs = dict(D=inputs["D"], delta_bias=inputs["delta_bias"], delta_softplus=True)
        dy = torch.randn_like(inputs["u"])
        for name, config in candidates(module, n_state).items():
            def forward():
                with torch.no_grad():
                    module.selective_scan_triton(*args_, config=config, **kwargs)

            leaves = [t for t in inputs.values() if t is not None]

            def clear():
                for t in leaves:
                    t.grad = None

            def forward_backward():
                module.selective_scan_triton(*args_, config=config, **kwargs).backward(dy)

            try:
                fwd = timer(forward)
                for t in leaves:
                    t.requires_grad_(True)
                fb = timer(forward_backward, prepare=clear)
            except Exception as err:  # a config that does not compile or fit: report, go on
                print(f"{dim:>5} {n_state:>3} {length:>8} {name:>14} failed: {type(err).__name__}: {err}"[:300],
                      flush=True)
                continue
            finally:
                clear()
                for t in leaves:
                    t.requires_grad_(False)
            print(f"{dim:>5} {n_state:>3} {length:>8} {name:>14} {fwd:8.3f} {fb:8.3f}", flush=True)
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
