"""``mambapath extract``: tile features of one slide into a features HDF5.

Reads the tiles file written by ``mambapath tile``, reads each tile from the slide through a
DataLoader (workers, each with its own OpenSlide handle), runs the extractor in batches on the
CPU or a CUDA GPU (bf16 autocast and channels-last there) and writes, atomically::

    features  (N, D) float32
    coords    (N, 2) int64   level-0 x, y   (as in the tiles file)
    grid      (N, 2) int64   row, col       (as in the tiles file)
    attrs     every tiles-file attribute, plus extractor, weights_sha256 ("random-init" when
              no weights file was given), mambapath_version, config_hash and how tiles were read

A slide with no tiles (``status = no_tissue``) gets a features file with N = 0: a recorded
skip, not an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import __version__
from ..errors import ConfigError, SlideError
from ..io import atomic_path, config_hash
from ..slide import open_slide
from .dataset import (
    RESAMPLING,
    TileDataset,
    TileReadPlan,
    TilesFile,
    collate_tiles,
    plan_tile_reads,
    read_tiles_file,
)
from .extractors import Extractor, create_extractor, list_extractors

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when a GPU is visible, else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("features.device: cuda was asked for but no CUDA GPU is visible; set device to auto or cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"features.device: {device!r} is not one of auto, cpu, cuda")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 autocast on a GPU, float32 on the CPU (CPU bf16 is slower and coarser)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ConfigError(f"features.precision: {precision!r} is not one of auto, bf16, fp32")
    return precision


@dataclass
class FeatureEncoder:
    """An extractor placed on a device: uint8 tiles (B, H, W, 3) -> float32 features (B, D)."""

    extractor: Extractor
    device: torch.device
    precision: str

    def __post_init__(self):
        model = self.extractor.model.to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.model = model.eval()
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(self.extractor.mean, device=self.device).view(shape)
        self._std = torch.tensor(self.extractor.std, device=self.device).view(shape)

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device, non_blocking=True)  # (B, H, W, 3) uint8
        # NHWC memory viewed as NCHW is channels-last already, which cuDNN prefers.
        x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)
        x = (x - self._mean) / self._std
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            features = self.model(x)  # (B, D)
        return features.float()


def feature_config_hash(extractor: Extractor, tiles: TilesFile, plan: TileReadPlan, precision: str) -> str:
    """Hash of every setting that changes the features (not batch size, workers or device)."""
    return config_hash(
        {
            **extractor.provenance(),
            "precision": precision,
            "input_size": plan.input_size,
            "resample": RESAMPLING,
            "tiling": {k: tiles.attrs.get(k) for k in ("target_mpp", "patch_size", "patch_size_level0", "overlap", "level0_mpp")},
        }
    )


def extract_features(
    slide_path: str | Path,
    tiles_path: str | Path,
    out_path: str | Path,
    extractor: str = "resnet50_trunc",
    weights: str | Path | None = None,
    seed: int = 0,
    model_kwargs: dict | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
) -> dict:
    """Extract the features of one slide's tiles and write the features HDF5; returns a summary."""
    slide_path, out_path = Path(slide_path), Path(out_path)
    tiles = read_tiles_file(tiles_path)
    torch_device = resolve_device(device)
    used_precision = resolve_precision(precision, torch_device)
    ext = create_extractor(extractor, weights=weights, seed=seed, **(model_kwargs or {}))
    slide_id = tiles.slide_id

    slide = open_slide(slide_path)
    try:
        plan = plan_tile_reads(slide, tiles, ext.input_size)
    finally:
        slide.close()
    log.info(
        "%s: %d tiles, read at level %d (%.3f mpp, %d px) -> %d px; %s on %s (%s), batch %d, %d workers",
        slide_id, len(tiles), plan.level, plan.level_mpp, plan.read_size, plan.input_size,
        ext.name, torch_device, used_precision, batch_size, num_workers,
    )
    if len(tiles) == 0:
        log.warning("%s: tiles file has no tiles (status %s); writing an empty features file (recorded skip)",
                    slide_id, tiles.attrs.get("status", "?"))

    encoder = FeatureEncoder(ext, torch_device, used_precision)
    attrs = {
        **tiles.attrs,
        **ext.provenance(),
        "mambapath_version": __version__,
        "torch_version": str(torch.__version__),
        "config_hash": feature_config_hash(ext, tiles, plan, used_precision),
        "precision": used_precision,
        "device": torch_device.type,
        "read_level": plan.level,
        "read_level_mpp": plan.level_mpp,
        "read_size": plan.read_size,
        "input_size": plan.input_size,
        "n_tiles": len(tiles),
        "slide_id": slide_id,
        "slide_file": slide_path.name,
    }
    start = time.perf_counter()
    with atomic_path(out_path) as tmp:
        with h5py.File(tmp, "w") as f:
            features = f.create_dataset("features", shape=(len(tiles), ext.feature_dim), dtype="float32")
            f.create_dataset("coords", data=tiles.coords)
            f.create_dataset("grid", data=tiles.grid)
            if len(tiles):
                for start_row, batch in iter_feature_batches(
                    encoder, slide_path, tiles, plan, batch_size, num_workers, progress
                ):
                    features[start_row : start_row + len(batch)] = batch
            for key, value in attrs.items():
                f.attrs[key] = value
    seconds = time.perf_counter() - start
    log.info("%s: wrote %s (%d x %d) in %.1f s (%.1f tiles/s)", slide_id, out_path, len(tiles),
             ext.feature_dim, seconds, len(tiles) / max(seconds, 1e-9))
    return {"slide_id": slide_id, "n_tiles": len(tiles), "seconds": seconds, "out": str(out_path), **attrs}


def iter_feature_batches(encoder: FeatureEncoder, slide_path, tiles: TilesFile, plan: TileReadPlan,
                         batch_size: int, num_workers: int, progress: bool = True):
    """Yield (first row, features (B, D) float32 numpy) in tile order."""
    dataset = TileDataset(slide_path, tiles.coords, plan)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_tiles,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
    )
    bar = tqdm(total=len(dataset), unit="tile", desc=tiles.slide_id, disable=not progress, mininterval=2.0)
    try:
        for indices, pixels, error in loader:
            if error:
                raise SlideError(
                    f"slide {tiles.slide_id}: {error} (no features file written)"
                )
            yield int(indices[0]), encoder(pixels).cpu().numpy()
            bar.update(len(indices))
    finally:
        bar.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", "--tiles", dest="tiles", required=True, help="tiles HDF5 written by `mambapath tile`")
    parser.add_argument("--slide", required=True, help="the slide file the tiles were cut from")
    parser.add_argument("--out", required=True, help="features HDF5 to write")
    parser.add_argument("--extractor", default="resnet50_trunc",
                        help=f"tile encoder: {', '.join(list_extractors())}")
    parser.add_argument("--weights", default="",
                        help="local weights file (.pth/.pt/.bin state_dict or .safetensors); empty = random init")
    parser.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for the encoder (timm ones)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init when no weights are given")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes reading tiles")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="auto = bf16 autocast on a GPU, fp32 on the CPU")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        model_kwargs = json.loads(args.model_kwargs or "{}")
    except json.JSONDecodeError as exc:
        raise ConfigError(f"features.model_kwargs: --model-kwargs is not valid JSON ({exc})") from exc
    if not isinstance(model_kwargs, dict):
        raise ConfigError("features.model_kwargs: must be a mapping of keyword arguments")
    if args.batch_size < 1 or args.num_workers < 0:
        raise ConfigError("features.batch_size must be >= 1 and features.num_workers >= 0")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    extract_features(
        slide_path=args.slide,
        tiles_path=args.tiles,
        out_path=args.out,
        extractor=args.extractor,
        weights=args.weights or None,
        seed=args.seed,
        model_kwargs=model_kwargs,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        precision=args.precision,
        progress=not args.no_progress,
    )
    return 0
