"""MambaMIL (Yang et al., MICCAI 2024): Mamba layers over a slide's tile sequence.

    features (n, in_dim) of one bag, put into ``tile_order`` by their grid positions
    -> Linear(in_dim, d_model) -> act -> Dropout                      (n, d_model)
    -> n_layers x [h = h + mixer(LayerNorm(h))]
    -> LayerNorm -> attention pooling (Linear(d_model, 128) -> tanh -> Linear(128, 1),
       softmax over the bag's tiles) -> Linear(d_model, n_outputs)

Mixers (``mixer=``):

- ``mamba``: one Mamba block (causal scan along the sequence).
- ``bimamba``: Vision Mamba's bidirectional block (layers/bidirectional.py).
- ``srmamba``: MambaMIL's Sequence Reordering Mamba. A second mixer (its own conv, step and
  B/C projections, A and D; shared in/out projections) reads the projected sequence
  re-ordered with rate R: the sequence is zero-padded to a multiple of R, cut into rows of R
  and read column by column (positions 0, R, 2R, ..., then 1, R + 1, ...), so that tiles R
  apart in the original order become neighbours. Its output is put back in the original
  order, the padding dropped, and added to the first mixer's output before out_proj.

Defaults follow the authors' code: d_model 512, two layers, d_state 16, d_conv 4, expand 2,
R = 10, dropout 0.25, ReLU.

Tile order: the authors feed tiles in the order of CLAM's coordinate files (column-major per
tissue piece), so ``tile_order`` defaults to ``column``; ``raster``, ``snake`` and
``hilbert`` are the alternatives (mambapath.order). Each bag's real tiles (mask True) are
ordered by their own grid, and the model runs bag by bag on its real tiles only, so padding
never enters a scan (a padded reverse or reordered scan would otherwise read it). The
``tile_order`` attribute is the order used, recorded with the results.

Differences from the authors' code, and why: Mamba's own initialisation of the step
projection and A/D is kept (the authors' Xavier re-initialisation of every Linear also
zeroes the step bias, which Mamba sets so that softplus(bias) is log-uniform in [0.001,
0.1]); Xavier-normal initialisation is applied to the MIL head (embedding, attention,
classifier) only.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mambapath.errors import DataError
from mambapath.order import ORDERS, tile_order

from .bag import Bag
from .layers.attention_pool import AttentionPool
from .layers.bidirectional import Bidirectional
from .layers.mamba import Mamba
from .registry import register_model

MIXERS = ("mamba", "bimamba", "srmamba")


def ordered_tile_indices(bag: Bag, b: int, order: str) -> torch.Tensor:
    """Indices into bag ``b``'s N slots of its real tiles, put in ``order`` by grid position."""
    real = torch.nonzero(bag.mask[b], as_tuple=False).squeeze(1)  # (n,)
    if real.numel() == 0:
        raise DataError(
            f"bag {b} of the batch has no tiles; slides without tissue must be skipped before "
            "training (their tile files have status 'no_tissue')"
        )
    grid = bag.grid[b, real].detach().cpu().numpy()
    perm = torch.from_numpy(np.ascontiguousarray(tile_order(grid, order))).to(real.device)
    return real[perm]


def init_xavier(*modules: nn.Module) -> None:
    """Xavier-normal weights and zero biases for the Linear layers of the MIL head."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def sequence_reorder(xz: torch.Tensor, rate: int) -> torch.Tensor:
    """(B, C, L) -> (B, C, R * ceil(L / R)): zero-pad to a multiple of R, then read the
    (ceil(L / R), R) table column by column (position k * R + r goes to r * ceil(L / R) + k)."""
    batch, channels, length = xz.shape
    rows = -(-length // rate)
    xz = nn.functional.pad(xz, (0, rows * rate - length))
    return xz.reshape(batch, channels, rows, rate).transpose(2, 3).reshape(batch, channels, rows * rate)


def sequence_restore(y: torch.Tensor, rate: int, length: int) -> torch.Tensor:
    """Inverse of :func:`sequence_reorder`, dropping the padding: (B, C, R * k) -> (B, C, L)."""
    batch, channels, padded = y.shape
    rows = padded // rate
    return y.reshape(batch, channels, rate, rows).transpose(2, 3).reshape(batch, channels, padded)[:, :, :length]


class SRMamba(nn.Module):
    """Sequence Reordering Mamba block: (B, L, D) -> (B, L, D)."""

    def __init__(self, block: Mamba, rate: int):
        super().__init__()
        if rate < 1:
            raise ValueError(f"SRMamba rate must be >= 1, got {rate}")
        self.block = block
        self.rate = rate
        self.mixer_reordered = block.build_mixer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xz = self.block.project_in(x)  # (B, C, L)
        y_reordered = self.mixer_reordered(sequence_reorder(xz, self.rate))
        y = self.block.mixer(xz) + sequence_restore(y_reordered, self.rate, xz.shape[-1])
        return self.block.project_out(y)


class MambaMIL(nn.Module):
    input_kind = "features"

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        mixer: str = "mamba",
        d_model: int = 512,
        n_layers: int = 2,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        rate: int = 10,
        dropout: float = 0.25,
        act: str = "relu",
        attention_dim: int = 128,
        tile_order: str = "column",
        scan_backend: str = "auto",
    ):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"unknown MambaMIL mixer {mixer!r}; choose one of {', '.join(MIXERS)}")
        if tile_order not in ORDERS:
            raise ValueError(f"unknown tile_order {tile_order!r}; choose one of {', '.join(ORDERS)}")
        if act not in ("relu", "gelu"):
            raise ValueError(f"act must be 'relu' or 'gelu', got {act!r}")
        self.mixer = mixer
        self.tile_order = tile_order
        self.embed = nn.Sequential(
            nn.Linear(in_dim, d_model), nn.ReLU() if act == "relu" else nn.GELU(), nn.Dropout(dropout)
        )
        block_kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand, scan_backend=scan_backend)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.layers = nn.ModuleList()
        for _ in range(n_layers):
            block = Mamba(d_model, **block_kwargs)
            if mixer == "bimamba":
                block = Bidirectional(block)
            elif mixer == "srmamba":
                block = SRMamba(block, rate)
            self.layers.append(block)
        self.norm = nn.LayerNorm(d_model)
        self.pool = AttentionPool(d_model, attention_dim)
        self.classifier = nn.Linear(d_model, n_outputs)
        init_xavier(self.embed, self.pool, self.classifier)

    def encode(self, sequence: torch.Tensor) -> torch.Tensor:
        """(1, n, in_dim) tiles in sequence order -> (1, n, d_model) normalised tile states."""
        h = self.embed(sequence)
        for norm, layer in zip(self.norms, self.layers):
            h = h + layer(norm(h))
        return self.norm(h)

    def forward(self, bag: Bag) -> torch.Tensor:
        logits = []
        for b in range(bag.batch_size):
            idx = ordered_tile_indices(bag, b, self.tile_order)
            h = self.encode(bag.features[b, idx][None])  # (1, n, d_model)
            logits.append(self.classifier(self.pool(h)))
        return torch.cat(logits, dim=0)  # (B, n_outputs)


TINY = dict(d_model=16, n_layers=1, d_state=4, expand=2, rate=3, attention_dim=8)


@register_model
def mamba_mil(in_dim: int, n_outputs: int, **kwargs) -> MambaMIL:
    """MambaMIL; ``mixer`` picks mamba (default), bimamba or srmamba."""
    return MambaMIL(in_dim, n_outputs, **kwargs)


@register_model
def bimamba_mil(in_dim: int, n_outputs: int, **kwargs) -> MambaMIL:
    return MambaMIL(in_dim, n_outputs, mixer="bimamba", **kwargs)


@register_model
def srmamba_mil(in_dim: int, n_outputs: int, **kwargs) -> MambaMIL:
    return MambaMIL(in_dim, n_outputs, mixer="srmamba", **kwargs)


@register_model
def mamba_mil_tiny(in_dim: int, n_outputs: int, **kwargs) -> MambaMIL:
    return MambaMIL(in_dim, n_outputs, **{**TINY, **kwargs})


@register_model
def bimamba_mil_tiny(in_dim: int, n_outputs: int, **kwargs) -> MambaMIL:
    return MambaMIL(in_dim, n_outputs, mixer="bimamba", **{**TINY, **kwargs})


@register_model
def srmamba_mil_tiny(in_dim: int, n_outputs: int, **kwargs) -> MambaMIL:
    return MambaMIL(in_dim, n_outputs, mixer="srmamba", **{**TINY, **kwargs})
