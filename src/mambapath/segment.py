"""Tissue segmentation on a low-resolution view of the slide.

``mambapath segment`` reads the slide at ``seg_mpp`` microns per pixel (from the coarsest
pyramid level that is at least that fine, then resampled to exactly that scale), and finds
tissue as the pixels whose HSV saturation passes Otsu's threshold (never below
``min_saturation``: glass is grey, stained tissue is coloured). Pen marks (green, blue or
black ink) are taken out when ``remove_pen`` is set; a morphological closing joins the
pieces of one section; holes smaller than ``min_hole_um2`` are filled and pieces smaller than
``min_area_um2`` are dropped. Areas are in square microns, so the result does not depend on
the scan's resolution.

Per slide it writes, into its output folder::

    mask.png           tissue mask at seg_mpp (255 = tissue)
    contours.geojson   tissue outlines with holes, level-0 pixel coordinates, as QuPath
                       annotations of class "Tissue" (File > Import objects)
    overlay.png        QC view: the slide at seg_mpp with outlines (green), holes (blue) and
                       removed pen marks (red)
    summary.json       status, tissue fraction and area, level-0 mpp and where it came from,
                       pyramid level read, seg_mpp, mask scale, parameters

A slide without tissue is a recorded skip: status ``no_tissue``, an empty mask, no
polygons, exit status 0; the tiling stage then writes an empty tile file.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SUMMARY_VERSION = 1


@dataclass(frozen=True)
class SegmentParams:
    seg_mpp: float = 16.0
    min_saturation: float = 0.05
    min_area_um2: float = 20000.0
    min_hole_um2: float = 5000.0
    close_um: float = 32.0
    remove_pen: bool = True


@dataclass
class Segmentation:
    """Result of :func:`segment_tissue` on one low-resolution RGB image."""

    tissue_mask: np.ndarray  # (H, W) bool
    pen_mask: np.ndarray  # (H, W) bool, ink taken out of the tissue
    saturation_threshold: float  # 0..1, the threshold used
    otsu_threshold: float  # 0..1, Otsu's own (before the floor)


# ---------------------------------------------------------------------------- reading


def read_at_mpp(slide, level0_mpp: float, target_mpp: float, path="", block: int = 1024,
                max_single_read_px: int = 4096 * 4096):
    """The whole slide as RGB at ``target_mpp`` (never finer than level 0).

    Returns ``(rgb (H, W, 3) uint8, level, downsample_xy)`` where ``downsample_xy`` is the
    number of level-0 pixels per output pixel along x and y. Levels larger than
    ``max_single_read_px`` are read in blocks of ``block`` output pixels, so a single-level
    gigapixel slide does not need its whole level 0 in memory.
    """
    import cv2

    from .slide import best_level_for_mpp, read_region_checked

    target_mpp = max(float(target_mpp), float(level0_mpp))
    level = best_level_for_mpp(slide, level0_mpp, target_mpp)
    w0, h0 = slide.dimensions
    out_w = max(1, int(round(w0 * level0_mpp / target_mpp)))
    out_h = max(1, int(round(h0 * level0_mpp / target_mpp)))
    lw, lh = slide.level_dimensions[level]
    ds = float(slide.level_downsamples[level])
    if lw * lh <= max_single_read_px:
        region = read_region_checked(slide, (0, 0), level, (lw, lh), path)
        rgb = cv2.resize(region, (out_w, out_h), interpolation=cv2.INTER_AREA) if (lw, lh) != (out_w, out_h) else region
    else:
        rgb = np.empty((out_h, out_w, 3), np.uint8)
        sx, sy = lw / out_w, lh / out_h  # level pixels per output pixel
        for r0 in range(0, out_h, block):
            r1 = min(out_h, r0 + block)
            for c0 in range(0, out_w, block):
                c1 = min(out_w, c0 + block)
                lx0, lx1 = int(math.floor(c0 * sx)), min(lw, int(math.ceil(c1 * sx)))
                ly0, ly1 = int(math.floor(r0 * sy)), min(lh, int(math.ceil(r1 * sy)))
                region = read_region_checked(
                    slide, (int(lx0 * ds), int(ly0 * ds)), level, (lx1 - lx0, ly1 - ly0), path
                )
                rgb[r0:r1, c0:c1] = cv2.resize(region, (c1 - c0, r1 - r0), interpolation=cv2.INTER_AREA)
    return rgb, level, (w0 / out_w, h0 / out_h)


# ---------------------------------------------------------------------------- masks


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of green, blue or black marker ink.

    H&E is pink to purple: red is its strongest or second channel and green its weakest.
    Green ink has green well above red and about as high as blue; blue ink has red far below
    blue; black ink is dark and grey or blue-black (dark hematoxylin is dark but purple, with
    red close to blue).
    """
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    hi = np.maximum(np.maximum(r, g), b)
    lo = np.minimum(np.minimum(r, g), b)
    chroma = hi - lo
    green = (g > r + 15) & (g >= b - 5) & (chroma * 4 > hi) & (g > 60)
    blue = (r * 100 < 55 * b) & (g * 100 < 75 * b) & (b > 60)
    black = (hi < 70) & ((chroma * 5 < hi) | ((r * 100 < 75 * b) & (g * 100 < 75 * b)))  # grey or blue-black
    return green | blue | black


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_px
    return keep[labels]


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill background components enclosed by tissue that are smaller than ``max_px``."""
    import cv2

    background = (~mask).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(background, connectivity=4)
    h, w = mask.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    touches_border = (x == 0) | (y == 0) | (x + bw >= w) | (y + bh >= h)
    fill = (~touches_border) & (area < max_px)
    fill[0] = False  # label 0 is the tissue itself
    return mask | fill[labels]


def segment_tissue(rgb: np.ndarray, mpp: float, params: SegmentParams = SegmentParams()) -> Segmentation:
    """Tissue mask of an RGB image at ``mpp`` microns per pixel."""
    import cv2

    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    saturation = cv2.medianBlur(hsv[..., 1], 3)
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = max(float(otsu), params.min_saturation * 255.0)
    tissue = saturation > threshold

    pen = np.zeros_like(tissue)
    if params.remove_pen:
        pen = pen_mask(rgb)
        # ink edges blend with the glass: widen the mark by one pixel
        pen = cv2.dilate(pen.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        tissue &= ~pen

    radius = int(round(params.close_um / mpp / 2))
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        # pad so closing does not glue tissue to the image border
        pad = 2 * radius + 1
        padded = cv2.copyMakeBorder(tissue.astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
        tissue = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)[pad:-pad, pad:-pad] > 0
        if params.remove_pen:
            tissue &= ~pen
    px_area = mpp * mpp
    tissue = _fill_small_holes(tissue, params.min_hole_um2 / px_area)
    tissue = _remove_small(tissue, params.min_area_um2 / px_area)
    return Segmentation(
        tissue_mask=tissue,
        pen_mask=pen & ~tissue,
        saturation_threshold=threshold / 255.0,
        otsu_threshold=float(otsu) / 255.0,
    )


# ---------------------------------------------------------------------------- contours


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _ring(contour: np.ndarray, scale_xy, exterior: bool) -> list[list[float]]:
    pts = contour.reshape(-1, 2).astype(float)
    # pixel centres of the mask -> level-0 pixel coordinates
    pts = (pts + 0.5) * np.asarray(scale_xy, float)
    pts = np.vstack([pts, pts[:1]])
    # GeoJSON's right-hand rule: exterior counter-clockwise, holes clockwise
    if (_signed_area(pts) > 0) != exterior:
        pts = pts[::-1]
    return np.round(pts, 1).tolist()


def mask_to_geojson(mask: np.ndarray, scale_xy, slide_id: str = "") -> dict:
    """QuPath-readable GeoJSON: one Polygon feature (with holes) per tissue piece."""
    import cv2

    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    features = []
    if hierarchy is not None:
        hierarchy = hierarchy[0]
        for i, contour in enumerate(contours):
            if hierarchy[i][3] != -1 or len(contour) < 3:
                continue  # holes are attached to their parent below
            rings = [_ring(contour, scale_xy, exterior=True)]
            child = hierarchy[i][2]
            while child != -1:
                if len(contours[child]) >= 3:
                    rings.append(_ring(contours[child], scale_xy, exterior=False))
                child = hierarchy[child][0]
            features.append({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": rings},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tissue", "color": [0, 170, 0]},
                    "isLocked": False,
                    "name": f"{slide_id} tissue {len(features) + 1}".strip(),
                },
            })
    return {"type": "FeatureCollection", "features": features}


def geojson_to_mask(geojson: dict, shape, scale_xy) -> np.ndarray:
    """Rasterise the polygons back onto a mask of ``shape`` (for checks and QC)."""
    import cv2

    mask = np.zeros(shape, np.uint8)
    scale = np.asarray(scale_xy, float)
    for feature in geojson["features"]:
        rings = feature["geometry"]["coordinates"]
        pts = [np.round(np.asarray(r, float) / scale - 0.5).astype(np.int32) for r in rings]
        cv2.fillPoly(mask, pts[:1], 1)
        if len(pts) > 1:
            cv2.fillPoly(mask, pts[1:], 0)
            for hole in pts[1:]:
                cv2.polylines(mask, [hole], True, 1)  # the hole's outline is tissue
    return mask.astype(bool)


def overlay_image(rgb: np.ndarray, seg: Segmentation, text: str = "") -> np.ndarray:
    import cv2

    scale = max(1, 1024 // max(rgb.shape[:2]))
    view = cv2.resize(rgb, (rgb.shape[1] * scale, rgb.shape[0] * scale), interpolation=cv2.INTER_NEAREST)
    if seg.pen_mask.any():
        pen = cv2.resize(seg.pen_mask.astype(np.uint8), view.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
        view[pen] = (0.5 * view[pen] + 0.5 * np.array([230, 0, 0])).astype(np.uint8)
    mask = cv2.resize(seg.tissue_mask.astype(np.uint8), view.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is not None:
        for i, c in enumerate(contours):
            colour = (0, 170, 0) if hierarchy[0][i][3] == -1 else (0, 60, 230)
            cv2.drawContours(view, [c], -1, colour, 2)
    if text:
        cv2.putText(view, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return view


# ---------------------------------------------------------------------------- one slide


def segment_slide(slide_path, out_dir, slide_id: str | None = None, params: SegmentParams = SegmentParams(),
                  fallback_mpp: float | None = None) -> dict:
    """Segment one slide and write mask, contours, overlay and summary; return the summary."""
    from PIL import Image

    from . import __version__
    from .io import atomic_path, write_json, write_text
    from .slide import open_slide, resolve_mpp

    slide_path = Path(slide_path)
    out_dir = Path(out_dir)
    slide_id = slide_id or slide_path.stem
    slide = open_slide(slide_path)
    try:
        scale = resolve_mpp(slide, slide_path, fallback_mpp)
        rgb, level, ds_xy = read_at_mpp(slide, scale.mpp, params.seg_mpp, slide_path)
        level_mpp = scale.mpp * float(slide.level_downsamples[level])
        w0, h0 = slide.dimensions
    finally:
        slide.close()
    mask_mpp = scale.mpp * (ds_xy[0] + ds_xy[1]) / 2
    seg = segment_tissue(rgb, mask_mpp, params)
    tissue = seg.tissue_mask
    tissue_fraction = float(tissue.mean())
    status = "ok" if tissue.any() else "no_tissue"
    geojson = mask_to_geojson(tissue, ds_xy, slide_id)
    import cv2

    n_pieces = cv2.connectedComponents(tissue.astype(np.uint8), connectivity=8)[0] - 1
    summary = {
        "slide_id": slide_id,
        "slide_path": str(slide_path),
        "status": status,
        "tissue_fraction": tissue_fraction,
        "tissue_area_mm2": float(tissue.sum()) * ds_xy[0] * ds_xy[1] * scale.mpp**2 / 1e6,
        "n_pieces": int(n_pieces),
        "n_polygons": len(geojson["features"]),
        "pen_fraction": float(seg.pen_mask.mean()),
        "level0_mpp": scale.mpp,
        "mpp_source": scale.source,
        "objective_power": scale.objective_power,
        "level0_width": int(w0),
        "level0_height": int(h0),
        "level_used": int(level),
        "level_mpp": level_mpp,
        "seg_mpp": mask_mpp,
        "mask_width": int(tissue.shape[1]),
        "mask_height": int(tissue.shape[0]),
        "mask_downsample": [float(ds_xy[0]), float(ds_xy[1])],
        "saturation_threshold": seg.saturation_threshold,
        "otsu_threshold": seg.otsu_threshold,
        "params": asdict(params),
        "mambapath_version": __version__,
        "summary_version": SUMMARY_VERSION,
    }
    if status == "no_tissue":
        log.warning("%s: no tissue found (recorded as a skip; tiling will write an empty tile file)", slide_path)
    else:
        log.info("%s: tissue %.1f%% of the slide in %d piece(s), level %d, mpp %.3f (%s)", slide_id,
                 100 * tissue_fraction, n_pieces, level, scale.mpp, scale.source)

    import json

    text = f"{slide_id}: tissue {100 * tissue_fraction:.1f}% ({status})"
    overlay = overlay_image(rgb, seg, text)
    written = []
    try:
        for name, image in (("mask.png", tissue.astype(np.uint8) * 255), ("overlay.png", overlay)):
            with atomic_path(out_dir / name) as tmp:
                Image.fromarray(image).save(tmp)
            written.append(out_dir / name)
        write_text(out_dir / "contours.geojson", json.dumps(geojson) + "\n")
        written.append(out_dir / "contours.geojson")
        # the summary goes last: its presence means the other three are complete
        write_json(out_dir / "summary.json", summary)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return summary


def load_segmentation(segment_dir) -> tuple[np.ndarray, dict]:
    """The tissue mask (bool) and summary written by :func:`segment_slide`."""
    from PIL import Image

    from .errors import DataError
    from .io import read_json

    segment_dir = Path(segment_dir)
    summary_path = segment_dir / "summary.json"
    if not summary_path.exists():
        raise DataError(f"{summary_path}: no segmentation summary; run `mambapath segment` for this slide first")
    summary = read_json(summary_path)
    mask = np.asarray(Image.open(segment_dir / "mask.png")) > 0
    if mask.shape != (summary["mask_height"], summary["mask_width"]):
        raise DataError(f"{segment_dir}: mask.png does not match summary.json; segment the slide again")
    return mask, summary


def fallback_mpp_arg(cohort, slide_id: str) -> str:
    """``--fallback-mpp`` value for one slide: the sheet's ``mpp`` column, else the cohort's mpp.

    Synthetic cohorts have no sheet when the DAG is built (their slides carry their mpp), so
    only the cohort's mpp applies there. Returns "none" when neither is set.
    """
    mpp = None
    if cohort.source != "synth" and cohort.sheet is not None and Path(cohort.sheet).exists():
        mpp = _sheet_mpp(str(cohort.sheet)).get(slide_id)
    mpp = mpp or cohort.mpp
    return f"{float(mpp):g}" if mpp else "none"


@functools.lru_cache(maxsize=8)
def _sheet_mpp(sheet_path: str) -> dict:
    import pandas as pd

    sheet = pd.read_csv(sheet_path, dtype={"slide_id": str})
    if "mpp" not in sheet.columns:
        return {}
    return {k: float(v) for k, v in sheet.dropna(subset=["mpp"]).set_index("slide_id")["mpp"].items() if v > 0}


# ---------------------------------------------------------------------------- CLI


def _optional_float(value: str) -> float | None:
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    return float(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SegmentParams()
    parser.add_argument("--slide", required=True, help="slide file")
    parser.add_argument("--out-dir", required=True, help="output folder (mask.png, contours.geojson, overlay.png, summary.json)")
    parser.add_argument("--slide-id", default=None, help="slide id (default: the file name without extension)")
    parser.add_argument("--fallback-mpp", type=_optional_float, default=None,
                        help="level-0 mpp for slides whose metadata has neither mpp nor objective power "
                             "(the sheet's mpp column or the cohort's mpp); 'none' for no fallback")
    parser.add_argument("--method", choices=("otsu",), default="otsu",
                        help="otsu: Otsu's threshold on HSV saturation, floored at --min-saturation")
    parser.add_argument("--seg-mpp", type=float, default=defaults.seg_mpp, help="microns per pixel to segment at")
    parser.add_argument("--min-saturation", type=float, default=defaults.min_saturation,
                        help="floor of the saturation threshold (0..1)")
    parser.add_argument("--min-area-um2", type=float, default=defaults.min_area_um2, help="drop smaller tissue pieces")
    parser.add_argument("--min-hole-um2", type=float, default=defaults.min_hole_um2, help="fill smaller holes")
    parser.add_argument("--close-um", type=float, default=defaults.close_um, help="morphological closing diameter")
    parser.add_argument("--remove-pen", action=argparse.BooleanOptionalAction, default=defaults.remove_pen,
                        help="take green/blue/black pen marks out of the tissue")


def run(args: argparse.Namespace) -> int:
    from .errors import ConfigError

    if args.seg_mpp <= 0:
        raise ConfigError(f"--seg-mpp must be positive, got {args.seg_mpp}")
    params = SegmentParams(
        seg_mpp=args.seg_mpp,
        min_saturation=args.min_saturation,
        min_area_um2=args.min_area_um2,
        min_hole_um2=args.min_hole_um2,
        close_um=args.close_um,
        remove_pen=args.remove_pen,
    )
    segment_slide(args.slide, args.out_dir, args.slide_id, params, fallback_mpp=args.fallback_mpp)
    return 0


__all__ = [
    "SegmentParams",
    "Segmentation",
    "geojson_to_mask",
    "load_segmentation",
    "mask_to_geojson",
    "pen_mask",
    "read_at_mpp",
    "segment_slide",
    "segment_tissue",
]
