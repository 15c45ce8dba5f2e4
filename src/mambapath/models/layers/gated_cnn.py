"""1D gated CNN block in the style of MambaOut (Yu and Wang, 2024).

MambaOut keeps Mamba's gated block and drops the state-space scan: what is left is a gated
MLP whose value branch passes through a depthwise convolution, a purely local mixer.

    shortcut = x                                     (B, L, D)
    g, i, c = split(fc1(norm(x)), [hidden, hidden - conv_channels, conv_channels])
    c = depthwise conv1d(c)                          local mixing along the sequence
    x = fc2(act(g) * concat(i, c)) + shortcut

MambaOut's blocks are 2D (7 x 7 depthwise conv on image tokens); over a sequence of tiles the
convolution is 1D and causal (each position sees itself and the ``kernel_size - 1`` positions
before it), so that, like a Mamba block, it can be streamed chunk by chunk: ``forward_chunk``
carries the last ``kernel_size - 1`` conv inputs from one chunk to the next. A model that
wants context from both sides runs a second block over the reversed sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from .mamba import causal_depthwise_conv


class GatedCNNBlock(nn.Module):
    """(B, L, dim) -> (B, L, dim), with its own pre-norm and residual, as in MambaOut."""

    def __init__(
        self,
        dim: int,
        expansion_ratio: float = 8 / 3,
        kernel_size: int = 7,
        conv_ratio: float = 1.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        hidden = int(expansion_ratio * dim)
        conv_channels = int(conv_ratio * dim)
        if not 0 < conv_channels <= hidden:
            raise ValueError(f"conv_ratio {conv_ratio} gives {conv_channels} conv channels; need 1..{hidden}")
        self.split_sizes = (hidden, hidden - conv_channels, conv_channels)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.act = nn.GELU()
        self.conv = nn.Conv1d(conv_channels, conv_channels, kernel_size, groups=conv_channels)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward_chunk(self, x: torch.Tensor, state: torch.Tensor | None = None):
        """One chunk (B, T, dim); ``state`` (B, conv_channels, kernel_size - 1) or None at the
        start of a sequence. Returns (y (B, T, dim), state after the chunk)."""
        shortcut = x
        g, i, c = torch.split(self.fc1(self.norm(x)), self.split_sizes, dim=-1)
        c, state = causal_depthwise_conv(c.transpose(1, 2), self.conv, state)  # (B, conv_channels, T)
        x = self.fc2(self.act(g) * torch.cat([i, c.transpose(1, 2)], dim=-1))
        return self.dropout(x) + shortcut, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_chunk(x)[0]
