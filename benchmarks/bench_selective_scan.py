"""Selective scan benchmark: our Triton kernels, the PyTorch reference and mamba-ssm's CUDA
kernel, forward and forward+backward, at whole-slide-image shapes (batch 1, long L).

Run on a GPU (all three backends in one run, on one device):

    python benchmarks/bench_selective_scan.py --out bench_selective_scan.txt [--grid targets]

and on the CPU, for the reference's memory at L = 1M, dim 64:

    python benchmarks/bench_selective_scan.py --cpu-reference

Timing: median of ``--reps`` runs (20) timed with CUDA events, after 3 warm-up runs, with the
L2 cache flushed (a 256 MiB write) before each timed run. Forward+backward times one forward
and one ``backward`` of <y, dy>. Peak memory is ``torch.cuda.max_memory_allocated`` during one
forward+backward, above what the inputs and dy already hold.

Host overhead: a timed call includes launching its kernels from Python. Where the GPU work is
short (L = 16k) that launch time, not the kernels, sets the time (our forward is three kernel
launches and a few tensor allocations: about 0.2 ms of CPU time on the benchmark machine, the
forward+backward about 0.8 ms; bench_launch_overhead.py measures it). The "graph" columns
therefore also time each call captured once in a CUDA graph (``torch.cuda.graph``, forward
under no_grad, forward+backward with the gradients) and replayed: the GPU's own time, for
Triton and mamba-ssm alike.

The call measured is a Mamba layer's: u, delta (1, dim, L); A (dim, N); B, C (1, N, L); D and
delta_bias (dim,); softplus on; no gate z unless ``--gate`` (the default grid) adds the rows
marked z. float32 unless ``--dtype bfloat16``.

Floors (the fastest any kernel could be, each derived from one resource):

* Bytes: a kernel must read every input once and write every output once. With e the size of
  an element, the forward moves e * L * (3 * dim + 2 * N) bytes (u, delta in; y out; B, C in)
  plus e * L * dim per extra tensor (z). The forward+backward moves the forward's bytes and,
  for the backward, reads u, delta, B, C, dy (and z) and writes du, ddelta, dB, dC (and dz):
  e * L * (5 * dim + 4 * N) more. Time >= bytes / HBM bandwidth, the bandwidth measured here
  as a device-to-device copy of 1 GiB (bytes read + bytes written, over the copy time).
* Exponentials: the recurrence needs exp(delta_t * A[d, n]) once per (channel, state,
  position): dim * N * L exponentials in the forward. A backward that does not store
  dim * N * L decays (which would cost far more bytes) recomputes them once: 2 * dim * N * L
  for forward+backward. Time >= count / exp rate, the rate measured here by a Triton kernel
  that does nothing but independent exp2 (the special-function unit's ex2, which tl.exp uses).

The floor is the larger of the two; "x floor" is measured time over floor (1.0 = at the floor).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ISSUE_MAMBA_MS = {  # mamba-ssm on the issue's H100, float32, median of 20: (dim, N, L) -> (fwd, fwd+bwd)
    (512, 16, 65536): (1.68, 6.32),
    (128, 16, 262144): (2.82, 9.30),
    (128, 16, 16384): (0.17, 0.63),
}


def target_grid():
    """(dim, N, L, gate) rows: the issue's target shapes (N 16, dim 128 and 512, L >= 16k) and a
    few around them, N = 64 once, and the gated rows."""
    rows = [(dim, 16, length, False) for dim in (128, 512) for length in (16384, 65536, 262144, 1048576)]
    rows += [(256, 16, 65536, False), (1024, 16, 65536, False), (512, 64, 65536, False)]
    rows += [(512, 16, 65536, True), (128, 16, 262144, True)]
    return rows


def default_grid():
    """(dim, N, L, gate) rows: the issue's WSI shapes."""
    rows = []
    for n_state in (16, 64):
        dims = (128, 256, 512, 1024) if n_state == 16 else (256, 512, 1024)
        lengths = (4096, 16384, 65536, 262144, 1048576) if n_state == 16 else (4096, 65536, 1048576)
        for dim in dims:
            for length in lengths:
                rows.append((dim, n_state, length, False))
    rows += [(512, 16, 65536, True), (128, 16, 262144, True)]
    return rows


def make_inputs(dim, n_state, length, gate, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dt)

    return dict(
        u=randn(1, dim, length), delta=randn(1, dim, length, scale=0.5),
        A=-torch.exp(randn(dim, n_state, scale=0.5, dt=torch.float32)),
        B=randn(1, n_state, length), C=randn(1, n_state, length),
        D=randn(dim, dt=torch.float32), delta_bias=randn(dim, scale=0.3, dt=torch.float32) - 1.0,
        z=randn(1, dim, length) if gate else None,
    )


def scan_call(backend, inputs):
    from mambapath.kernels.selective_scan import selective_scan, selective_scan_ref

    args = (inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    kwargs = dict(D=inputs["D"], z=inputs["z"], delta_bias=inputs["delta_bias"], delta_softplus=True)
    if backend == "reference":
        return selective_scan_ref(*args, **kwargs)
    return selective_scan(*args, backend=backend, **kwargs)


class Timer:
    def __init__(self, reps: int, warmup: int = 3):
        self.reps, self.warmup = reps, warmup
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")

    def __call__(self, fn, prepare=None, reps=None):
        reps = reps or self.reps
        for _ in range(self.warmup):
            if prepare:
                prepare()
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            if prepare:
                prepare()
            self.flush.fill_(1)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def measure_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").fill_(3)
    dst = torch.empty_like(src)
    timer = Timer(reps=10)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * (1 << 30) / (ms * 1e-3)


def measure_exp_rate() -> float:
    """exp2 per second, from a kernel of independent exp2 chains (8 per thread)."""
    import triton
    import triton.language as tl

    @triton.jit
    def exp_kernel(x_ptr, n_iter, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        for _ in range(n_iter):
            x = tl.exp2(-x)  # stays in (0.5, 1]: no overflow, no constant folding
        tl.store(x_ptr + offs, x)

    block, n_iter = 1024, 4096
    n_programs = 8 * torch.cuda.get_device_properties(0).multi_processor_count * 4
    x = torch.rand(n_programs * block, device="cuda")
    timer = Timer(reps=10)
    ms = timer(lambda: exp_kernel[(n_programs,)](x, n_iter, BLOCK=block, num_warps=4))
    return n_programs * block * n_iter / (ms * 1e-3)


def floors(dim, n_state, length, gate, elt, bandwidth, exp_rate):
    extra = dim if gate else 0
    fwd_bytes = elt * length * (3 * dim + 2 * n_state + extra)
    bwd_bytes = elt * length * (5 * dim + 4 * n_state + 2 * extra)
    exps = dim * n_state * length
    fwd = max(fwd_bytes / bandwidth, exps / exp_rate)
    fwd_bwd = max((fwd_bytes + bwd_bytes) / bandwidth, 2 * exps / exp_rate)
    return fwd * 1e3, fwd_bwd * 1e3


def bench_backend(backend, inputs, timer, reps):
    """(fwd ms, fwd+bwd ms, peak MiB) for one backend."""
    leaves = [t for t in inputs.values() if t is not None]

    def forward():
        with torch.no_grad():
            scan_call(backend, inputs)

    fwd = timer(forward, reps=reps)
    for t in leaves:
        t.requires_grad_(True)
    dy = torch.randn_like(inputs["u"])

    def clear():
        for t in leaves:
            t.grad = None

    def forward_backward():
        scan_call(backend, inputs).backward(dy)

    fwd_bwd = timer(forward_backward, prepare=clear, reps=reps)
    clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward_backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    clear()
    for t in leaves:
        t.requires_grad_(False)
    return fwd, fwd_bwd, peak


def bench_graphed(call, inputs, timer, reps):
    """(fwd ms, fwd+bwd ms) of ``call()`` (one scan over ``inputs``, returning its output)
    captured in a CUDA graph and replayed: the kernels' time on the GPU without the host's launch
    overhead. Warm-up runs on a side stream, as capture requires; the gradients are allocated by
    the captured backward (they start as None)."""
    leaves = [t for t in inputs.values() if t is not None]
    dy = torch.randn_like(inputs["u"])

    def clear():
        for t in leaves:
            t.grad = None

    def capture(fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
                clear()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph

    def forward():
        with torch.no_grad():
            call()

    graph = capture(forward)
    fwd = timer(graph.replay, reps=reps)
    del graph
    for t in leaves:
        t.requires_grad_(True)
    graph = capture(lambda: call().backward(dy))
    fwd_bwd = timer(graph.replay, reps=reps)
    del graph
    clear()
    for t in leaves:
        t.requires_grad_(False)
    torch.cuda.synchronize()
    return fwd, fwd_bwd


def mamba_available(marker: str | None, deadline: float) -> tuple[bool, str]:
    """Wait for a background build (its marker file) until the deadline, then try the import."""
    if marker:
        while not Path(marker).exists() and time.time() < deadline:
            time.sleep(5)
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
    except Exception as err:  # any import failure means: no mamba-ssm column
        return False, f"{type(err).__name__}: {err}"
    return True, "mamba-ssm " + __import__("importlib.metadata").metadata.version("mamba-ssm")


def fmt(value, spec=".3f"):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def run_gpu(args):
    dtype = getattr(torch, args.dtype)
    elt = torch.finfo(dtype).bits // 8
    device = torch.cuda.get_device_name(0)
    bandwidth = measure_bandwidth()
    exp_rate = measure_exp_rate()
    import triton

    from mambapath.kernels.selective_scan import triton_module, uses_many_states

    configs = {n: triton_module(False, uses_many_states(n)).default_config(n, False) for n in (16, 64)}
    header = [f"device: {device}; torch {torch.__version__}; triton {triton.__version__}; dtype {args.dtype}; "
              f"median of {args.reps}",
              f"measured: HBM copy {bandwidth / 1e12:.2f} TB/s, exp2 {exp_rate / 1e12:.2f} T/s",
              *(f"triton tiles for N={n} ({'chunk_many_states.py' if uses_many_states(n) else 'chunk.py'}): {c}"
                for n, c in configs.items())]
    print("\n".join(header), flush=True)
    grid = target_grid() if args.grid == "targets" else default_grid()
    if args.quick:
        grid = [r for r in grid if r[2] <= 65536 and r[0] <= 512]
    results = {}
    graphed = {}  # the same calls replayed from CUDA graphs (Triton and mamba-ssm)
    # our kernels and the reference first: they need no build
    for dim, n_state, length, gate in grid:
        inputs = make_inputs(dim, n_state, length, gate, dtype, "cuda")
        results[(dim, n_state, length, gate, "triton")] = bench_backend("triton", inputs, Timer(args.reps),
                                                                        args.reps)
        graphed[(dim, n_state, length, gate, "triton")] = bench_graphed(
            lambda: scan_call("triton", inputs), inputs, Timer(args.reps), args.reps)
        if dim * n_state * length <= args.reference_max_elements:
            results[(dim, n_state, length, gate, "reference")] = bench_backend("reference", inputs,
                                                                              Timer(3, warmup=1), 3)
        print(f"  done triton/reference dim={dim} N={n_state} L={length} gate={gate}", flush=True)
        del inputs
        torch.cuda.empty_cache()
    have_mamba, mamba_note = mamba_available(args.wait_mamba, args.deadline)
    print(f"mamba-ssm: {mamba_note}", flush=True)
    if have_mamba:
        for dim, n_state, length, gate in grid:
            if time.time() > args.deadline:
                mamba_note += "; stopped at the time limit"
                break
            inputs = make_inputs(dim, n_state, length, gate, dtype, "cuda")
            results[(dim, n_state, length, gate, "mamba_ssm")] = bench_backend("mamba_ssm", inputs,
                                                                               Timer(args.reps), args.reps)
            graphed[(dim, n_state, length, gate, "mamba_ssm")] = bench_graphed(
                lambda: scan_call("mamba_ssm", inputs), inputs, Timer(args.reps), args.reps)
            del inputs
            torch.cuda.empty_cache()

    lines = header + [f"mamba-ssm column: {mamba_note if have_mamba else 'not available (' + mamba_note + ')'}",
                      "speedup = mamba-ssm time / this backend's time; x floor = time / floor; "
                      "peak = MiB above the inputs during forward+backward; graph = the same call replayed "
                      "from a CUDA graph (no host launch overhead), graph speedup = mamba-ssm's graph time / "
                      "this backend's", ""]
    cols = ["dim", "N", "L", "z", "backend", "fwd ms", "fwd+bwd ms", "fwd speedup", "f+b speedup",
            "fwd x floor", "f+b x floor", "peak MiB", "mamba peak MiB", "graph fwd ms", "graph f+b ms",
            "graph fwd speedup", "graph f+b speedup"]
    rows = []
    for dim, n_state, length, gate in grid:
        floor_fwd, floor_fb = floors(dim, n_state, length, gate, elt, bandwidth, exp_rate)
        mamba = results.get((dim, n_state, length, gate, "mamba_ssm"))
        for backend in ("triton", "mamba_ssm", "reference", "issue: mamba-ssm"):
            if backend == "issue: mamba-ssm":
                quoted = ISSUE_MAMBA_MS.get((dim, n_state, length)) if not gate and args.dtype == "float32" else None
                if quoted is None or mamba is not None:
                    continue
                res = (quoted[0], quoted[1], None)
            else:
                res = results.get((dim, n_state, length, gate, backend))
            if res is None:
                continue
            fwd, fb, peak = res
            ref = mamba if mamba is not None else (
                (*ISSUE_MAMBA_MS[(dim, n_state, length)], None)
                if (dim, n_state, length) in ISSUE_MAMBA_MS and not gate and args.dtype == "float32" else None)
            rows.append([dim, n_state, length, "z" if gate else "", backend, fmt(fwd), fmt(fb),
                         fmt(ref[0] / fwd, ".2f") if ref else "-", fmt(ref[1] / fb, ".2f") if ref else "-",
                         fmt(fwd / floor_fwd, ".1f"), fmt(fb / floor_fb, ".1f"), fmt(peak, ".0f"),
                         fmt(mamba[2], ".0f") if mamba else "-", *graph_columns(graphed, dim, n_state, length, gate,
                                                                                 backend)])
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(cols)]
    lines.append("  ".join(str(c).rjust(w) for c, w in zip(cols, widths)))
    lines.extend("  ".join(str(v).rjust(w) for v, w in zip(r, widths)) for r in rows)
    table = "\n".join(lines)
    print(table, flush=True)
    if args.out:
        Path(args.out).write_text(table + "\n")


def graph_columns(graphed, dim, n_state, length, gate, backend):
    """graph fwd ms, graph f+b ms and their speedups over mamba-ssm's graph times ('-' where absent)."""
    own = graphed.get((dim, n_state, length, gate, backend))
    mamba = graphed.get((dim, n_state, length, gate, "mamba_ssm"))
    if own is None:
        return ["-"] * 4
    speed = [fmt(m / o, ".2f") if mamba else "-" for m, o in zip(mamba or (0, 0), own)]
    return [fmt(own[0]), fmt(own[1]), *speed]


def run_cpu_reference(args):
    """The reference at L = 1M, dim 64, N 16 on the CPU, in a fresh process: time and peak RSS."""
    if args.child:
        torch.set_num_threads(args.threads)
        from mambapath.kernels.selective_scan import selective_scan_ref

        length, dim, n_state = args.length, 64, 16
        inputs = make_inputs(dim, n_state, length, False, torch.float32, "cpu")
        start = time.time()
        if args.child == "forward":
            with torch.no_grad():
                y = selective_scan_ref(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
                                       D=inputs["D"], delta_bias=inputs["delta_bias"], delta_softplus=True)
        else:
            for t in inputs.values():
                if t is not None:
                    t.requires_grad_(True)
            y = selective_scan_ref(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
                                   D=inputs["D"], delta_bias=inputs["delta_bias"], delta_softplus=True)
            y.backward(torch.ones_like(y))
        elapsed = time.time() - start
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        held = sum(t.numel() * t.element_size() for t in inputs.values() if t is not None) / 2**30
        print(f"{args.child} L={length} dim={dim} N={n_state} threads={args.threads}: "
              f"{elapsed:.1f} s, peak RSS {rss:.2f} GiB (process, inputs {held:.2f} GiB included)", flush=True)
        return
    for mode in args.cpu_modes.split(","):
        subprocess.run([sys.executable, __file__, "--cpu-reference", "--child", mode, "--length", str(args.length),
                        "--threads", str(args.threads)], check=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--reference-max-elements", type=float, default=2**27,
                        help="time the reference only where dim * N * L is at most this (its Python loops are slow)")
    parser.add_argument("--quick", action="store_true", help="dim <= 512, L <= 64k only")
    parser.add_argument("--grid", choices=("all", "targets"), default="all",
                        help="all: the issue's WSI grid; targets: its target shapes and a few around them")
    parser.add_argument("--wait-mamba", help="marker file written when a background mamba-ssm build ends")
    parser.add_argument("--time-limit", type=float, default=1e9, help="seconds; mamba-ssm rows stop after it")
    parser.add_argument("--cpu-reference", action="store_true", help="measure the reference on the CPU instead")
    parser.add_argument("--cpu-modes", default="forward,forward_backward")
    parser.add_argument("--length", type=int, default=1 << 20)
    parser.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.deadline = time.time() + args.time_limit
    if args.cpu_reference:
        run_cpu_reference(args)
    elif not torch.cuda.is_available():
        parser.error("no CUDA GPU here; use --cpu-reference for the CPU measurement")
    else:
        run_gpu(args)


if __name__ == "__main__":
    main()
