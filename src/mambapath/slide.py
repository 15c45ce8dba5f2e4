"""Opening whole-slide images, and the physical scale of their pixels.

Every stage reads slides through :func:`open_slide`, which turns OpenSlide's failures into
:class:`~mambapath.errors.SlideError` messages that name the file and the fix, and through
:func:`resolve_mpp`, which says where a slide's microns-per-pixel came from.

Scale is always a physical quantity here: a target mpp (microns per pixel) or an objective
magnification, never a bare pyramid level. Magnification is converted with the convention
used by Aperio, CLAM and TRIDENT: 10 um/px at 1x, so 20x = 0.5 um/px, 2.5x = 4.0 um/px.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SlideError

log = logging.getLogger(__name__)

#: microns per pixel at 1x objective magnification (so mpp = MPP_AT_1X / magnification)
MPP_AT_1X = 10.0


def magnification_to_mpp(magnification: float) -> float:
    return MPP_AT_1X / float(magnification)


def mpp_to_magnification(mpp: float) -> float:
    return MPP_AT_1X / float(mpp)


@dataclass(frozen=True)
class SlideScale:
    """The level-0 scale of a slide and where it was read from."""

    mpp: float
    source: str  # "slide-mpp" | "objective-power" | "cohort-config"
    objective_power: float | None


def open_slide(path: str | os.PathLike):
    """Open a slide with OpenSlide (or as a plain image), with errors that say what to do."""
    import openslide

    path = Path(path)
    if not path.exists():
        raise SlideError(f"{path}: slide file not found; check the `path` column of the cohort sheet")
    if path.stat().st_size == 0:
        raise SlideError(f"{path}: slide file is empty (an interrupted download?); download it again")
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception as exc:  # noqa: BLE001 - OpenSlide raises several types here
        raise SlideError(f"{path}: cannot be read as a slide ({exc}); check the file is a whole-slide image") from exc
    try:
        if fmt is None:
            # Not a format OpenSlide knows: a flat image (PNG, plain TIFF) still opens as an
            # ImageSlide; anything else is not a slide.
            return openslide.ImageSlide(str(path))
        return openslide.OpenSlide(str(path))
    except Exception as exc:  # noqa: BLE001
        raise SlideError(
            f"{path}: not a readable whole-slide image ({type(exc).__name__}: {exc}); "
            "re-download or re-export the slide, or drop it from the cohort sheet"
        ) from exc


def read_region_checked(slide, location, level, size, path="") -> np.ndarray:
    """``read_region`` as an RGB uint8 array, with a clear error for corrupt tiles."""
    try:
        region = slide.read_region(tuple(int(v) for v in location), int(level), tuple(int(v) for v in size))
    except Exception as exc:  # noqa: BLE001
        raise SlideError(
            f"{path}: slide opens but its pixels cannot be read at level {level} ({exc}); "
            "the file is corrupt: re-download it or drop it from the cohort sheet"
        ) from exc
    rgba = np.asarray(region)
    rgb = rgba[..., :3].copy()
    # Transparent (out-of-slide) pixels are white glass, not black.
    if rgba.shape[-1] == 4:
        rgb[rgba[..., 3] == 0] = 255
    return rgb


def resolve_mpp(slide, path="", fallback_mpp: float | None = None) -> SlideScale:
    """Level-0 microns per pixel: from the slide, else its objective power, else the config.

    Raises a :class:`SlideError` naming the slide and the fix when none of them is known.
    """
    import openslide

    props = slide.properties
    power = _as_float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    mpp_x = _as_float(props.get(openslide.PROPERTY_NAME_MPP_X))
    mpp_y = _as_float(props.get(openslide.PROPERTY_NAME_MPP_Y))
    if mpp_x and mpp_y and 0.05 < mpp_x < 100:
        if abs(mpp_x - mpp_y) / mpp_x > 0.05:
            log.warning("%s: anisotropic pixels (mpp x %.4f, y %.4f); using their mean", path, mpp_x, mpp_y)
        return SlideScale(mpp=(mpp_x + mpp_y) / 2, source="slide-mpp", objective_power=power)
    if power and power > 0:
        return SlideScale(mpp=magnification_to_mpp(power), source="objective-power", objective_power=power)
    if fallback_mpp:
        return SlideScale(mpp=float(fallback_mpp), source="cohort-config", objective_power=power)
    raise SlideError(
        f"{path}: slide has no mpp and no objective power in its metadata; "
        "set `mpp` for this slide in the cohort sheet (an `mpp` column) or `mpp` in the cohort config"
    )


def best_level_for_mpp(slide, level0_mpp: float, target_mpp: float) -> int:
    """The coarsest pyramid level whose mpp is still at least as fine as ``target_mpp``."""
    downsamples = np.asarray(slide.level_downsamples, dtype=float)
    level_mpps = level0_mpp * downsamples
    ok = np.nonzero(level_mpps <= target_mpp * 1.01)[0]
    return int(ok[-1]) if len(ok) else 0


def _as_float(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None
