"""The input of every MIL model: a bag of tile features placed on the slide's tile grid."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Bag:
    """A batch of bags, padded to the longest one.

    features: (B, N, D) float tile features
    coords:   (B, N, 2) long level-0 pixel (x, y) of each tile's top-left corner
    grid:     (B, N, 2) long (row, col) of each tile on the slide's tile grid
    mask:     (B, N) bool, True for real tiles, False for padding
    """

    features: torch.Tensor
    coords: torch.Tensor
    grid: torch.Tensor
    mask: torch.Tensor

    def to(self, device) -> "Bag":
        return Bag(*(t.to(device) for t in (self.features, self.coords, self.grid, self.mask)))

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @classmethod
    def single(cls, features, coords=None, grid=None) -> "Bag":
        """A batch of one bag from (N, D) features and optional (N, 2) coords/grid."""
        n = features.shape[0]
        if grid is None:
            grid = torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)], dim=1)
        if coords is None:
            coords = grid.flip(-1).clone()
        return cls(
            features=features[None],
            coords=torch.as_tensor(coords, dtype=torch.long)[None],
            grid=torch.as_tensor(grid, dtype=torch.long)[None],
            mask=torch.ones(1, n, dtype=torch.bool),
        )
