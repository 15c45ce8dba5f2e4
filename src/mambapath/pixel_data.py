"""Slide images for pixel models (Pixel-Mamba): read at a magnification, cached, served to training.

Pixel models read the whole slide at a low magnification (2.5x by default, 4 um/px), one token
per pixel, instead of tile features. The magnification is a physical scale: the slide is read
from the coarsest pyramid level at least as fine as the target mpp and resampled to exactly
that mpp (``mambapath.segment.read_at_mpp``), never taken as "pyramid level k".

``mambapath pixels`` (one job per slide and magnification, rules/pixel.smk) writes into
``results/<cohort>/pixels/<magnification>x/``::

    <slide>.png         the slide at the target mpp, RGB
    <slide>.tissue.png  the tissue mask of the segment stage resampled to the same size (255 = tissue)
    <slide>.json        level-0 mpp and its source, pyramid level read, size, tissue fraction,
                        segmentation status; written last, so its presence means the PNGs are whole

``make_pixel_dataset`` (the interface mambapath.bags expects for ``input_kind == "pixels"``)
serves one :class:`~mambapath.models.pixel_mamba.SlideImage` per slide: the image as a float
tensor (1, 3, H, W) in [0, 1] and, when the method drops tissue-free regions
(``kwargs.drop_background``), the tissue mask (1, H, W). With ``pixel.cache: true`` (the
default) it reads the files above and a missing one is an error that names the rule to run;
with ``cache: false`` every train job reads the slides themselves (and the segment stage's
masks) at the method's magnification.

The settings come from the method yaml's ``kwargs`` (merged with ``train.model_kwargs``):
``magnification``, ``drop_background``, ``scan_window``, ``region_min_tissue``; absent ones
take the defaults of :class:`~mambapath.models.pixel_mamba.PixelMamba`. Slides whose
segmentation found no tissue are dropped and recorded (as the feature datasets drop slides
without tiles), so Pixel-Mamba and the MIL methods are evaluated on the same slides.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: images are held in memory (uint8) when all of them together are smaller than this
PRELOAD_MAX_BYTES = 2 << 30
#: the method kwargs that are data settings, besides being recorded by the model
DATA_KWARGS = ("magnification", "drop_background", "scan_window", "region_min_tissue")


def magnification_tag(magnification: float) -> str:
    """Folder name of a magnification: 2.5 -> '2.5x', 0.3125 -> '0.3125x'."""
    return f"{float(magnification):g}x"


def pixel_settings(method: dict) -> dict:
    """The data settings of a pixel method: its kwargs, else the model's defaults."""
    from .models.pixel_mamba import PixelMamba

    defaults = {k: p.default for k, p in inspect.signature(PixelMamba.__init__).parameters.items()
                if k in DATA_KWARGS}
    kwargs = method.get("kwargs") or {}
    settings = {k: kwargs.get(k, defaults[k]) for k in DATA_KWARGS}
    if not settings["magnification"] or float(settings["magnification"]) <= 0:
        raise ConfigError(f"method {method.get('name', '?')!r}: kwargs.magnification must be a positive "
                          f"magnification (e.g. 2.5), got {settings['magnification']!r}")
    return settings


def pixel_dir(config: dict, magnification: float) -> Path:
    """results/<cohort>/pixels/<magnification>x: where ``mambapath pixels`` writes."""
    from .config import load_cohort

    return Path(config["results"]) / load_cohort(config).name / "pixels" / magnification_tag(magnification)


def train_input_files(method: str, config: dict, results: str, slide_ids: list[str], features: list[str]) -> list[str]:
    """What the train job of ``method`` reads (the Snakemake train rule's input): ``features``
    for feature methods; for pixel methods the image summaries at the method's magnification
    (``pixel.cache`` true, made by the pixels rule), else the segment summaries (the train job
    then reads the slides itself). ``results`` is results/<cohort>."""
    from .train import load_method

    spec = load_method(method, config)
    if spec["input_kind"] != "pixels":
        return list(features)
    if (config.get("pixel") or {}).get("cache", True):
        tag = magnification_tag(pixel_settings(spec)["magnification"])
        return [f"{results}/pixels/{tag}/{slide_id}.json" for slide_id in slide_ids]
    return [f"{results}/segment/{slide_id}/summary.json" for slide_id in slide_ids]


def cache_paths(out_dir: str | os.PathLike, slide_id: str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {"image": out_dir / f"{slide_id}.png", "tissue": out_dir / f"{slide_id}.tissue.png",
            "summary": out_dir / f"{slide_id}.json"}


# Reading ---------------------------------------------------------------------------------------


def read_slide_at_magnification(slide_path, magnification: float, fallback_mpp: float | None = None):
    """The whole slide as RGB uint8 (H, W, 3) at ``magnification`` (10 um/px at 1x), and a dict
    of what was read (level-0 mpp and its source, level, downsample)."""
    from .segment import read_at_mpp
    from .slide import magnification_to_mpp, open_slide, resolve_mpp

    target_mpp = magnification_to_mpp(magnification)
    slide = open_slide(slide_path)
    try:
        scale = resolve_mpp(slide, slide_path, fallback_mpp)
        if target_mpp < scale.mpp * 0.99:
            raise DataError(f"{slide_path}: asked for {magnification:g}x ({target_mpp:g} um/px) but the slide's "
                            f"finest level is {scale.mpp:g} um/px; choose a magnification at or below "
                            f"{10 / scale.mpp:g}x")
        rgb, level, downsample = read_at_mpp(slide, scale.mpp, target_mpp, slide_path)
        level0 = slide.dimensions
    finally:
        slide.close()
    info = {"slide_path": str(slide_path), "level0_mpp": scale.mpp, "mpp_source": scale.source,
            "objective_power": scale.objective_power, "magnification": float(magnification),
            "target_mpp": target_mpp, "level_used": int(level), "downsample": [float(d) for d in downsample],
            "level0_width": int(level0[0]), "level0_height": int(level0[1]),
            "height": int(rgb.shape[0]), "width": int(rgb.shape[1])}
    return rgb, info


def tissue_mask_at(segment_dir, height: int, width: int) -> tuple[np.ndarray, dict]:
    """The segment stage's tissue mask resampled (nearest) to ``height`` x ``width``. Both cover
    the whole level-0 extent of the slide, so resizing aligns them."""
    import cv2

    from .segment import load_segmentation

    mask, summary = load_segmentation(segment_dir)
    resized = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    return resized, summary


def write_pixel_cache(slide_path, slide_id: str, magnification: float, segment_dir, out_dir,
                      fallback_mpp: float | None = None) -> dict:
    """Read one slide at ``magnification``, resample its tissue mask, write the three files."""
    import cv2

    from . import __version__
    from .io import atomic_path, write_json

    rgb, info = read_slide_at_magnification(slide_path, magnification, fallback_mpp)
    height, width = rgb.shape[:2]
    tissue, seg = tissue_mask_at(segment_dir, height, width)
    paths = cache_paths(out_dir, slide_id)
    status = seg.get("status", "ok")
    summary = {**info, "slide_id": slide_id, "status": status, "tissue_fraction": float(tissue.mean()),
               "segment_dir": str(segment_dir), "mambapath_version": __version__}
    written = []
    try:
        for key, image in (("image", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)), ("tissue", tissue.astype(np.uint8) * 255)):
            with atomic_path(paths[key]) as tmp:
                if not cv2.imwrite(str(tmp), image):
                    raise DataError(f"{paths[key]}: could not be written (disk full or too large for PNG?)")
            written.append(paths[key])
        write_json(paths["summary"], summary)  # last: its presence means the PNGs are complete
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    log.info("%s: %d x %d px at %gx (level %d, %s mpp %.3f), tissue %.1f%% (%s)", slide_id, width, height,
             magnification, info["level_used"], info["mpp_source"], info["level0_mpp"], 100 * summary["tissue_fraction"],
             status)
    return summary


def _read_png(path: Path, grayscale: bool = False) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if grayscale else cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{path}: cannot be read as a PNG; delete it and its .json and re-run the pixels rule")
    return image if grayscale else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


# Dataset ---------------------------------------------------------------------------------------


class PixelSlideDataset(torch.utils.data.Dataset):
    """One SlideImage per slide at one magnification (see the module docstring)."""

    input_kind = "pixels"
    input_dim = 3

    def __init__(self, slides, magnification: float, cache_dir: str | os.PathLike | None = None,
                 segment_root: str | os.PathLike | None = None, drop_background: bool = True,
                 scan_window: int = 224, region_min_tissue: float = 0.0, fallback_mpp: float | None = None,
                 preload: bool | None = None):
        from .io import read_json
        from .serialize import region_tissue_fraction

        self.magnification = float(magnification)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.segment_root = None if segment_root is None else Path(segment_root)
        self.drop_background = drop_background
        self.scan_window = int(scan_window)
        self.region_min_tissue = float(region_min_tissue)
        self.fallback_mpp = fallback_mpp
        self.dropped: dict[str, str] = {}
        self.slide_ids: list[str] = []
        self.sizes: dict[str, tuple[int, int]] = {}
        self._paths: dict[str, str] = dict(zip(slides["slide_id"], slides["path"]))
        self._mpp: dict[str, float] = {}
        if "mpp" in slides.columns:
            self._mpp = {s: float(m) for s, m in zip(slides["slide_id"], slides["mpp"]) if m == m and m}
        if self.cache_dir is None and self.segment_root is None:
            raise ConfigError("pixel dataset: reading slides directly needs the segment stage's folder "
                              "(results/<cohort>/segment) for the tissue status")

        missing = []
        for slide_id in slides["slide_id"]:
            if self.cache_dir is not None:
                paths = cache_paths(self.cache_dir, slide_id)
                if not paths["summary"].exists():
                    missing.append(str(paths["summary"]))
                    continue
                summary = read_json(paths["summary"])
                if abs(float(summary["magnification"]) - self.magnification) > 1e-9:
                    raise DataError(f"{paths['summary']}: written at {summary['magnification']}x, not "
                                    f"{self.magnification:g}x; delete {self.cache_dir} and re-run the pixels rule")
                status = summary.get("status", "ok")
                self.sizes[slide_id] = (int(summary["height"]), int(summary["width"]))
            else:
                seg_summary = Path(self.segment_root) / slide_id / "summary.json"
                if not seg_summary.exists():
                    missing.append(str(seg_summary))
                    continue
                status = read_json(seg_summary).get("status", "ok")
            if status != "ok":
                self.dropped[slide_id] = f"segmentation status {status}"
                log.warning("slide %s: segmentation status %s; dropped", slide_id, status)
                continue
            if self.drop_background and self.region_min_tissue > 0 and self.cache_dir is not None:
                tissue = torch.from_numpy(_read_png(cache_paths(self.cache_dir, slide_id)["tissue"], True) > 0)
                if not bool((region_tissue_fraction(tissue, self.scan_window) > self.region_min_tissue).any()):
                    self.dropped[slide_id] = (f"no {self.scan_window} px region with more than "
                                              f"{self.region_min_tissue:.0%} tissue")
                    log.warning("slide %s: %s; dropped", slide_id, self.dropped[slide_id])
                    continue
            self.slide_ids.append(slide_id)
        if missing:
            what = ("run the pixels rule for these slides (snakemake builds them for every pixel method), or "
                    "`mambapath pixels`" if self.cache_dir is not None else "run the segment stage for these slides")
            raise DataError(f"{len(missing)} file(s) missing, e.g. {missing[:3]}; {what}")
        total = 3 * sum(h * w for h, w in self.sizes.values())
        self.preload = (self.cache_dir is not None and total <= PRELOAD_MAX_BYTES) if preload is None else preload
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return len(self.slide_ids)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        slide_id = self.slide_ids[i]
        if self.cache_dir is not None:
            paths = cache_paths(self.cache_dir, slide_id)
            rgb = _read_png(paths["image"])
            tissue = _read_png(paths["tissue"], grayscale=True) > 0 if self.drop_background else None
        else:
            fallback = self._mpp.get(slide_id, self.fallback_mpp)
            rgb, _ = read_slide_at_magnification(self._paths[slide_id], self.magnification, fallback)
            tissue = None
            if self.drop_background:
                tissue, _ = tissue_mask_at(self.segment_root / slide_id, *rgb.shape[:2])
        return rgb, tissue

    def __getitem__(self, i: int):
        from .models.pixel_mamba import SlideImage

        if i in self._cache:
            rgb, tissue = self._cache[i]
        else:
            rgb, tissue = self._load(i)
            if self.preload:
                self._cache[i] = (rgb, tissue)
        image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div_(255.0)  # (1, 3, H, W)
        mask = None if tissue is None else torch.from_numpy(np.ascontiguousarray(tissue))[None]  # (1, H, W)
        return SlideImage(image, mask)

    def describe(self) -> dict:
        pixels = [h * w for h, w in self.sizes.values()]
        return {
            "input_kind": self.input_kind,
            "input_dim": self.input_dim,
            "magnification": self.magnification,
            "source": str(self.cache_dir) if self.cache_dir is not None else "slides (read in each job)",
            "drop_background": self.drop_background,
            "scan_window": self.scan_window,
            "region_min_tissue": self.region_min_tissue,
            "pixels_mean": float(np.mean(pixels)) if pixels else None,
            "pixels_max": int(max(pixels)) if pixels else None,
        }


def make_pixel_dataset(slides, config: dict, method: dict) -> PixelSlideDataset:
    """The dataset mambapath.bags asks for when a method's input_kind is "pixels"."""
    from .config import load_cohort

    settings = pixel_settings(method)
    pixel_config = config.get("pixel") or {}
    cohort = load_cohort(config)
    results = Path(config["results"]) / cohort.name
    use_cache = pixel_config.get("cache", True)
    return PixelSlideDataset(
        slides,
        magnification=settings["magnification"],
        cache_dir=pixel_dir(config, settings["magnification"]) if use_cache else None,
        segment_root=results / "segment",
        drop_background=bool(settings["drop_background"]),
        scan_window=int(settings["scan_window"]),
        region_min_tissue=float(settings["region_min_tissue"]),
        fallback_mpp=cohort.mpp,
    )


# CLI -------------------------------------------------------------------------------------------


def _optional_float(value: str | None) -> float | None:
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    return float(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slide", required=True, help="slide file")
    parser.add_argument("--slide-id", required=True)
    parser.add_argument("--magnification", type=float, required=True, help="e.g. 2.5 (= 4 um/px)")
    parser.add_argument("--segment-dir", required=True, help="the slide's segment output folder (mask.png, summary.json)")
    parser.add_argument("--out-dir", required=True, help="results/<cohort>/pixels/<magnification>x")
    parser.add_argument("--fallback-mpp", default=None, help="level-0 mpp for slides whose metadata has none")


def run(args: argparse.Namespace) -> int:
    if not math.isfinite(args.magnification) or args.magnification <= 0:
        raise ConfigError(f"--magnification must be positive, got {args.magnification}")
    write_pixel_cache(args.slide, args.slide_id, args.magnification, args.segment_dir, args.out_dir,
                      _optional_float(args.fallback_mpp))
    return 0
