"""Pixel-Mamba training step on whole-slide-sized inputs: peak GPU memory and seconds per slide.

    python benchmarks/bench_pixel_mamba.py                       # CUDA, 6M and 21M, 1M / 5M / 20M pixels
    python benchmarks/bench_pixel_mamba.py --configs 6m --pixels 20000000 40000000
    python benchmarks/bench_pixel_mamba.py --device cpu --configs tiny --pixels 20000 --window 16   # smoke test

One step = the forward pass of one slide image, a cross-entropy loss on 4 classes (the staging
head) and the backward pass; no optimiser step (AdamW's update is a few elementwise passes over
21M parameters, nothing next to the step). The image is random RGB in [0, 1] of 5:4 aspect
(e.g. 5000 x 4000 = 20 million pixels, a typical TCGA diagnostic slide at 2.5x); every region is
kept (no tissue dropping), so these are worst cases for a slide of that size: real slides drop
their glass. By default the step runs as training runs on the GPU: bf16 autocast, activation
checkpointing of every Mamba Block (``--no-checkpointing`` and ``--fp32`` switch them off).

Per (configuration, size): one warm-up step (Triton compiles its kernels for every layer width
on first use), then ``--repeats`` timed steps; seconds per slide is their median (device
synchronised before each clock read); peak memory is ``torch.cuda.max_memory_allocated`` over
the timed steps, weights and gradients included. A size that does not fit is reported as OOM
and the next one still runs. The table goes to stdout (and ``--out`` as CSV); the last columns
give memory and time relative to the smallest size that ran, to show how both grow.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

CONFIGS = {"6m": "pixel_mamba_6m", "21m": "pixel_mamba_21m", "tiny": "pixel_mamba_tiny",
           "fixed": "pixel_mamba_fixed"}
DEFAULT_PIXELS = (1_000_000, 5_000_000, 20_000_000)


def image_size(pixels: int) -> tuple[int, int]:
    """(height, width) of a 4:5 image with at least ``pixels`` pixels (rounded up to 8 px)."""
    height = math.ceil(math.sqrt(pixels * 4 / 5) / 8) * 8
    width = math.ceil(pixels / height / 8) * 8
    return height, width


def run_one(name: str, height: int, width: int, args) -> dict:
    from mambapath.models import create_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(name, in_dim=3, n_outputs=4, scan_window=args.window, alpha=args.alpha,
                         checkpointing=not args.no_checkpointing, bf16=not args.fp32).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator(device=device).manual_seed(1)
    image = torch.rand(1, 3, height, width, device=device, generator=generator)
    target = torch.tensor([2], device=device)
    with torch.no_grad():
        tokens, _ = model.serialize(image)
    n_regions, n_tokens = tokens.shape[0], tokens.shape[0] * tokens.shape[1]
    del tokens

    def step():
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(image), target)
        loss.backward()
        return float(loss.detach())

    row = {"config": name, "height": height, "width": width, "pixels": height * width, "regions": n_regions,
           "tokens": n_tokens, "params": n_params}
    try:
        start = time.perf_counter()
        step()
        _sync(device)
        row["warmup_s"] = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.repeats):
            _sync(device)
            start = time.perf_counter()
            loss = step()
            _sync(device)
            times.append(time.perf_counter() - start)
        row["s_per_slide"] = statistics.median(times)
        row["loss"] = loss
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError as exc:
        row.update(status="OOM", s_per_slide=float("nan"), peak_gib=float("nan"), error=str(exc).splitlines()[0])
    finally:
        del model, image
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["6m", "21m"], choices=sorted(CONFIGS))
    parser.add_argument("--pixels", nargs="+", type=int, default=list(DEFAULT_PIXELS),
                        help="input sizes in pixels (images of 4:5 aspect)")
    parser.add_argument("--window", type=int, default=224, help="scan window (px)")
    parser.add_argument("--alpha", type=float, default=0.8, help="Region Fusion alpha")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--out", default=None, help="CSV of the table")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu for a smoke test", file=sys.stderr)
        return 2

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# Pixel-Mamba train step: {device_name}, torch {torch.__version__}, window {args.window}, "
          f"alpha {args.alpha}, bf16 {not args.fp32}, checkpointing {not args.no_checkpointing}", flush=True)
    rows = []
    for config in args.configs:
        base = None
        for pixels in args.pixels:
            height, width = image_size(pixels)
            row = run_one(CONFIGS[config], height, width, args)
            if row["status"] == "ok":
                base = base or row
                row["mem_x"] = row["peak_gib"] / base["peak_gib"] if base["peak_gib"] == base["peak_gib"] else float("nan")
                row["time_x"] = row["s_per_slide"] / base["s_per_slide"]
            rows.append(row)
            print(f"  {config} {height}x{width}: {row['status']} {row['s_per_slide']:.3f} s, "
                  f"{row['peak_gib']:.2f} GiB", flush=True)

    header = (f"| config | image (H x W) | Mpixels | regions | tokens (M) | peak GiB | s / slide | "
              f"mem vs smallest | time vs smallest |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        mem_x, time_x = r.get("mem_x", float("nan")), r.get("time_x", float("nan"))
        lines.append(f"| {r['config']} | {r['height']} x {r['width']} | {r['pixels'] / 1e6:.1f} | {r['regions']} | "
                     f"{r['tokens'] / 1e6:.2f} | {r['peak_gib']:.2f} | {r['s_per_slide']:.3f} | "
                     f"{mem_x:.2f}x | {time_x:.2f}x |" if r["status"] == "ok" else
                     f"| {r['config']} | {r['height']} x {r['width']} | {r['pixels'] / 1e6:.1f} | {r['regions']} | "
                     f"{r['tokens'] / 1e6:.2f} | OOM | - | - | - |")
    print("\n".join(lines))
    if args.out:
        import pandas as pd

        pd.DataFrame(rows).to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
