"""Training-step and inference time and peak memory of the Mamba MIL family on one bag.

    python benchmarks/bench_mamba_family_speed.py --device cuda --tiles 10000
    python benchmarks/bench_mamba_family_speed.py --device cpu --tiles 500 --sizes demo

Models: mamba_mil, bimamba_mil, srmamba_mil, mamba2d_mil, mambaback, built with the keyword
arguments of config/methods/<name>.yaml (``--sizes paper``) or with the demo's overrides of
config/config.yaml train.model_kwargs (``--sizes demo``). The bag: ``--tiles`` tiles of 1024-d
random features on a grid of about twice as many cells (60% tissue, random holes).

Per model: a training step (forward + backward + AdamW step) and an inference forward (eval
mode, no grad; MambaBack streams there), each the median of ``--repeats`` after one warm-up;
peak memory (CUDA: torch.cuda.max_memory_allocated over the step; CPU: not measured); which
scan backends ran. For MambaBack also the largest difference between its streamed and its
parallel logits on this device (float32).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mamba_mil", "bimamba_mil", "srmamba_mil", "mamba2d_mil", "mambaback")


def model_kwargs(name: str, sizes: str) -> dict:
    method = yaml.safe_load((ROOT / "config" / "methods" / f"{name}.yaml").read_text())
    kwargs = dict(method.get("kwargs") or {})
    if sizes == "demo":
        config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
        kwargs.update(((config.get("train") or {}).get("model_kwargs") or {}).get(name) or {})
    return kwargs


def make_bag(n_tiles: int, device: str, seed: int = 0):
    from mambapath.models import Bag

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_tiles / 0.6)))
    cells = rng.choice(side * side, size=n_tiles, replace=False)
    grid = torch.as_tensor(np.stack([cells // side, cells % side], axis=1))
    features = torch.randn(n_tiles, 1024, generator=torch.Generator().manual_seed(seed))
    return Bag.single(features, grid=grid).to(device)


class BackendLog(logging.Handler):
    """Collects the backends the scan functions report (they log each call at DEBUG level)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seen = set()

    def emit(self, record):
        message = record.getMessage()
        if "backend=" in message:
            self.seen.add(record.name.rsplit(".", 1)[-1] + ":" + message.split("backend=")[1].split()[0])


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (kernel compilation)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    from tabulate import tabulate

    from mambapath.models import create_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiles", type=int, default=10_000)
    parser.add_argument("--sizes", choices=("paper", "demo"), default="paper")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scan-backend", default="auto", help="backend of both scans (auto, triton, reference)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    backends = BackendLog()
    for name in ("mambapath.kernels.selective_scan", "mambapath.kernels.selective_scan_2d"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(backends)

    bag = make_bag(args.tiles, args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"Mamba MIL family, one bag of {args.tiles} tiles x 1024 features, {args.sizes} sizes, {device_name}, "
          f"torch {torch.__version__}")
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        backends.seen.clear()
        model = create_model(name, in_dim=1024, n_outputs=4, scan_backend=args.scan_backend,
                             **model_kwargs(name, args.sizes)).to(args.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def train_step():
            model.train()
            optimizer.zero_grad()
            loss = model(bag).logsumexp(-1).sum()
            loss.backward()
            optimizer.step()

        @torch.no_grad()
        def infer():
            model.eval()
            return model(bag)

        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step_s = timed(train_step, args.device, args.repeats)
        step_peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else float("nan")
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        infer_s = timed(infer, args.device, args.repeats)
        infer_peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else float("nan")
        stream_diff = ""
        if name == "mambaback":
            model.eval()
            with torch.no_grad():
                parallel = model.forward_parallel(bag)
                stream_diff = f"{(model.stream(bag, 1000) - parallel).abs().max().item():.1e}"
        n_params = sum(p.numel() for p in model.parameters())
        rows.append([name, f"{n_params / 1e6:.2f}M", f"{1000 * step_s:.0f}", f"{step_peak:.0f}",
                     f"{1000 * infer_s:.0f}", f"{infer_peak:.0f}", stream_diff, ", ".join(sorted(backends.seen))])
        del model, optimizer
    print(tabulate(rows, headers=["model", "params", "train step ms", "train peak MiB", "inference ms",
                                  "inference peak MiB", "|stream - parallel|", "scan backends"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
