"""2D selective scan (2DMamba) in plain PyTorch: the ground truth and the CPU path.

Per batch b, channel d and state n, over a grid of H rows and W columns:

    a[i,j] = exp(delta[i,j] * A[d,n])
    g[i,j] = a[i,j] * g[i,j-1] + delta[i,j] * B[i,j,n] * u[i,j]     (along each row)
    h[i,j] = a[i,j] * h[i-1,j] + g[i,j]                             (down each column)
    y[i,j] = sum_n C[i,j,n] * h[i,j,n] + D[d] * u[i,j],  then y * silu(z) if z is given

The loop runs over states, so memory holds a (batch, dim, H, W) block at a time, never a
(batch, dim, H, W, N) tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _scan_last_dim(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """s[..., k] = a[..., k] * s[..., k-1] + x[..., k], s[..., -1] = 0."""
    out = []
    s = torch.zeros_like(x[..., 0])
    for k in range(x.shape[-1]):
        s = a[..., k] * s + x[..., k]
        out.append(s)
    return torch.stack(out, dim=-1)


def selective_scan_2d_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Reference 2D selective scan. u, delta, z (batch, dim, H, W); A (dim, N);
    B, C (batch, N, H, W); D, delta_bias (dim,). Returns y (batch, dim, H, W)."""
    dtype_in = u.dtype
    work = torch.float64 if dtype_in == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(work) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[None, :, None, None]
    if delta_softplus:
        delta = F.softplus(delta)
    y = torch.zeros_like(u)
    for n in range(A.shape[1]):
        a = torch.exp(delta * A[None, :, n, None, None])  # (b, d, H, W)
        x = delta * B[:, None, n] * u
        g = _scan_last_dim(a, x)  # along each row (over W)
        h = _scan_last_dim(a.transpose(-1, -2), g.transpose(-1, -2)).transpose(-1, -2)  # down each column
        y = y + C[:, None, n] * h
    if D is not None:
        y = y + D.to(work)[None, :, None, None] * u
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(dtype_in)
