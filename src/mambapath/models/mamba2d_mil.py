"""2DMambaMIL (Zhang et al., CVPR 2025): 2D Mamba layers over the slide's own tile grid.

    features (n, in_dim) of one bag -> Linear(in_dim, d_model) -> GELU -> Dropout
    -> placed on an (H, W) map: the bounding box of the bag's grid positions (bag.grid,
       row/col on the slide's tile grid), tissue cells hold their tile, every other cell
       holds one learnable padding token
    -> n_layers x [h = h + Mamba2D(RMSNorm(h))]   (layers/mamba2d.py: 2D selective scan)
    -> the tissue cells only -> LayerNorm -> attention pooling -> Linear(d_model, n_outputs)

Defaults follow one of the configurations of the authors' MIL code (d_model 128, d_state 16,
expand 2, dropout 0.25, a trainable padding token, pre-norm RMSNorm residual layers, an
attention head of width 128), with two layers (their code runs one or two).

Where and why this differs from the authors' code:

- The map is the bag's own bounding box on its tile grid (``bag.grid`` minus its minimum),
  sized per slide. The authors divide level-0 coordinates by a fixed patch size and write
  the tiles into a canvas of fixed, per-dataset maximum width and height (hard-coded per
  cohort), which ties the model to one tiling and one dataset and makes the output depend
  on where the tissue sits on the slide. Here translating all tiles leaves the output
  unchanged, and any slide size works.
- Attention pooling runs over tissue cells only. The authors pool over the whole canvas,
  padding cells included, so the amount of background changes the slide's embedding.
- The local convolution is a 2D depthwise conv (see layers/mamba2d.py) where the authors
  run a 1D convolution over the row-major flattened map.
- The padding token starts at small random values (normal, std 0.02) instead of uniform
  [0, 1), so that at initialisation it is on the scale of the embedded tiles.
- ``coords`` are not read: ``grid`` is the tile grid the tiling wrote, which also holds for
  tiles with overlap, where level-0 coordinates divided by the tile size would not be cells.

Bags of a batch are placed on their own maps and run one by one (MIL trains with one slide
per step); padding slots in the Bag (mask False) never reach the map. The 2D scan has no
order, so ``tile_order`` is None.
"""

from __future__ import annotations

import torch
from torch import nn

from mambapath.errors import DataError

from .bag import Bag
from .layers.attention_pool import AttentionPool
from .layers.mamba2d import Mamba2D
from .mamba_mil import init_xavier
from .registry import register_model


class MambaMIL2D(nn.Module):
    input_kind = "features"
    tile_order = None  # the 2D scan reads the grid itself

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        d_model: int = 128,
        n_layers: int = 2,
        d_state: int = 16,
        d_conv: int = 3,
        expand: int = 2,
        dropout: float = 0.25,
        attention_dim: int = 128,
        max_cells: int = 4_000_000,
        scan_backend: str = "auto",
    ):
        super().__init__()
        self.max_cells = max_cells
        self.embed = nn.Sequential(nn.Linear(in_dim, d_model), nn.GELU(), nn.Dropout(dropout))
        self.pad_token = nn.Parameter(torch.randn(d_model) * 0.02)
        self.norms = nn.ModuleList(nn.RMSNorm(d_model, eps=1e-5) for _ in range(n_layers))
        self.layers = nn.ModuleList(
            Mamba2D(d_model, d_state=d_state, d_conv=d_conv, expand=expand, scan_backend=scan_backend)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.pool = AttentionPool(d_model, attention_dim)
        self.classifier = nn.Linear(d_model, n_outputs)
        init_xavier(self.embed, self.pool, self.classifier)

    def place_on_grid(self, tiles: torch.Tensor, grid: torch.Tensor):
        """tiles (n, d_model) at grid (n, 2) of (row, col) -> map (1, H, W, d_model) of the
        bounding box with the padding token in empty cells, and the tiles' (rows, cols)."""
        rows = grid[:, 0] - grid[:, 0].min()
        cols = grid[:, 1] - grid[:, 1].min()
        height, width = int(rows.max()) + 1, int(cols.max()) + 1
        if height * width > self.max_cells:
            raise DataError(
                f"the tiles span a {height} x {width} grid ({height * width} cells, more than "
                f"max_cells={self.max_cells}); tile at a coarser scale or raise max_cells in the method's yaml"
            )
        cell = rows * width + cols
        if torch.unique(cell).numel() != cell.numel():
            raise DataError("two tiles of one bag share a grid cell; the tile file's `grid` must be unique per tile")
        canvas = self.pad_token.expand(height * width, -1)
        canvas = canvas.index_put((cell,), tiles)  # out of place: gradients reach tiles and pad_token
        return canvas.reshape(1, height, width, -1), rows, cols

    def forward(self, bag: Bag) -> torch.Tensor:
        logits = []
        for b in range(bag.batch_size):
            real = torch.nonzero(bag.mask[b], as_tuple=False).squeeze(1)
            if real.numel() == 0:
                raise DataError(
                    f"bag {b} of the batch has no tiles; slides without tissue must be skipped before "
                    "training (their tile files have status 'no_tissue')"
                )
            tiles = self.embed(bag.features[b, real])  # (n, d_model)
            h, rows, cols = self.place_on_grid(tiles, bag.grid[b, real])
            for norm, layer in zip(self.norms, self.layers):
                h = h + layer(norm(h))  # (1, H, W, d_model)
            tissue = self.norm(h[0, rows, cols])[None]  # (1, n, d_model)
            logits.append(self.classifier(self.pool(tissue)))
        return torch.cat(logits, dim=0)


TINY = dict(d_model=16, n_layers=1, d_state=2, expand=1, attention_dim=8)


@register_model
def mamba2d_mil(in_dim: int, n_outputs: int, **kwargs) -> MambaMIL2D:
    return MambaMIL2D(in_dim, n_outputs, **kwargs)


@register_model
def mamba2d_mil_tiny(in_dim: int, n_outputs: int, **kwargs) -> MambaMIL2D:
    return MambaMIL2D(in_dim, n_outputs, **{**TINY, **kwargs})
