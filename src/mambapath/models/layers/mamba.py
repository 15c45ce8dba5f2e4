"""Mamba block (Gu and Dao, 2023): the selective state-space layer, on our ``selective_scan``.

    x (B, L, D) -> in_proj -> [x, z] (B, 2 * d_inner, L)
    x -> causal depthwise conv1d (width d_conv) -> SiLU
      -> x_proj -> (dt (rank R), B (N), C (N)) per position -> dt_proj -> delta (B, d_inner, L)
      -> selective scan with A = -exp(A_log) (d_inner, N), D skip, softplus(delta + dt bias),
         output gated by SiLU(z)
    -> out_proj -> (B, L, D)

The block is split in three so that wrappers can share parts: ``project_in`` (in_proj),
``mixer`` (a :class:`MambaMixer`: conv, projections and scan, everything that depends on
the direction of travel) and ``project_out`` (out_proj). The bidirectional and
sequence-reordered variants (bidirectional.py, MambaMIL's SRMamba) run a second mixer over
the same projected input, as Vision Mamba and MambaMIL do.

Streaming: ``forward_chunk(x, state)`` runs one chunk of a longer sequence and returns the
state after it (the last ``d_conv - 1`` conv inputs and the scan state), so a sequence fed
chunk by chunk gives the same outputs as fed whole; ``step`` is the one-position case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mambapath.kernels import selective_scan


@dataclass
class ScanState:
    """What a causal sequence layer carries from one chunk to the next.

    conv: (B, C, d_conv - 1) the last inputs of the causal depthwise convolution
    ssm:  (B, d_inner, N) the selective scan's hidden state (float32)
    """

    conv: torch.Tensor
    ssm: torch.Tensor


def causal_depthwise_conv(x: torch.Tensor, conv: nn.Conv1d, conv_state: torch.Tensor | None):
    """Causal depthwise 1D convolution of x (B, C, L) that continues from ``conv_state``
    (B, C, K - 1), the previous chunk's last inputs (zeros at the start of a sequence, which is
    the zero padding of the whole-sequence convolution). Returns (y (B, C, L), new state)."""
    width = conv.kernel_size[0]
    batch, channels, _ = x.shape
    if conv_state is None:
        conv_state = x.new_zeros(batch, channels, width - 1)
    window = torch.cat([conv_state.to(x.dtype), x], dim=-1)  # (B, C, K - 1 + L)
    y = F.conv1d(window, conv.weight, conv.bias, groups=channels)  # (B, C, L)
    return y, window[:, :, window.shape[-1] - (width - 1):]


def init_dt_bias(d_inner: int, dt_min: float, dt_max: float, dt_init_floor: float) -> torch.Tensor:
    """Bias whose softplus is log-uniform in [dt_min, dt_max] (Mamba's initialisation)."""
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse softplus


class MambaMixer(nn.Module):
    """The direction-dependent part of a Mamba block: conv, x/dt projections and the scan.

    Input xz (B, 2 * d_inner, L) is the in_proj output (x then z); the output
    (B, d_inner, L) is the gated scan output, ready for out_proj.
    """

    def __init__(
        self,
        d_inner: int,
        d_state: int = 16,
        d_conv: int = 4,
        dt_rank: int | None = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        scan_backend: str = "auto",
    ):
        super().__init__()
        self.d_inner = d_inner
        self.d_state = d_state
        self.d_conv = d_conv
        self.dt_rank = dt_rank or math.ceil(d_inner / 32)  # Mamba's ceil(d_model / 16) with expand 2
        self.scan_backend = scan_backend
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=conv_bias)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(init_dt_bias(d_inner, dt_min, dt_max, dt_init_floor))
        # S4D-real initialisation: A[d, n] = -(n + 1)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))

    def forward(self, xz: torch.Tensor, state: ScanState | None = None, return_state: bool = False):
        x, z = xz.chunk(2, dim=1)  # (B, d_inner, L) each
        x, conv_state = causal_depthwise_conv(x, self.conv1d, None if state is None else state.conv)
        x = F.silu(x)
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, d_inner, L); bias added in the scan
        A = -torch.exp(self.A_log.float())  # (d_inner, N)
        out = selective_scan(
            x,
            delta,
            A,
            B.transpose(1, 2).contiguous(),  # (B, N, L)
            C.transpose(1, 2).contiguous(),
            D=self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            initial_state=None if state is None else state.ssm,
            return_last_state=return_state,
            backend=self.scan_backend,
        )
        if not return_state:
            return out
        y, ssm_state = out
        return y, ScanState(conv=conv_state, ssm=ssm_state)


class Mamba(nn.Module):
    """Mamba block: (B, L, d_model) -> (B, L, d_model). No norm or residual (the caller's)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        bias: bool = False,
        scan_backend: str = "auto",
        **mixer_kwargs,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_inner = expand * d_model
        self._mixer_config = dict(
            d_inner=self.d_inner,
            d_state=d_state,
            d_conv=d_conv,
            dt_rank=dt_rank or math.ceil(d_model / 16),
            scan_backend=scan_backend,
            **mixer_kwargs,
        )
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.mixer = self.build_mixer()
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def build_mixer(self) -> MambaMixer:
        """A fresh mixer with this block's sizes (wrappers use it for a second direction)."""
        return MambaMixer(**self._mixer_config)

    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        return self.in_proj(x).transpose(1, 2)  # (B, 2 * d_inner, L)

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        return self.out_proj(y.transpose(1, 2))  # (B, L, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.mixer(self.project_in(x)))

    def forward_chunk(self, x: torch.Tensor, state: ScanState | None = None):
        """One chunk (B, T, d_model) of a longer sequence; ``state`` None starts a sequence.
        Returns (y (B, T, d_model), state after the chunk)."""
        y, state = self.mixer(self.project_in(x), state, return_state=True)
        return self.project_out(y), state

    def step(self, x: torch.Tensor, state: ScanState | None = None):
        """One position x (B, d_model) -> (y (B, d_model), state)."""
        y, state = self.forward_chunk(x[:, None], state)
        return y[:, 0], state
