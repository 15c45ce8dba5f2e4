"""Tiling: coordinates inside the slide and the tissue, the HDF5 contract, scan orders,
magnification vs mpp, overlap, empty slides, and CLAM/TRIDENT coordinate files both ways.

The kept tiles are checked against a brute-force loop over every grid position on a
level-0 rendering of the mask, and against the synthetic ground truth.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from mambapath import synth
from mambapath.cli import main as cli_main
from mambapath.errors import DataError, SlideError
from mambapath.order import ORDERS, tile_order
from mambapath.segment import segment_slide
from mambapath.tiling import (
    Tiles,
    read_coords_file,
    read_tiles,
    tile_from_mask,
    tile_slide,
    write_clam_coords,
    write_tiles,
    write_trident_coords,
)

CONTRACT_ATTRS = ("patch_size", "patch_size_level0", "level0_mpp", "target_mpp", "magnification", "overlap",
                  "scan_order", "slide_id", "mpp_source", "status")


@pytest.fixture(scope="module")
def segmented(tiny_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiling_segment")
    for slide_id, path in zip(tiny_cohort.slide_ids, tiny_cohort.slide_paths):
        segment_slide(path, out / slide_id, slide_id)
    return out


@pytest.fixture(scope="module")
def tiled(tiny_cohort, segmented, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiles")
    for slide_id, path in zip(tiny_cohort.slide_ids, tiny_cohort.slide_paths):
        tile_slide(path, segmented / slide_id, out / f"{slide_id}.h5", slide_id, target_mpp=2.0, patch_size=64)
    return out


def test_tiles_lie_inside_the_slide_and_the_tissue(tiny_cohort, tiled):
    for slide_id in tiny_cohort.slide_ids:
        tiles = read_tiles(tiled / f"{slide_id}.h5")
        assert len(tiles) > 10
        ps0 = tiles.attrs["patch_size_level0"]
        assert ps0 == 128
        x, y = tiles.coords[:, 0], tiles.coords[:, 1]
        assert (x >= 0).all() and (y >= 0).all()
        assert (x + ps0 <= 1536).all() and (y + ps0 <= 1152).all()
        # ground truth at 4 um/px: each tile covers 32 x 32 GT pixels
        gt = np.asarray(Image.open(tiny_cohort.gt_mask_path(slide_id))) > 0
        fractions = np.array([gt[yy // 4 : (yy + ps0) // 4, xx // 4 : (xx + ps0) // 4].mean() for xx, yy in tiles.coords])
        assert fractions.min() >= 0.3  # min_tissue 0.5, less the segmentation's error at the border
        assert np.median(fractions) > 0.9


def test_hdf5_follows_the_contract(tiny_cohort, tiled):
    path = tiled / f"{tiny_cohort.slide_ids[0]}.h5"
    with h5py.File(path, "r") as h5:
        assert h5["coords"].dtype == np.int64 and h5["coords"].shape[1] == 2
        assert h5["grid"].dtype == np.int64 and h5["grid"].shape == h5["coords"].shape
        for key in CONTRACT_ATTRS:
            assert key in h5.attrs, key
        assert h5.attrs["status"] == "ok" and h5.attrs["slide_id"] == tiny_cohort.slide_ids[0]
        assert h5.attrs["target_mpp"] == 2.0 and h5.attrs["magnification"] == 5.0
        assert h5.attrs["mpp_source"] == "slide-mpp"
        # TRIDENT reads the coords dataset's own attributes
        assert h5["coords"].attrs["patch_size_level0"] == 128
        assert h5["coords"].attrs["target_magnification"] == 5.0
        coords, grid = h5["coords"][:], h5["grid"][:]
    np.testing.assert_array_equal(coords, grid[:, ::-1] * 128)  # x = col * step, y = row * step


def _level0_mask(mask: np.ndarray, ds: float, width0: int, height0: int) -> np.ndarray:
    """Nearest-neighbour rendering of a mask on level-0 pixels (pixel x lies in mask column x // ds)."""
    cols = np.minimum((np.arange(width0) + 0.5) // ds, mask.shape[1] - 1).astype(int)
    rows = np.minimum((np.arange(height0) + 0.5) // ds, mask.shape[0] - 1).astype(int)
    return mask[rows][:, cols]


@pytest.mark.parametrize("level0_mpp, target_mpp, patch, overlap, ds", [
    (1.0, 2.0, 64, 0, 16.0),
    (0.499, 2.0, 56, 8, 32.064),  # non-integer tile size and mask scale
    (0.25, 1.0, 32, 0, 10.0),
])
def test_kept_tiles_match_a_brute_force_loop(level0_mpp, target_mpp, patch, overlap, ds):
    rng = np.random.default_rng(3)
    import cv2

    mask = np.zeros((60, 80), np.uint8)
    for _ in range(6):
        cv2.circle(mask, (int(rng.integers(0, 80)), int(rng.integers(0, 60))), int(rng.integers(5, 18)), 1, -1)
    mask = mask > 0
    width0, height0 = int(80 * ds), int(60 * ds)
    tiles, fractions = tile_from_mask(mask, (ds, ds), level0_mpp, width0, height0, target_mpp, patch, overlap, 0.5)
    # brute force: every grid position, tissue share counted on level-0 pixels
    full = _level0_mask(mask, ds, width0, height0)
    ps0 = int(round(patch * target_mpp / level0_mpp))
    step = (patch - overlap) * target_mpp / level0_mpp
    expected, borderline = set(), set()
    col = 0
    while round(col * step) + ps0 <= width0:
        row = 0
        while round(row * step) + ps0 <= height0:
            x, y = round(col * step), round(row * step)
            share = full[y : y + ps0, x : x + ps0].mean()
            if share >= 0.5:
                expected.add((x, y))
            if abs(share - 0.5) < 0.01:
                borderline.add((x, y))
            row += 1
        col += 1
    got = {tuple(c) for c in tiles.coords.tolist()}
    assert got ^ expected <= borderline
    assert len(expected) > 5
    assert tiles.attrs["patch_size_level0"] == ps0
    assert (fractions >= 0.5).all()


@pytest.mark.parametrize("order", ORDERS)
def test_tiles_are_stored_in_the_declared_scan_order(tiny_cohort, segmented, tmp_path, order):
    slide_id = tiny_cohort.slide_ids[1]
    tiles = tile_slide(tiny_cohort.slide_paths[1], segmented / slide_id, tmp_path / "t.h5", slide_id,
                       target_mpp=2.0, patch_size=64, scan_order=order)
    stored = read_tiles(tmp_path / "t.h5")
    assert stored.attrs["scan_order"] == order
    np.testing.assert_array_equal(stored.grid, tiles.grid)
    np.testing.assert_array_equal(tile_order(stored.grid, order), np.arange(len(stored)))
    if order == "raster":  # checked without tile_order: rows ascending, columns ascending within a row
        key = stored.grid[:, 0] * 10_000 + stored.grid[:, 1]
        assert (np.diff(key) > 0).all()


def test_magnification_is_the_same_as_its_mpp(tiny_cohort, segmented, tmp_path):
    slide_id = tiny_cohort.slide_ids[0]
    a = tile_slide(tiny_cohort.slide_paths[0], segmented / slide_id, tmp_path / "a.h5", target_mpp=2.0, patch_size=64)
    b = tile_slide(tiny_cohort.slide_paths[0], segmented / slide_id, tmp_path / "b.h5", magnification=5, patch_size=64)
    np.testing.assert_array_equal(a.coords, b.coords)
    assert b.attrs["target_mpp"] == 2.0 and b.attrs["magnification"] == 5.0


def test_overlap_shrinks_the_step(tiny_cohort, segmented, tmp_path):
    slide_id = tiny_cohort.slide_ids[0]
    plain = tile_slide(tiny_cohort.slide_paths[0], segmented / slide_id, tmp_path / "a.h5", target_mpp=2.0,
                       patch_size=64)
    half = tile_slide(tiny_cohort.slide_paths[0], segmented / slide_id, tmp_path / "b.h5", target_mpp=2.0,
                      patch_size=64, overlap=32)
    assert half.attrs["overlap"] == 32 and half.attrs["patch_size_level0"] == 128
    assert (half.coords % 64 == 0).all() and not (half.coords % 128 == 0).all()
    assert 3.0 < len(half) / len(plain) < 5.0


def test_tiles_finer_than_level0_are_refused(tiny_cohort, segmented, tmp_path):
    slide_id = tiny_cohort.slide_ids[0]
    with pytest.raises(SlideError, match="finer than the slide's level 0"):
        tile_slide(tiny_cohort.slide_paths[0], segmented / slide_id, tmp_path / "x.h5", target_mpp=0.5)
    assert not (tmp_path / "x.h5").exists()


def test_no_tissue_gives_an_empty_file(tmp_path):
    rng = np.random.default_rng(2)
    glass = np.clip(242 + rng.normal(0, 2, (768, 1024, 3)), 0, 255).astype(np.uint8)
    slide = tmp_path / "blank.tiff"
    synth.write_pyramid(slide, glass, {**synth.SYNTH_DEFAULTS, "n_levels": 3})
    segment_slide(slide, tmp_path / "seg")
    argv = ["tile", "--slide", str(slide), "--segment-dir", str(tmp_path / "seg"), "--out", str(tmp_path / "t.h5"),
            "--target-mpp", "2.0", "--patch-size", "64"]
    assert cli_main(argv) == 0
    tiles = read_tiles(tmp_path / "t.h5")
    assert len(tiles) == 0 and tiles.coords.shape == (0, 2) and tiles.grid.shape == (0, 2)
    assert tiles.attrs["status"] == "no_tissue"


def test_missing_segmentation_is_a_clear_error(tiny_slide, tmp_path, capsys):
    argv = ["tile", "--slide", str(tiny_slide), "--segment-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "t.h5"),
            "--target-mpp", "2"]
    assert cli_main(argv) == 2
    assert "mambapath segment" in capsys.readouterr().err
    assert not (tmp_path / "t.h5").exists()


# ---- CLAM and TRIDENT coordinate files ----------------------------------------------------------


def _same_tiles(a: Tiles, b: Tiles):
    order_a = np.lexsort((a.coords[:, 0], a.coords[:, 1]))
    order_b = np.lexsort((b.coords[:, 0], b.coords[:, 1]))
    np.testing.assert_array_equal(a.coords[order_a], b.coords[order_b])
    np.testing.assert_array_equal(a.grid[order_a], b.grid[order_b])
    for key in ("patch_size", "patch_size_level0", "overlap"):
        assert a.attrs[key] == b.attrs[key], key
    assert a.attrs["target_mpp"] == pytest.approx(b.attrs["target_mpp"])
    assert a.attrs["level0_mpp"] == pytest.approx(b.attrs["level0_mpp"])


@pytest.mark.parametrize("overlap", [0, 16])
def test_trident_round_trip(tiny_cohort, segmented, tmp_path, overlap):
    slide_id = tiny_cohort.slide_ids[0]
    ours = tile_slide(tiny_cohort.slide_paths[0], segmented / slide_id, tmp_path / "ours.h5", slide_id,
                      target_mpp=2.0, patch_size=64, overlap=overlap)
    write_trident_coords(tmp_path / f"{slide_id}_patches.h5", ours)
    with h5py.File(tmp_path / f"{slide_id}_patches.h5", "r") as h5:
        attrs = dict(h5["coords"].attrs)
        assert attrs["level0_magnification"] == 10.0 and attrs["target_magnification"] == 5.0
        assert attrs["patch_size"] == 64 and attrs["patch_size_level0"] == 128 and attrs["overlap"] == overlap
    back = read_coords_file(tmp_path / f"{slide_id}_patches.h5")
    assert back.attrs["source"] == "trident" and back.attrs["slide_id"] == slide_id
    _same_tiles(ours, back)


def test_clam_round_trip_with_and_without_the_slide(tiny_cohort, segmented, tmp_path):
    slide_id, slide = tiny_cohort.slide_ids[0], tiny_cohort.slide_paths[0]
    ours = tile_slide(slide, segmented / slide_id, tmp_path / "ours.h5", slide_id, target_mpp=2.0, patch_size=64)
    # with the slide: 2 um/px is pyramid level 1, so CLAM reads 64 px there
    write_clam_coords(tmp_path / "clam.h5", ours, slide_path=slide)
    with h5py.File(tmp_path / "clam.h5", "r") as h5:
        assert h5["coords"].attrs["patch_level"] == 1 and h5["coords"].attrs["patch_size"] == 64
    _same_tiles(ours, read_coords_file(tmp_path / "clam.h5", slide_path=slide))
    # without it: level 0, 128 px read and resized to the target size
    write_clam_coords(tmp_path / "clam0.h5", ours)
    with h5py.File(tmp_path / "clam0.h5", "r") as h5:
        assert h5["coords"].attrs["patch_level"] == 0 and h5["coords"].attrs["patch_size"] == 128
    with pytest.raises(SlideError, match="no physical scale"):
        read_coords_file(tmp_path / "clam0.h5")
    _same_tiles(ours, read_coords_file(tmp_path / "clam0.h5", level0_mpp=1.0))


def test_reads_clam_file_as_clam_writes_it(tmp_path):
    """CLAM: per-contour grids (different origins), step = patch size, attrs on `coords`."""
    contour_a = [(100 + 256 * i, 50 + 256 * j) for i in range(3) for j in range(2)]
    contour_b = [(1500 + 256 * i, 900 + 256 * j) for i in range(2) for j in range(2)]
    coords = np.array(contour_a + contour_b, np.int64)
    with h5py.File(tmp_path / "slide.h5", "w") as h5:
        d = h5.create_dataset("coords", data=coords)
        d.attrs.update({"patch_size": 256, "patch_level": 0, "downsample": np.array([1.0, 1.0]),
                        "downsampled_level_dim": np.array([4000, 3000]), "level_dim": np.array([4000, 3000]),
                        "name": "slide", "save_path": "x"})
    tiles = read_coords_file(tmp_path / "slide.h5", level0_mpp=0.5, slide_id="S1")
    assert tiles.attrs["source"] == "clam" and tiles.attrs["slide_id"] == "S1"
    assert tiles.attrs["target_mpp"] == 0.5 and tiles.attrs["patch_size_level0"] == 256
    assert tiles.attrs["overlap"] == 0 and tiles.attrs["grid_collisions"] == 0
    assert len(tiles) == 10 and len(np.unique(tiles.grid, axis=0)) == 10
    # neighbours on the slide are neighbours on the grid
    a = {tuple(c): tuple(g) for c, g in zip(tiles.coords.tolist(), tiles.grid.tolist())}
    assert a[(356, 50)][1] - a[(100, 50)][1] == 1 and a[(100, 306)][0] - a[(100, 50)][0] == 1
    write_tiles(tmp_path / "ours.h5", tiles)
    assert len(read_tiles(tmp_path / "ours.h5")) == 10


def test_reads_trident_file_as_trident_writes_it(tmp_path):
    coords = np.array([[0, 0], [512, 0], [1024, 512]], np.int64)
    with h5py.File(tmp_path / "slide_patches.h5", "w") as h5:
        d = h5.create_dataset("coords", data=coords)
        d.attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 20,
                        "target_magnification": 10, "overlap": 0, "name": "slide", "savetodir": "x"})
    tiles = read_coords_file(tmp_path / "slide_patches.h5")
    assert tiles.attrs["level0_mpp"] == 0.5 and tiles.attrs["target_mpp"] == 1.0
    assert tiles.attrs["mpp_source"] == "trident-level0_magnification"
    assert sorted(map(tuple, tiles.grid.tolist())) == [(0, 0), (0, 1), (1, 2)]


def test_unknown_coordinate_file_is_a_clear_error(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as h5:
        h5.create_dataset("coords", data=np.zeros((2, 2), np.int64))
    with pytest.raises(DataError, match="neither TRIDENT attributes"):
        read_coords_file(tmp_path / "x.h5")


def test_cli_import_and_export(tiny_cohort, tiled, tmp_path):
    slide_id, slide = tiny_cohort.slide_ids[0], tiny_cohort.slide_paths[0]
    ours = tiled / f"{slide_id}.h5"
    for fmt in ("trident", "clam"):
        assert cli_main(["tile", "--export", fmt, "--tiles", str(ours), "--slide", str(slide),
                         "--out", str(tmp_path / f"{fmt}.h5")]) == 0
        assert cli_main(["tile", "--import-coords", str(tmp_path / f"{fmt}.h5"), "--slide", str(slide),
                         "--slide-id", slide_id, "--out", str(tmp_path / f"back_{fmt}.h5")]) == 0
        _same_tiles(read_tiles(ours), read_tiles(tmp_path / f"back_{fmt}.h5"))


# ---- real slides and bad input from ../shared/data ----------------------------------------------


@pytest.mark.shared_data
@pytest.mark.parametrize("rel, fallback", [("wsi/CMU-1-Small-Region.svs", None), ("wsi/tcga-cr-7395-01a-01-ts1.svs", 0.25),
                                           ("wsi/test_dicom.dcm", None)])
def test_real_slides_tile_inside_slide_and_tissue(shared_data, tmp_path, rel, fallback):
    import openslide

    slide = shared_data / rel
    summary = segment_slide(slide, tmp_path / "seg", fallback_mpp=fallback)
    tiles = tile_slide(slide, tmp_path / "seg", tmp_path / "t.h5", target_mpp=2.0, patch_size=112)
    assert len(tiles) > 5
    w0, h0 = openslide.open_slide(str(slide)).dimensions
    ps0 = tiles.attrs["patch_size_level0"]
    assert ps0 == round(112 * 2.0 / summary["level0_mpp"])
    assert (tiles.coords >= 0).all() and (tiles.coords[:, 0] + ps0 <= w0).all() and (tiles.coords[:, 1] + ps0 <= h0).all()
    mask = np.asarray(Image.open(tmp_path / "seg" / "mask.png")) > 0
    # tissue share of each tile, counted on a level-0 rendering of the mask
    dx, dy = summary["mask_downsample"]
    assert dx == pytest.approx(dy, rel=0.02)
    full = _level0_mask(mask, dx, w0, h0)
    shares = np.array([full[y : y + ps0, x : x + ps0].mean() for x, y in tiles.coords])
    assert shares.min() >= 0.5 - 0.03
    assert tiles.attrs["mpp_source"] == ("cohort-config" if fallback else "slide-mpp")


@pytest.mark.shared_data
def test_unreadable_slide_fails_tiling_without_output(shared_data, tiny_cohort, segmented, tmp_path, capsys):
    bad = shared_data / "wsi_edge_cases/histolab/broken.svs"
    argv = ["tile", "--slide", str(bad), "--segment-dir", str(segmented / tiny_cohort.slide_ids[0]),
            "--out", str(tmp_path / "t.h5"), "--target-mpp", "2"]
    assert cli_main(argv) == 2
    assert "broken.svs" in capsys.readouterr().err
    assert not (tmp_path / "t.h5").exists()


def test_stale_segmentation_is_detected(tiny_cohort, segmented, tmp_path):
    other = tmp_path / "other.tiff"
    synth.write_pyramid(other, np.full((384, 512, 3), 240, np.uint8), {**synth.SYNTH_DEFAULTS, "n_levels": 2})
    with pytest.raises(DataError, match="segment the slide again"):
        tile_slide(other, segmented / tiny_cohort.slide_ids[0], tmp_path / "t.h5", target_mpp=2.0)
    assert not (tmp_path / "t.h5").exists()
