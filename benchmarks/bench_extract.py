"""Tile feature extraction: the batched DataLoader pipeline beside a naive per-tile loop.

Makes a synthetic Aperio-style pyramidal slide (JPEG tiles, H&E-like texture), tiles all of
it, and measures on the same tiles, in one run:

- naive loop: one ``read_region`` (the pipeline's own ``read_tile``: same conversion and
  resize) and one model call (batch of 1) per tile, in one process;
- pipeline: ``mambapath.features.extract.extract_features`` end to end (DataLoader workers,
  batches, bf16 autocast + channels-last on a GPU, HDF5 write): the time it reports, from
  worker start to the finished file (building the network is left out, as in the naive loop);
- reading only: the same DataLoader without the model (the reading limit);
- model only: the encoder on batches already in memory (the compute limit).

Both paths use the same extractor, precision and device; the naive loop runs on the first
``--naive-tiles`` tiles (its rate does not depend on how many), the pipeline on all of them.
The features of the tiles both paths saw are compared and the difference printed.

    python benchmarks/bench_extract.py                          # small, CPU-sized defaults
    python benchmarks/bench_extract.py --width 32768 --height 24576 --naive-tiles 300 \\
        --batch-size 256 --num-workers 14                       # GPU machine
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

from mambapath.features.dataset import (
    TileDataset,
    collate_tiles,
    plan_tile_reads,
    read_tile,
    read_tiles_file,
)
from mambapath.features.extract import FeatureEncoder, extract_features, resolve_device, resolve_precision
from mambapath.features.extractors import create_extractor

TILE = 256  # TIFF tile edge


def texture_bank(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(n, size, size, 3) uint8 H&E-like patches: pink stroma, purple nuclei, some white space."""
    import cv2

    bank = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        eosin = np.array([235, 160, 200]) + rng.normal(0, 12, 3)
        field = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), 6)
        img = eosin[None, None, :] + 60 * field[..., None] * np.array([0.3, 1.0, 0.6])
        nuclei = np.zeros((size, size), np.uint8)
        for _ in range(rng.integers(5, 60)):
            centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
            cv2.ellipse(nuclei, centre, (int(rng.integers(3, 9)), int(rng.integers(3, 9))),
                        float(rng.uniform(0, 180)), 0, 360, 255, -1)
        nuclei = cv2.GaussianBlur(nuclei, (0, 0), 1.2).astype(np.float32)[..., None] / 255
        img = img * (1 - nuclei) + np.array([90, 50, 140]) * nuclei
        img += rng.normal(0, 6, img.shape)
        if rng.random() < 0.15:  # glass between tissue
            img = 0.25 * img + 0.75 * 245
        bank[i] = np.clip(img, 0, 255).astype(np.uint8)
    return bank


def write_synthetic_slide(path: Path, width: int, height: int, mpp: float, seed: int = 0, n_levels: int = 3) -> None:
    """A pyramidal TIFF OpenSlide reads as Aperio: one page per level (downsample 4), JPEG Q90 tiles."""
    import tifffile

    rng = np.random.default_rng(seed)
    bank = texture_bank(rng, 48, TILE)
    rows, cols = -(-height // TILE), -(-width // TILE)
    choice = rng.integers(0, len(bank), (rows, cols))
    description = (
        f"Aperio Image Library v12.0.0 \n {width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) JPEG/RGB Q=90"
        f"|AppMag = {10 / mpp:g}|MPP = {mpp}"
    )
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(n_levels):
            block = TILE // 4**level
            small = bank if level == 0 else np.stack(
                [np.asarray(Image.fromarray(t).resize((block, block), Image.Resampling.BILINEAR)) for t in bank]
            )
            # (rows, cols, block, block, 3) -> (rows * block, cols * block, 3)
            image = small[choice].transpose(0, 2, 1, 3, 4).reshape(rows * block, cols * block, 3)
            image = image[: height // 4**level, : width // 4**level]
            tif.write(
                image, tile=(TILE, TILE), compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                description=description if level == 0 else None, metadata=None,
                subfiletype=0 if level == 0 else 1, maxworkers=os.cpu_count(),
            )


def write_full_grid_tiles(path: Path, width: int, height: int, level0_mpp: float, target_mpp: float,
                          patch_size: int, limit: int | None = None) -> int:
    """Every tile of the slide on a raster grid (no tissue filter: all tiles are read)."""
    patch_size_level0 = int(round(patch_size * target_mpp / level0_mpp))
    rows, cols = height // patch_size_level0, width // patch_size_level0
    grid = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    grid = grid[:limit] if limit else grid
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=(grid[:, ::-1] * patch_size_level0).astype(np.int64))
        f.create_dataset("grid", data=grid.astype(np.int64))
        f.attrs.update(patch_size=patch_size, patch_size_level0=patch_size_level0, level0_mpp=level0_mpp,
                       target_mpp=target_mpp, magnification=10 / target_mpp, overlap=0, scan_order="raster",
                       slide_id="bench", mpp_source="slide-mpp", status="ok")
    return len(grid)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def naive_loop(encoder: FeatureEncoder, slide_path: Path, tiles, plan, n: int) -> tuple[float, np.ndarray]:
    """One read_region and one model call per tile; returns (seconds, features (n, D))."""
    import openslide

    slide = openslide.OpenSlide(str(slide_path))
    rows = []

    def one(x, y):
        pixels = torch.from_numpy(read_tile(slide, x, y, plan, slide_path))[None]  # (1, H, W, 3) uint8
        return encoder(pixels).cpu().numpy()[0]

    one(*tiles.coords[-1])  # warm-up on a tile outside the timed ones
    sync(encoder.device)
    start = time.perf_counter()
    for x, y in tiles.coords[:n]:
        rows.append(one(x, y))
    sync(encoder.device)
    seconds = time.perf_counter() - start
    slide.close()
    return seconds, np.stack(rows)


def reading_only(slide_path: Path, tiles, plan, batch_size: int, num_workers: int) -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(TileDataset(slide_path, tiles.coords, plan), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=collate_tiles, prefetch_factor=4 if num_workers else None)
    start = time.perf_counter()
    for _, pixels, error in loader:
        assert not error, error
    return time.perf_counter() - start


def model_only(encoder: FeatureEncoder, input_size: int, batch_size: int, budget_s: float = 3.0) -> tuple[int, float]:
    """(tiles, seconds) of the encoder on one batch held in (pinned) memory, for about budget_s."""
    pixels = torch.randint(0, 256, (batch_size, input_size, input_size, 3), dtype=torch.uint8)
    if encoder.device.type == "cuda":
        pixels = pixels.pin_memory()
    encoder(pixels)
    sync(encoder.device)
    start, n_batches = time.perf_counter(), 0
    while n_batches < 50 and (n_batches == 0 or time.perf_counter() - start < budget_s):
        encoder(pixels).cpu()
        n_batches += 1
    sync(encoder.device)
    return n_batches * batch_size, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=6144, help="level-0 slide width in pixels")
    p.add_argument("--height", type=int, default=4096)
    p.add_argument("--level0-mpp", type=float, default=0.25, help="slide scan resolution (0.25 = 40x)")
    p.add_argument("--target-mpp", type=float, default=0.5, help="tile resolution (0.5 = 20x)")
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--naive-tiles", type=int, default=24, help="tiles timed in the naive loop")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--workdir", default=None, help="where the slide and outputs go (default: a temp folder)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Speed does not depend on the weights: random init, without its warning on every build.
    logging.getLogger("mambapath.features.extractors").setLevel(logging.ERROR)
    from tabulate import tabulate

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_extract_"))
    workdir.mkdir(parents=True, exist_ok=True)
    slide_path, tiles_path = workdir / "bench.tiff", workdir / "bench_tiles.h5"
    start = time.perf_counter()
    write_synthetic_slide(slide_path, args.width, args.height, args.level0_mpp)
    n_tiles = write_full_grid_tiles(tiles_path, args.width, args.height, args.level0_mpp, args.target_mpp, args.patch_size)
    print(f"slide {args.width}x{args.height} at {args.level0_mpp} mpp ({slide_path.stat().st_size / 2**20:.0f} MiB), "
          f"{n_tiles} tiles of {args.patch_size} px at {args.target_mpp} mpp; made in {time.perf_counter() - start:.1f} s")
    slide_path.read_bytes()  # into the page cache, so neither path pays the first disk read

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    encoder = FeatureEncoder(create_extractor("resnet50_trunc", seed=0), device, precision)
    tiles = read_tiles_file(tiles_path)
    import openslide

    with openslide.OpenSlide(str(slide_path)) as slide:
        plan = plan_tile_reads(slide, tiles)
    n_naive = min(args.naive_tiles, n_tiles - 1)

    # Warm-up of the pipeline (CUDA context, cuDNN autotuning) on a few batches, not timed.
    warm_tiles = workdir / "warm_tiles.h5"
    write_full_grid_tiles(warm_tiles, args.width, args.height, args.level0_mpp, args.target_mpp, args.patch_size,
                          limit=2 * args.batch_size)
    kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
              precision=args.precision, progress=False)
    extract_features(slide_path, warm_tiles, workdir / "warm.h5", **kw)

    naive_s, naive_features = naive_loop(encoder, slide_path, tiles, plan, n_naive)
    pipe = extract_features(slide_path, tiles_path, workdir / "features.h5", **kw)
    read_s = reading_only(slide_path, tiles, plan, args.batch_size, args.num_workers)
    model_tiles, model_s = model_only(encoder, plan.input_size, args.batch_size)

    with h5py.File(workdir / "features.h5", "r") as f:
        pipe_features = f["features"][:n_naive]
    rel_diff = float(np.abs(pipe_features - naive_features).max() / np.abs(naive_features).max())

    naive_rate, pipe_rate = n_naive / naive_s, n_tiles / pipe["seconds"]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "-"
    print(f"device {device} ({gpu}), precision {precision}, CPUs {os.cpu_count()}, torch {torch.__version__}, "
          f"python {platform.python_version()}; read level {plan.level} ({plan.level_mpp:g} mpp, {plan.read_size} px)"
          f" -> {plan.input_size} px; batch {args.batch_size}, workers {args.num_workers}")
    table = [
        ["naive loop (read_region + model per tile)", n_naive, f"{naive_s:.2f}", f"{naive_rate:.1f}", "1.0"],
        ["pipeline (DataLoader workers, batched, end to end)", n_tiles, f"{pipe['seconds']:.2f}", f"{pipe_rate:.1f}",
         f"{pipe_rate / naive_rate:.1f}"],
        ["  reading only (same DataLoader, no model)", n_tiles, f"{read_s:.2f}", f"{n_tiles / read_s:.1f}",
         f"{n_tiles / read_s / naive_rate:.1f}"],
        ["  model only (batches in memory)", model_tiles, f"{model_s:.2f}", f"{model_tiles / model_s:.1f}",
         f"{model_tiles / model_s / naive_rate:.1f}"],
    ]
    print(tabulate(table, headers=["path", "tiles", "seconds", "tiles/s", "x naive"], tablefmt="github"))
    print(f"pipeline vs naive features on the first {n_naive} tiles: max |diff| / max |feature| = {rel_diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
