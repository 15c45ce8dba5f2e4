"""2DMambaMIL: the slide's own grid, translation invariance, padding, spatial sensitivity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mambapath.errors import DataError
from mambapath.models import Bag, create_model

IN_DIM = 10


def _slide(n_rows=4, n_cols=6, keep=0.7, seed=0):
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:n_rows, :n_cols]
    grid = np.stack([rows.ravel(), cols.ravel()], axis=1)
    grid = grid[rng.random(len(grid)) < keep]
    grid = torch.as_tensor(grid[rng.permutation(len(grid))] + [2, 5], dtype=torch.long)
    features = torch.as_tensor(rng.normal(size=(len(grid), IN_DIM)), dtype=torch.float32)
    return features, grid


def _bag(features, grid, coords=None):
    coords = grid.flip(-1) * 224 if coords is None else coords
    return Bag(features[None], coords[None], grid[None], torch.ones(1, len(features), dtype=torch.bool))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("mamba2d_mil_tiny", in_dim=IN_DIM, n_outputs=3).eval()


def test_shape_and_backward_reach_the_padding_token():
    torch.manual_seed(0)
    model = create_model("mamba2d_mil_tiny", in_dim=IN_DIM, n_outputs=3)
    assert model.input_kind == "features" and model.tile_order is None
    features, grid = _slide(seed=1)
    out = model(_bag(features, grid))
    assert out.shape == (1, 3)
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.pad_token.grad.abs().sum() > 0  # the grid has holes: the padding token is used


def test_map_is_the_bounding_box_with_padding_in_empty_cells(model):
    features, grid = _slide(seed=2)
    tiles = torch.randn(len(features), 16)
    canvas, rows, cols = model.place_on_grid(tiles, grid)
    height = int(grid[:, 0].max() - grid[:, 0].min()) + 1
    width = int(grid[:, 1].max() - grid[:, 1].min()) + 1
    assert canvas.shape == (1, height, width, 16)
    occupied = {(int(r) - int(grid[:, 0].min()), int(c) - int(grid[:, 1].min())): k for k, (r, c) in enumerate(grid)}
    for i in range(height):
        for j in range(width):
            expected = tiles[occupied[(i, j)]] if (i, j) in occupied else model.pad_token
            torch.testing.assert_close(canvas[0, i, j], expected)


def test_translating_the_slide_does_not_change_the_output(model):
    features, grid = _slide(seed=3)
    out = model(_bag(features, grid))
    shift = torch.tensor([17, 230])
    moved = model(_bag(features, grid + shift, coords=(grid + shift).flip(-1) * 224 + 5))
    torch.testing.assert_close(out, moved, atol=1e-6, rtol=0)


def test_padding_slots_and_storage_order_do_not_change_the_output(model):
    slides = [_slide(seed=4), _slide(seed=5, n_rows=3, n_cols=3)]
    alone = torch.cat([model(_bag(f, g)) for f, g in slides])
    pad_to = 30
    features = torch.full((2, pad_to, IN_DIM), float("nan"))
    grid = torch.zeros(2, pad_to, 2, dtype=torch.long)  # junk positions, some colliding with real tiles
    mask = torch.zeros(2, pad_to, dtype=torch.bool)
    for b, (f, g) in enumerate(slides):
        perm = torch.randperm(len(f))
        features[b, : len(f)], grid[b, : len(g)], mask[b, : len(f)] = f[perm], g[perm], True
    batched = model(Bag(features, grid.flip(-1), grid, mask))
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)


def test_output_depends_on_where_tiles_sit(model):
    features, grid = _slide(seed=6, keep=1.0)
    out = model(_bag(features, grid))
    # swap the positions of two tiles: same bag of features, different arrangement
    swapped = grid.clone()
    swapped[[0, 7]] = grid[[7, 0]]
    assert (model(_bag(features, swapped)) - out).abs().max() > 1e-5


def test_bad_grids_are_refused(model):
    features, grid = _slide(seed=7)
    duplicated = grid.clone()
    duplicated[1] = duplicated[0]
    with pytest.raises(DataError, match="share a grid cell"):
        model(_bag(features, duplicated))
    far = grid.clone()
    far[0] = torch.tensor([10_000, 10_000])
    small = create_model("mamba2d_mil_tiny", in_dim=IN_DIM, n_outputs=3, max_cells=1000)
    with pytest.raises(DataError, match="max_cells"):
        small(_bag(features, far))
