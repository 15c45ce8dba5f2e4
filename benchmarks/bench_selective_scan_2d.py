"""Benchmark of the 2D selective scan (2DMamba's recurrence) on one CUDA GPU.

    python benchmarks/bench_selective_scan_2d.py                     # the full table
    python benchmarks/bench_selective_scan_2d.py --grids 128 --dims 128 --methods ours
    python benchmarks/bench_selective_scan_2d.py --tune              # pick tiles first, then the table

Methods, all on the same inputs (float32, batch 1, N = 16, softplus(delta + bias), D skip, z gate):
  ours       the Triton kernels (mambapath.kernels.selective_scan_2d, backend="triton")
  reference  the PyTorch twin (loops over states; no (b, d, H, W, N) tensor)
  naive      two-pass PyTorch that materialises the (b, d, H, W, N) states (one loop over W, one over H)
  scan1d     our 1D selective scan over the same H * W positions (row-major), backend="triton"
             where that backend exists, else its reference (the table says which ran)

Times come from CUDA events: for ours and the Triton 1D scan, medians of 30 runs after 10 warm-up
runs; for the loop-based methods (reference, naive, the 1D reference) one run after one warm-up
forward. "bwd" is the backward alone (autograd.grad on a retained graph). Peaks are
torch.cuda.max_memory_allocated above what the inputs already hold, for an inference forward (no
grad) and for forward + backward. Inputs are not rotated: at the small grids they sit in
the 50 MB L2, as they did for the quoted numbers.

The "(graph)" columns time ours and the Triton 1D scan replayed from CUDA graphs (medians of 30):
the GPU's time without the host's work of preparing and launching each call, which at the small
grids is most of the event-timed figure and varies from run to run with the host. "bwd ms
(graph)" is the forward + backward graph less the inference forward graph (the training forward
also stores the column checkpoints, so it slightly overstates the backward).

Floor of the forward (a lower bound, not a target): the larger of
  bytes / bandwidth: u, delta, z read and y written (4 x b*d*H*W*4 bytes) plus B and C read
  (2 x b*N*H*W*4 bytes), over 3.0e12 B/s (a device-to-device copy measured on this H100);
  exps / exp rate:   2 exponentials per state element (the decay of each pass: our kernels compute
  exp(dt*A) once in the carry kernel and once in the main one) = 2 x b*d*H*W*N, over
  132 SMs x 16 ex2 per clock x 1.98 GHz = 4.2e12 /s.

2DMamba's own CUDA kernel does not build here; its times below are QUOTED from our issue tracker
(measured earlier on this H100 model, float32, batch 1, N 16, their kernel patched for CUDA 13),
not measured by this script.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch
import torch.nn.functional as F

# (grid side, dim) -> (forward ms, backward ms): 2DMamba's CUDA kernel, quoted, external.
QUOTED_2DMAMBA = {(128, 128): (0.68, 2.26), (256, 512): (3.08, 11.5), (512, 128): (10.8, 38.2)}
BANDWIDTH = 3.0e12
DEVICE = "cuda"
MAX_REPS = 1000  # lowered only for a dry run of this script
# the reference's backward loops over H + W positions per state: skip it where it takes over 20 s
REFERENCE_BWD_MAX = 2**26
EXP_RATE = 132 * 16 * 1.98e9


def make_inputs(batch, dim, side, n_state, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32)

    return {
        "u": rnd(batch, dim, side, side),
        "delta": rnd(batch, dim, side, side) * 0.5 - 1.5,
        "A": -torch.exp(rnd(dim, n_state) * 0.5),
        "B": rnd(batch, n_state, side, side),
        "C": rnd(batch, n_state, side, side),
        "D": rnd(dim),
        "z": rnd(batch, dim, side, side),
        "delta_bias": rnd(dim) * 0.3,
    }


def naive_two_pass(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence with every state materialised: (b, d, H, W, N) tensors throughout."""
    dt = delta + delta_bias[None, :, None, None] if delta_bias is not None else delta
    dt = F.softplus(dt) if delta_softplus else dt
    a = torch.exp(dt.unsqueeze(-1) * A[None, :, None, None, :])  # (b, d, H, W, N)
    x = (dt * u).unsqueeze(-1) * B.permute(0, 2, 3, 1).unsqueeze(1)  # (b, d, H, W, N)
    g = [x[:, :, :, 0]]
    for j in range(1, x.shape[3]):
        g.append(a[:, :, :, j] * g[-1] + x[:, :, :, j])
    g = torch.stack(g, dim=3)
    h = [g[:, :, 0]]
    for i in range(1, x.shape[2]):
        h.append(a[:, :, i] * h[-1] + g[:, :, i])
    h = torch.stack(h, dim=2)
    y = (h * C.permute(0, 2, 3, 1).unsqueeze(1)).sum(-1)
    if D is not None:
        y = y + D[None, :, None, None] * u
    return y * F.silu(z) if z is not None else y


def method_fn(name, backend_1d, config=None):
    from mambapath.kernels import selective_scan, selective_scan_2d, selective_scan_2d_ref

    if name == "ours":
        if config is None:
            return lambda **kw: selective_scan_2d(**kw, backend="triton")
        from mambapath.kernels.selective_scan_2d import triton_module

        tiled = triton_module(False)
        return lambda **kw: tiled.selective_scan_2d_triton(**kw, config=config)
    if name == "reference":
        return selective_scan_2d_ref
    if name == "naive":
        return naive_two_pass
    if name == "scan1d":
        def flat(**kw):
            shape = kw["u"].shape
            kw = {k: (v.flatten(2) if isinstance(v, torch.Tensor) and v.dim() == 4 else v) for k, v in kw.items()}
            return selective_scan(**kw, backend=backend_1d).view(shape)  # (b, d, H * W) -> (b, d, H, W)
        return flat
    raise ValueError(f"unknown method {name!r}")


def time_ms(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mib(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def timed_once(fn):
    """(ms, peak MiB above what was allocated before) of one run: for the loop-based methods."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end), (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(fn, inputs, fast, with_backward=True, bwd_alone=True):
    """fwd, bwd, fwd+bwd (ms) and fwd, fwd+bwd peaks (MiB); None where not measured. Fast methods:
    medians of 30 after 10 warm-up runs, peaks from separate runs; slow ones: one warm-up forward,
    then one timed run each."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    dout = torch.randn_like(inputs["u"])

    def fwd():
        with torch.no_grad():
            fn(**inputs, delta_softplus=True)

    def fwd_bwd():
        for v in leaves.values():
            v.grad = None
        fn(**leaves, delta_softplus=True).backward(dout)

    out = {}
    if fast:
        warmup, reps = min(10, MAX_REPS), min(30, MAX_REPS)
        out["fwd"], out["fwd_peak"] = time_ms(fwd, warmup, reps), peak_mib(fwd)
        if with_backward:
            out["fwd_bwd"], out["fwd_bwd_peak"] = time_ms(fwd_bwd, warmup, reps), peak_mib(fwd_bwd)
            # the same calls replayed from CUDA graphs: GPU time without the host's launch work
            from bench_selective_scan import bench_graphed

            graph_inputs = {k: v.detach().clone() for k, v in inputs.items()}
            out["fwd_graph"], out["fwd_bwd_graph"] = bench_graphed(
                lambda: fn(**graph_inputs, delta_softplus=True), graph_inputs,
                lambda call, reps: time_ms(call, warmup, reps), reps)
            out["bwd_graph"] = out["fwd_bwd_graph"] - out["fwd_graph"]
    else:
        fwd()
        out["fwd"], out["fwd_peak"] = timed_once(fwd)
        if with_backward:
            out["fwd_bwd"], out["fwd_bwd_peak"] = timed_once(fwd_bwd)
    if with_backward and bwd_alone:
        y = fn(**leaves, delta_softplus=True)
        params = list(leaves.values())
        out["bwd"] = time_ms(lambda: torch.autograd.grad(y, params, dout, retain_graph=True),
                             min(10, MAX_REPS), min(30, MAX_REPS))
        del y
    return out


def naive_fits(batch, dim, side, n_state, with_backward):
    """Skip the naive method where its states cannot fit (about 7 state tensors forward, 12 with
    the backward)."""
    state = batch * dim * side * side * n_state * 4
    free, _ = torch.cuda.mem_get_info()
    return (12 if with_backward else 7) * state < 0.9 * free


def fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.{digits}g}" if v < 100 else f"{v:.0f}"


def run_table(args, config=None):
    backend_1d = "triton"  # main() runs on CUDA only, where the 1D scan's Triton kernels always run
    rows, ratio_rows = [], []
    for side in args.grids:
        for dim in args.dims:
            inputs = make_inputs(args.batch, dim, side, args.state)
            results = {}
            for name in args.methods:
                label = name if name != "scan1d" else f"scan1d ({backend_1d})"
                fn = method_fn(name, backend_1d, config if name == "ours" else None)
                res = {}
                try:
                    if name == "naive" and not naive_fits(args.batch, dim, side, args.state, False):
                        res = {"note": "skipped: states do not fit"}
                    else:
                        with_bwd = name != "naive" or naive_fits(args.batch, dim, side, args.state, True)
                        if name == "reference" and args.batch * dim * side * side > REFERENCE_BWD_MAX:
                            with_bwd = False
                            res["note"] = "fwd+bwd not run (over 20 s)"
                        res.update(measure(fn, inputs,
                                           fast=name == "ours" or (name == "scan1d" and backend_1d == "triton"),
                                           with_backward=with_bwd, bwd_alone=name in ("ours", "scan1d")))
                except torch.cuda.OutOfMemoryError:
                    res = {"note": "out of memory"}
                torch.cuda.empty_cache()
                results[name] = res
                rows.append([f"{side}x{side}", dim, label, fmt(res.get("fwd")), fmt(res.get("bwd")),
                             fmt(res.get("fwd_bwd")), fmt(res.get("fwd_graph")), fmt(res.get("bwd_graph")),
                             fmt(res.get("fwd_peak")), fmt(res.get("fwd_bwd_peak")), res.get("note", "")])
                print("| " + " | ".join(str(c) for c in rows[-1]) + " |", file=sys.stderr, flush=True)
            ratio_rows.append(ratio_row(side, dim, args, results))
            del inputs
            torch.cuda.empty_cache()
    print(f"\n2D selective scan, {torch.cuda.get_device_name()}, float32, batch {args.batch}, N {args.state} "
          f"(times in ms, peaks in MiB above the inputs)\n")
    print_table(["grid", "dim", "method", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd ms (graph)", "bwd ms (graph)",
                 "fwd peak MiB", "fwd+bwd peak MiB", "note"], rows)
    print("\nRatios (x > 1: ours is faster / smaller). 2DMamba = their CUDA kernel, QUOTED from the issue "
          "(external, not measured here); 1D = time of our 1D scan over the same H*W positions / ours, "
          "i.e. our throughput as a fraction of the 1D scan's.\n")
    print_table(["grid", "dim", "floor fwd ms", "ours fwd ms", "2DMamba fwd ms (quoted)", "vs 2DMamba fwd",
                 "ours bwd ms", "2DMamba bwd ms (quoted)", "vs 2DMamba bwd", "vs 2DMamba fwd / bwd (graph)",
                 "vs naive fwd", "vs naive fwd+bwd",
                 "vs reference fwd+bwd", "vs 1D fwd", "vs 1D fwd+bwd", "naive / ours fwd peak"], ratio_rows)
    if "ours" in args.methods:
        from mambapath.kernels.selective_scan_2d import triton_module

        tiled = triton_module(False)
        print(f"\nours: {config or tiled.DEFAULT_CONFIG}\n" + "\n".join(kernel_resources(tiled)))


def ratio_row(side, dim, args, results):
    ours = results.get("ours", {})

    def ratio(other, key, mine=None):
        a = results.get(other, {}).get(key) if isinstance(other, str) else other
        b = ours.get(mine or key)
        return f"{a / b:.2f}" if a and b else "-"

    numel = args.batch * dim * side * side
    floor = max((4 * numel + 2 * args.batch * args.state * side * side) * 4 / BANDWIDTH,
                2 * numel * args.state / EXP_RATE) * 1e3
    quoted = QUOTED_2DMAMBA.get((side, dim)) if args.batch == 1 and args.state == 16 else None
    return [f"{side}x{side}", dim, f"{floor:.3f}", fmt(ours.get("fwd")),
            fmt(quoted[0]) if quoted else "-", ratio(quoted[0], "fwd") if quoted else "-",
            fmt(ours.get("bwd")), fmt(quoted[1]) if quoted else "-", ratio(quoted[1], "bwd") if quoted else "-",
            f"{ratio(quoted[0], 'fwd_graph')} / {ratio(quoted[1], 'bwd_graph')}" if quoted else "-",
            ratio("naive", "fwd"), ratio("naive", "fwd_bwd"), ratio("reference", "fwd_bwd"),
            ratio("scan1d", "fwd"), ratio("scan1d", "fwd_bwd"), ratio("naive", "fwd_peak")]


def print_table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


# Candidates for --tune: forward ones (the backward's parameters at their defaults) and backward
# ones; the best of each (time over 2DMamba's quoted time, summed over TUNE_SHAPES) are combined.
FWD_CANDIDATES = {
    "fwd x16 r128": dict(fwd_cols=16, fwd_maxnreg=128),
    "fwd x16": dict(fwd_cols=16, fwd_maxnreg=None),
    "fwd x32": dict(fwd_cols=32, fwd_maxnreg=None),
    "fwd x32 r168": dict(fwd_cols=32, fwd_maxnreg=168),
    "fwd x64 r168": dict(fwd_cols=64, fwd_maxnreg=168),
}
BWD_CANDIDATES = {
    "bwd 8x4, carries every 16 cols": dict(CH=8, CW=4, carry_cols=16),
    "bwd 8x4, carries every 8 cols": dict(CH=8, CW=4, carry_cols=8),
    "bwd 8x4, 2 warps": dict(CH=8, CW=4, bwd_warps=2),
    "bwd 4x8, carries every 16 cols": dict(CH=4, CW=8, carry_cols=16),
    "bwd 16x2, carries every 16 cols": dict(CH=16, CW=2, carry_cols=16),
}
TUNE_SHAPES = [(128, 128), (256, 512)]  # (grid side, dim), both with quoted 2DMamba times


def kernel_resources(module):
    """Registers and spills of every compiled kernel of the Triton module (diagnostic)."""
    lines = []
    for name in ("_row_carry_kernel", "_fwd_kernel", "_col_carry_kernel", "_bwd_kernel"):
        fn = getattr(module, name)
        try:
            caches = [entry[0] for entry in fn.device_caches.values()]
        except AttributeError:
            return ["(this Triton keeps no device_caches: no register report)"]
        for cache in caches:
            for compiled in cache.values():
                warps = getattr(compiled.metadata, "num_warps", "?")
                lines.append(f"{name}: warps {warps}, registers {compiled.n_regs}, spills {compiled.n_spills}")
    return lines


def run_tune(args):
    """Time the candidates at TUNE_SHAPES; return the default config with the best forward and
    the best backward parameters."""
    import dataclasses

    from mambapath.kernels.selective_scan_2d import triton_module

    tiled = triton_module(False)
    base = tiled.DEFAULT_CONFIG
    scores = {name: 0.0 for name in (*FWD_CANDIDATES, *BWD_CANDIDATES)}
    rows = []
    for side, dim in TUNE_SHAPES:
        inputs = make_inputs(1, dim, side, args.state)
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
        dout = torch.randn_like(inputs["u"])
        quoted_fwd, quoted_bwd = QUOTED_2DMAMBA[(side, dim)]
        for name, overrides in (*FWD_CANDIDATES.items(), *BWD_CANDIDATES.items()):
            fn = method_fn("ours", None, dataclasses.replace(base, **overrides))
            try:
                if name in FWD_CANDIDATES:
                    def run():
                        with torch.no_grad():
                            fn(**inputs, delta_softplus=True)
                    t, quoted = time_ms(run, min(10, MAX_REPS), min(30, MAX_REPS)), quoted_fwd
                else:
                    y = fn(**leaves, delta_softplus=True)
                    params = list(leaves.values())
                    t = time_ms(lambda: torch.autograd.grad(y, params, dout, retain_graph=True),
                                min(10, MAX_REPS), min(30, MAX_REPS))
                    quoted = quoted_bwd
                    del y
            except Exception as err:  # a candidate that does not compile or run here loses
                print(f"# {name}: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
                t, quoted = math.inf, 1.0
            scores[name] += t / quoted
            rows.append([f"{side}x{side}", dim, name, fmt(t), f"{t / quoted:.2f}"])
            print("| " + " | ".join(str(c) for c in rows[-1]) + " |", file=sys.stderr, flush=True)
    best_fwd = min(FWD_CANDIDATES, key=scores.get)
    best_bwd = min(BWD_CANDIDATES, key=scores.get)
    chosen = dataclasses.replace(base, **FWD_CANDIDATES[best_fwd], **BWD_CANDIDATES[best_bwd])
    print(f"\nTile candidates of ours, {torch.cuda.get_device_name()}: forward (no grad) or backward alone, "
          "ms and the ratio to 2DMamba's quoted time\n")
    print_table(["grid", "dim", "candidate", "ms", "/ 2DMamba (quoted)"], rows)
    print(f"\nchosen: {best_fwd} + {best_bwd} -> {chosen}\n" + "\n".join(kernel_resources(tiled)))
    return chosen


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[64, 128, 256, 512], help="grid sides (H = W)")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--state", type=int, default=16, help="N")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["ours", "reference", "naive", "scan1d"],
                        choices=["ours", "reference", "naive", "scan1d"])
    parser.add_argument("--tune", action="store_true",
                        help="first time tile candidates of ours, then run the table with the best")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_selective_scan_2d: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    run_table(args, run_tune(args) if args.tune else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
