"""Tile orders: how a slide's 2D tile grid becomes a 1D sequence.

Every sequence model takes its tiles in one of these orders, and the order is recorded
with the results. Each function maps a (N, 2) array of (row, col) grid positions, which may
have holes (background cells have no tile) and any shape, to a permutation of range(N):
``features[order]`` is the sequence.

- ``raster``: row by row, left to right (row-major).
- ``snake``: row by row, alternating direction (boustrophedon), so consecutive tiles touch
  at row ends too.
- ``column``: column by column, top to bottom (column-major): the order CLAM's
  coordinate files come in, since its patching walks x in the outer loop.
- ``hilbert``: along a Hilbert curve over the grid's bounding box, which keeps 2D
  neighbours close in the sequence. Non-square and non-power-of-two grids use the curve
  of the smallest enclosing 2^k x 2^k square; cells are sorted by their curve index, so
  missing cells are simply skipped.
"""

from __future__ import annotations

import numpy as np

ORDERS = ("raster", "snake", "column", "hilbert")


def hilbert_index(rows: np.ndarray, cols: np.ndarray, order_bits: int) -> np.ndarray:
    """Distance along the Hilbert curve of side 2**order_bits for each (row, col)."""
    x = np.asarray(cols, dtype=np.int64).copy()
    y = np.asarray(rows, dtype=np.int64).copy()
    d = np.zeros_like(x)
    s = 1 << (order_bits - 1) if order_bits > 0 else 0
    while s > 0:
        rx = ((x & s) > 0).astype(np.int64)
        ry = ((y & s) > 0).astype(np.int64)
        d += s * s * ((3 * rx) ^ ry)
        # rotate the quadrant so the sub-curve has the canonical orientation
        flip = ry == 0
        swap_and_reflect = flip & (rx == 1)
        x = np.where(swap_and_reflect, s - 1 - x, x)
        y = np.where(swap_and_reflect, s - 1 - y, y)
        x, y = np.where(flip, y, x), np.where(flip, x, y)
        s >>= 1
    return d


def tile_order(grid: np.ndarray, order: str) -> np.ndarray:
    """Permutation that puts tiles at ``grid`` (N, 2 of row, col) into ``order``."""
    grid = np.asarray(grid, dtype=np.int64)
    if grid.ndim != 2 or grid.shape[1] != 2:
        raise ValueError(f"grid must be (N, 2) of (row, col), got shape {grid.shape}")
    if len(grid) == 0:
        return np.zeros(0, dtype=np.int64)
    rows = grid[:, 0] - grid[:, 0].min()
    cols = grid[:, 1] - grid[:, 1].min()
    if order == "raster":
        return np.lexsort((cols, rows))
    if order == "column":
        return np.lexsort((rows, cols))
    if order == "snake":
        snake_cols = np.where(rows % 2 == 1, cols.max() - cols, cols)
        return np.lexsort((snake_cols, rows))
    if order == "hilbert":
        side = int(max(rows.max(), cols.max())) + 1
        bits = max(1, int(np.ceil(np.log2(side))))
        return np.argsort(hilbert_index(rows, cols, bits), kind="stable")
    raise ValueError(f"unknown tile order {order!r}; choose one of {', '.join(ORDERS)}")
