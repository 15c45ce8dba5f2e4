"""Selective scan in plain PyTorch: the ground truth and the CPU path.

Recurrence (mamba-ssm's ``selective_scan_fn`` semantics), per batch b, channel d, state n:

    delta_t = softplus(delta_t + delta_bias)          (each step optional)
    h_t     = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t     = sum_n C_t[n] * h_t[n] + D[d] * u_t
    y_t     = y_t * silu(z_t)                          (optional gate)

B and C are shared by groups of channels: channel d reads group d // (dim // groups).
``reverse=True`` runs the same recurrence from the last position to the first.

The sequence is processed in chunks of ``chunk_size`` positions, so memory holds at most a
(batch, dim, chunk, chunk, N) block, never a (batch, dim, L, N) tensor. Inside a chunk the
states are a lower-triangular matrix of decays applied to the inputs
(h_t = sum_{s<=t} exp(S_t - S_s) x_s + exp(S_t) h_0, with S the cumulative log-decay), which
stays finite because only differences S_t - S_s <= 0 are exponentiated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_groups(M: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, N, L) or (batch, groups, N, L) -> (batch, dim, N, L) view by channel group."""
    if M.dim() == 3:
        return M.unsqueeze(1).expand(M.shape[0], dim, M.shape[1], M.shape[2])
    groups = M.shape[1]
    if dim % groups:
        raise ValueError(f"dim {dim} is not a multiple of the number of B/C groups {groups}")
    return M.repeat_interleave(dim // groups, dim=1)


def selective_scan_ref(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    reverse=False,
    initial_state=None,
    return_last_state=False,
    chunk_size: int = 64,
):
    """Reference selective scan. Shapes: u, delta, z (batch, dim, L); A (dim, N);
    B, C (batch, N, L) or (batch, groups, N, L); D, delta_bias (dim,);
    initial_state (batch, dim, N). Returns y (batch, dim, L) in u's dtype, and the last
    state (batch, dim, N) in float32 (float64 for float64 inputs) when asked for."""
    dtype_in = u.dtype
    work = torch.float64 if dtype_in == torch.float64 else torch.float32
    batch, dim, length = u.shape
    u = u.to(work)
    delta = delta.to(work)
    A = A.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    Bx = _expand_groups(B.to(work), dim)  # (batch, dim, N, L)
    Cx = _expand_groups(C.to(work), dim)
    if reverse:
        u, delta, Bx, Cx = u.flip(-1), delta.flip(-1), Bx.flip(-1), Cx.flip(-1)

    n_state = A.shape[1]
    h = (
        torch.zeros(batch, dim, n_state, dtype=work, device=u.device)
        if initial_state is None
        else initial_state.to(work)
    )
    ys = []
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        dt = delta[:, :, start:end]  # (b, d, T)
        log_decay = dt.unsqueeze(-1) * A[None, :, None, :]  # (b, d, T, N)
        S = torch.cumsum(log_decay, dim=2)
        x = (dt * u[:, :, start:end]).unsqueeze(-1) * Bx[:, :, :, start:end].transpose(-1, -2)  # (b, d, T, N)
        T = end - start
        causal = torch.ones(T, T, dtype=torch.bool, device=u.device).tril()
        seg = S.unsqueeze(3) - S.unsqueeze(2)  # (b, d, T, T, N): S_t - S_s
        decay = torch.exp(seg.masked_fill(~causal[None, None, :, :, None], float("-inf")))
        states = torch.einsum("bdtsn,bdsn->bdtn", decay, x) + torch.exp(S) * h.unsqueeze(2)
        ys.append(torch.einsum("bdtn,bdnt->bdt", states, Cx[:, :, :, start:end]))
        h = states[:, :, -1]
    y = torch.cat(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0)
    if reverse:
        y = y.flip(-1)
        u = u.flip(-1)
    if D is not None:
        y = y + D.to(work)[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.to(work))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y
