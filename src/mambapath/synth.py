"""A synthetic cohort: H&E-like pyramidal slides whose labels depend on what and where.

``mambapath synth`` writes, for every synthetic patient, one or more slides as tiled
pyramidal TIFFs that OpenSlide opens as Aperio slides (vendor ``aperio``, objective power,
mpp, one page per pyramid level, JPEG tiles), the ground truth beside them, and a cohort
sheet with a clinical table::

    <out>/slides/<slide_id>.tiff        the slide
    <out>/synth/<slide_id>_mask.png     ground-truth tissue mask (255 = tissue) at GT_MPP um/px
    <out>/synth/<slide_id>_types.png    ground-truth tissue types (palette PNG, codes below)
    <out>/cohort/slides.csv             slide_id, patient_id, path, mpp, stage, os_days,
                                        os_event, label, and the true composition/arrangement

Tissue
------
Each slide holds one tissue section (occasionally split into pieces) on white glass, made of
five tissue types with their own colour and texture (codes in the types PNG):

====  ============  ==============================================================
code  type          looks like
====  ============  ==============================================================
0     background    white glass, faint noise, a few dust specks
1     tumour        crowded large purple nuclei on purple-pink cytoplasm (nests)
2     stroma        pink eosin with wavy fibres and sparse elongated nuclei
3     lymphocytes   dense small dark-blue round nuclei (round aggregates)
4     necrosis      pale pink-grey with scattered nuclear debris (cores of tumour nests)
5     fat           empty white cells with thin pink membranes
====  ============  ==============================================================

Artefacts are drawn on top: pen marks (green, blue or black strokes, mostly on the glass
around the tissue) and tissue folds (a darker, more saturated band). The ground-truth
tissue mask counts folds as tissue and pen marks and dust as not tissue.

Labelling rule
--------------
Every number the rule uses is measured on the ground-truth types map of the slide as
written (so anyone can recompute it from ``<slide>_types.png``); for a patient with several
slides the measures are averaged over the slides.

- composition: ``frac_<type>`` = area of the type / tissue area. The tumour burden is
  ``burden = frac_tumour + frac_necrosis``.
- arrangement: ``lymph_tumour_contact`` = the fraction of lymphocyte area that lies within
  ``CONTACT_UM`` (40 um) of tumour or necrosis. Lymphocyte aggregates are laid out either
  along the tumour border ("infiltrated", contact near 1) or in the stroma far from the
  tumour ("excluded", contact near 0). The composition targets are drawn independently of
  the arrangement, and infiltrated slides start with more tumour by the area their
  aggregates later cover, so that tumour and necrosis fractions match between the two
  arrangements on average. The lymphocyte fraction does not: excluded aggregates must keep
  their distance from the tumour, so fewer of them fit, and on the 30-patient demo the
  measured lymphocyte fraction is 0.114 (infiltrated) against 0.081 (excluded), which gives
  the arrangement away with AUC 0.81 (``benchmarks/analyse_spatial_labels.py``, section 2).

The binary class (task ``classification``) is::

    label = "1"  if burden >= BURDEN_THRESHOLD (0.30) and lymph_tumour_contact < CONTACT_THRESHOLD (0.5)
            "0"  otherwise

i.e. "1" is a tumour-rich slide whose lymphocytes are kept away from the tumour. A model
that sees only how much of each tissue there is gets the burden half of the rule; the
contact half needs where the lymphocyte aggregates sit relative to the tumour.

Stage (task ``staging``) comes from composition plus noise::

    stage_score = 2.5 * burden + 4.0 * frac_necrosis + Normal(0, 0.12)
    stage = I (< 0.90) | II (< 1.15) | III (< 1.42) | IV

Overall survival (task ``survival``) is Weibull (shape 1.3, proportional hazards) with a
risk that uses stage, necrosis and the arrangement::

    risk = exp(0.45 * (stage_number - 1) + 0.7 * [contact < 0.5] + 2.0 * frac_necrosis)
    time = 5000 days * (Exponential(1) / risk) ** (1 / 1.3);  censoring ~ Uniform(180, 3650) days
    os_days = min(time, censoring);  os_event = 1 if the death was observed (time <= censoring)

Everything is drawn from ``numpy.random.default_rng([seed, patient, ...])``, so a patient's
slides and outcome depend only on the seed and the patient's number (adding patients does
not change the existing ones) and not on the number of worker processes.
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError

log = logging.getLogger(__name__)

TISSUE_TYPES = ("background", "tumour", "stroma", "lymphocytes", "necrosis", "fat")
BACKGROUND, TUMOUR, STROMA, LYMPHOCYTES, NECROSIS, FAT = range(6)

#: colours of the types PNG's palette (for viewing; the pixel values are the codes)
TYPE_PALETTE = {
    BACKGROUND: (255, 255, 255),
    TUMOUR: (128, 40, 160),
    STROMA: (240, 150, 180),
    LYMPHOCYTES: (30, 60, 200),
    NECROSIS: (150, 150, 150),
    FAT: (250, 220, 90),
}

#: microns per pixel of the ground-truth mask and types PNGs
GT_MPP = 4.0
#: lymphocytes within this distance of tumour or necrosis count as touching it
CONTACT_UM = 40.0
BURDEN_THRESHOLD = 0.30
CONTACT_THRESHOLD = 0.5
STAGE_CUTS = (0.90, 1.15, 1.42)
STAGES = ("I", "II", "III", "IV")
BASELINE_DAYS = 5000.0
WEIBULL_SHAPE = 1.3

#: defaults of the cohort file's ``synth:`` section; every key may be set there
SYNTH_DEFAULTS = {
    "n_patients": 30,
    "slides_per_patient": 1,
    "seed": 0,
    "width_px": 4096,  # level-0 width in pixels
    "height_px": 3072,  # level-0 height in pixels
    "mpp": 1.0,  # level-0 microns per pixel (objective power = 10 / mpp)
    "n_levels": 5,  # pyramid levels, each half the size of the one above
    "tile_px": 256,  # TIFF tile edge
    "jpeg_quality": 85,
    "artefacts": True,  # pen marks, folds and dust
}

# Colours (RGB) of cytoplasm / background and of nuclei per tissue type.
_CYTO = np.array(
    [
        (243, 242, 244),  # background glass
        (200, 130, 190),  # tumour: purple-pink cytoplasm
        (236, 160, 192),  # stroma: eosin pink
        (214, 176, 214),  # lymphocytes: pale lilac between nuclei
        (222, 172, 198),  # necrosis: pale pink-grey
        (248, 243, 247),  # fat: empty cell interior
    ],
    dtype=np.float32,
)
_NUCLEUS = np.array(
    [
        (243, 242, 244),
        (72, 36, 118),  # tumour: large purple nuclei
        (104, 58, 140),  # stroma: elongated fibroblast nuclei
        (42, 28, 104),  # lymphocytes: small dark-blue nuclei
        (128, 84, 138),  # necrosis: pale debris
        (248, 243, 247),
    ],
    dtype=np.float32,
)
#: fraction of the area covered by nuclei, per type
_NUCLEAR_DENSITY = np.array([0.0, 0.36, 0.07, 0.55, 0.10, 0.0])
_MEMBRANE = np.array((222, 146, 182), dtype=np.float32)
_PEN_COLOURS = {"green": (40, 150, 70), "blue": (40, 70, 170), "black": (35, 35, 40)}


# ---------------------------------------------------------------------------- config


def synth_settings(synth_cfg: dict | None) -> dict:
    """The cohort's ``synth:`` section with defaults filled in, checked key by key."""
    synth_cfg = dict(synth_cfg or {})
    unknown = sorted(set(synth_cfg) - set(SYNTH_DEFAULTS))
    if unknown:
        raise ConfigError(
            f"cohort synth: unknown key(s) {unknown}; known keys: {', '.join(SYNTH_DEFAULTS)}"
        )
    settings = {**SYNTH_DEFAULTS, **synth_cfg}
    for key in ("n_patients", "slides_per_patient", "width_px", "height_px", "n_levels", "tile_px", "seed"):
        if not isinstance(settings[key], int) or isinstance(settings[key], bool):
            raise ConfigError(f"cohort synth.{key}: expected an integer, got {settings[key]!r}")
    if settings["n_patients"] < 1 or settings["slides_per_patient"] < 1:
        raise ConfigError("cohort synth: n_patients and slides_per_patient must be at least 1")
    if min(settings["width_px"], settings["height_px"]) < 256:
        raise ConfigError("cohort synth: width_px and height_px must be at least 256")
    if settings["tile_px"] % 16:
        raise ConfigError(f"cohort synth.tile_px: {settings['tile_px']} is not a multiple of 16 (TIFF needs that)")
    if not 1 <= settings["n_levels"] <= 10:
        raise ConfigError("cohort synth.n_levels: must be between 1 and 10")
    if not isinstance(settings["mpp"], (int, float)) or not 0.1 <= settings["mpp"] <= 10:
        raise ConfigError(f"cohort synth.mpp: expected microns per pixel in [0.1, 10], got {settings['mpp']!r}")
    if not 10 <= int(settings["jpeg_quality"]) <= 100:
        raise ConfigError("cohort synth.jpeg_quality: must be between 10 and 100")
    return settings


def synth_patient_ids(cohort_name: str, synth_cfg: dict | None) -> list[str]:
    settings = synth_settings(synth_cfg)
    return [f"{cohort_name}-P{p:03d}" for p in range(settings["n_patients"])]


def synth_slide_ids(cohort_name: str, synth_cfg: dict | None) -> list[str]:
    """Slide ids of a synthetic cohort: a pure function of the cohort name and its config."""
    settings = synth_settings(synth_cfg)
    return [
        f"{patient}-S{s + 1}"
        for patient in synth_patient_ids(cohort_name, settings)
        for s in range(settings["slides_per_patient"])
    ]


# ---------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class PatientPlan:
    """What a patient's slides are made of (targets; the measured values go to the sheet)."""

    tumour: float
    necrosis: float
    lymphocytes: float
    fat: float
    arrangement: str  # "infiltrated" | "excluded"


def plan_patient(seed: int, patient: int) -> PatientPlan:
    rng = np.random.default_rng([seed, patient, 0])
    return PatientPlan(
        tumour=float(rng.uniform(0.15, 0.55)),
        necrosis=float(rng.uniform(0.0, 0.10)),
        lymphocytes=float(rng.uniform(0.06, 0.16)),
        fat=float(rng.uniform(0.0, 0.08)),
        arrangement="infiltrated" if rng.random() < 0.5 else "excluded",
    )


def _smooth_noise(rng, shape, sigma_px: float) -> np.ndarray:
    """Gaussian random field with unit standard deviation and correlation length ~sigma."""
    import cv2

    # Blur a coarse grid and upsample: a large-sigma blur of the full grid costs more
    # and looks the same.
    step = max(1, int(sigma_px // 4))
    small = (max(2, shape[0] // step + 2), max(2, shape[1] // step + 2))
    field = rng.standard_normal(small).astype(np.float32)
    field = cv2.GaussianBlur(field, (0, 0), sigmaX=max(sigma_px / step, 0.5))
    field = cv2.resize(field, (small[1] * step, small[0] * step), interpolation=cv2.INTER_CUBIC)
    field = field[: shape[0], : shape[1]]
    return (field - field.mean()) / (field.std() + 1e-8)


def _tissue_shape(rng, shape, layout_um: float) -> np.ndarray:
    """A blob-like section of tissue, clear of the slide border."""
    import cv2

    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx = xx / w * 2 - 1
    yy = yy / h * 2 - 1
    rx, ry = rng.uniform(0.7, 0.9, size=2)
    cx, cy = rng.uniform(-0.08, 0.08, size=2)
    prior = 1 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2
    field = prior + 0.45 * _smooth_noise(rng, shape, 300.0 / layout_um)
    # push the field down near the slide's edges, so the section ends in a curved border
    # and is not cut straight by the margin below
    to_edge = np.minimum(np.minimum(xx + 1, 1 - xx), np.minimum(yy + 1, 1 - yy)) / 2  # 0 at the edge
    to_edge += 0.035 * _smooth_noise(rng, shape, 120.0 / layout_um)
    field -= 4.0 * np.clip((0.16 - to_edge) / 0.12, 0.0, 1.0) ** 2
    tissue = field > 0
    margin_y, margin_x = max(2, int(0.04 * h)), max(2, int(0.04 * w))
    tissue[:margin_y] = tissue[-margin_y:] = False
    tissue[:, :margin_x] = tissue[:, -margin_x:] = False
    # Keep the pieces that are at least a tenth of the largest one.
    n, labels, stats, _ = cv2.connectedComponentsWithStats(tissue.astype(np.uint8), connectivity=8)
    if n <= 1:
        tissue[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = True
        return tissue
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.nonzero(areas >= 0.1 * areas.max())[0] + 1
    return np.isin(labels, keep)


def _quantile_mask(values: np.ndarray, where: np.ndarray, fraction: float, top: bool = True) -> np.ndarray:
    """The ``fraction`` of ``where`` with the highest (or lowest) ``values``."""
    out = np.zeros_like(where)
    n = int(round(fraction * where.sum()))
    if n <= 0:
        return out
    idx = np.flatnonzero(where)
    vals = values.ravel()[idx]
    order = np.argsort(-vals if top else vals, kind="stable")[:n]
    out.ravel()[idx[order]] = True
    return out


def make_layout(rng, plan: PatientPlan, shape, layout_um: float) -> np.ndarray:
    """Tissue-type map (codes 0..5) on a grid of ``layout_um`` microns per cell."""
    import cv2

    tissue = _tissue_shape(rng, shape, layout_um)
    layout = np.where(tissue, STROMA, BACKGROUND).astype(np.uint8)
    # Tumour nests are the high ground of a smooth field; necrosis is the very top of it,
    # so it sits in the cores of the larger nests.
    potential = _smooth_noise(rng, shape, 170.0 / layout_um)
    # Infiltrating aggregates later cover about 70% tumour: start with that much more tumour
    # so the measured tumour fraction does not give the arrangement away.
    extra = 0.7 * plan.lymphocytes if plan.arrangement == "infiltrated" else 0.0
    tumour_region = _quantile_mask(potential, tissue, plan.tumour + plan.necrosis + extra)
    necrosis = _quantile_mask(potential, tissue, plan.necrosis)
    layout[tumour_region] = TUMOUR
    layout[necrosis] = NECROSIS

    # distance (um) from tumour for cells outside it, and to its edge for cells inside
    dist_out = cv2.distanceTransform((~tumour_region).astype(np.uint8), cv2.DIST_L2, 5) * layout_um
    dist_in = cv2.distanceTransform(tumour_region.astype(np.uint8), cv2.DIST_L2, 5) * layout_um

    # Fat lobules: away from the tumour, in the low ground of a second field.
    fat_candidates = tissue & ~tumour_region & (dist_out > 120.0)
    if fat_candidates.any() and plan.fat > 0:
        share = min(1.0, plan.fat * tissue.sum() / fat_candidates.sum())
        layout[_quantile_mask(_smooth_noise(rng, shape, 140.0 / layout_um), fat_candidates, share)] = FAT

    # Lymphocyte aggregates: round clusters, either on the tumour border or far from it.
    target = plan.lymphocytes * tissue.sum()
    if plan.arrangement == "infiltrated":
        candidates = tissue & (layout != NECROSIS) & (dist_out <= 30.0) & (dist_in <= 60.0)
    else:
        candidates = tissue & ~tumour_region & (dist_out >= 300.0)
        if candidates.sum() < 50:
            far = np.quantile(dist_out[tissue & ~tumour_region], 0.8) if (tissue & ~tumour_region).any() else 0
            candidates = tissue & ~tumour_region & (dist_out >= far)
    ys, xs = np.nonzero(candidates)
    painted = np.zeros(shape, dtype=bool)
    yy, xx = np.ogrid[0 : shape[0], 0 : shape[1]]
    for _ in range(400):
        if painted.sum() >= target or len(ys) == 0:
            break
        i = rng.integers(len(ys))
        radius = rng.uniform(35.0, 90.0) / layout_um
        y0, x0 = ys[i], xs[i]
        r = int(math.ceil(radius * 1.3)) + 1
        sl = (slice(max(0, y0 - r), y0 + r + 1), slice(max(0, x0 - r), x0 + r + 1))
        d2 = (yy[sl[0]] - y0) ** 2 + (xx[:, sl[1]] - x0) ** 2
        wobble = 1 + 0.2 * rng.standard_normal(d2.shape)
        disc = (d2 <= (radius * wobble) ** 2) & tissue[sl]
        if plan.arrangement == "excluded":
            disc &= ~tumour_region[sl]  # excluded lymphocytes never reach the tumour
        else:
            disc &= layout[sl] != NECROSIS
        painted[sl] |= disc
    layout[painted] = LYMPHOCYTES
    return layout


def measure_types(types_map: np.ndarray, mpp: float) -> dict:
    """Composition and arrangement of a ground-truth types map (codes 0..5 at ``mpp`` um/px)."""
    from scipy import ndimage

    counts = np.bincount(types_map.ravel(), minlength=len(TISSUE_TYPES)).astype(float)
    tissue = counts[1:].sum()
    out = {f"frac_{name}": (counts[code] / tissue if tissue else 0.0) for code, name in enumerate(TISSUE_TYPES) if code}
    tumour_like = np.isin(types_map, (TUMOUR, NECROSIS))
    lymph = types_map == LYMPHOCYTES
    if lymph.any() and tumour_like.any():
        # exact Euclidean distance (in px) from each pixel to the nearest tumour/necrosis pixel
        dist = ndimage.distance_transform_edt(~tumour_like) * mpp
        out["lymph_tumour_contact"] = float((dist[lymph] <= CONTACT_UM).mean())
    else:
        out["lymph_tumour_contact"] = 0.0
    out["tissue_area_mm2"] = tissue * (mpp / 1000.0) ** 2
    return out


def apply_rule(measures: dict) -> dict:
    """The class label from measured composition and arrangement (see module docstring)."""
    burden = measures["frac_tumour"] + measures["frac_necrosis"]
    infiltrated = measures["lymph_tumour_contact"] >= CONTACT_THRESHOLD
    label = "1" if (burden >= BURDEN_THRESHOLD and not infiltrated) else "0"
    return {
        "burden": burden,
        "arrangement": "infiltrated" if infiltrated else "excluded",
        "label": label,
    }


def clinical_outcome(seed: int, patient: int, measures: dict) -> dict:
    """Stage and overall survival of one patient from its (slide-averaged) measures."""
    rng = np.random.default_rng([seed, patient, 1])
    rule = apply_rule(measures)
    stage_score = 2.5 * rule["burden"] + 4.0 * measures["frac_necrosis"] + rng.normal(0.0, 0.12)
    stage_number = 1 + int(np.searchsorted(STAGE_CUTS, stage_score, side="right"))
    log_hazard = (
        0.45 * (stage_number - 1)
        + 0.7 * (rule["arrangement"] == "excluded")
        + 2.0 * measures["frac_necrosis"]
    )
    # Weibull proportional hazards: S(t) = exp(-risk * (t / BASELINE_DAYS) ** WEIBULL_SHAPE)
    time = BASELINE_DAYS * (rng.exponential(1.0) / math.exp(log_hazard)) ** (1.0 / WEIBULL_SHAPE)
    censor = rng.uniform(180.0, 3650.0)
    return {
        "stage": STAGES[stage_number - 1],
        "stage_score": float(stage_score),
        "os_days": max(1.0, float(round(min(time, censor)))),
        "os_event": int(time <= censor),
        **rule,
    }


# ---------------------------------------------------------------------------- rendering


def _render_level0(rng, layout: np.ndarray, layout_um: float, settings: dict):
    """Level-0 RGB image, its label map, and the artefact masks.

    Full-image arithmetic goes through OpenCV (LUT, blendLinear, multiply): at slide sizes
    it is several times faster than the same steps in numpy.
    """
    import cv2
    from scipy.special import ndtri

    mpp = float(settings["mpp"])
    h, w = settings["height_px"], settings["width_px"]

    # Labels at level 0: the layout, warped by a smooth displacement so borders look organic.
    # The warp runs at half resolution (borders move by whole pixels there) and is then
    # upsampled, which is four times cheaper and looks the same.
    hh, hw = (h + 1) // 2, (w + 1) // 2
    half_mpp = 2 * mpp
    disp_shape = (hh // 4 + 2, hw // 4 + 2)
    amp = 10.0 / half_mpp
    dx = cv2.resize(_smooth_noise(rng, disp_shape, 3.0 / half_mpp) * amp, (hw, hh), interpolation=cv2.INTER_LINEAR)
    dy = cv2.resize(_smooth_noise(rng, disp_shape, 3.0 / half_mpp) * amp, (hw, hh), interpolation=cv2.INTER_LINEAR)
    cell_px = layout_um / half_mpp
    map_x = (np.arange(hw, dtype=np.float32)[None, :] + dx) / cell_px - 0.5
    map_y = (np.arange(hh, dtype=np.float32)[:, None] + dy) / cell_px - 0.5
    labels = cv2.remap(layout, map_x, map_y, interpolation=cv2.INTER_NEAREST,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    labels = cv2.resize(labels, (w, h), interpolation=cv2.INTER_NEAREST)
    del map_x, map_y, dx, dy

    def field(sigma_x_um, sigma_y_um):
        # blurred white noise ~ a Gaussian random field; standardised on a subsample
        f = rng.random((h, w), dtype=np.float32)
        f = cv2.GaussianBlur(f, (0, 0), sigmaX=sigma_x_um / mpp, sigmaY=sigma_y_um / mpp)
        sub = f[::7, ::7]
        f -= sub.mean()
        f *= 1.0 / (sub.std() + 1e-8)
        return f

    # Nuclei: blobs where a smooth random field passes a per-type threshold. Different
    # correlation lengths give small round (lymphocytes), large (tumour) and elongated
    # (stroma) nuclei.
    horizontal = rng.random() < 0.5
    z = field(2.6, 2.6)
    np.copyto(z, field(1.4, 1.4), where=labels == LYMPHOCYTES)
    z_aniso = field(4.5, 1.0) if horizontal else field(1.0, 4.5)
    stroma = labels == STROMA
    np.copyto(z, z_aniso, where=stroma)
    thresholds = np.array([1e6 if d <= 0 else ndtri(1 - d) for d in _NUCLEAR_DENSITY], dtype=np.float32)
    z -= thresholds[labels]
    z *= 2.5
    alpha = np.clip(z, 0.0, 1.0, out=z)

    lab3 = cv2.merge([labels, labels, labels])
    cyto = cv2.LUT(lab3, _lut(_CYTO))
    nuclei = cv2.LUT(lab3, _lut(_NUCLEUS))
    del lab3
    img = cv2.blendLinear(nuclei, cyto, alpha, 1.0 - alpha)
    del cyto, nuclei, alpha, z

    # Fat: Voronoi cells with thin pink membranes (computed in the fat's bounding box).
    fat = labels == FAT
    if fat.any():
        ys, xs = np.nonzero(fat.any(1))[0], np.nonzero(fat.any(0))[0]
        y0, y1 = ys[0], ys[-1] + 1
        x0, x1 = xs[0], xs[-1] + 1
        bh, bw = y1 - y0, x1 - x0
        cell_um = 55.0
        n_seeds = max(1, int(bh * bw * (mpp / cell_um) ** 2))
        seeds = np.ones((bh, bw), np.uint8)
        seeds[rng.integers(0, bh, n_seeds), rng.integers(0, bw, n_seeds)] = 0
        _, vor = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_CCOMP)
        edges = np.zeros((bh, bw), np.uint8)
        edges[:, 1:] |= vor[:, 1:] != vor[:, :-1]
        edges[1:, :] |= vor[1:, :] != vor[:-1, :]
        edges = cv2.dilate(edges, np.ones((3, 3), np.uint8), iterations=max(1, int(round(1.0 / mpp))))
        membrane = (edges > 0) & fat[y0:y1, x0:x1]
        img[y0:y1, x0:x1][membrane] = _MEMBRANE.astype(np.uint8)

    # One multiplicative factor per pixel and channel: stroma fibres (streaks along the
    # anisotropy), slow stain variation across the section (per channel), sensor noise.
    shade = z_aniso
    shade *= 0.06
    shade *= stroma
    shade += 1.0
    noise = rng.standard_normal((h, w), dtype=np.float32)
    noise *= 0.012
    noise += 1.0
    shade *= noise
    del z_aniso, stroma, noise
    small = (h // 32 + 2, w // 32 + 2)
    tissue_small = cv2.resize((labels != BACKGROUND).astype(np.float32), (small[1], small[0]), interpolation=cv2.INTER_AREA)
    # channel by channel, reusing one buffer: a (H, W, 3) float image costs more in page
    # faults than in arithmetic
    channels = list(cv2.split(img))
    factor = np.empty((h, w), np.float32)
    for c in range(3):
        gain_small = 1.0 + 0.05 * _smooth_noise(rng, small, 8.0) * tissue_small
        cv2.resize(gain_small, (w, h), dst=factor, interpolation=cv2.INTER_LINEAR)
        cv2.multiply(factor, shade, dst=factor)
        channels[c] = cv2.multiply(channels[c], factor, dtype=cv2.CV_8U)
    img = cv2.merge(channels)
    del factor, shade, channels

    artefacts = {"pen": np.zeros((h, w), bool), "fold": np.zeros((h, w), bool), "dust": np.zeros((h, w), bool)}
    if settings["artefacts"]:
        artefacts = _draw_artefacts(rng, img, labels, mpp)
    return img, labels, artefacts


def _lut(colours: np.ndarray) -> np.ndarray:
    """(256, 1, 3) uint8 lookup table from label code to RGB."""
    lut = np.zeros((256, 1, 3), np.uint8)
    lut[: len(colours), 0] = np.clip(colours, 0, 255).astype(np.uint8)
    return lut


def _bezier(rng, p0, p1, n=60):
    """A gently curved stroke between two points (quadratic Bezier)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    mid = (p0 + p1) / 2 + rng.normal(0, 0.25, 2) * np.linalg.norm(p1 - p0)
    t = np.linspace(0, 1, n)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * mid + t**2 * p1
    return pts.astype(np.int32)


def _draw_artefacts(rng, img, labels, mpp):
    import cv2

    h, w = labels.shape
    tissue = labels != BACKGROUND
    masks = {}

    # Fold: a band across the tissue where it lies double: darker and more saturated.
    fold = np.zeros((h, w), np.uint8)
    if rng.random() < 0.45:
        ys, xs = np.nonzero(tissue[::16, ::16])
        if len(ys):
            i = rng.integers(len(ys))
            c = np.array([xs[i] * 16, ys[i] * 16], float)
            angle = rng.uniform(0, np.pi)
            half = rng.uniform(0.15, 0.3) * min(h, w)
            d = np.array([np.cos(angle), np.sin(angle)]) * half
            width = int(rng.uniform(50, 110) / mpp)
            cv2.polylines(fold, [_bezier(rng, c - d, c + d)], False, 1, thickness=width)
    fold = (fold > 0) & tissue
    img[fold] = img[fold] * np.array([0.72, 0.66, 0.8], np.float32)
    masks["fold"] = fold

    # Pen marks: a stroke on the glass around the tissue (how pathologists circle a region),
    # sometimes crossing its edge.
    pen = np.zeros((h, w), np.uint8)
    if rng.random() < 0.5:
        colour = np.array(list(_PEN_COLOURS.values())[rng.integers(len(_PEN_COLOURS))], np.float32)
        ys, xs = np.nonzero(tissue)
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        rx, ry = (x1 - x0) / 2 * rng.uniform(1.0, 1.15), (y1 - y0) / 2 * rng.uniform(1.0, 1.15)
        start = rng.uniform(0, 2 * np.pi)
        t = np.linspace(start, start + rng.uniform(0.6, 1.6), 80)
        pts = np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1).astype(np.int32)
        width = int(rng.uniform(25, 50) / mpp)
        cv2.polylines(pen, [pts], False, 1, thickness=width)
        pen_mask = pen > 0
        # ink is a filter: it multiplies what lies beneath
        img[pen_mask] = img[pen_mask] * (colour / 255.0) * 0.9 + colour * 0.1
        masks["pen"] = pen_mask
    else:
        masks["pen"] = pen > 0

    # Dust: a few small dark specks on the glass.
    dust = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(3, 10))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        cv2.circle(dust, (x, y), int(rng.uniform(2, 6) / mpp) + 1, 1, -1)
    dust = (dust > 0) & ~tissue
    img[dust] = np.array((70, 60, 60), np.float32)
    masks["dust"] = dust
    return masks


def aperio_description(width: int, height: int, level_width: int, level_height: int, tile_px: int,
                       quality: int, mpp: float) -> str:
    """An Aperio-style ImageDescription: OpenSlide reads vendor, AppMag and MPP from it."""
    power = 10.0 / mpp
    size = f"{width}x{height} [0,0 {width}x{height}] ({tile_px}x{tile_px})"
    if (level_width, level_height) != (width, height):
        size += f" -> {level_width}x{level_height}"
    return (
        f"Aperio Image Library v12.0.15 \r\n{size} JPEG/RGB Q={quality}"
        f"|AppMag = {power:g}|MPP = {mpp:.4f}|ScanScope ID = MAMBAPATH-SYNTH|Filename = synthetic"
    )


def write_pyramid(path: Path, level0: np.ndarray, settings: dict) -> list[tuple[int, int]]:
    """Write a tiled, JPEG-compressed pyramidal TIFF, one page per level (no SubIFDs)."""
    import cv2
    import tifffile

    from .io import atomic_path

    h, w = level0.shape[:2]
    levels = [level0]
    for _ in range(1, settings["n_levels"]):
        prev = levels[-1]
        if min(prev.shape[:2]) < 32:
            break
        levels.append(cv2.resize(prev, (prev.shape[1] // 2, prev.shape[0] // 2), interpolation=cv2.INTER_AREA))
    tile = settings["tile_px"]
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=level0.nbytes > 2**31) as tif:
            for i, level in enumerate(levels):
                lh, lw = level.shape[:2]
                level_mpp = settings["mpp"] * w / lw
                tif.write(
                    level,
                    tile=(tile, tile),
                    compression="jpeg",
                    compressionargs={"level": int(settings["jpeg_quality"])},
                    photometric="rgb",
                    description=aperio_description(w, h, lw, lh, tile, settings["jpeg_quality"], settings["mpp"]),
                    metadata=None,
                    subfiletype=1 if i else 0,
                    resolution=(1e4 / level_mpp, 1e4 / level_mpp),
                    resolutionunit="CENTIMETER",
                )
    return [lvl.shape[1::-1] for lvl in levels]


# ---------------------------------------------------------------------------- one slide


def synth_slide(out_dir: str | Path, slide_id: str, seed: int, patient: int, slide: int, settings: dict) -> dict:
    """Write one slide and its ground truth; return its measured composition and arrangement."""
    import cv2
    from PIL import Image

    from .io import atomic_path

    out_dir = Path(out_dir)
    plan = plan_patient(seed, patient)
    rng = np.random.default_rng([seed, patient, 2 + slide])
    mpp = float(settings["mpp"])
    h, w = settings["height_px"], settings["width_px"]
    layout_um = 4.0
    layout_shape = (int(math.ceil(h * mpp / layout_um)), int(math.ceil(w * mpp / layout_um)))
    layout = make_layout(rng, plan, layout_shape, layout_um)
    level0, labels, artefacts = _render_level0(rng, layout, layout_um, settings)

    gt_shape = (max(1, int(round(w * mpp / GT_MPP))), max(1, int(round(h * mpp / GT_MPP))))
    types_map = cv2.resize(labels, gt_shape, interpolation=cv2.INTER_NEAREST)
    # The tissue mask is the area share of tissue in each GT pixel, >= one half.
    tissue_share = cv2.resize((labels != BACKGROUND).astype(np.float32), gt_shape, interpolation=cv2.INTER_AREA)
    gt_mask = (tissue_share >= 0.5).astype(np.uint8) * 255

    slide_path = out_dir / "slides" / f"{slide_id}.tiff"
    dims = write_pyramid(slide_path, level0, settings)
    synth_dir = out_dir / "synth"
    with atomic_path(synth_dir / f"{slide_id}_mask.png") as tmp:
        Image.fromarray(gt_mask).save(tmp)
    types_img = Image.fromarray(types_map, mode="P")
    palette = [c for code in range(len(TISSUE_TYPES)) for c in TYPE_PALETTE[code]]
    types_img.putpalette(palette + [0] * (768 - len(palette)))
    with atomic_path(synth_dir / f"{slide_id}_types.png") as tmp:
        types_img.save(tmp)

    measures = measure_types(types_map, GT_MPP)
    log.info("%s: %s, %d levels, burden %.2f, contact %.2f", slide_id, plan.arrangement, len(dims),
             measures["frac_tumour"] + measures["frac_necrosis"], measures["lymph_tumour_contact"])
    return {
        "slide_id": slide_id,
        "path": str(slide_path),
        "mpp": mpp,
        "width_px": w,
        "height_px": h,
        "n_levels": len(dims),
        "planned_arrangement": plan.arrangement,
        "pen_mark": bool(artefacts["pen"].any()),
        "fold": bool(artefacts["fold"].any()),
        "gt_mask": str(synth_dir / f"{slide_id}_mask.png"),
        "gt_types": str(synth_dir / f"{slide_id}_types.png"),
        "gt_mpp": GT_MPP,
        **measures,
    }


def _synth_slide_job(args):
    import cv2

    # one OpenCV thread per worker process: the processes already fill the cores
    cv2.setNumThreads(1)
    return synth_slide(*args)


# ---------------------------------------------------------------------------- cohort


def synth_cohort(out_dir: str | Path, cohort_name: str, synth_cfg: dict | None, workers: int = 1):
    """Write a whole synthetic cohort; return the cohort sheet as a DataFrame."""
    import pandas as pd
    from tqdm import tqdm

    from .io import write_csv

    settings = synth_settings(synth_cfg)
    out_dir = Path(out_dir)
    seed = settings["seed"]
    jobs = []
    for p, patient_id in enumerate(synth_patient_ids(cohort_name, settings)):
        for s in range(settings["slides_per_patient"]):
            jobs.append((out_dir, f"{patient_id}-S{s + 1}", seed, p, s, settings))
    log.info("writing %d synthetic slides (%dx%d px at %.2f mpp) to %s with %d worker(s)",
             len(jobs), settings["width_px"], settings["height_px"], settings["mpp"], out_dir, workers)
    if workers > 1:
        # spawn, not fork: a forked child inherits OpenCV's thread pool in whatever state the
        # parent's threads left it, and can hang on its locks
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            rows = list(tqdm(pool.map(_synth_slide_job, jobs), total=len(jobs), desc="synth slides", unit="slide"))
    else:
        rows = [synth_slide(*job) for job in tqdm(jobs, desc="synth slides", unit="slide")]

    measure_keys = [f"frac_{t}" for t in TISSUE_TYPES[1:]] + ["lymph_tumour_contact"]
    records = []
    for p, patient_id in enumerate(synth_patient_ids(cohort_name, settings)):
        slides = rows[p * settings["slides_per_patient"] : (p + 1) * settings["slides_per_patient"]]
        patient_measures = {k: float(np.mean([r[k] for r in slides])) for k in measure_keys}
        outcome = clinical_outcome(seed, p, patient_measures)
        for r in slides:
            records.append({
                "slide_id": r["slide_id"],
                "patient_id": patient_id,
                "path": r["path"],
                "mpp": r["mpp"],
                "stage": outcome["stage"],
                "os_days": outcome["os_days"],
                "os_event": outcome["os_event"],
                "label": outcome["label"],
                "burden": round(outcome["burden"], 4),
                "arrangement": outcome["arrangement"],
                **{k: round(r[k], 4) for k in measure_keys},
                "tissue_area_mm2": round(r["tissue_area_mm2"], 3),
                "planned_arrangement": r["planned_arrangement"],
                "stage_score": round(outcome["stage_score"], 4),
                "pen_mark": int(r["pen_mark"]),
                "fold": int(r["fold"]),
                "gt_mask": r["gt_mask"],
                "gt_types": r["gt_types"],
                "gt_mpp": r["gt_mpp"],
            })
    sheet = pd.DataFrame.from_records(records)
    from .config import validate_sheet

    validate_sheet(sheet, out_dir / "cohort" / "slides.csv")
    write_csv(out_dir / "cohort" / "slides.csv", sheet)
    log.info("cohort sheet: %s (%d slides; label 1: %d; stages %s)", out_dir / "cohort" / "slides.csv", len(sheet),
             int((sheet["label"] == "1").sum()), sheet["stage"].value_counts().sort_index().to_dict())
    return sheet


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--cohort-file", default=None,
                        help="cohort yaml (config/cohorts/<name>.yaml) whose `synth:` section is used")
    source.add_argument("--config", default=None,
                        help="workflow config yaml; its cohort's `synth:` section is used (default: config/config.yaml)")
    parser.add_argument("--out-dir", required=True, help="results/<cohort>: slides/, synth/ and cohort/ go here")
    parser.add_argument("--n-patients", type=int, default=None, help="override synth.n_patients")
    parser.add_argument("--seed", type=int, default=None, help="override synth.seed")
    parser.add_argument("--width-px", type=int, default=None, help="override synth.width_px (level-0 width)")
    parser.add_argument("--height-px", type=int, default=None, help="override synth.height_px (level-0 height)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (results do not depend on it)")


def _load_cohort_file(path) -> tuple[str, str, dict, Path]:
    from .config import CONFIG_DIR, _load_yaml, _validate

    path = Path(path)
    data = _load_yaml(path)
    _validate(data, CONFIG_DIR / "cohort.schema.yaml", str(path))
    return data["name"], data["source"], dict(data.get("synth") or {}), path


def run(args: argparse.Namespace) -> int:
    from .config import CONFIG_DIR, load_cohort, load_config

    if args.cohort_file:
        name, source, synth_cfg, path = _load_cohort_file(args.cohort_file)
    else:
        cohort = load_cohort(load_config(args.config or CONFIG_DIR / "config.yaml"))
        name, source, synth_cfg, path = cohort.name, cohort.source, dict(cohort.synth), cohort.file
    if source != "synth":
        raise ConfigError(
            f"{path}: cohort '{name}' has source '{source}', not 'synth'; "
            "`mambapath synth` writes synthetic cohorts only (set source: synth or pick the demo cohort)"
        )
    for key in ("n_patients", "seed", "width_px", "height_px"):
        value = getattr(args, key)
        if value is not None:
            synth_cfg[key] = value
    synth_cohort(args.out_dir, name, synth_cfg, workers=max(1, args.workers))
    return 0
