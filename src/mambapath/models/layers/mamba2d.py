"""2D Mamba block (2DMamba, Zhang et al., CVPR 2025) on our ``selective_scan_2d``.

The Mamba block with the 1D scan replaced by 2DMamba's 2D selective scan, which runs along
each row and then down each column with the same input-dependent decay, so that the state
reaching a cell has travelled over the grid instead of along a flattened sequence:

    x (B, H, W, D) -> in_proj -> [x, z] (B, 2 * d_inner, H, W)
    x -> depthwise conv2d (d_conv x d_conv, same padding) -> SiLU
      -> x_proj -> (dt, B, C) per cell -> dt_proj -> delta (B, d_inner, H, W)
      -> 2D selective scan with A = -exp(A_log), D skip, softplus(delta + dt bias),
         gated by SiLU(z)
    -> out_proj -> (B, H, W, D)

The local convolution is a 2D depthwise convolution over the grid (the authors' code runs
Mamba's 1D convolution over the row-major flattened map, which mixes the last cells of one
row with the first of the next); a 2D kernel keeps the block's local mixing as 2D as its scan.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mambapath.kernels import selective_scan_2d

from .mamba import init_dt_bias


class Mamba2D(nn.Module):
    """(B, H, W, d_model) -> (B, H, W, d_model). No norm or residual (the caller's)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 3,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        scan_backend: str = "auto",
    ):
        super().__init__()
        if d_conv % 2 == 0:
            raise ValueError(f"d_conv must be odd for a centred 2D convolution, got {d_conv}")
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv2d = nn.Conv2d(
            self.d_inner, self.d_inner, d_conv, padding=d_conv // 2, groups=self.d_inner, bias=conv_bias
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(init_dt_bias(self.d_inner, dt_min, dt_max, dt_init_floor))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(x).permute(0, 3, 1, 2)  # (B, 2 * d_inner, H, W)
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv2d(x))  # (B, d_inner, H, W)
        dt, B, C = torch.split(
            self.x_proj(x.permute(0, 2, 3, 1)), [self.dt_rank, self.d_state, self.d_state], dim=-1
        )  # (B, H, W, .)
        delta = (dt @ self.dt_proj.weight.t()).permute(0, 3, 1, 2)  # (B, d_inner, H, W)
        y = selective_scan_2d(
            x,
            delta,
            -torch.exp(self.A_log.float()),
            B.permute(0, 3, 1, 2).contiguous(),  # (B, N, H, W)
            C.permute(0, 3, 1, 2).contiguous(),
            D=self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            backend=self.scan_backend,
        )
        return self.out_proj(y.permute(0, 2, 3, 1))
