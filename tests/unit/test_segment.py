"""Tissue segmentation: Dice against synthetic ground truth, pen removal, GeoJSON, bad input.

Dice is computed here with plain numpy against the ground-truth masks that ``mambapath
synth`` writes; polygons are rasterised with PIL (not the code's own rasteriser).
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from mambapath import synth
from mambapath.cli import main as cli_main
from mambapath.errors import SlideError
from mambapath.segment import SegmentParams, mask_to_geojson, segment_slide, segment_tissue

DICE_MIN = 0.90  # per slide
DICE_MEAN_MIN = 0.93


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def gt_at(mask_path, shape) -> np.ndarray:
    """Ground-truth mask resampled (area share >= 1/2) onto a mask of ``shape``."""
    gt = np.asarray(Image.open(mask_path)).astype(np.float32) / 255.0
    return cv2.resize(gt, (shape[1], shape[0]), interpolation=cv2.INTER_AREA) >= 0.5


@pytest.fixture(scope="module")
def segmented(tiny_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("segment")
    summaries = {}
    for slide_id, path in zip(tiny_cohort.slide_ids, tiny_cohort.slide_paths):
        summaries[slide_id] = segment_slide(path, out / slide_id, slide_id)
    return out, summaries


def test_dice_against_synthetic_ground_truth(tiny_cohort, segmented):
    out, summaries = segmented
    scores = []
    for slide_id in tiny_cohort.slide_ids:
        mask = np.asarray(Image.open(out / slide_id / "mask.png")) > 0
        scores.append(dice(mask, gt_at(tiny_cohort.gt_mask_path(slide_id), mask.shape)))
    print("segmentation Dice vs ground truth:", " ".join(f"{s:.3f}" for s in scores), f"mean {np.mean(scores):.3f}")
    assert min(scores) >= DICE_MIN
    assert np.mean(scores) >= DICE_MEAN_MIN


def test_summary_records_scale_and_level(tiny_cohort, segmented):
    out, summaries = segmented
    for slide_id in tiny_cohort.slide_ids:
        s = json.loads((out / slide_id / "summary.json").read_text())
        assert s["status"] == "ok"
        assert s["level0_mpp"] == pytest.approx(1.0)
        assert s["mpp_source"] == "slide-mpp"
        assert s["level_used"] == 2  # the coarsest level (4 um/px) at least as fine as 16 um/px
        assert s["seg_mpp"] == pytest.approx(16.0)
        assert (s["mask_width"], s["mask_height"]) == (96, 72)
        gt = np.asarray(Image.open(tiny_cohort.gt_mask_path(slide_id))) > 0
        assert s["tissue_fraction"] == pytest.approx(gt.mean(), abs=0.06)
        assert {"mask.png", "contours.geojson", "overlay.png", "summary.json"} <= {p.name for p in (out / slide_id).iterdir()}


def test_level_is_chosen_by_mpp(tiny_slide, tmp_path):
    s = segment_slide(tiny_slide, tmp_path / "fine", params=SegmentParams(seg_mpp=2.0))
    assert s["level_used"] == 1 and s["seg_mpp"] == pytest.approx(2.0)
    s = segment_slide(tiny_slide, tmp_path / "finest", params=SegmentParams(seg_mpp=0.5))
    assert s["level_used"] == 0 and s["seg_mpp"] == pytest.approx(1.0)  # never finer than level 0


def _rasterise(geojson: dict, shape, scale) -> np.ndarray:
    image = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(image)
    for feature in geojson["features"]:
        rings = feature["geometry"]["coordinates"]
        for i, ring in enumerate(rings):
            pts = [(x / scale[0] - 0.5, y / scale[1] - 0.5) for x, y in ring]
            draw.polygon(pts, fill=255 if i == 0 else 0, outline=255)
    return np.asarray(image) > 0


def test_geojson_is_qupath_annotations_in_level0_pixels(tiny_cohort, segmented):
    out, summaries = segmented
    for slide_id in tiny_cohort.slide_ids:
        s = summaries[slide_id]
        geojson = json.loads((out / slide_id / "contours.geojson").read_text())
        assert geojson["type"] == "FeatureCollection" and geojson["features"]
        for feature in geojson["features"]:
            assert feature["geometry"]["type"] == "Polygon"
            assert feature["properties"]["objectType"] == "annotation"
            assert feature["properties"]["classification"]["name"] == "Tissue"
            for ring in feature["geometry"]["coordinates"]:
                ring = np.asarray(ring)
                assert (ring[0] == ring[-1]).all() and len(ring) >= 4
                assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= s["level0_width"]
                assert ring[:, 1].min() >= 0 and ring[:, 1].max() <= s["level0_height"]
        mask = np.asarray(Image.open(out / slide_id / "mask.png")) > 0
        drawn = _rasterise(geojson, mask.shape, s["mask_downsample"])
        assert (drawn & mask).sum() / (drawn | mask).sum() > 0.97


def test_geojson_holes_and_orientation():
    mask = np.zeros((60, 80), bool)
    mask[10:50, 10:70] = True
    mask[20:35, 25:45] = False  # a hole
    mask[25:30, 32:38] = True  # an island inside the hole
    geojson = mask_to_geojson(mask, (16.0, 16.0))
    polygons = [f["geometry"]["coordinates"] for f in geojson["features"]]
    assert sorted(len(p) for p in polygons) == [1, 2]  # outer with hole; island alone

    def signed_area(ring):
        r = np.asarray(ring)
        return 0.5 * np.sum(r[:-1, 0] * r[1:, 1] - r[1:, 0] * r[:-1, 1])

    with_hole = next(p for p in polygons if len(p) == 2)
    assert signed_area(with_hole[0]) > 0 > signed_area(with_hole[1])  # right-hand rule
    xs = np.asarray(with_hole[0])[:, 0]
    assert xs.min() == pytest.approx(10.5 * 16) and xs.max() == pytest.approx(69.5 * 16)


def _glass_with_tissue_and_pen(rng):
    h, w = 200, 300
    img = np.full((h, w, 3), 242, np.uint8)
    tissue = np.zeros((h, w), np.uint8)
    cv2.ellipse(tissue, (140, 100), (80, 55), 0, 0, 360, 1, -1)
    tissue = tissue > 0
    img[tissue] = (226, 150, 190)
    ink = {}
    for name, colour, y in (("green", (45, 140, 70), 20), ("blue", (40, 65, 160), 180), ("black", (30, 28, 48), 170)):
        stroke = np.zeros((h, w), np.uint8)
        cv2.line(stroke, (10, y), (280, y - 10), 1, 6)
        stroke = (stroke > 0) & ~tissue
        img[stroke] = colour
        ink[name] = stroke
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    return img, tissue, ink


def test_pen_marks_are_removed_only_when_asked():
    img, tissue, ink = _glass_with_tissue_and_pen(np.random.default_rng(0))
    params = SegmentParams(min_area_um2=0, min_hole_um2=0, close_um=0)
    with_pen = segment_tissue(img, 16.0, params).tissue_mask
    kept = segment_tissue(img, 16.0, SegmentParams(**{**params.__dict__, "remove_pen": False})).tissue_mask
    for name, stroke in ink.items():
        assert with_pen[stroke].mean() < 0.05, name
        assert kept[stroke].mean() > 0.9, name  # the same ink is tissue to saturation alone
    assert dice(with_pen, tissue) > 0.97


def test_slide_without_tissue_is_a_recorded_skip(tmp_path):
    rng = np.random.default_rng(1)
    glass = np.clip(242 + rng.normal(0, 2, (768, 1024, 3)), 0, 255).astype(np.uint8)
    path = tmp_path / "blank.tiff"
    synth.write_pyramid(path, glass, {**synth.SYNTH_DEFAULTS, "n_levels": 3})
    assert cli_main(["segment", "--slide", str(path), "--out-dir", str(tmp_path / "seg")]) == 0
    summary = json.loads((tmp_path / "seg" / "summary.json").read_text())
    assert summary["status"] == "no_tissue" and summary["tissue_fraction"] == 0.0
    assert not (np.asarray(Image.open(tmp_path / "seg" / "mask.png")) > 0).any()
    assert json.loads((tmp_path / "seg" / "contours.geojson").read_text())["features"] == []


# ---- bad input from ../shared/data -------------------------------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "rel, words",
    [
        ("wsi_edge_cases/histolab/broken.svs", ["broken.svs", "not a readable whole-slide image"]),
        ("wsi_edge_cases/openslide_python/unreadable.svs", ["unreadable.svs", "cannot be read", "re-download"]),
        ("wsi_edge_cases/openslide_python/unopenable.tiff", ["unopenable.tiff", "Unsupported TIFF compression"]),
    ],
)
def test_unreadable_slides_fail_clearly_and_leave_nothing(shared_data, tmp_path, capsys, rel, words):
    out = tmp_path / "seg"
    assert cli_main(["segment", "--slide", str(shared_data / rel), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mambapath segment: error:")
    for word in words:
        assert word in err
    assert "drop it from the cohort sheet" in err or "re-download" in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.shared_data
def test_slide_without_mpp_needs_a_fallback(shared_data, tmp_path, capsys):
    slide = shared_data / "wsi/tcga-cr-7395-01a-01-ts1.svs"
    assert cli_main(["segment", "--slide", str(slide), "--out-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "tcga-cr-7395-01a-01-ts1.svs" in err and "no mpp" in err and "cohort" in err
    assert not (tmp_path / "a").exists()
    assert cli_main(["segment", "--slide", str(slide), "--out-dir", str(tmp_path / "b"), "--fallback-mpp", "0.25"]) == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["mpp_source"] == "cohort-config" and summary["level0_mpp"] == 0.25
    assert summary["level_used"] == 1 and summary["status"] == "ok"


@pytest.mark.shared_data
def test_flat_image_with_almost_no_tissue(shared_data, tmp_path, capsys):
    slide = shared_data / "wsi_edge_cases/histolab/kidney-48-5.tif"
    assert cli_main(["segment", "--slide", str(slide), "--out-dir", str(tmp_path / "a")]) == 2
    assert "no mpp" in capsys.readouterr().err
    assert cli_main(["segment", "--slide", str(slide), "--out-dir", str(tmp_path / "b"), "--fallback-mpp", "0.5"]) == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"] == "no_tissue"


def _non_white_fraction(rgb: np.ndarray) -> float:
    """A crude independent tissue estimate: pixels clearly darker or more coloured than glass."""
    rgb = rgb.astype(int)
    return float(((rgb.min(-1) < 200) | (rgb.max(-1) - rgb.min(-1) > 25)).mean())


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "rel, fallback, lo, hi",
    [
        ("wsi/CMU-1-Small-Region.svs", None, 0.2, 0.6),
        ("wsi/tcga-cr-7395-01a-01-ts1.svs", 0.25, 0.4, 0.85),
        ("wsi/test_dicom.dcm", None, 0.2, 0.6),
    ],
)
def test_real_slides_have_plausible_tissue(shared_data, tmp_path, rel, fallback, lo, hi):
    from mambapath.segment import read_at_mpp
    from mambapath.slide import open_slide, resolve_mpp

    summary = segment_slide(shared_data / rel, tmp_path / "seg", fallback_mpp=fallback)
    assert summary["status"] == "ok"
    assert lo < summary["tissue_fraction"] < hi
    slide = open_slide(shared_data / rel)
    scale = resolve_mpp(slide, rel, fallback)
    rgb, _, _ = read_at_mpp(slide, scale.mpp, 16.0)
    assert summary["tissue_fraction"] == pytest.approx(_non_white_fraction(rgb), abs=0.12)


def test_no_mpp_error_type(tmp_path):
    """A flat PNG has no scale: SlideError (the CLI's exit 2) unless a fallback is given."""
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((64, 64, 3), 240, np.uint8)).save(path)
    with pytest.raises(SlideError, match="no mpp"):
        segment_slide(path, tmp_path / "seg")


def test_fallback_mpp_comes_from_the_sheet_then_the_cohort(tmp_path):
    from mambapath.config import Cohort
    from mambapath.segment import fallback_mpp_arg

    sheet = tmp_path / "slides.csv"
    sheet.write_text("slide_id,patient_id,path,mpp\nA,p1,a.svs,0.25\nB,p2,b.svs,\n")
    cohort = Cohort(name="c", source="sheet", tasks=[], sheet=sheet, mpp=0.5)
    assert fallback_mpp_arg(cohort, "A") == "0.25"
    assert fallback_mpp_arg(cohort, "B") == "0.5"
    assert fallback_mpp_arg(Cohort(name="c", source="sheet", tasks=[], sheet=sheet), "B") == "none"
    assert fallback_mpp_arg(Cohort(name="d", source="synth", tasks=[]), "X") == "none"


def test_block_reading_matches_one_read(tiny_slide):
    from mambapath.segment import read_at_mpp
    from mambapath.slide import open_slide

    slide = open_slide(tiny_slide)
    whole, level, ds = read_at_mpp(slide, 1.0, 3.0)
    blocks, level_b, ds_b = read_at_mpp(slide, 1.0, 3.0, block=50, max_single_read_px=0)
    assert level == level_b == 1 and ds == ds_b and whole.shape == blocks.shape == (384, 512, 3)
    assert np.abs(whole.astype(int) - blocks.astype(int)).mean() < 3.0
