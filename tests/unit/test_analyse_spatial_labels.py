"""benchmarks/analyse_spatial_labels.py: tile-local contact against plain loops, file reading."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mambapath.synth import BACKGROUND, LYMPHOCYTES, NECROSIS, STROMA, TUMOUR

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "analyse_spatial_labels.py"


@pytest.fixture(scope="module")
def analysis():
    spec = importlib.util.spec_from_file_location("analyse_spatial_labels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up by name while the class body runs
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def loop_contact(types_map: np.ndarray, mpp: float, contact_um: float) -> np.ndarray:
    """Lymphocyte pixels within contact_um of a tumour/necrosis pixel, by checking every pair (float64)."""
    out = np.zeros(types_map.shape, dtype=bool)
    tumour_px = [(y, x) for y in range(types_map.shape[0]) for x in range(types_map.shape[1])
                 if types_map[y, x] in (TUMOUR, NECROSIS)]
    for y in range(types_map.shape[0]):
        for x in range(types_map.shape[1]):
            if types_map[y, x] != LYMPHOCYTES:
                continue
            out[y, x] = any(((y - ty) ** 2 + (x - tx) ** 2) ** 0.5 * mpp <= contact_um for ty, tx in tumour_px)
    return out


def random_types(rng, shape) -> np.ndarray:
    # blocky so that lymphocytes and tumour sit at a range of distances
    coarse = rng.choice([BACKGROUND, TUMOUR, STROMA, LYMPHOCYTES, NECROSIS], size=(shape[0] // 2, shape[1] // 2),
                        p=[0.2, 0.15, 0.35, 0.25, 0.05])
    return np.kron(coarse, np.ones((2, 2), dtype=coarse.dtype)).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tile_contact_mask_matches_pairwise_loop(analysis, seed):
    types_map = random_types(np.random.default_rng(seed), (14, 18))
    got = analysis.tile_contact_mask(types_map, gt_mpp=4.0, contact_um=8.0)  # 2 px: the boundary is hit
    np.testing.assert_array_equal(got, loop_contact(types_map, 4.0, 8.0))


def test_tile_contact_mask_without_tumour_is_empty(analysis):
    types_map = np.full((6, 6), LYMPHOCYTES, dtype=np.uint8)
    assert not analysis.tile_contact_mask(types_map, 4.0, 40.0).any()


def test_tile_boxes_scale_level0_coords_to_the_map(analysis):
    coords = np.array([[448, 224], [4000, 0]])  # second tile runs past the map's right edge
    boxes = analysis.tile_boxes_gt(coords, patch_size_level0=224, level0_mpp=1.0, gt_mpp=4.0, shape=(768, 1024))
    np.testing.assert_array_equal(boxes, [[56, 112, 112, 168], [0, 56, 1000, 1024]])


def test_slide_measures_count_same_tile_contact_like_a_loop(analysis):
    """Two side-by-side tiles; a lymphocyte band touches tumour across the tile border and within a tile."""
    types_map = np.full((8, 16), STROMA, dtype=np.uint8)
    types_map[:, 7] = LYMPHOCYTES  # left tile, its tumour neighbour is in the right tile
    types_map[:, 8] = TUMOUR
    types_map[0:2, 12] = LYMPHOCYTES  # right tile, tumour (column 8) 4 px away: beyond 1.5 px
    types_map[4:6, 9] = LYMPHOCYTES  # right tile, next to the tumour column: in-tile contact
    types_map[6, 2] = LYMPHOCYTES  # left tile, far from any tumour
    boxes = np.array([[0, 8, 0, 8], [0, 8, 8, 16]])
    mpp, contact_um = 4.0, 6.0  # 1.5 px

    tiles, slide = analysis.slide_tile_measures(types_map, boxes, mpp, contact_um)

    whole = loop_contact(types_map, mpp, contact_um)
    per_tile = [loop_contact(types_map[y0:y1, x0:x1], mpp, contact_um) for y0, y1, x0, x1 in boxes]
    within = np.zeros_like(whole)
    for (y0, y1, x0, x1), mask in zip(boxes, per_tile):
        within[y0:y1, x0:x1] |= mask
    n_lymph = [int((types_map[y0:y1, x0:x1] == LYMPHOCYTES).sum()) for y0, y1, x0, x1 in boxes]
    assert tiles["n_contact"].tolist() == [int(m.sum()) for m in per_tile] == [0, 2]
    assert tiles["n_lymph"].tolist() == n_lymph
    assert slide["contact_px_in_tiles"] == int(whole.sum()) == 10
    assert slide["contact_px_same_tile"] == int((whole & within).sum()) == 2
    assert slide["tile_contact_pooled"] == pytest.approx(2 / sum(n_lymph))
    assert slide["tiles_with_contact"] == 1
    assert slide["tiles_with_both"] == 1  # the left tile holds lymphocytes but no tumour
    assert tiles["dominant_type"].tolist() == ["stroma", "stroma"]
    assert tiles["frac_tumour_necrosis"].tolist() == pytest.approx([0.0, 8 / 64])


def test_method_scores_prefers_summary_and_marks_partial_runs(analysis, tmp_path):
    summary_dir = tmp_path / "eval" / "classification" / "abmil"
    summary_dir.mkdir(parents=True)
    (summary_dir / "summary.json").write_text(json.dumps({"metrics": {"auc": {"values": [0.5, 1.0]}}}))
    partial_dir = tmp_path / "eval" / "classification" / "mamba_mil" / "fold1"
    partial_dir.mkdir(parents=True)
    (partial_dir / "metrics.json").write_text(json.dumps({"metrics": {"auc": 0.75}}))

    full = analysis.method_scores(tmp_path, "classification", "abmil", "auc", n_folds=2)
    partial = analysis.method_scores(tmp_path, "classification", "mamba_mil", "auc", n_folds=2)
    assert (full.values, full.complete) == ([0.5, 1.0], True)
    assert (partial.values, partial.complete) == ([0.75], False)
    assert analysis.method_scores(tmp_path, "classification", "transmil", "auc", n_folds=2) is None


def test_shuffled_feature_dir_moves_rows_among_positions_only(analysis, tmp_path):
    import h5py

    source, target = tmp_path / "features", tmp_path / "shuffled"
    source.mkdir()
    rng = np.random.default_rng(3)
    features = rng.normal(size=(40, 6)).astype(np.float32)
    coords = np.stack([np.arange(40) * 224, np.zeros(40, dtype=np.int64)], axis=1)
    grid = np.stack([np.zeros(40, dtype=np.int64), np.arange(40)], axis=1)
    with h5py.File(source / "s1.h5", "w") as fh:
        fh["features"], fh["coords"], fh["grid"] = features, coords, grid
        fh.attrs["extractor"] = "resnet50_trunc"

    analysis.shuffled_feature_dir(source, target, seed=0)

    with h5py.File(target / "s1.h5", "r") as fh:
        shuffled = fh["features"][:]
        np.testing.assert_array_equal(fh["coords"][:], coords)
        np.testing.assert_array_equal(fh["grid"][:], grid)
        assert fh.attrs["extractor"] == "resnet50_trunc"
    # the same rows (as a multiset), most of them at another position
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, features.tolist()))
    assert (shuffled != features).any(axis=1).sum() > 30
    with h5py.File(source / "s1.h5", "r") as fh:  # the source is left alone
        np.testing.assert_array_equal(fh["features"][:], features)
