"""Tile orders: true permutations, the orders they claim, and the Hilbert curve's locality."""

from __future__ import annotations

import numpy as np
import pytest

from mambapath.order import ORDERS, gilbert_index, hilbert_index, neighbour_distances, tile_order


def _random_grid(rng, height, width, keep=0.6, offset=(0, 0)):
    rows, cols = np.mgrid[:height, :width]
    cells = np.stack([rows.ravel(), cols.ravel()], axis=1)
    cells = cells[rng.random(len(cells)) < keep]
    rng.shuffle(cells)  # storage order must not matter
    return cells + np.asarray(offset)


def _walk_gilbert(width, height):
    """Plain recursive walk of the generalised Hilbert curve (the definition, cell by cell)."""

    def sign(v):
        return (v > 0) - (v < 0)

    def walk(x, y, ax, ay, bx, by):
        w, h = abs(ax + ay), abs(bx + by)
        dax, day, dbx, dby = sign(ax), sign(ay), sign(bx), sign(by)
        if h == 1 or w == 1:
            steps, dx, dy = (w, dax, day) if h == 1 else (h, dbx, dby)
            for _ in range(steps):
                yield x, y
                x, y = x + dx, y + dy
            return
        ax2, ay2, bx2, by2 = ax // 2, ay // 2, bx // 2, by // 2
        w2, h2 = abs(ax2 + ay2), abs(bx2 + by2)
        if 2 * w > 3 * h:
            if w2 % 2 and w > 2:
                ax2, ay2 = ax2 + dax, ay2 + day
            yield from walk(x, y, ax2, ay2, bx, by)
            yield from walk(x + ax2, y + ay2, ax - ax2, ay - ay2, bx, by)
        else:
            if h2 % 2 and h > 2:
                bx2, by2 = bx2 + dbx, by2 + dby
            yield from walk(x, y, bx2, by2, ax2, ay2)
            yield from walk(x + bx2, y + by2, ax, ay, bx - bx2, by - by2)
            yield from walk(x + (ax - dax) + (bx2 - dbx), y + (ay - day) + (by2 - dby), -bx2, -by2, -(ax - ax2), -(ay - ay2))

    if width >= height:
        yield from walk(0, 0, width, 0, 0, height)
    else:
        yield from walk(0, 0, 0, height, width, 0)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (7, 1), (5, 8), (13, 6), (16, 16), (3, 40)])
def test_every_order_is_a_permutation(order, shape):
    rng = np.random.default_rng(sum(shape))
    grid = _random_grid(rng, *shape, keep=0.7, offset=(11, -4))
    perm = tile_order(grid, order)
    assert perm.dtype.kind == "i"
    assert np.array_equal(np.sort(perm), np.arange(len(grid)))


@pytest.mark.parametrize("order", ORDERS)
def test_order_ignores_translation_and_storage_order(order):
    rng = np.random.default_rng(3)
    grid = _random_grid(rng, 9, 14)
    reference = grid[tile_order(grid, order)]
    shifted = grid + np.array([37, 1000])
    assert np.array_equal(shifted[tile_order(shifted, order)] - [37, 1000], reference)
    shuffled = grid[rng.permutation(len(grid))]
    assert np.array_equal(shuffled[tile_order(shuffled, order)], reference)


def test_raster_column_snake_follow_their_definitions():
    rng = np.random.default_rng(5)
    grid = _random_grid(rng, 6, 9, keep=0.8)
    cells = [tuple(c) for c in grid]
    raster = sorted(cells, key=lambda rc: (rc[0], rc[1]))
    column = sorted(cells, key=lambda rc: (rc[1], rc[0]))
    last_col = int(grid[:, 1].max())  # snake reverses odd rows of the bounding box
    snake = sorted(cells, key=lambda rc: (rc[0], rc[1] if rc[0] % 2 == 0 else last_col - rc[1]))
    for name, expected in (("raster", raster), ("column", column), ("snake", snake)):
        got = [tuple(c) for c in grid[tile_order(grid, name)]]
        assert got == expected, name


@pytest.mark.parametrize("height", [1, 2, 3, 5, 8, 11, 16, 21])
@pytest.mark.parametrize("width", [1, 2, 4, 7, 9, 16, 30])
def test_gilbert_index_matches_the_curve_walked_cell_by_cell(height, width):
    walked = list(_walk_gilbert(width, height))
    expected = np.full((height, width), -1)
    for k, (x, y) in enumerate(walked):
        expected[y, x] = k
    rows, cols = np.mgrid[:height, :width]
    got = gilbert_index(rows.ravel(), cols.ravel(), height, width).reshape(height, width)
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6])
def test_hilbert_on_full_power_of_two_grid_steps_to_4_neighbours(bits):
    side = 2**bits
    rows, cols = np.mgrid[:side, :side]
    grid = np.stack([rows.ravel(), cols.ravel()], axis=1) + [5, 9]
    path = grid[tile_order(grid, "hilbert")]
    steps = np.abs(np.diff(path, axis=0)).sum(axis=1)
    assert np.all(steps == 1)
    # and it is a Hilbert curve: every aligned b x b block is visited in one run of b * b
    # tiles (which a snake or any other unit-step path does not do), as the classic curve does
    classic = np.stack([rows.ravel(), cols.ravel()], axis=1)[np.argsort(hilbert_index(rows.ravel(), cols.ravel(), bits))]
    for curve in (path - [5, 9], classic):
        for block in (2**k for k in range(1, bits + 1)):
            runs = (curve // block).reshape(-1, block * block, 2)
            assert np.all(runs == runs[:, :1]), block


@pytest.mark.parametrize("height,width", [(6, 10), (10, 6), (12, 34), (40, 8), (5, 9), (9, 20), (17, 33)])
def test_hilbert_on_rectangles_is_continuous(height, width):
    rows, cols = np.mgrid[:height, :width]
    grid = np.stack([rows.ravel(), cols.ravel()], axis=1)
    path = grid[tile_order(grid, "hilbert")]
    step = np.abs(np.diff(path, axis=0))
    assert np.all(step.max(axis=1) == 1)  # never jumps: a unit or a diagonal step
    diagonal = (step == 1).all(axis=1)
    if height % 2 == 0 and width % 2 == 0:
        assert not diagonal.any()
    else:
        assert diagonal.sum() <= 1


def test_hilbert_with_missing_cells_keeps_the_full_curve_order():
    rng = np.random.default_rng(8)
    rows, cols = np.mgrid[:12, :20]
    full = np.stack([rows.ravel(), cols.ravel()], axis=1)
    full_rank = {tuple(c): k for k, c in enumerate(full[tile_order(full, "hilbert")])}
    # keep a subset that still touches all four sides, so the bounding box is the same
    keep = rng.random(len(full)) < 0.5
    keep[[0, len(full) - 1]] = True
    part = full[keep]
    ranks = [full_rank[tuple(c)] for c in part[tile_order(part, "hilbert")]]
    assert ranks == sorted(ranks)


def test_neighbour_distances_match_a_plain_loop():
    rng = np.random.default_rng(2)
    grid = _random_grid(rng, 7, 11, keep=0.7)
    for order in ORDERS:
        position = {tuple(c): k for k, c in enumerate(grid[tile_order(grid, order)])}
        expected = []
        for (r, c), k in position.items():
            for other in ((r, c + 1), (r + 1, c)):
                if other in position:
                    expected.append(abs(k - position[other]))
        assert sorted(neighbour_distances(grid, order).tolist()) == sorted(expected), order


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown tile order"):
        tile_order(np.zeros((3, 2), dtype=int), "spiral")
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        tile_order(np.zeros((3, 3), dtype=int), "raster")
    assert tile_order(np.zeros((0, 2), dtype=int), "hilbert").shape == (0,)
