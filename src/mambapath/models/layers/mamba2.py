"""Mamba2 block (Dao and Gu, 2024), on our ``selective_scan`` with grouped B and C.

    x (B, L, D) -> in_proj -> [z (d_inner), xBC (d_inner + 2 * G * N), dt (H)]
    xBC -> causal depthwise conv1d -> SiLU -> x (d_inner), B (G, N), C (G, N)
    selective scan with one scalar decay per head: A[h] = -exp(A_log[h]) shared by the
      head's ``headdim`` channels and all N states; delta = softplus(dt[h] + dt_bias[h]) per
      head; B and C shared by the channels of each of the G groups; D skip per head;
      output gated by SiLU(z)
    -> RMSNorm (grouped by G) -> out_proj -> (B, L, D)

Mamba2's SSD algorithm computes exactly this recurrence (scalar-times-identity A per head),
so the selective scan with (batch, groups, N, L) B and C and per-channel copies of the
head's decay and step is the same layer, on the same kernels as Mamba.

As in mamba.py the block is split into ``project_in``, a direction-dependent ``mixer`` and
``project_out``, and supports chunked streaming with a carried conv and scan state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mambapath.kernels import selective_scan

from .mamba import ScanState, causal_depthwise_conv, init_dt_bias


class Mamba2Mixer(nn.Module):
    """Conv over (x, B, C), per-head step and decay, and the grouped selective scan.

    Input zxbcdt (B, 2 * d_inner + 2 * G * N + H, L), the in_proj output; output
    (B, d_inner, L), the gated scan output.
    """

    def __init__(
        self,
        d_inner: int,
        headdim: int,
        d_state: int = 64,
        ngroups: int = 1,
        d_conv: int = 4,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        scan_backend: str = "auto",
    ):
        super().__init__()
        if d_inner % headdim:
            raise ValueError(f"d_inner {d_inner} is not a multiple of headdim {headdim}")
        self.nheads = d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"{self.nheads} heads cannot be split into {ngroups} B/C groups")
        self.d_inner = d_inner
        self.headdim = headdim
        self.d_state = d_state
        self.ngroups = ngroups
        self.d_conv = d_conv
        self.scan_backend = scan_backend
        conv_dim = d_inner + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, bias=conv_bias)
        self.dt_bias = nn.Parameter(init_dt_bias(self.nheads, dt_min, dt_max, dt_init_floor))
        A = torch.empty(self.nheads).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.nheads))

    def forward(self, zxbcdt: torch.Tensor, state: ScanState | None = None, return_state: bool = False):
        batch, _, length = zxbcdt.shape
        d_inner, n_group_state = self.d_inner, self.ngroups * self.d_state
        z, xBC, dt = torch.split(zxbcdt, [d_inner, d_inner + 2 * n_group_state, self.nheads], dim=1)
        xBC, conv_state = causal_depthwise_conv(xBC, self.conv1d, None if state is None else state.conv)
        xBC = F.silu(xBC)
        x, B, C = torch.split(xBC, [d_inner, n_group_state, n_group_state], dim=1)
        B = B.reshape(batch, self.ngroups, self.d_state, length)  # (B, G, N, L)
        C = C.reshape(batch, self.ngroups, self.d_state, length)
        # every channel of a head shares the head's step, decay and skip
        delta = dt.repeat_interleave(self.headdim, dim=1)  # (B, d_inner, L)
        A = (-torch.exp(self.A_log.float())).repeat_interleave(self.headdim)[:, None].expand(d_inner, self.d_state)
        out = selective_scan(
            x,
            delta,
            A,
            B,
            C,
            D=self.D.float().repeat_interleave(self.headdim),
            z=z,
            delta_bias=self.dt_bias.float().repeat_interleave(self.headdim),
            delta_softplus=True,
            initial_state=None if state is None else state.ssm,
            return_last_state=return_state,
            backend=self.scan_backend,
        )
        if not return_state:
            return out
        y, ssm_state = out
        return y, ScanState(conv=conv_state, ssm=ssm_state)


class GroupedRMSNorm(nn.Module):
    """RMSNorm over each of ``groups`` equal slices of the last dimension (Mamba2's gated
    norm with ngroups > 1; one group is plain RMSNorm)."""

    def __init__(self, dim: int, groups: int = 1, eps: float = 1e-5):
        super().__init__()
        self.groups = groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(*shape[:-1], self.groups, shape[-1] // self.groups)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.reshape(shape) * self.weight


class Mamba2(nn.Module):
    """Mamba2 block: (B, L, d_model) -> (B, L, d_model). No outer norm or residual."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        bias: bool = False,
        scan_backend: str = "auto",
        **mixer_kwargs,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_inner = expand * d_model
        self._mixer_config = dict(
            d_inner=self.d_inner,
            headdim=headdim,
            d_state=d_state,
            ngroups=ngroups,
            d_conv=d_conv,
            scan_backend=scan_backend,
            **mixer_kwargs,
        )
        self.mixer = self.build_mixer()
        nheads = self.mixer.nheads
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + nheads, bias=bias)
        self.norm = GroupedRMSNorm(self.d_inner, groups=ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def build_mixer(self) -> Mamba2Mixer:
        return Mamba2Mixer(**self._mixer_config)

    def project_in(self, x: torch.Tensor) -> torch.Tensor:
        return self.in_proj(x).transpose(1, 2)  # (B, C, L)

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.norm(y.transpose(1, 2)))  # (B, L, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.mixer(self.project_in(x)))

    def forward_chunk(self, x: torch.Tensor, state: ScanState | None = None):
        """One chunk (B, T, d_model) of a longer sequence -> (y (B, T, d_model), state)."""
        y, state = self.mixer(self.project_in(x), state, return_state=True)
        return self.project_out(y), state

    def step(self, x: torch.Tensor, state: ScanState | None = None):
        y, state = self.forward_chunk(x[:, None], state)
        return y[:, 0], state
