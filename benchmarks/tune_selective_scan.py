"""Tile-size sweep for the Triton selective scan: forward and forward+backward times of a few
ScanConfig candidates at a few WSI shapes (batch 1, float32, softplus, D, delta_bias), so the
defaults in kernels/selective_scan/chunk.py can be chosen from measurements.

    python benchmarks/tune_selective_scan.py [--candidates NAME ...] [--shapes DIM,N,L ...]

Same timing as bench_selective_scan.py (median of CUDA-event timings, L2 flushed between runs);
"bwd ms" is the forward+backward time minus the forward time; ``--graph`` times the calls replayed
from CUDA graphs instead (the GPU's own time, which at short L the host's launch overhead
hides); ``--check`` adds each candidate's largest relative difference from the default config
(output and gradients). ``--profile`` instead runs one
forward+backward per candidate and shape between cudaProfilerStart and cudaProfilerStop, for

    ncu --profile-from-start off --section SpeedOfLight --section Occupancy \
        python benchmarks/tune_selective_scan.py --profile --candidates default --shapes 512,16,65536
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_selective_scan import Timer, bench_graphed, make_inputs  # noqa: E402

SHAPES = [(512, 16, 65536), (128, 16, 262144), (128, 16, 16384)]


def candidates(module, n_state):
    """name -> ScanConfig: the default for N, and variations of one or two fields."""
    base = module.default_config(n_state, False)
    change = dataclasses.replace
    return {
        "default": base,
        "fwd-no-cap": change(base, maxnreg=None, out_maxnreg=None),
        "fwd-nreg128": change(base, maxnreg=128, out_maxnreg=128),
        "fwd-pps24": change(base, programs_per_sm=24),
        "fwd-prefetch": change(base, prefetch_state=True, prefetch_out=True),
        "bwd-d16": change(base, bwd_block_d=16),
        "bwd-butterfly": change(base, fast_reduce=False),
        "bwd-nreg168": change(base, bwd_maxnreg=168, bwd_programs_per_sm=12),
        "bwd-pps16": change(base, bwd_programs_per_sm=16),
        "carry-d8-c16": change(base, carry_block_d=8, block_c=16),
        "carry-d2": change(base, carry_block_d=2, carry_num_warps=2),
        "seg2": change(base, seg_factor=2),
        "seg4": change(base, seg_factor=4),
        "out-t2": change(base, out_block_t=2),
        "out-t2-nreg168": change(base, out_block_t=2, out_maxnreg=168),
        "out-t2-nreg184": change(base, out_block_t=2, out_maxnreg=184),
        "out-nreg168": change(base, out_maxnreg=168),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--candidates", nargs="*", help="names to run (default: all)")
    parser.add_argument("--shapes", nargs="*", help="DIM,N,L triples (default: the WSI targets)")
    parser.add_argument("--graph", action="store_true",
                        help="time calls replayed from CUDA graphs (the GPU's time, without host launch overhead)")
    parser.add_argument("--check", action="store_true",
                        help="also print each candidate's largest relative difference from the default "
                             "config over the output and every gradient")
    parser.add_argument("--profile", action="store_true",
                        help="one profiled forward+backward per run (for ncu --profile-from-start off)")
    args = parser.parse_args(argv)
    from mambapath.kernels.selective_scan import triton_module, uses_many_states

    module = triton_module(False)
    timer = Timer(args.reps)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else SHAPES
    print(f"{'dim':>5} {'N':>3} {'L':>8} {'config':>14} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8}"
          + (f" {'max rel diff':>10}" if args.check else ""), flush=True)
    for dim, n_state, length in shapes:
        if uses_many_states(n_state):
            print(f"{dim:>5} {n_state:>3} {length:>8} skipped: N > 16 runs chunk_many_states.py, not tuned here",
                  flush=True)
            continue
        inputs = make_inputs(dim, n_state, length, False, torch.float32, "cuda")
        args_ = (inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
        kwargs = dict(D=inputs["D"], delta_bias=inputs["delta_bias"], delta_softplus=True)
        dy = torch.randn_like(inputs["u"])
        reference = None  # the default config's output and gradients (--check)
        for name, config in candidates(module, n_state).items():
            if args.candidates and name not in args.candidates:
                continue

            def forward():
                with torch.no_grad():
                    module.selective_scan_triton(*args_, config=config, **kwargs)

            leaves = [t for t in inputs.values() if t is not None]

            def clear():
                for t in leaves:
                    t.grad = None

            def forward_backward():
                module.selective_scan_triton(*args_, config=config, **kwargs).backward(dy)

            def results(config_):
                for t in leaves:
                    t.requires_grad_(True)
                out = module.selective_scan_triton(*args_, config=config_, **kwargs)
                out.backward(dy)
                values = [out.detach().clone()] + [t.grad.clone() for t in leaves]
                clear()
                for t in leaves:
                    t.requires_grad_(False)
                return values

            if args.profile:
                for t in leaves:
                    t.requires_grad_(True)
                forward_backward()  # compiles
                clear()
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStart()
                forward_backward()
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStop()
                clear()
                for t in leaves:
                    t.requires_grad_(False)
                print(f"{dim:>5} {n_state:>3} {length:>8} {name:>14} profiled", flush=True)
                continue
            try:
                if args.graph:
                    fwd, fb = bench_graphed(lambda: module.selective_scan_triton(*args_, config=config, **kwargs),
                                            inputs, timer, args.reps)
                else:
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
            diff = ""
            if args.check:
                if reference is None:
                    reference = results(module.default_config(n_state, False))
                diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                           for a, b in zip(results(config), reference))
                diff = f" {diff:10.2e}"
            print(f"{dim:>5} {n_state:>3} {length:>8} {name:>14} {fwd:8.3f} {fb - fwd:8.3f} {fb:8.3f}{diff}",
                  flush=True)
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
