"""Peak inference memory of MambaBack's streaming inference against sequence length.

    python benchmarks/bench_mambaback_memory.py                          # CPU, demo-sized model
    python benchmarks/bench_mambaback_memory.py --device cuda --preset paper --parallel-max 1000000

For each length (default 10k, 30k, 100k, 300k and 1M tiles) the model streams a sequence of
that many tiles at a fixed chunk size (``MambaBack.stream_sequence``: a forward pass over the
chunks, then a backward pass over them in reverse order). The tiles' features are made chunk
by chunk from their positions (a deterministic function of the tile index, as if read from
disk chunk by chunk), so nothing of size N is held by the benchmark itself: what is measured
is the model's working memory. (Ordering a real bag by its grid holds one int64 index per
tile, 8 MB per million tiles, on top of this; the bag's features are the reader's business.)

Memory measured:
- CPU: each length runs in a fresh subprocess; the peak resident set size (ru_maxrss) is read
  once the model is built (``before``), after a warm-up run over two chunks and after the
  measured run (``peak``). The table gives the peak, the working set (peak - before: what
  inference added to the process) and the growth over the warm-up. Most of the RSS is the
  torch libraries; the working set is the number to compare. glibc's malloc keeps freed large
  blocks in its heap once its dynamic mmap threshold has risen, which makes RSS high-water
  marks wander by tens of MiB between runs; the subprocesses therefore run with
  MALLOC_MMAP_THRESHOLD_=65536, so that every large tensor is mapped and unmapped and RSS
  follows the memory actually alive.
- CUDA: torch.cuda.max_memory_allocated during the stream, minus what was allocated before it
  (the weights), one process for all lengths.

``--parallel-max N`` also runs the parallel forward (training's path, under no_grad) for
lengths up to N, for contrast: its memory grows with the sequence. The table's last column
gives each streamed working set relative to the shortest length's; the target is within 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

PRESETS = {
    # the demo's sizes (config/config.yaml train.model_kwargs.mambaback)
    "demo": dict(dims=(32, 32), depths=(1, 1), d_state=4, headdim=16, attention_dim=16),
    # config/methods/mambaback.yaml
    "paper": dict(dims=(128, 128, 128), depths=(1, 1, 1), d_state=16, headdim=32),
}
DEFAULT_LENGTHS = (10_000, 30_000, 100_000, 300_000, 1_000_000)


def build_model(preset: str, in_dim: int, device: str, scan_backend: str = "auto"):
    from mambapath.models import create_model

    torch.manual_seed(0)
    model = create_model("mambaback", in_dim=in_dim, n_outputs=4, scan_backend=scan_backend, **PRESETS[preset])
    return model.to(device).eval()


def make_reader(in_dim: int, device: str):
    """read_chunk(start, end) -> (1, end - start, in_dim) features that depend on position only."""
    frequencies = torch.linspace(1e-4, 1e-2, in_dim, device=device)
    phases = torch.arange(in_dim, device=device, dtype=torch.float32)

    def read_chunk(start: int, end: int) -> torch.Tensor:
        position = torch.arange(start, end, device=device, dtype=torch.float32)
        return torch.sin(position[:, None] * frequencies + phases)[None]

    return read_chunk


def resolved_backend(device: str, backend: str) -> str:
    """Which 1D selective scan backend runs on ``device``, as the kernels package reports it."""
    from mambapath.kernels import selective_scan

    package = sys.modules[selective_scan.__module__]
    resolve = getattr(package, "resolve_backend", None)
    if resolve is None:
        return "reference (the only backend of selective_scan in this checkout)"
    return resolve(backend, torch.empty(1, 1, 1, device=device))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_child(args) -> None:
    """One CPU length in this process: print a JSON line."""
    torch.set_num_threads(args.threads)
    model = build_model(args.preset, args.in_dim, "cpu", args.scan_backend)
    read_chunk = make_reader(args.in_dim, "cpu")

    def run(length):
        if args.mode == "stream":
            return model.stream_sequence(read_chunk, length, args.chunk_size)
        return parallel_forward(model, read_chunk, length)

    before = rss_mib()
    run(2 * args.chunk_size)
    warm = rss_mib()
    start = time.perf_counter()
    logits = run(args.length)
    seconds = time.perf_counter() - start
    print(json.dumps({"length": args.length, "mode": args.mode, "before_mib": before, "warm_mib": warm,
                      "peak_mib": rss_mib(), "seconds": seconds, "finite": bool(torch.isfinite(logits).all())}))


@torch.no_grad()
def parallel_forward(model, read_chunk, length: int) -> torch.Tensor:
    x = model.stem(read_chunk(0, length))
    return model._head(model.forward_stack(x) + model.backward_stack(x.flip(1)))


def cpu_rows(args) -> list[dict]:
    rows = []
    for mode, lengths in (("stream", args.lengths), ("parallel", [n for n in args.lengths if n <= args.parallel_max])):
        for length in lengths:
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--length", str(length),
                   "--chunk-size", str(args.chunk_size), "--in-dim", str(args.in_dim), "--preset", args.preset,
                   "--threads", str(args.threads), "--scan-backend", args.scan_backend]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
            row = json.loads(out)
            row["working_mib"] = row["peak_mib"] - row["before_mib"]
            rows.append(row)
            print(f"  {mode} {length}: peak {row['peak_mib']:.1f} MiB, {row['seconds']:.1f} s", file=sys.stderr)
    return rows


def cuda_rows(args) -> list[dict]:
    model = build_model(args.preset, args.in_dim, "cuda", args.scan_backend)
    read_chunk = make_reader(args.in_dim, "cuda")
    model.stream_sequence(read_chunk, 2 * args.chunk_size, args.chunk_size)  # warm-up: kernels compiled
    rows = []
    for mode, lengths in (("stream", args.lengths), ("parallel", [n for n in args.lengths if n <= args.parallel_max])):
        for length in lengths:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            if mode == "stream":
                logits = model.stream_sequence(read_chunk, length, args.chunk_size)
            else:
                logits = parallel_forward(model, read_chunk, length)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            rows.append({"length": length, "mode": mode, "working_mib": peak, "peak_mib": peak, "seconds": seconds,
                         "finite": bool(torch.isfinite(logits).all())})
            print(f"  {mode} {length}: peak {peak:.1f} MiB, {seconds:.1f} s", file=sys.stderr)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--in-dim", type=int, default=1024)
    parser.add_argument("--parallel-max", type=int, default=0, help="parallel forward too, up to this length")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    parser.add_argument("--scan-backend", default="auto", help="selective_scan backend (auto, triton, reference)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("stream", "parallel"), default="stream", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    if args.chunk_size > min(args.lengths):
        print(f"note: chunk size {args.chunk_size} exceeds the shortest length {min(args.lengths)}; its one chunk is "
              "shorter than the others', so its working set is smaller: use a chunk size below every length")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"MambaBack streaming inference memory: preset {args.preset} {PRESETS[args.preset]}, "
          f"in_dim {args.in_dim}, chunk {args.chunk_size} tiles, device {device_name}, "
          f"torch {torch.__version__}, scan backend: {resolved_backend(args.device, args.scan_backend)}")
    rows = cuda_rows(args) if args.device == "cuda" else cpu_rows(args)

    from tabulate import tabulate

    base = next(r["working_mib"] for r in rows if r["mode"] == "stream")
    table = []
    for r in rows:
        table.append([r["mode"], f"{r['length']:,}", f"{r['peak_mib']:.1f}", f"{r['working_mib']:.1f}",
                      f"{r['peak_mib'] - r['warm_mib']:.1f}" if "warm_mib" in r else "",
                      f"{r['seconds']:.1f}", f"{r['length'] / r['seconds']:,.0f}",
                      f"{r['working_mib'] / base:.3f}" if r["mode"] == "stream" else "", "yes" if r["finite"] else "NO"])
    if args.device == "cpu":
        headers = ["path", "tiles", "peak RSS MiB", "working set MiB", "growth over warm-up MiB", "seconds",
                   "tiles/s", "working set / shortest", "finite"]
    else:
        headers = ["path", "tiles", "peak allocated MiB", "working set MiB", "", "seconds", "tiles/s",
                   "working set / shortest", "finite"]
    print(tabulate(table, headers=headers, tablefmt="github"))
    working = [r["working_mib"] for r in rows if r["mode"] == "stream"]
    spread = max(working) / min(working) - 1
    print(f"streamed working-set spread over {len(working)} lengths: {100 * spread:.1f}% (target: within 10%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "preset": args.preset, "chunk_size": args.chunk_size,
                       "in_dim": args.in_dim, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
