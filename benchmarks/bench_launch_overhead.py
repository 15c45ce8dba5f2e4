"""Host time of a scan call: kernels launched through kept compiled kernels (kernels/launch.py)
against every launch through Triton's own argument binding, side by side in one run.

    python benchmarks/bench_launch_overhead.py [--rounds 3] [--out FILE]

For each shape, both modes alternate ``--rounds`` times (so that a change in the host's speed
during the run hits both); a cell is the median over the rounds of:

* "cpu ms": the CPU time of one call, from its start until it returns (the GPU synchronised
  before each call; median of 50 calls): forward under no_grad, and forward + backward
  (a backward of <y, dy>, the inputs being leaves that need gradients).
* "event ms": the time between two CUDA events around the call (median of 20, L2 flushed before
  each, as in bench_selective_scan.py): what a call costs when it is not hidden behind earlier
  GPU work. Where the kernels are shorter than the host's work, it is mostly host time.

"Triton" mode replaces ``Launcher.launch`` by the plain ``kernel[grid](*args, **kwargs)``.
1D: batch 1, N 16, softplus and bias, no gate; 2D: the same over an H x W grid. float32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [("1d", 128, (16384,)), ("1d", 128, (65536,)), ("1d", 512, (16384,)), ("1d", 512, (65536,)),
          ("2d", 128, (128, 128)), ("2d", 512, (256, 256))]


def make_inputs(dim, shape, n_state=16):
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*s, scale=1.0):
        return torch.randn(*s, generator=gen, device="cuda") * scale

    bc = (1, n_state, *shape)
    return dict(u=randn(1, dim, *shape), delta=randn(1, dim, *shape, scale=0.5),
                A=-torch.exp(randn(dim, n_state, scale=0.5)), B=randn(*bc), C=randn(*bc), D=randn(dim),
                delta_bias=randn(dim, scale=0.3) - 1.0)


def cpu_ms(fn, prepare=None, calls=50):
    times = []
    for i in range(calls + 5):
        if prepare:
            prepare()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if i >= 5:
            times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_launch_overhead: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from bench_selective_scan import Timer
    from mambapath.kernels import selective_scan, selective_scan_2d
    from mambapath.kernels.launch import Launcher

    kept = Launcher.launch

    def through_triton(self, grid, launch_args, kwargs):
        self.kernel[grid](*launch_args, **kwargs)

    timer = Timer(reps=20)
    lines = [f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; triton {triton.__version__}; "
             f"float32, batch 1, N 16; median over {args.rounds} alternating rounds",
             "", f"{'scan':4} {'dim':>4} {'shape':>9}  {'launch':6} {'cpu fwd':>8} {'cpu f+b':>8} "
                 f"{'event fwd':>9} {'event f+b':>9}"]
    print("\n".join(lines), flush=True)
    for kind, dim, shape in SHAPES:
        scan = selective_scan if kind == "1d" else selective_scan_2d
        inputs = make_inputs(dim, shape)
        dy = torch.randn_like(inputs["u"])
        cells = {"kept": [], "Triton": []}

        def forward():
            with torch.no_grad():
                scan(**inputs, delta_softplus=True)

        def clear():
            for t in inputs.values():
                t.grad = None

        def forward_backward():
            scan(**inputs, delta_softplus=True).backward(dy)

        for _ in range(args.rounds):
            for mode, launch in (("kept", kept), ("Triton", through_triton)):
                Launcher.launch = launch
                try:
                    row = [cpu_ms(forward), timer(forward)]
                    for t in inputs.values():
                        t.requires_grad_(True)
                    row[1:1] = [cpu_ms(forward_backward, prepare=clear)]
                    row.append(timer(forward_backward, prepare=clear))
                finally:
                    Launcher.launch = kept
                    clear()
                    for t in inputs.values():
                        t.requires_grad_(False)
                cells[mode].append(row)
        for mode, rows in cells.items():
            med = [statistics.median(col) for col in zip(*rows)]
            line = (f"{kind:4} {dim:4d} {'x'.join(map(str, shape)):>9}  {mode:6} "
                    + " ".join(f"{v:{w}.3f}" for v, w in zip(med, (8, 8, 9, 9))))
            lines.append(line)
            print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
