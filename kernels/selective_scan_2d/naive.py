"""2D selective scan (2DMamba) in plain PyTorch: the ground truth and the CPU path.

Per batch b, channel d and state n, over a grid of H rows and W columns (position (i, j)):

    dt[i,j] = softplus(delta[i,j] + delta_bias[d])                  (bias and softplus optional)
    a[i,j]  = exp(dt[i,j] * A[d,n])                                  (one decay, used by both passes)
    x[i,j]  = dt[i,j] * B[n,i,j] * u[i,j]
    g[i,j]  = a[i,j] * g[i,j-1] + x[i,j]      g[i,-1] = 0            (pass 1: along each row)
    h[i,j]  = a[i,j] * h[i-1,j] + g[i,j]      h[-1,j] = 0            (pass 2: down each column)
    y[i,j]  = sum_n C[n,i,j] * h[i,j] + D[d] * u[i,j]
    y[i,j]  = y[i,j] * silu(z[i,j])                                  (optional gate)

Worked 2x2 example (one channel, one state, x as above):

    g[0,0] = x00                      h[0,0] = g[0,0]               = x00
    g[0,1] = a01 x00 + x01            h[0,1] = g[0,1]               = a01 x00 + x01
    g[1,0] = x10                      h[1,0] = a10 h[0,0] + g[1,0]  = a10 x00 + x10
    g[1,1] = a11 x10 + x11            h[1,1] = a11 h[0,1] + g[1,1]  = a11 a01 x00 + a11 x01 + a11 x10 + x11

With every a = 0.5 and x = [[1, 2], [3, 4]]: g = [[1, 2.5], [3, 5.5]] and h = [[1, 2.5], [3.5, 6.75]].
Position (0,0) reaches (1,1) along one path only (right, then down), decayed by a01 * a11.

This is not the sequential reference shipped with 2DMamba's CUDA kernel, which computes a
different recurrence and assumes square grids. On a grid of one row the scan is the 1D
selective scan over W positions; on a grid of one column it is the 1D scan over H positions.

The loop runs over states, so memory holds a few (batch, dim, H, W) blocks at a time, never a
(batch, dim, H, W, N) tensor. Under autograd each state's contribution is checkpointed
(recomputed in the backward) so that training does not keep N copies of the intermediates either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _scan_last_dim(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """s[..., k] = a[..., k] * s[..., k-1] + x[..., k], s[..., -1] = 0."""
    out = []
    s = torch.zeros_like(x[..., 0])
    for k in range(x.shape[-1]):
        s = a[..., k] * s + x[..., k]
        out.append(s)
    return torch.stack(out, dim=-1)


def _state_output(dt: torch.Tensor, dt_u: torch.Tensor, A_n: torch.Tensor, B_n: torch.Tensor,
                  C_n: torch.Tensor) -> torch.Tensor:
    """One state's term C_n * h_n. dt, dt_u (b, d, H, W); A_n (d,); B_n, C_n (b, H, W)."""
    a = torch.exp(dt * A_n[None, :, None, None])  # (b, d, H, W)
    x = dt_u * B_n[:, None]
    g = _scan_last_dim(a, x)  # pass 1: along each row (over W)
    h = _scan_last_dim(a.transpose(-1, -2), g.transpose(-1, -2)).transpose(-1, -2)  # pass 2: down each column
    return C_n[:, None] * h


def selective_scan_2d_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Reference 2D selective scan. u, delta, z (batch, dim, H, W); A (dim, N);
    B, C (batch, N, H, W); D, delta_bias (dim,). Returns y (batch, dim, H, W) in u's dtype,
    computed in float32 (float64 for float64 inputs)."""
    if u.dim() != 4 or delta.shape != u.shape:
        raise ValueError(f"selective_scan_2d: u and delta must be (batch, dim, H, W) of one shape, "
                         f"got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, dim, height, width = u.shape
    n_state = A.shape[-1]
    if A.shape != (dim, n_state) or B.shape != (batch, n_state, height, width) or C.shape != B.shape:
        raise ValueError(f"selective_scan_2d: expected A (dim, N) = ({dim}, N) and B, C (batch, N, H, W) = "
                         f"({batch}, N, {height}, {width}); got A {tuple(A.shape)}, B {tuple(B.shape)}, "
                         f"C {tuple(C.shape)}")
    dtype_in = u.dtype
    work = torch.float64 if dtype_in == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(work) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[None, :, None, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dt_u = delta * u
    use_checkpoint = torch.is_grad_enabled() and any(
        t.requires_grad for t in (delta, dt_u, A, B, C))
    y = torch.zeros_like(u)
    for n in range(n_state):
        args = (delta, dt_u, A[:, n], B[:, n], C[:, n])
        if use_checkpoint:
            y = y + checkpoint(_state_output, *args, use_reentrant=False)
        else:
            y = y + _state_output(*args)
    if D is not None:
        y = y + D.to(work)[None, :, None, None] * u
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(dtype_in)
