"""Bidirectional selective-scan blocks, as in Vision Mamba (Zhu et al., 2024).

One block, two directions: the input projection and the output projection are shared, and
each direction has its own mixer (convolution, step and B/C projections, A, D). The second
mixer reads the projected sequence reversed, and its output is reversed back and added to
the first's before the output projection:

    xz = in_proj(x)                                     (B, C, L)
    y  = mixer_fwd(xz) + flip(mixer_bwd(flip(xz)))      (B, d_inner, L)
    out = out_proj(y)

``BiMamba`` wraps a Mamba block (MambaMIL's BiMamba mixer); ``BiMamba2`` wraps a Mamba2
block. Every output position depends on the whole sequence, so a bidirectional block cannot
be streamed chunk by chunk in one pass; MambaBack (mambaback.py) explains how it keeps the
two directions apart so that its inference can stream.
"""

from __future__ import annotations

import torch
from torch import nn

from .mamba import Mamba
from .mamba2 import Mamba2


class Bidirectional(nn.Module):
    """Forward plus reversed scan around one block with ``project_in``/``mixer``/``project_out``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.mixer_backward = block.build_mixer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xz = self.block.project_in(x)  # (B, C, L)
        y = self.block.mixer(xz) + self.mixer_backward(xz.flip(-1)).flip(-1)  # (B, d_inner, L)
        return self.block.project_out(y)


def BiMamba(d_model: int, **kwargs) -> Bidirectional:
    """Bidirectional Mamba block (B, L, d_model) -> (B, L, d_model); kwargs as for Mamba."""
    return Bidirectional(Mamba(d_model, **kwargs))


def BiMamba2(d_model: int, **kwargs) -> Bidirectional:
    """Bidirectional Mamba2 block (B, L, d_model) -> (B, L, d_model); kwargs as for Mamba2."""
    return Bidirectional(Mamba2(d_model, **kwargs))
