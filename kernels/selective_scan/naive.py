"""Selective scan in plain PyTorch: the ground truth and the CPU path.

Recurrence (mamba-ssm's ``selective_scan_fn`` semantics), per batch b, channel d, state n:

    delta_t = softplus(delta_t + delta_bias)          (each step optional)
    h_t     = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t     = sum_n C_t[n] * h_t[n] + D[d] * u_t
    y_t     = y_t * silu(z_t)                          (optional gate)

B and C are shared by groups of channels: channel d reads group d // (dim // groups).
``reverse=True`` runs the same recurrence from the last position to the first (the outputs stay
in place; ``initial_state`` is the state before position L-1 and the last state the one after
position 0). ``initial_state`` is h_{-1}; the last state is h_{L-1}.

How it is computed, without ever holding a (batch, dim, L, N) tensor:

1. The sequence is cut into windows processed one after another, the state carried between
   them. A window holds ``window_elements`` state values at most (batch * dim * positions * N).
   Under autograd a sequence of several windows is checkpointed window by window, so the
   backward keeps only the window inputs and one (batch, dim, N) state per window, and
   recomputes one window at a time.
2. Inside a window the positions are cut into chunks of ``chunk_size``. The decays and inputs
   of the whole window are formed at once; then all chunks advance together, one position per
   step (a loop of ``chunk_size`` steps over (batch, dim, n_chunks, N) tensors), first from a
   zero state to get each chunk's end state, then, once the chunk start states are known,
   again to produce the states and the outputs.
3. The chunk start states follow from h_start[c+1] = exp(A * sum(delta in chunk c)) * h_start[c]
   + h_end_local[c], a short loop over the chunks of the window.

Only products of decays exp(delta * A) <= 1 (A < 0) are formed, so nothing overflows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# State values (batch * dim * positions * N) that one window may span: 2**22 float32 values are
# 16 MiB per live tensor (decays, inputs, states: a few are alive at once).
WINDOW_ELEMENTS = 1 << 22


def check_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None) -> int:
    """Validate shapes against mamba-ssm's conventions; returns the number of B/C groups."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u and delta must be (batch, dim, L) of one shape, "
                         f"got u {tuple(u.shape)} and delta {tuple(delta.shape)}")
    batch, dim, length = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim, N) = ({dim}, N), got {tuple(A.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported; pass a real (dim, N) A")
    n_state = A.shape[1]
    group_counts = []
    for name, M in (("B", B), ("C", C)):
        if M.dim() == 3 and tuple(M.shape) == (batch, n_state, length):
            group_counts.append(1)
        elif M.dim() == 4 and M.shape[0] == batch and tuple(M.shape[2:]) == (n_state, length):
            group_counts.append(M.shape[1])
        else:
            raise ValueError(f"selective_scan: {name} must be (batch, N, L) = ({batch}, {n_state}, {length}) "
                             f"or (batch, groups, N, L), got {tuple(M.shape)}")
    groups = group_counts[0]
    if group_counts[1] != groups:
        raise ValueError(f"selective_scan: B and C must have the same number of groups, got {group_counts}")
    if groups < 1 or dim % groups:
        raise ValueError(f"selective_scan: dim {dim} is not a multiple of the {groups} groups of B and C")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"selective_scan: {name} must be (dim,) = ({dim},), got {tuple(t.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim, n_state):
        raise ValueError(f"selective_scan: initial_state must be (batch, dim, N) = ({batch}, {dim}, {n_state}), "
                         f"got {tuple(initial_state.shape)}")
    return groups


def _as_groups(M: torch.Tensor) -> torch.Tensor:
    """(batch, N, L) or (batch, groups, N, L) -> (batch, groups, N, L) view."""
    return M.unsqueeze(1) if M.dim() == 3 else M


def _scan_window(u, delta, A, B, C, h, chunk_size: int):
    """One window. u, delta (b, g, dg, W); A (g, dg, N); B, C (b, g, N, W); h (b, g, dg, N).
    Returns y (b, g, dg, W) without the D term, and the state after the window."""
    width = u.shape[-1]
    n_chunks = -(-width // chunk_size)
    pad = n_chunks * chunk_size - width
    if pad:
        # padded positions have delta = 0: decay 1 and input 0, so they leave the state alone
        u, delta, B, C = (F.pad(t, (0, pad)) for t in (u, delta, B, C))
    b, g, dg = u.shape[:3]
    n_state = A.shape[-1]
    # step-major layouts, so that each step reads one contiguous slab
    delta = delta.reshape(b, g, dg, n_chunks, chunk_size).permute(4, 0, 1, 2, 3)  # (T, b, g, dg, nc)
    delta_u = (delta * u.reshape(b, g, dg, n_chunks, chunk_size).permute(4, 0, 1, 2, 3)).contiguous()
    delta = delta.contiguous()
    B = B.reshape(b, g, n_state, n_chunks, chunk_size).permute(4, 0, 1, 3, 2).unsqueeze(3).contiguous()
    C = C.reshape(b, g, n_state, n_chunks, chunk_size).permute(4, 0, 1, 3, 2).unsqueeze(3).contiguous()
    A = A[:, :, None, :]  # (g, dg, 1, N); B, C are (T, b, g, 1, nc, N)
    decay = torch.exp(delta[..., None] * A)  # (T, b, g, dg, nc, N)
    x = delta_u[..., None] * B  # (T, b, g, dg, nc, N)
    # unbind, not decay[t]: autograd then gathers the per-step gradients in one stack
    decays, xs = decay.unbind(0), x.unbind(0)

    # every chunk from a zero state: its end state
    h_local = torch.zeros_like(xs[0])  # (b, g, dg, nc, N)
    for t in range(chunk_size):
        h_local = decays[t] * h_local + xs[t]
    chunk_decay = torch.exp(delta.sum(0)[..., None] * A)  # (b, g, dg, nc, N)

    # chunk start states, carried from the window's start
    starts = []
    for c_decay, c_local in zip(chunk_decay.unbind(3), h_local.unbind(3)):
        starts.append(h)
        h = c_decay * h + c_local
    state = torch.stack(starts, dim=3)  # (b, g, dg, nc, N)

    # every chunk again, from its true start state: the outputs
    states = []
    for t in range(chunk_size):
        state = decays[t] * state + xs[t]
        states.append(state)
    ys = (torch.stack(states) * C).sum(-1)  # (T, b, g, dg, nc)
    y = ys.permute(1, 2, 3, 4, 0).reshape(b, g, dg, n_chunks * chunk_size)
    return y[..., :width], h


class _WindowCheckpoint(torch.autograd.Function):
    """One window, recomputed in the backward: the graph keeps its inputs and nothing else."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h, chunk_size):
        ctx.save_for_backward(u, delta, A, B, C, h)
        ctx.chunk_size = chunk_size
        with torch.no_grad():
            return _scan_window(u, delta, A, B, C, h, chunk_size)

    @staticmethod
    def backward(ctx, dy, dh):
        inputs = [t.detach().requires_grad_(needs) for t, needs in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        with torch.enable_grad():
            outputs = _scan_window(*inputs, ctx.chunk_size)
        pairs = [(out, grad) for out, grad in zip(outputs, (dy, dh)) if grad is not None]
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                     if pairs and wanted else [None] * len(wanted))
        return (*[next(grads) if t.requires_grad else None for t in inputs], None)


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
    window_elements: int = WINDOW_ELEMENTS,
):
    """Reference selective scan. Shapes: u, delta, z (batch, dim, L); A (dim, N);
    B, C (batch, N, L) or (batch, groups, N, L); D, delta_bias (dim,);
    initial_state (batch, dim, N). Returns y (batch, dim, L) in u's dtype, and the last
    state (batch, dim, N) in float32 (float64 for float64 inputs) when asked for.
    Gradients flow to every tensor input, through the last state too."""
    groups = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in = u.dtype
    work = torch.float64 if dtype_in == torch.float64 else torch.float32
    batch, dim, length = u.shape
    n_state = A.shape[1]
    dg = dim // groups

    u_w = u.to(work)
    delta = delta.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B4 = _as_groups(B).to(work).expand(batch, groups, n_state, length)
    C4 = _as_groups(C).to(work).expand(batch, groups, n_state, length)
    if reverse:
        u_w, delta, B4, C4 = u_w.flip(-1), delta.flip(-1), B4.flip(-1), C4.flip(-1)
    u_g = u_w.reshape(batch, groups, dg, length)
    delta_g = delta.reshape(batch, groups, dg, length)
    A_g = A.to(work).reshape(groups, dg, n_state)
    if initial_state is None:
        h = u_w.new_zeros(batch, groups, dg, n_state)
    else:
        h = initial_state.to(work).reshape(batch, groups, dg, n_state)

    window = max(chunk_size, window_elements // max(1, batch * dim * n_state) // chunk_size * chunk_size)
    track_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias, initial_state))
    # one window needs no checkpoint: its intermediates are bounded by the window anyway
    track_grad = track_grad and length > window
    ys = []
    for start in range(0, length, window):
        sl = slice(start, min(start + window, length))
        args = (u_g[..., sl], delta_g[..., sl], A_g, B4[..., sl], C4[..., sl], h, chunk_size)
        if track_grad:
            y_w, h = _WindowCheckpoint.apply(*args)
        else:
            y_w, h = _scan_window(*args)
        ys.append(y_w)
    y = torch.cat(ys, dim=-1) if ys else u_g.new_zeros(batch, groups, dg, 0)
    y = y.reshape(batch, dim, length)
    if reverse:
        y = y.flip(-1)
    if D is not None:
        y = y + D.to(work)[None, :, None] * u.to(work)
    if z is not None:
        y = y * F.silu(z.to(work))
    y = y.to(dtype_in)
    last_state = h.reshape(batch, dim, n_state)
    return (y, last_state) if return_last_state else y
