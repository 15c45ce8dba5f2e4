"""2D selective scan in Triton: tiled forward and backward kernels and their autograd Function.

The maths (carries, adjoint recurrences, why four kernels) is in README.md beside this file;
the kernels keep shape comments only. Notation: grid (H, W), states padded to NP, dt =
softplus(delta + delta_bias) recomputed wherever it is needed, a = exp(dt * A).

Launch order
    forward:  _row_carry_kernel  (g at every CW-column boundary, a 1D problem per row)
              _fwd_kernel        (one program per column stripe and channel block, row by row)
              both with one (channel, state) pair per thread (see "lanes" below)
    backward: _col_carry_kernel  (adjoint flowing up into every CH-row boundary, 1D per column)
              _bwd_kernel        (one program per row stripe and state block, tiles right to left)

Triton fixes compiled or interpreted mode when it defines a kernel; the package loads this file
on the first call of the Triton backend, once per mode (see __init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from mambapath.kernels.launch import launcher

LOG2E = tl.constexpr(1.4426950408889634)


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes (powers of two). CW, CH: the backward tile, which is also the granularity of the
    row carries (every CW columns) and of the column checkpoints (every CH rows). The forward
    walks down stripes of fwd_cols columns (a multiple of CW; at least the padded state count)
    with its registers capped at fwd_maxnreg per thread (None: no cap); its programs hold as
    many channels as fill a warp's lanes with their states. The backward splits the N states
    into blocks of bwd_states, one program each (their sums over states are then added
    atomically).

    Measured on an H100 (README.md beside this file): the forward's 16-column stripes capped at
    128 registers beat 32-column ones and no cap; the backward's tiles come from
    ``benchmarks/bench_selective_scan_2d.py --tune`` (all 16 states in one program of 4 warps;
    blocks of states were slower). Backward tiles of 8 columns (CW = 8) were 6% faster, but CW
    also spaces the forward's row carries, and the earlier forward lost more than that."""

    CW: int = 16
    CH: int = 16
    fwd_cols: int = 16
    fwd_maxnreg: int | None = 128
    carry_cols: int = 16  # columns per program of the column-carry kernel
    carry_warps: int = 2
    bwd_states: int = 16
    bwd_warps: int = 4

    def check(self) -> None:
        for name in ("CW", "CH", "fwd_cols", "carry_cols", "bwd_states"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"TileConfig.{name}={value} must be a power of two")
        if self.fwd_cols % self.CW:
            raise ValueError(f"TileConfig: fwd_cols ({self.fwd_cols}) must be a multiple of CW ({self.CW})")
        if self.fwd_maxnreg is not None and not 32 <= self.fwd_maxnreg <= 255:
            raise ValueError(f"TileConfig.fwd_maxnreg={self.fwd_maxnreg} must be None (no cap) or a register count "
                             "per thread from 32 to 255")


DEFAULT_CONFIG = TileConfig()


@triton.jit
def _affine_combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): s -> a2 * (a1 * s + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _softplus(v):
    # log1p(exp(v)) without log1p: log(w) * e / (w - 1) with w = 1 + e is exact to rounding
    # (Goldberg); v > 20 returns v as torch.nn.functional.softplus does.
    e = tl.exp(tl.minimum(v, 20.0))
    w = 1.0 + e
    small = w == 1.0
    lp = tl.where(small, e, tl.log(w) * e / tl.where(small, 1.0, w - 1.0))
    return tl.where(v > 20.0, v, lp)


@triton.jit
def _dt_of(delta, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt = softplus(delta + bias), 0 where mask is False; also returns delta + bias."""
    raw = delta
    if HAS_BIAS:
        raw = raw + bias
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return tl.where(mask, dt, 0.0), raw


@triton.jit
def _load_dt(delta_ptr, offs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
             COMPUTE: tl.constexpr):
    """dt = softplus(delta + bias) at offs, 0 where mask is False; also returns delta + bias."""
    return _dt_of(tl.load(delta_ptr + offs, mask=mask, other=0.0).to(COMPUTE), mask, bias, HAS_BIAS, SOFTPLUS)


# ---------------------------------------------------------------------------------------------
# lanes: the forward kernels put one (channel, state) pair on each thread
#
# A program owns DB channels and the NB (padded) states: a (DB, NB) tile holds one value per
# thread. Every recurrence then runs inside a thread, position after position, with no scan
# across threads. The same (DB, NB) tile also holds NB consecutive positions of the DB
# channels (loads and stores of delta, u, z and y are coalesced, softplus runs once per
# position), and two exchanges move between the two readings: _lane_bcast hands position j
# to every state of its channel, _lane_sums adds NB per-state tiles over the states and leaves
# the sum of tile j in position j. With FAST (compiled float32, DB * NB = 32, one warp: lane
# c * NB + n holds element (c, n)) these are warp shuffles; otherwise (the interpreter,
# float64, more than 32 states) Triton's reductions do the same.


@triton.jit
def _lane_id(like):
    # the lane of each element's thread (``like`` only gives the shape)
    return tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _shfl_xor(x, lane_mask):
    # the value held by the lane whose id differs from this one's by the bits of lane_mask
    return tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=f,f,r",
                                     [x, lane_mask], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _lane_bcast(v, j: tl.constexpr, lanes, FAST: tl.constexpr):
    """(DB, NB) tile read as positions -> (DB, NB): every element of channel c holds v[c, j]."""
    if FAST:
        NB: tl.constexpr = v.shape[1]
        seg: tl.constexpr = ((32 - NB) << 8) | 31  # segments of NB lanes, source lane j of each
        out = tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, $3, 0xffffffff;", "=f,f,r,r",
                                        [v, tl.full(v.shape, j, tl.int32), tl.full(v.shape, seg, tl.int32)],
                                        dtype=tl.float32, is_pure=True, pack=1)
    else:
        out = tl.broadcast_to(tl.sum(tl.where(lanes[None, :] == j, v, 0.0), axis=1)[:, None], v.shape)
    return out


@triton.jit
def _cat(a, b):
    """The rows of a (R, ...) above those of b: (2R, ...); the new rows stay in each thread."""
    return tl.reshape(tl.permute(tl.join(a, b), (3, 0, 1, 2)), (2 * a.shape[0], a.shape[1], a.shape[2]))


@triton.jit
def _halves(x):
    """(2R, P, Q) -> its first R rows and its last R rows."""
    R: tl.constexpr = x.shape[0] // 2
    return tl.split(tl.permute(tl.reshape(x, (2, R, x.shape[1], x.shape[2])), (1, 2, 3, 0)))


@triton.jit
def _lane_sums(vals, lanes, FAST: tl.constexpr):
    """A tuple of NB (DB, NB) tiles read as states -> one (DB, NB) tile read as positions whose
    element (c, j) is the sum over states of vals[j][c, :]. FAST: a transposing exchange (each
    step halves the values a thread holds and swaps half of them with the lane across one bit
    of the state index: NB - 1 shuffles for NB sums)."""
    NB: tl.constexpr = len(vals)
    if FAST:
        level = ()
        for k in tl.static_range(NB):
            level = level + (tl.expand_dims(vals[k], 0),)
        for _ in tl.static_range(6):
            if len(level) > 1:
                pairs = ()
                for k in tl.static_range(len(level) // 2):
                    pairs = pairs + (_cat(level[2 * k], level[2 * k + 1]),)
                level = pairs
        x = level[0]  # (NB, DB, NB): row k is vals[k]
        lane = _lane_id(vals[0])[None, :, :]
        for _ in tl.static_range(6):
            if x.shape[0] > 1:
                # lanes whose state index has bit x.shape[0] / 2 keep the upper half of the rows
                lo, hi = _halves(x)
                upper = (lane & (x.shape[0] // 2)) != 0
                keep = tl.where(upper, hi, lo)
                send = tl.where(upper, lo, hi)
                x = keep + _shfl_xor(send, tl.full(send.shape, x.shape[0] // 2, tl.int32))
        out = tl.reshape(x, vals[0].shape)
    else:
        out = tl.zeros(vals[0].shape, vals[0].dtype)
        for k in tl.static_range(NB):
            out = tl.where(lanes[None, :] == k, tl.sum(vals[k], axis=1)[:, None], out)
    return out


@triton.jit
def _row_carry_kernel(
    delta_ptr, bias_ptr, u_ptr, Bt_ptr, A_ptr, carry_ptr,
    H, W, DIM, N, N_CW,
    DB: tl.constexpr, NB: tl.constexpr, CW: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr, COMPUTE: tl.constexpr,
):
    """carry[b, d, c, i, :] = g[i, (c + 1) * CW - 1, :] for c < N_CW - 1 (the row pass at chunk ends).
    One program per (row i, block of DB channels, batch): each thread runs the row pass of one
    (channel, state) from the left edge, NB columns at a time."""
    i = tl.program_id(0)
    chans = tl.program_id(1) * DB + tl.arange(0, DB)  # (DB,)
    b = tl.program_id(2).to(tl.int64)
    lanes = tl.arange(0, NB)  # (NB,): a state, or a column of a group of NB
    zero = tl.zeros((DB, NB), tl.int32)
    m_chan = (chans[:, None] + zero) < DIM  # (DB, NB)
    m_state = (lanes[None, :] + zero) < N
    A2 = tl.load(A_ptr + chans[:, None] * N + lanes[None, :], mask=m_chan & m_state, other=0.0).to(COMPUTE) * LOG2E
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chans[:, None] + zero, mask=m_chan, other=0.0).to(COMPUTE)
    row = ((b * DIM + chans[:, None]) * H + i) * W  # (DB, 1)
    B_row = Bt_ptr + (b * H + i) * W * N + lanes[None, :] + zero  # (DB, NB)
    carry_rows = carry_ptr + ((b * DIM + chans[:, None]) * (N_CW - 1) * H + i) * NB + lanes[None, :]
    STEP: tl.constexpr = CW if CW < NB else NB  # chunk ends fall on multiples of STEP inside a group
    g = tl.zeros((DB, NB), COMPUTE)
    for k in range(0, tl.cdiv((N_CW - 1) * CW, NB)):
        cols = k * NB + lanes[None, :] + zero  # (DB, NB) read as positions
        m_pos = m_chan & (cols < W)
        dt, _ = _load_dt(delta_ptr, row + cols, m_pos, bias, HAS_BIAS, SOFTPLUS, COMPUTE)
        x = dt * tl.load(u_ptr + row + cols, mask=m_pos, other=0.0).to(COMPUTE)
        for j in tl.static_range(NB):
            col = k * NB + j
            a = tl.exp2(_lane_bcast(dt, j, lanes, FAST) * A2)
            Bj = tl.load(B_row + col * N, mask=m_state & (zero + col < W), other=0.0).to(COMPUTE)
            g = a * g + _lane_bcast(x, j, lanes, FAST) * Bj
            if (j + 1) % STEP == 0:
                c = (col + 1) // CW - 1  # the chunk ending here, when (col + 1) % CW == 0
                tl.store(carry_rows + c * H * NB, g, mask=m_chan & ((zero + col + 1) % CW == 0) & (zero + c < N_CW - 1))


@triton.jit
def _fwd_kernel(
    delta_ptr, bias_ptr, u_ptr, z_ptr, Bt_ptr, Ct_ptr, A_ptr, D_ptr, carry_ptr, ckpt_ptr, y_ptr,
    H, W, DIM, N, N_CW, N_CH,
    DB: tl.constexpr, NB: tl.constexpr, TW: tl.constexpr, CW: tl.constexpr, CH: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, HAS_D: tl.constexpr,
    STORE_CKPT: tl.constexpr, FAST: tl.constexpr, COMPUTE: tl.constexpr,
):
    """One program per (column stripe of TW, block of DB channels, batch), one row at a time top
    to bottom. Each thread holds one (channel, state) of the stripe's TW columns of h and runs
    the row pass along the stripe (from the row carry on its left) and the column pass down
    each column; y = sum_n C h is a sum across the lanes."""
    pid_c = tl.program_id(0)
    chans = tl.program_id(1) * DB + tl.arange(0, DB)  # (DB,)
    b = tl.program_id(2).to(tl.int64)
    lanes = tl.arange(0, NB)
    zero = tl.zeros((DB, NB), tl.int32)
    m_chan = (chans[:, None] + zero) < DIM  # (DB, NB)
    m_state = (lanes[None, :] + zero) < N
    A2 = tl.load(A_ptr + chans[:, None] * N + lanes[None, :], mask=m_chan & m_state, other=0.0).to(COMPUTE) * LOG2E
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chans[:, None] + zero, mask=m_chan, other=0.0).to(COMPUTE)
    skip = 0.0
    if HAS_D:
        skip = tl.load(D_ptr + chans[:, None] + zero, mask=m_chan, other=0.0).to(COMPUTE)
    col0 = pid_c * TW
    plane = (b * DIM + chans[:, None]) * H * W  # (DB, 1)
    # g at column col0 - 1 sits in carry slot col0 / CW - 1
    carry_rows = carry_ptr + ((b * DIM + chans[:, None]) * (N_CW - 1) + col0 // CW - 1) * H * NB + lanes[None, :]
    m_left = m_chan & (zero + pid_c > 0)
    ckpt_rows = ckpt_ptr + (b * DIM + chans[:, None]) * (N_CH - 1) * W * NB + lanes[None, :]
    h = ()
    for col_init in tl.static_range(TW):
        h = h + (tl.zeros((DB, NB), COMPUTE),)
    # a row's inputs are loaded while the row above is computed
    nxt = _fwd_row_inputs(0, delta_ptr, u_ptr, z_ptr, Bt_ptr, Ct_ptr, carry_rows, plane, col0, b, H, W, N,
                          m_chan, m_left, m_state, lanes, zero, TW, NB, HAS_Z)
    for i in range(0, H):
        if STORE_CKPT:
            if (i % CH == 0) & (i > 0):
                # h above every CH-th row, read back by the backward kernel
                for tc in tl.static_range(TW):
                    tl.store(ckpt_rows + ((i // CH - 1) * W + col0 + tc) * NB, h[tc],
                             mask=m_chan & (zero + col0 + tc < W))
        g, deltas, us, zs, Bs, Cs = nxt
        nxt = _fwd_row_inputs(i + 1, delta_ptr, u_ptr, z_ptr, Bt_ptr, Ct_ptr, carry_rows, plane, col0, b, H, W, N,
                              m_chan, m_left, m_state, lanes, zero, TW, NB, HAS_Z)
        g = g.to(COMPUTE)
        new_h = ()
        for grp in tl.static_range(TW // NB):
            cols = col0 + grp * NB + lanes[None, :] + zero  # (DB, NB) read as positions
            m_pos = m_chan & (cols < W)
            dt, _ = _dt_of(deltas[grp].to(COMPUTE), m_pos, bias, HAS_BIAS, SOFTPLUS)
            u = us[grp].to(COMPUTE)
            x = dt * u
            terms = ()
            for j in tl.static_range(NB):
                a = tl.exp2(_lane_bcast(dt, j, lanes, FAST) * A2)
                g = a * g + _lane_bcast(x, j, lanes, FAST) * Bs[grp * NB + j].to(COMPUTE)  # pass 1 along the row
                ht = a * h[grp * NB + j] + g  # pass 2 down the column
                new_h = new_h + (ht,)
                terms = terms + (ht * Cs[grp * NB + j].to(COMPUTE),)
            y = _lane_sums(terms, lanes, FAST)  # (DB, NB) read as positions
            if HAS_D:
                y = y + skip * u
            if HAS_Z:
                zv = zs[grp].to(COMPUTE)
                y = y * zv * tl.sigmoid(zv)
            tl.store(y_ptr + plane + i * W + cols, y, mask=m_pos)
        h = new_h


@triton.jit
def _fwd_row_inputs(i, delta_ptr, u_ptr, z_ptr, Bt_ptr, Ct_ptr, carry_rows, plane, col0, b, H, W, N,
                    m_chan, m_left, m_state, lanes, zero, TW: tl.constexpr, NB: tl.constexpr, HAS_Z: tl.constexpr):
    """Row i's inputs for _fwd_kernel (nothing is read when i = H): the row carry on the left,
    delta, u and z as TW / NB position tiles, B and C as TW state tiles."""
    in_grid = (zero + i) < H
    g = tl.load(carry_rows + i * NB, mask=m_left & in_grid, other=0.0)
    deltas = ()
    us = ()
    zs = ()
    for grp in tl.static_range(TW // NB):
        cols = col0 + grp * NB + lanes[None, :] + zero
        m_pos = m_chan & (cols < W) & in_grid
        offs = plane + i * W + cols
        deltas = deltas + (tl.load(delta_ptr + offs, mask=m_pos, other=0.0),)
        us = us + (tl.load(u_ptr + offs, mask=m_pos, other=0.0),)
        if HAS_Z:
            zs = zs + (tl.load(z_ptr + offs, mask=m_pos, other=0.0),)
        else:
            zs = zs + (deltas[grp],)  # a placeholder, never read
    Bs = ()
    Cs = ()
    B_row = Bt_ptr + (b * H + i) * W * N + lanes[None, :] + zero
    C_row = Ct_ptr + (b * H + i) * W * N + lanes[None, :] + zero
    for t in tl.static_range(TW):
        m_bc = m_state & (zero + col0 + t < W) & in_grid
        Bs = Bs + (tl.load(B_row + (col0 + t) * N, mask=m_bc, other=0.0),)
        Cs = Cs + (tl.load(C_row + (col0 + t) * N, mask=m_bc, other=0.0),)
    return g, deltas, us, zs, Bs, Cs


@triton.jit
def _col_carry_kernel(
    delta_ptr, bias_ptr, z_ptr, dout_ptr, Ct_ptr, A_ptr, carry_ptr,
    H, W, DIM, N, N_CH, N_NB,
    CH: tl.constexpr, TW: tl.constexpr, NB: tl.constexpr, NP: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, COMPUTE: tl.constexpr,
):
    """carry[b, d, s, j, :] = a[i0, j] * dh[i0, j] with i0 = (s + 1) * CH: the column adjoint that
    flows up out of stripe s + 1 into stripe s, for s < N_CH - 1. One program per (block of TW
    columns, channel, batch and block of NB states), stripes bottom to top. C is (batch, H, W, N)."""
    pid_c = tl.program_id(0)
    d = tl.program_id(1)
    b = (tl.program_id(2) // N_NB).to(tl.int64)
    states = (tl.program_id(2) % N_NB) * NB + tl.arange(0, NB)  # (NB,)
    ti = tl.arange(0, CH)
    cols = pid_c * TW + tl.arange(0, TW)  # (TW,)
    m_col = cols < W
    m_state = states < N
    A = tl.load(A_ptr + d * N + states, mask=m_state, other=0.0).to(COMPUTE)  # (NB,)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d).to(COMPUTE)
    base = (b * DIM + d) * H * W
    base_B = b * N * H * W
    base_carry = (b * DIM + d) * (N_CH - 1) * W * NP
    carry = tl.zeros((TW, NB), dtype=COMPUTE)  # a * dh on the row below the stripe
    for k in range(0, N_CH - 1):
        s = N_CH - 1 - k
        rows = s * CH + ti
        m2 = (rows < H)[:, None] & m_col[None, :]  # (CH, TW)
        offs = rows[:, None] * W + cols[None, :]
        dt, _ = _load_dt(delta_ptr + base, offs, m2, bias, HAS_BIAS, SOFTPLUS, COMPUTE)
        dy = tl.load(dout_ptr + base + offs, mask=m2, other=0.0).to(COMPUTE)
        if HAS_Z:
            zv = tl.load(z_ptr + base + offs, mask=m2, other=0.0).to(COMPUTE)
            dy = dy * zv * tl.sigmoid(zv)
        Cv = tl.load(Ct_ptr + base_B + offs[:, :, None] * N + states[None, None, :],
                     mask=m2[:, :, None] & m_state[None, None, :], other=0.0).to(COMPUTE)  # (CH, TW, NB)
        cum = tl.cumsum(dt, axis=0)  # (CH, TW): sum of dt from the stripe's top row
        total = tl.sum(dt, axis=0)  # (TW,)
        # a[i0] dh[i0] = sum_i exp(A * cum_i) C_i dy_i + exp(A * total) * carry
        weight = tl.exp(cum[:, :, None] * A[None, None, :])
        carry = tl.sum(weight * Cv * dy[:, :, None], axis=0) + tl.exp(total[:, None] * A[None, :]) * carry
        tl.store(carry_ptr + base_carry + (s - 1) * W * NP + cols[:, None] * NP + states[None, :], carry,
                 mask=m_col[:, None])


@triton.jit
def _bwd_kernel(
    delta_ptr, bias_ptr, u_ptr, z_ptr, dout_ptr, Bt_ptr, Ct_ptr, A_ptr, D_ptr,
    row_carry_ptr, ckpt_ptr, col_carry_ptr,
    ddelta_ptr, du_ptr, dz_ptr, dBt_ptr, dCt_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr,
    H, W, DIM, N, N_CW, N_CH, N_NB,
    CH: tl.constexpr, CW: tl.constexpr, NB: tl.constexpr, NP: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, HAS_D: tl.constexpr,
    SPLIT: tl.constexpr, COMPUTE: tl.constexpr,
):
    """One program per (row stripe of CH, channel, batch and block of NB states); tiles of CW
    columns right to left. Each tile recomputes g and h from the saved carries, then runs the
    two adjoint scans. B, C and their gradients are (batch, H, W, N): a position's states are
    contiguous. With several state blocks (SPLIT) the sums over states (ddelta, du, dz) are
    accumulated atomically; the D terms come from the first block only. All atomics are
    relaxed: they are sums, ordered by nothing."""
    pid_s = tl.program_id(0)
    d = tl.program_id(1)
    b = (tl.program_id(2) // N_NB).to(tl.int64)
    kb = tl.program_id(2) % N_NB
    ti = tl.arange(0, CH)
    tj = tl.arange(0, CW)
    states = kb * NB + tl.arange(0, NB)  # (NB,)
    m_state = states < N
    rows = pid_s * CH + ti  # (CH,)
    m_row = rows < H
    m_row_dn = (rows + 1) < H
    A = tl.load(A_ptr + d * N + states, mask=m_state, other=0.0).to(COMPUTE)  # (NB,)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d).to(COMPUTE)
    first_block = (kb == 0).to(COMPUTE)  # the D terms belong to one block only
    skip = 0.0
    if HAS_D:
        skip = tl.load(D_ptr + d).to(COMPUTE) * first_block
    base = (b * DIM + d) * H * W
    base_B = b * N * H * W
    base_row_carry = (b * DIM + d) * (N_CW - 1) * H * NP
    base_ckpt = (b * DIM + d) * (N_CH - 1) * W * NP + (pid_s - 1) * W * NP
    base_col_carry = (b * DIM + d) * (N_CH - 1) * W * NP + pid_s * W * NP
    first_col = (tj == 0)[None, :, None]
    last_col = (tj == CW - 1)[None, :, None]
    first_row = (ti == 0)[:, None, None]
    last_row = (ti == CH - 1)[:, None, None]
    m_top = (tj * 0 + pid_s) > 0  # (CW,)
    m_bottom = (tj * 0 + pid_s) < N_CH - 1
    dg_right = tl.zeros((CH, NB), dtype=COMPUTE)  # a * dg on the column right of the tile
    dA_acc = tl.zeros((CH, CW, NB), dtype=COMPUTE)
    dD_acc = tl.zeros((CH, CW), dtype=COMPUTE)
    dbias_acc = tl.zeros((CH, CW), dtype=COMPUTE)
    for k in range(0, N_CW):
        c = N_CW - 1 - k
        cols = c * CW + tj  # (CW,)
        m_col = cols < W
        m2 = m_row[:, None] & m_col[None, :]  # (CH, CW)
        m3 = m2[:, :, None] & m_state[None, None, :]  # (CH, CW, NB)
        offs = rows[:, None] * W + cols[None, :]
        offs3 = offs[:, :, None] * N + states[None, None, :]  # (batch, H, W, N) layout
        dt, raw = _load_dt(delta_ptr + base, offs, m2, bias, HAS_BIAS, SOFTPLUS, COMPUTE)
        u = tl.load(u_ptr + base + offs, mask=m2, other=0.0).to(COMPUTE)
        Bv = tl.load(Bt_ptr + base_B + offs3, mask=m3, other=0.0).to(COMPUTE)
        Cv = tl.load(Ct_ptr + base_B + offs3, mask=m3, other=0.0).to(COMPUTE)
        # forward states of the tile, recomputed from the carries on its left and top edges
        a = tl.exp(dt[:, :, None] * A[None, None, :])  # (CH, CW, NB)
        x = (dt * u)[:, :, None] * Bv
        g_left = tl.load(row_carry_ptr + base_row_carry + (c - 1) * H * NP + rows[:, None] * NP + states[None, :],
                         mask=m_row[:, None] & ((rows * 0 + c) > 0)[:, None], other=0.0)  # (CH, NB)
        _, g = tl.associative_scan((a, x + tl.where(first_col, a * g_left[:, None, :], 0.0)), 1,
                                   _affine_combine)
        h_top = tl.load(ckpt_ptr + base_ckpt + cols[:, None] * NP + states[None, :],
                        mask=(m_col & m_top)[:, None], other=0.0)  # (CW, NB)
        _, h = tl.associative_scan((a, g + tl.where(first_row, a * h_top[None, :, :], 0.0)), 0,
                                   _affine_combine)
        dout = tl.load(dout_ptr + base + offs, mask=m2, other=0.0).to(COMPUTE)
        dy = dout
        if HAS_Z:
            y = tl.sum(Cv * h, axis=2)  # this block's share of y (and D u in the first block)
            if HAS_D:
                y = y + skip * u
            zv = tl.load(z_ptr + base + offs, mask=m2, other=0.0).to(COMPUTE)
            sig = tl.sigmoid(zv)
            dz = dout * y * sig * (1.0 + zv * (1.0 - sig))
            if SPLIT:
                tl.atomic_add(dz_ptr + base + offs, dz, mask=m2, sem="relaxed")
            else:
                tl.store(dz_ptr + base + offs, dz, mask=m2)
            dy = dout * zv * sig
        tl.atomic_add(dCt_ptr + base_B + offs3, h * dy[:, :, None], mask=m3, sem="relaxed")
        # column adjoint: dh[i] = C dy[i] + a[i+1] dh[i+1], bottom to top
        dt_dn, _ = _load_dt(delta_ptr + base, offs + W, m_row_dn[:, None] & m_col[None, :], bias, HAS_BIAS,
                            SOFTPLUS, COMPUTE)
        a_dn = tl.exp(dt_dn[:, :, None] * A[None, None, :])
        dh_below = tl.load(col_carry_ptr + base_col_carry + cols[:, None] * NP + states[None, :],
                           mask=(m_col & m_bottom)[:, None], other=0.0)  # (CW, NB)
        c_dy = Cv * dy[:, :, None] + tl.where(last_row, dh_below[None, :, :], 0.0)
        _, dh = tl.associative_scan((a_dn, c_dy), 0, _affine_combine, reverse=True)
        # row adjoint: dg[j] = dh[j] + a[j+1] dg[j+1], right to left
        dt_rt, _ = _load_dt(delta_ptr + base, offs + 1, m_row[:, None] & ((cols + 1) < W)[None, :], bias,
                            HAS_BIAS, SOFTPLUS, COMPUTE)
        a_rt = tl.exp(dt_rt[:, :, None] * A[None, None, :])
        _, dg = tl.associative_scan((a_rt, dh + tl.where(last_col, dg_right[:, None, :], 0.0)), 1,
                                    _affine_combine, reverse=True)
        dg_right = tl.sum(tl.where(first_col, a * dg, 0.0), axis=1)  # (CH, NB)
        # a * g[j-1] = g - x and a * h[i-1] = h - g: the decay's two inputs without a shift
        dlog_a = dg * (g - x) + dh * (h - g)  # d(out)/d(log a), (CH, CW, NB)
        tl.atomic_add(dBt_ptr + base_B + offs3, dg * (dt * u)[:, :, None], mask=m3, sem="relaxed")
        ddt = tl.sum(dlog_a * A[None, None, :] + dg * Bv * u[:, :, None], axis=2)  # (CH, CW)
        du = tl.sum(dg * Bv, axis=2) * dt
        if HAS_D:
            du = du + skip * dy
            dD_acc += tl.where(m2, dy * u, 0.0) * first_block
        dA_acc += dlog_a * dt[:, :, None]
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw)
        ddt = tl.where(m2, ddt, 0.0)
        dbias_acc += ddt
        if SPLIT:
            tl.atomic_add(ddelta_ptr + base + offs, ddt, mask=m2, sem="relaxed")
            tl.atomic_add(du_ptr + base + offs, du, mask=m2, sem="relaxed")
        else:
            tl.store(ddelta_ptr + base + offs, ddt, mask=m2)
            tl.store(du_ptr + base + offs, du, mask=m2)
    tl.store(dA_part_ptr + ((b * N_CH + pid_s) * DIM + d) * NP + states, tl.sum(tl.sum(dA_acc, axis=1), axis=0))
    part = ((b * N_CH + pid_s) * N_NB + kb) * DIM + d
    tl.store(dD_part_ptr + part, tl.sum(tl.sum(dD_acc, axis=1), axis=0))
    tl.store(dbias_part_ptr + part, tl.sum(tl.sum(dbias_acc, axis=1), axis=0))


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 4 or delta.shape != u.shape:
        raise ValueError(f"selective_scan_2d: u and delta must be (batch, dim, H, W) of one shape, "
                         f"got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, dim, height, width = u.shape
    n_state = A.shape[-1]
    if A.shape != (dim, n_state) or B.shape != (batch, n_state, height, width) or C.shape != B.shape:
        raise ValueError(f"selective_scan_2d: expected A (dim, N) = ({dim}, N) and B, C (batch, N, H, W) = "
                         f"({batch}, N, {height}, {width}); got A {tuple(A.shape)}, B {tuple(B.shape)}, "
                         f"C {tuple(C.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan_2d: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (dim,):
            raise ValueError(f"selective_scan_2d: {name} must be (dim,) = ({dim},), got {tuple(t.shape)}")
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"selective_scan_2d: all tensors must be on one device, got {sorted(map(str, devices))}")


def _padded_states(n_state: int) -> int:
    return max(triton.next_power_of_2(n_state), 2)


def _lane_tiles(n_padded: int, compute: torch.dtype) -> tuple[int, int, bool]:
    """(channels per program, warps, FAST) of the forward kernels for NP padded states: the
    channels fill a warp's lanes (one channel per program beyond 32 states); FAST (warp
    shuffles) needs compiled float32 kernels and exactly one warp."""
    channels = max(1, 32 // n_padded)
    warps = max(1, channels * n_padded // 32)
    fast = not INTERPRETED and compute == torch.float32 and channels * n_padded == 32
    return channels, warps, fast


def _states_last(t: torch.Tensor) -> torch.Tensor:
    """(batch, N, H, W) -> a (batch, H, W, N) copy: a position's states contiguous."""
    return t.permute(0, 2, 3, 1).contiguous()


def _launch_forward(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus, save_ckpt, cfg):
    batch, dim, height, width = u.shape
    n_state = A.shape[1]
    NP = _padded_states(n_state)
    compute = _compute_dtype(u)
    n_cw = triton.cdiv(width, cfg.CW)
    n_ch = triton.cdiv(height, cfg.CH)
    dummy = torch.empty(1, device=u.device, dtype=compute)
    row_carry = (torch.empty(batch, dim, n_cw - 1, height, NP, device=u.device, dtype=compute)
                 if n_cw > 1 else dummy)
    ckpt = (torch.empty(batch, dim, n_ch - 1, width, NP, device=u.device, dtype=compute)
            if save_ckpt and n_ch > 1 else dummy)
    channels, warps, fast = _lane_tiles(NP, compute)
    flags = dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), FAST=fast,
                 COMPUTE=_tl_dtype(compute), num_warps=warps)
    if cfg.fwd_maxnreg is not None and not INTERPRETED:
        flags["maxnreg"] = cfg.fwd_maxnreg
    bias_arg = delta_bias if delta_bias is not None else dummy
    if n_cw > 1:
        grid = (height, triton.cdiv(dim, channels), batch)
        launcher(_row_carry_kernel)[grid](
            delta, bias_arg, u, Bt, A, row_carry, height, width, dim, n_state, n_cw,
            DB=channels, NB=NP, CW=cfg.CW, **flags)
    y = torch.empty(u.shape, device=u.device, dtype=u.dtype)
    stripe = max(cfg.fwd_cols, NP)  # whole groups of NP columns, whole chunks of CW
    grid = (triton.cdiv(width, stripe), triton.cdiv(dim, channels), batch)
    launcher(_fwd_kernel)[grid](
        delta, bias_arg, u, z if z is not None else dummy, Bt, Ct, A, D if D is not None else dummy,
        row_carry, ckpt, y, height, width, dim, n_state, n_cw, n_ch,
        DB=channels, NB=NP, TW=stripe, CW=cfg.CW, CH=cfg.CH,
        HAS_Z=z is not None, HAS_D=D is not None, STORE_CKPT=bool(save_ckpt and n_ch > 1), **flags)
    return y, row_carry, ckpt


def _launch_backward(dout, u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus, row_carry, ckpt, cfg):
    batch, dim, height, width = u.shape
    n_state = A.shape[1]
    NP = _padded_states(n_state)
    NB = min(cfg.bwd_states, NP)
    n_nb = NP // NB
    split = n_nb > 1
    compute = _compute_dtype(u)
    n_cw = triton.cdiv(width, cfg.CW)
    n_ch = triton.cdiv(height, cfg.CH)
    dev = u.device
    dummy = torch.empty(1, device=dev, dtype=compute)
    flags = dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), HAS_Z=z is not None,
                 COMPUTE=_tl_dtype(compute))
    bias_arg = delta_bias if delta_bias is not None else dummy
    z_arg = z if z is not None else dummy
    col_carry = (torch.empty(batch, dim, n_ch - 1, width, NP, device=dev, dtype=compute)
                 if n_ch > 1 else dummy)
    if n_ch > 1:
        grid = (triton.cdiv(width, cfg.carry_cols), dim, batch * n_nb)
        launcher(_col_carry_kernel)[grid](
            delta, bias_arg, z_arg, dout, Ct, A, col_carry, height, width, dim, n_state, n_ch, n_nb,
            CH=cfg.CH, TW=cfg.carry_cols, NB=NB, NP=NP, num_warps=cfg.carry_warps, **flags)
    # sums over states: one program per state block adds its share (in the compute dtype)
    new = torch.zeros if split else torch.empty
    ddelta = new(delta.shape, device=dev, dtype=compute if split else delta.dtype)
    du = new(u.shape, device=dev, dtype=compute if split else u.dtype)
    dz = new(z.shape, device=dev, dtype=compute if split else z.dtype) if z is not None else dummy
    # B and C are shared by all channels: their gradients are summed across programs atomically,
    # (batch, H, W, N) like Bt and Ct
    dBt = torch.zeros(2, batch, height, width, n_state, device=dev, dtype=compute)
    dA_part = torch.empty(batch, n_ch, dim, NP, device=dev, dtype=compute)
    dD_part = torch.empty(batch, n_ch, n_nb, dim, device=dev, dtype=compute)
    dbias_part = torch.empty(batch, n_ch, n_nb, dim, device=dev, dtype=compute)
    grid = (n_ch, dim, batch * n_nb)
    launcher(_bwd_kernel)[grid](
        delta, bias_arg, u, z_arg, dout, Bt, Ct, A, D if D is not None else dummy,
        row_carry, ckpt, col_carry,
        ddelta, du, dz, dBt[0], dBt[1], dA_part, dD_part, dbias_part,
        height, width, dim, n_state, n_cw, n_ch, n_nb,
        CH=cfg.CH, CW=cfg.CW, NB=NB, NP=NP, HAS_D=D is not None, SPLIT=split, num_warps=cfg.bwd_warps,
        **flags)
    dA = dA_part.sum(dim=(0, 1))[:, :n_state].to(A.dtype)
    dD = dD_part.sum(dim=(0, 1, 2)).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum(dim=(0, 1, 2)).to(delta_bias.dtype) if delta_bias is not None else None
    dB, dC = dBt.permute(0, 1, 4, 2, 3)
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA, dB.to(Bt.dtype), dC.to(Ct.dtype), dD,
            dz.to(z.dtype) if z is not None else None, dbias)


class SelectiveScan2DFn(torch.autograd.Function):
    """Autograd wiring: the forward keeps only the N/CW- and N/CH-fold carries, never the states."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, cfg):
        save = any(ctx.needs_input_grad[:8])
        # B and C with a position's states contiguous (coalesced loads of a position's states)
        Bt, Ct = _states_last(B), _states_last(C)
        y, row_carry, ckpt = _launch_forward(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus, save, cfg)
        if save:
            ctx.save_for_backward(u, delta, A, Bt, Ct, D, z, delta_bias, row_carry, ckpt)
            ctx.delta_softplus = delta_softplus
            ctx.cfg = cfg
        return y

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, Bt, Ct, D, z, delta_bias, row_carry, ckpt = ctx.saved_tensors
        grads = _launch_backward(dout.contiguous(), u, delta, A, Bt, Ct, D, z, delta_bias, ctx.delta_softplus,
                                 row_carry, ckpt, ctx.cfg)
        return (*grads, None, None)


def selective_scan_2d_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             config: TileConfig | None = None):
    """The Triton 2D selective scan with autograd; same arguments and result as the reference."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    cfg = config or DEFAULT_CONFIG
    cfg.check()
    u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
    D = D.contiguous() if D is not None else None
    z = z.contiguous() if z is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    return SelectiveScan2DFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), cfg)


# True when this copy of the module was loaded under TRITON_INTERPRET=1 (the CPU interpreter)
INTERPRETED = isinstance(_fwd_kernel, InterpretedFunction)
