"""Whole-slide serialisation for Pixel-Mamba (Section 3.2 of the paper): pixels to a token series.

An image (C, H, W) becomes one token per pixel, grouped by region:

1. **Padding.** The image is padded at the bottom and on the right up to whole regions of
   ``window`` x ``window`` pixels (the scan window, 224 by default). Padded pixels get
   ``pad_value`` in every channel; the pixel datasets pass images in [0, 1] and Pixel-Mamba pads
   with 1.0, white, so the padding looks like the slide's empty glass rather than like a black
   border that tissue never has. Padding never goes on the top or the left, so pixel (y, x) of
   the image stays pixel (y, x) of its region grid.
2. **Regions, chained in zigzag order.** The region grid (``n_rows`` x ``n_cols``) is walked as a
   boustrophedon: the first row of regions left to right, the next right to left, and so on,
   so consecutive regions of the chain are always neighbours on the slide.
3. **Zigzag inside each region.** The pixels of a region are walked the same way: its first
   pixel row left to right, the next right to left, ... Every region uses this one walk, which
   starts at its top-left corner.
4. **CLS at the centre.** A CLS token is inserted into each region's sequence at position
   ``h * w // 2`` (the centre of the local sequence), so a region of ``h x w`` tokens is a
   sequence of ``h * w + 1`` and the whole slide one of ``M = H_pad * W_pad + n`` tokens.
5. **Tissue-free regions (optional).** Given a region keep mask (from the tissue segmentation),
   regions without tissue are left out of the chain; the remaining ones keep their zigzag order.
   The chain then jumps over the dropped regions, which is the point: glass adds tokens and no
   signal. :func:`region_tissue_fraction` turns a pixel tissue mask into per-region fractions.

Token series are held region-major, ``(n, h * w + 1, C)``: the network's Mamba blocks read them
flattened into one sequence ``(1, n * (h * w + 1), C)`` (regions in chain order), and Region
Fusion and Token Expansion work per region. :func:`deserialize` inverts :func:`serialize`.
The same walk is applied at every token scale by :func:`zigzag_order` (Token Expansion
re-serialises each region's coarser token grid with it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def zigzag_order(n_rows: int, n_cols: int, device=None) -> torch.Tensor:
    """(n_rows * n_cols,) long: the raster index ``row * n_cols + col`` of each step of the
    zigzag walk (even rows left to right, odd rows right to left)."""
    raster = torch.arange(n_rows * n_cols, device=device).reshape(n_rows, n_cols)
    raster[1::2] = raster[1::2].flip(-1)
    return raster.reshape(-1)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes ``order``: ``x[order][inverse] == x``."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


def cls_position(n_tokens: int) -> int:
    """Index of the CLS token in a region sequence of ``n_tokens`` image tokens (+ 1 CLS)."""
    return n_tokens // 2


def insert_cls(tokens: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """(n, T, C) region tokens and (n, C) or (C,) CLS -> (n, T + 1, C), CLS at ``T // 2``."""
    n, t, c = tokens.shape
    cls = cls.to(tokens.dtype).expand(n, c)[:, None]  # (n, 1, C)
    centre = cls_position(t)
    return torch.cat([tokens[:, :centre], cls, tokens[:, centre:]], dim=1)


def split_cls(sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, T + 1, C) -> (tokens (n, T, C), cls (n, C)); the inverse of :func:`insert_cls`."""
    centre = cls_position(sequence.shape[1] - 1)
    tokens = torch.cat([sequence[:, :centre], sequence[:, centre + 1:]], dim=1)
    return tokens, sequence[:, centre]


@dataclass(frozen=True)
class RegionLayout:
    """Where the regions of one serialised image came from.

    height, width:   the image size before padding (pixels)
    window:          region edge (pixels)
    n_rows, n_cols:  the region grid of the padded image
    regions:         (n,) long, raster index ``row * n_cols + col`` of each region of the
                     series, in chain order (the zigzag order without the dropped regions)
    """

    height: int
    width: int
    window: int
    n_rows: int
    n_cols: int
    regions: torch.Tensor

    @property
    def n_regions(self) -> int:
        return int(self.regions.numel())

    @property
    def pad_bottom(self) -> int:
        return self.n_rows * self.window - self.height

    @property
    def pad_right(self) -> int:
        return self.n_cols * self.window - self.width

    def region_rows_cols(self) -> torch.Tensor:
        """(n, 2) long (row, col) of each region of the series on the region grid."""
        return torch.stack([self.regions // self.n_cols, self.regions % self.n_cols], dim=1)


def region_grid(height: int, width: int, window: int) -> tuple[int, int]:
    """(n_rows, n_cols) of regions that cover an image of ``height`` x ``width`` pixels."""
    if window < 1:
        raise ValueError(f"scan window must be a positive number of pixels, got {window}")
    return max(1, math.ceil(height / window)), max(1, math.ceil(width / window))


def region_tissue_fraction(tissue_mask: torch.Tensor, window: int) -> torch.Tensor:
    """(H, W) bool tissue mask -> (n_rows, n_cols) float: the tissue fraction of each region
    (padding counts as background)."""
    height, width = tissue_mask.shape
    n_rows, n_cols = region_grid(height, width, window)
    padded = F.pad(tissue_mask.float(), (0, n_cols * window - width, 0, n_rows * window - height))
    return padded.reshape(n_rows, window, n_cols, window).mean(dim=(1, 3))


def serialize(image: torch.Tensor, window: int, cls: torch.Tensor, keep: torch.Tensor | None = None,
              pad_value: float = 1.0) -> tuple[torch.Tensor, RegionLayout]:
    """Serialise an image into region sequences.

    image: (C, H, W); cls: (C,) the token inserted at the centre of every region;
    keep: optional (n_rows, n_cols) bool, False for regions to leave out (at least one True).
    Returns (tokens (n, window * window + 1, C), layout).
    """
    if image.dim() != 3:
        raise ValueError(f"serialize: image must be (C, H, W), got shape {tuple(image.shape)}")
    channels, height, width = image.shape
    n_rows, n_cols = region_grid(height, width, window)
    chain = zigzag_order(n_rows, n_cols, device=image.device)
    if keep is not None:
        if tuple(keep.shape) != (n_rows, n_cols):
            raise ValueError(f"serialize: keep mask must be the region grid ({n_rows}, {n_cols}), "
                             f"got {tuple(keep.shape)}")
        chain = chain[keep.reshape(-1).to(image.device)[chain]]
        if chain.numel() == 0:
            raise ValueError("serialize: the keep mask drops every region; keep at least one")
    padded = F.pad(image, (0, n_cols * window - width, 0, n_rows * window - height), value=pad_value)
    # (C, R, w, Q, w) -> (R * Q, w * w, C): raster order inside each region
    regions = padded.reshape(channels, n_rows, window, n_cols, window).permute(1, 3, 2, 4, 0)
    regions = regions.reshape(n_rows * n_cols, window * window, channels)
    inner = zigzag_order(window, window, device=image.device)
    tokens = regions[chain][:, inner]  # (n, w * w, C) in chain order, zigzag inside
    layout = RegionLayout(height, width, window, n_rows, n_cols, chain)
    return insert_cls(tokens, cls), layout


def deserialize(tokens: torch.Tensor, layout: RegionLayout, fill_value: float = 0.0) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """Invert :func:`serialize`: (n, window * window + 1, C) -> (image (C, H, W), cls (n, C)).
    Pixels of dropped regions get ``fill_value``; the padding is cut off."""
    window = layout.window
    body, cls = split_cls(tokens)
    n, _, channels = body.shape
    if n != layout.n_regions or body.shape[1] != window * window:
        raise ValueError(f"deserialize: tokens {tuple(tokens.shape)} do not match the layout "
                         f"({layout.n_regions} regions of {window} x {window} + 1)")
    # back to raster order inside each region
    raster = body[:, inverse_permutation(zigzag_order(window, window, device=tokens.device))]
    grid = body.new_full((layout.n_rows * layout.n_cols, window * window, channels), fill_value)
    grid[layout.regions.to(tokens.device)] = raster
    image = grid.reshape(layout.n_rows, layout.n_cols, window, window, channels).permute(4, 0, 2, 1, 3)
    image = image.reshape(channels, layout.n_rows * window, layout.n_cols * window)
    return image[:, :layout.height, :layout.width], cls


def sequence_to_grid(body: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, height * width, C) zigzag-ordered region tokens -> (n, height, width, C) grid."""
    n, _, channels = body.shape
    raster = body[:, inverse_permutation(zigzag_order(height, width, device=body.device))]
    return raster.reshape(n, height, width, channels)


def grid_to_sequence(grid: torch.Tensor) -> torch.Tensor:
    """(n, height, width, C) region token grid -> (n, height * width, C) in zigzag order."""
    n, height, width, channels = grid.shape
    return grid.reshape(n, height * width, channels)[:, zigzag_order(height, width, device=grid.device)]
