"""Slide images for pixel models: read at a magnification, cached by `mambapath pixels`, served."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from mambapath.cli import main as cli_main
from mambapath.errors import DataError
from mambapath.pixel_data import PixelSlideDataset, cache_paths, magnification_tag, pixel_settings


@pytest.fixture(scope="module")
def segmented(tiny_cohort, tmp_path_factory):
    """The tiny cohort's first two slides segmented into a results-like folder."""
    from mambapath.segment import segment_slide

    root = tmp_path_factory.mktemp("pixel_results")
    slide_ids = tiny_cohort.slide_ids[:2]
    for slide_id, path in zip(slide_ids, tiny_cohort.slide_paths):
        segment_slide(path, root / "segment" / slide_id, slide_id=slide_id)
    return root, slide_ids


def _write_cache(tiny_cohort, root, slide_id, magnification):
    out_dir = root / "pixels" / magnification_tag(magnification)
    path = tiny_cohort.sheet.set_index("slide_id").loc[slide_id, "path"]
    status = cli_main(["pixels", "--slide", str(path), "--slide-id", slide_id, "--magnification", str(magnification),
                       "--segment-dir", str(root / "segment" / slide_id), "--out-dir", str(out_dir)])
    assert status == 0
    return out_dir


def test_slide_is_read_at_the_magnification_from_its_mpp(tiny_cohort, segmented):
    root, slide_ids = segmented
    out_dir = _write_cache(tiny_cohort, root, slide_ids[0], 2.5)  # 4 um/px on a 1 um/px slide
    paths = cache_paths(out_dir, slide_ids[0])
    summary = json.loads(paths["summary"].read_text())
    assert summary["target_mpp"] == 4.0 and summary["level0_mpp"] == 1.0
    assert (summary["height"], summary["width"]) == (1152 // 4, 1536 // 4)

    # independent reference: level 0 of the TIFF averaged over 4 x 4 pixel blocks
    level0 = tifffile.imread(tiny_cohort.slide_paths[0], level=0)[..., :3].astype(np.float64)
    expected = level0.reshape(288, 4, 384, 4, 3).mean(axis=(1, 3))
    dataset = PixelSlideDataset(tiny_cohort.sheet.iloc[:1], magnification=2.5, cache_dir=out_dir,
                                segment_root=root / "segment")
    item = dataset[0]
    image = item.image[0].permute(1, 2, 0).numpy() * 255.0
    assert item.image.shape == (1, 3, 288, 384) and item.image.dtype == torch.float32
    assert float(item.image.min()) >= 0.0 and float(item.image.max()) <= 1.0
    # the slide's levels are JPEG-compressed, so the match is close, not exact; the same slide
    # at 8 um/px (each value repeated 2 x 2) is already much further away
    too_coarse = np.kron(level0.reshape(144, 8, 192, 8, 3).mean(axis=(1, 3)), np.ones((2, 2, 1)))
    assert np.corrcoef(image.ravel(), expected.ravel())[0, 1] > 0.98
    assert np.abs(image - expected).mean() < 4.0 < np.abs(image - too_coarse).mean()

    # the tissue mask: the segmentation mask (16 um/px) taken to 4 um/px by nearest neighbour
    from PIL import Image

    seg = np.asarray(Image.open(root / "segment" / slide_ids[0] / "mask.png")) > 0
    rows = np.minimum((np.arange(288) + 0.5) * seg.shape[0] / 288, seg.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(384) + 0.5) * seg.shape[1] / 384, seg.shape[1] - 1).astype(int)
    expected_mask = seg[rows][:, cols]
    assert item.tissue_mask.shape == (1, 288, 384)
    assert (item.tissue_mask[0].numpy() == expected_mask).mean() > 0.99
    assert summary["tissue_fraction"] == pytest.approx(expected_mask.mean(), abs=0.01)


def test_dataset_drops_slides_without_tissue_and_names_missing_files(tiny_cohort, segmented):
    root, slide_ids = segmented
    out_dir = _write_cache(tiny_cohort, root, slide_ids[1], 1.25)
    _write_cache(tiny_cohort, root, slide_ids[0], 1.25)
    summary_path = cache_paths(out_dir, slide_ids[1])["summary"]
    summary = json.loads(summary_path.read_text())
    summary_path.write_text(json.dumps({**summary, "status": "no_tissue"}))
    try:
        dataset = PixelSlideDataset(tiny_cohort.sheet.iloc[:2], magnification=1.25, cache_dir=out_dir,
                                    segment_root=root / "segment", drop_background=False)
        assert dataset.slide_ids == [slide_ids[0]]
        assert dataset.dropped == {slide_ids[1]: "segmentation status no_tissue"}
        assert dataset[0].tissue_mask is None  # not asked for
    finally:
        summary_path.write_text(json.dumps(summary))

    with pytest.raises(DataError, match="pixels rule"):
        PixelSlideDataset(tiny_cohort.sheet.iloc[:3], magnification=1.25, cache_dir=out_dir,
                          segment_root=root / "segment")
    with pytest.raises(DataError, match="not 5x"):
        PixelSlideDataset(tiny_cohort.sheet.iloc[:1], magnification=5.0, cache_dir=out_dir,
                          segment_root=root / "segment")


def test_direct_reading_matches_the_cache(tiny_cohort, segmented):
    root, slide_ids = segmented
    out_dir = _write_cache(tiny_cohort, root, slide_ids[0], 1.25)
    cached = PixelSlideDataset(tiny_cohort.sheet.iloc[:1], magnification=1.25, cache_dir=out_dir,
                               segment_root=root / "segment")[0]
    direct = PixelSlideDataset(tiny_cohort.sheet.iloc[:1], magnification=1.25, cache_dir=None,
                               segment_root=root / "segment")[0]
    assert torch.equal(cached.image, direct.image)
    assert torch.equal(cached.tissue_mask, direct.tissue_mask)


def test_pixel_settings_fall_back_to_the_model_defaults():
    settings = pixel_settings({"name": "m", "kwargs": {"scan_window": 32}})
    assert settings == {"magnification": 2.5, "drop_background": True, "scan_window": 32, "region_min_tissue": 0.0}
    assert magnification_tag(2.5) == "2.5x" and magnification_tag(1.0) == "1x" and magnification_tag(0.3125) == "0.3125x"


def test_a_magnification_finer_than_the_slide_is_an_error(tiny_cohort, segmented, tmp_path):
    root, slide_ids = segmented
    with pytest.raises(DataError, match="finest level"):
        from mambapath.pixel_data import write_pixel_cache

        write_pixel_cache(tiny_cohort.slide_paths[0], slide_ids[0], 20.0, root / "segment" / slide_ids[0], tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_sheet_frame_is_what_the_dataset_reads():
    frame = pd.DataFrame({"slide_id": ["a"], "path": ["/nonexistent.svs"]})
    with pytest.raises(DataError, match="missing"):
        PixelSlideDataset(frame, magnification=2.5, cache_dir="/nonexistent_dir")


def test_train_inputs_follow_the_methods_input_kind():
    from mambapath.config import CONFIG_DIR, load_config
    from mambapath.pixel_data import train_input_files

    config = load_config(CONFIG_DIR / "config.yaml")
    features = ["results/demo/features/x/a.h5"]
    assert train_input_files("abmil", config, "R", ["a", "b"], features) == features
    assert train_input_files("pixel_mamba-1.0x", config, "R", ["a", "b"], features) == ["R/pixels/1x/a.json",
                                                                                        "R/pixels/1x/b.json"]
    override = {**config, "train": {**config["train"], "model_kwargs": {"pixel_mamba": {"magnification": 0.3125}}}}
    assert train_input_files("pixel_mamba", override, "R", ["a"], features) == ["R/pixels/0.3125x/a.json"]
    no_cache = {**config, "pixel": {**config.get("pixel", {}), "cache": False}}
    assert train_input_files("pixel_mamba", no_cache, "R", ["a"], features) == ["R/segment/a/summary.json"]
