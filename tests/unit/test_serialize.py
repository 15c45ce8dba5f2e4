"""Whole-slide serialisation (Pixel-Mamba Section 3.2) against walks written out as plain loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mambapath.serialize import (
    deserialize,
    grid_to_sequence,
    region_tissue_fraction,
    sequence_to_grid,
    serialize,
    zigzag_order,
)

CLS_VALUE = -7.0


def _zigzag_cells(n_rows: int, n_cols: int) -> list[tuple[int, int]]:
    """(row, col) of a boustrophedon walk, as a loop."""
    cells = []
    for r in range(n_rows):
        cols = range(n_cols) if r % 2 == 0 else range(n_cols - 1, -1, -1)
        cells.extend((r, c) for c in cols)
    return cells


def _reference_series(image: np.ndarray, window: int, cls: np.ndarray, pad_value: float,
                      keep: np.ndarray | None = None) -> np.ndarray:
    """The token series built pixel by pixel: (n, window^2 + 1, C)."""
    channels, height, width = image.shape
    n_rows, n_cols = -(-height // window), -(-width // window)
    regions = []
    for rr, rc in _zigzag_cells(n_rows, n_cols):
        if keep is not None and not keep[rr, rc]:
            continue
        sequence = []
        for pr, pc in _zigzag_cells(window, window):
            y, x = rr * window + pr, rc * window + pc
            inside = y < height and x < width
            sequence.append(image[:, y, x] if inside else np.full(channels, pad_value))
        sequence.insert(window * window // 2, cls)
        regions.append(np.stack(sequence))
    return np.stack(regions)


def test_zigzag_order_is_a_boustrophedon():
    for n_rows, n_cols in [(1, 1), (3, 4), (4, 3), (5, 1)]:
        expected = [r * n_cols + c for r, c in _zigzag_cells(n_rows, n_cols)]
        assert zigzag_order(n_rows, n_cols).tolist() == expected


@pytest.mark.parametrize("height,width,window", [(37, 53, 16), (16, 32, 16), (5, 7, 8), (40, 24, 8)])
def test_serialisation_is_a_permutation_of_the_pixels_plus_one_cls_per_region(height, width, window):
    channels = 2
    # every pixel value unique, so a permutation is visible as one
    image = torch.arange(channels * height * width, dtype=torch.float64).reshape(channels, height, width)
    cls = torch.full((channels,), CLS_VALUE, dtype=torch.float64)
    tokens, layout = serialize(image, window, cls, pad_value=-1.0)

    n_rows, n_cols = -(-height // window), -(-width // window)
    n = n_rows * n_cols
    assert tokens.shape == (n, window * window + 1, channels)
    # M = H_pad * W_pad + n (the paper's H x W + n, on the padded image)
    assert tokens.shape[0] * tokens.shape[1] == n_rows * window * n_cols * window + n

    centre = window * window // 2
    assert torch.all(tokens[:, centre] == CLS_VALUE)
    assert int((tokens[..., 0] == CLS_VALUE).sum()) == n  # one CLS per region, nowhere else
    body = torch.cat([tokens[:, :centre], tokens[:, centre + 1:]], dim=1).reshape(-1, channels)
    real = body[body[:, 0] >= 0]
    assert real.shape[0] == height * width
    assert torch.equal(real[:, 0].sort().values, image[0].reshape(-1).sort().values)  # each pixel once
    assert int((body[:, 0] == -1).sum()) == n * window * window - height * width  # the rest is padding

    expected = _reference_series(image.numpy(), window, cls.numpy(), pad_value=-1.0)
    np.testing.assert_array_equal(tokens.numpy(), expected)

    restored, restored_cls = deserialize(tokens, layout)
    assert torch.equal(restored, image)
    assert torch.all(restored_cls == CLS_VALUE)


def test_tissue_free_regions_are_dropped_and_the_chain_keeps_its_order():
    channels, height, width, window = 3, 24, 40, 8
    image = torch.rand(channels, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([[True, False, True, True, False],
                         [False, False, True, False, True],
                         [True, True, False, False, False]])
    cls = torch.zeros(channels, dtype=torch.float64)
    tokens, layout = serialize(image, window, cls, keep=keep)
    expected = _reference_series(image.numpy(), window, cls.numpy(), pad_value=1.0, keep=keep.numpy())
    np.testing.assert_array_equal(tokens.numpy(), expected)
    # chain order: the zigzag over regions, skipping the dropped ones
    walk = [r * 5 + c for r, c in _zigzag_cells(3, 5) if keep[r, c]]
    assert layout.regions.tolist() == walk
    assert layout.region_rows_cols().tolist() == [[i // 5, i % 5] for i in walk]

    restored, _ = deserialize(tokens, layout, fill_value=-3.0)
    region_of_pixel = keep.repeat_interleave(window, 0).repeat_interleave(window, 1)
    assert torch.equal(restored[:, region_of_pixel], image[:, region_of_pixel])
    assert torch.all(restored[:, ~region_of_pixel] == -3.0)


def test_keep_mask_errors():
    image = torch.zeros(3, 16, 16)
    with pytest.raises(ValueError, match="drops every region"):
        serialize(image, 8, torch.zeros(3), keep=torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="region grid"):
        serialize(image, 8, torch.zeros(3), keep=torch.ones(3, 2, dtype=torch.bool))


def test_region_tissue_fraction_counts_padding_as_background():
    rng = np.random.default_rng(1)
    mask = rng.random((21, 30)) > 0.6
    window = 8
    fraction = region_tissue_fraction(torch.from_numpy(mask), window).numpy()
    assert fraction.shape == (3, 4)
    for r in range(3):
        for c in range(4):
            block = mask[r * window:(r + 1) * window, c * window:(c + 1) * window]
            assert fraction[r, c] == pytest.approx(block.sum() / window**2)


def test_grid_and_sequence_are_inverse_zigzag_walks():
    grid = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    sequence = grid_to_sequence(grid)
    cells = _zigzag_cells(3, 4)
    for step, (r, c) in enumerate(cells):
        assert torch.equal(sequence[:, step], grid[:, r, c])
    assert torch.equal(sequence_to_grid(sequence, 3, 4), grid)
