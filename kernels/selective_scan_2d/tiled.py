"""2D selective scan in Triton: tiled forward and backward kernels and their autograd Function.

The maths (carries, adjoint recurrences, why four kernels) is in README.md beside this file;
the kernels keep shape comments only. Notation: grid (H, W), states padded to NP, dt =
softplus(delta + delta_bias) recomputed wherever it is needed, a = exp(dt * A).

Launch order
    forward:  _row_carry_kernel  (g at every carry_cols-th column, a 1D problem per row)
              _fwd_kernel        (one program per column stripe and channel block, row by row)
    backward: _col_carry_kernel  (adjoint flowing up into every CH-row boundary, 1D per column)
              _bwd_kernel        (one program per row stripe and channel block, tiles right to left)
    all four with one (channel, state) pair per thread (see "lanes" below)

Triton fixes compiled or interpreted mode when it defines a kernel; the package loads this file
on the first call of the Triton backend, once per mode (see __init__.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from mambapath.kernels.launch import launcher
from mambapath.kernels.selective_scan.host import needs_autograd

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes (powers of two). CH x CW: the backward's tile, whose states each thread holds
    in registers; CH also spaces the column checkpoints and adjoints (every CH rows). The row
    carries are stored every carry_cols columns (a multiple of CW); a backward tile further
    right in its block first runs the row pass across the block's tiles on its left. The
    forward walks down stripes of fwd_cols columns (a multiple of carry_cols; at least the
    padded state count) with its registers capped at fwd_maxnreg per thread (None: no cap).
    Programs hold as many channels as fill a warp's lanes with their states, times bwd_warps in
    the backward; bwd_maxnreg caps the backward tile kernel's registers and carry_maxnreg the
    column adjoint kernel's (None: no cap).

    Measured on an H100 (README.md beside this file): the forward's 16-column stripes capped at
    128 registers beat 32-column ones and no cap; the backward's 8 x 4 tiles of one warp beat
    2 and 4 warps (whose sums of dB and dC over channels cross warps); row carries every 8
    columns were 6% faster in the backward than every 16 but take twice the memory; the column
    adjoint kernel capped at 128 registers (from 163) took 0.51 ms against 0.61 at
    256 x 256 / 512."""

    CW: int = 4
    CH: int = 8
    carry_cols: int = 16
    fwd_cols: int = 16
    fwd_maxnreg: int | None = 128
    bwd_warps: int = 1
    bwd_maxnreg: int | None = None
    carry_maxnreg: int | None = 128

    def check(self) -> None:
        for name in ("CW", "CH", "carry_cols", "fwd_cols", "bwd_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"TileConfig.{name}={value} must be a power of two")
        if self.carry_cols % self.CW:
            raise ValueError(f"TileConfig: carry_cols ({self.carry_cols}) must be a multiple of CW ({self.CW})")
        if self.fwd_cols % self.carry_cols:
            raise ValueError(f"TileConfig: fwd_cols ({self.fwd_cols}) must be a multiple of carry_cols "
                             f"({self.carry_cols})")
        for name in ("fwd_maxnreg", "bwd_maxnreg", "carry_maxnreg"):
            value = getattr(self, name)
            if value is not None and not 32 <= value <= 255:
                raise ValueError(f"TileConfig.{name}={value} must be None (no cap) or a register count per thread "
                                 "from 32 to 255")


DEFAULT_CONFIG = TileConfig()

# the backward adds its per-state terms over the states SUM_GROUP positions at a time
SUM_GROUP = 4


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
# lanes: the kernels put one (channel, state) pair on each thread
#
# A program owns DB channels and the NB (padded) states: a (DB, NB) tile holds one value per
# thread. Every recurrence then runs inside a thread, position after position, with no scan
# across threads. The same (DB, NB) tile also holds NB consecutive positions of the DB
# channels (loads and stores of delta, u, z and y are coalesced, softplus runs once per
# position), and two exchanges move between the two readings: _lane_bcast hands position j
# to every state of its channel, _lane_sums adds NB per-state tiles over the states and leaves
# the sum of tile j in position j. With FAST (compiled float32, NB <= 32: lane c * NB + n of a
# warp holds element (c, n) of its channels) these are warp shuffles; otherwise (the
# interpreter, float64, more than 32 states) Triton's reductions do the same.


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
def _stack(vals):
    """A tuple of K (power of two) (DB, NB) tiles -> one (K, DB, NB) tensor whose row k is
    vals[k]; the new rows stay in each thread."""
    level = ()
    for k in tl.static_range(len(vals)):
        level = level + (tl.expand_dims(vals[k], 0),)
    for _ in tl.static_range(6):
        if len(level) > 1:
            pairs = ()
            for k in tl.static_range(len(level) // 2):
                pairs = pairs + (_cat(level[2 * k], level[2 * k + 1]),)
            level = pairs
    return level[0]


@triton.jit
def _lane_sums(vals, lanes, FAST: tl.constexpr):
    """A tuple of K (DB, NB) tiles read as states (K a power of two, at most NB) -> one (DB, NB)
    tile whose element (c, j) is the sum over states of vals[j % K][c, :]: with K = NB, a tile
    read as positions. FAST: a transposing exchange (each step halves the values a thread holds
    and swaps half of them with the lane across one bit of the state index: K - 1 shuffles),
    then a plain one over the remaining bits (log2(NB / K) shuffles)."""
    K: tl.constexpr = len(vals)
    NB: tl.constexpr = vals[0].shape[1]
    if FAST:
        x = _stack(vals)  # (K, DB, NB)
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
        for step in tl.static_range(6):
            if (K << step) < NB:
                out = out + _shfl_xor(out, tl.full(out.shape, K << step, tl.int32))
    else:
        out = tl.zeros(vals[0].shape, vals[0].dtype)
        for k in tl.static_range(K):
            out = tl.where(lanes[None, :] % K == k, tl.sum(vals[k], axis=1)[:, None], out)
    return out


@triton.jit
def _program_lanes(A_ptr, bias_ptr, DIM, N, DB: tl.constexpr, NB: tl.constexpr, HAS_BIAS: tl.constexpr,
                   COMPUTE: tl.constexpr):
    """What every kernel's program starts from: its DB channels (program axis 1) and batch (axis
    2), the NB lanes, a (DB, NB) zero tile for broadcasting, the channel and state masks, A * log2(e)
    per (channel, state) and delta_bias per channel (zeros without it)."""
    chans = tl.program_id(1) * DB + tl.arange(0, DB)  # (DB,)
    b = tl.program_id(2).to(tl.int64)
    lanes = tl.arange(0, NB)  # (NB,): a state, or a position of a group of NB
    zero = tl.zeros((DB, NB), tl.int32)
    m_chan = (chans[:, None] + zero) < DIM  # (DB, NB)
    m_state = (lanes[None, :] + zero) < N
    A2 = tl.load(A_ptr + chans[:, None] * N + lanes[None, :], mask=m_chan & m_state, other=0.0).to(COMPUTE) * LOG2E
    bias = tl.zeros((DB, NB), COMPUTE)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chans[:, None] + zero, mask=m_chan, other=0.0).to(COMPUTE)
    return chans, b, lanes, zero, m_chan, m_state, A2, bias


@triton.jit
def _row_carry_kernel(
    delta_ptr, bias_ptr, u_ptr, Bt_ptr, A_ptr, carry_ptr,
    H, W, DIM, N, N_RC,
    DB: tl.constexpr, NB: tl.constexpr, RC: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, FAST: tl.constexpr, COMPUTE: tl.constexpr,
):
    """carry[b, d, c, i, :] = g[i, (c + 1) * RC - 1, :] for c < N_RC - 1 (the row pass at chunk ends).
    One program per (row i, block of DB channels, batch): each thread runs the row pass of one
    (channel, state) from the left edge, NB columns at a time."""
    i = tl.program_id(0)
    chans, b, lanes, zero, m_chan, m_state, A2, bias = _program_lanes(A_ptr, bias_ptr, DIM, N, DB, NB, HAS_BIAS,
                                                                      COMPUTE)
    row = ((b * DIM + chans[:, None]) * H + i) * W  # (DB, 1)
    B_row = Bt_ptr + (b * H + i) * W * N + lanes[None, :] + zero  # (DB, NB)
    carry_rows = carry_ptr + ((b * DIM + chans[:, None]) * (N_RC - 1) * H + i) * NB + lanes[None, :]
    STEP: tl.constexpr = RC if RC < NB else NB  # chunk ends fall on multiples of STEP inside a group
    g = tl.zeros((DB, NB), COMPUTE)
    for k in range(0, tl.cdiv((N_RC - 1) * RC, NB)):
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
                c = (col + 1) // RC - 1  # the chunk ending here, when (col + 1) % RC == 0
                tl.store(carry_rows + c * H * NB, g, mask=m_chan & ((zero + col + 1) % RC == 0) & (zero + c < N_RC - 1))


@triton.jit
def _fwd_kernel(
    delta_ptr, bias_ptr, u_ptr, z_ptr, Bt_ptr, Ct_ptr, A_ptr, D_ptr, carry_ptr, ckpt_ptr, y_ptr,
    H, W, DIM, N, N_RC, N_CH,
    DB: tl.constexpr, NB: tl.constexpr, TW: tl.constexpr, RC: tl.constexpr, CH: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, HAS_D: tl.constexpr,
    STORE_CKPT: tl.constexpr, FAST: tl.constexpr, COMPUTE: tl.constexpr,
):
    """One program per (column stripe of TW, block of DB channels, batch), one row at a time top
    to bottom. Each thread holds one (channel, state) of the stripe's TW columns of h and runs
    the row pass along the stripe (from the row carry on its left) and the column pass down
    each column; y = sum_n C h is a sum across the lanes."""
    pid_c = tl.program_id(0)
    chans, b, lanes, zero, m_chan, m_state, A2, bias = _program_lanes(A_ptr, bias_ptr, DIM, N, DB, NB, HAS_BIAS,
                                                                      COMPUTE)
    skip = 0.0
    if HAS_D:
        skip = tl.load(D_ptr + chans[:, None] + zero, mask=m_chan, other=0.0).to(COMPUTE)
    col0 = pid_c * TW
    plane = (b * DIM + chans[:, None]) * H * W  # (DB, 1)
    # g at column col0 - 1 sits in carry slot col0 / RC - 1
    carry_rows = carry_ptr + ((b * DIM + chans[:, None]) * (N_RC - 1) + col0 // RC - 1) * H * NB + lanes[None, :]
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
    H, W, DIM, N, N_CH,
    DB: tl.constexpr, NB: tl.constexpr, CH: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, FAST: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """carry[b, d, s, j, :] = a[i0, j] dh[i0, j] with i0 = (s + 1) * CH: the column adjoint that
    flows up out of stripe s + 1 into stripe s, for s < N_CH - 1. One program per (group of NB
    columns, block of DB channels, batch); each thread walks its (channel, state) up the NB
    columns, q = a (C dy + q), from the bottom row. C is (batch, H, W, N)."""
    pid_g = tl.program_id(0)
    chans, b, lanes, zero, m_chan, m_state, A2, bias = _program_lanes(A_ptr, bias_ptr, DIM, N, DB, NB, HAS_BIAS,
                                                                      COMPUTE)
    plane = (b * DIM + chans[:, None]) * H * W
    col0 = pid_g * NB
    cols = col0 + lanes[None, :] + zero  # (DB, NB) read as positions
    m_col = m_chan & (cols < W)
    carry_rows = carry_ptr + (b * DIM + chans[:, None]) * (N_CH - 1) * W * NB + lanes[None, :]
    q = ()
    for col_init in tl.static_range(NB):
        q = q + (tl.zeros((DB, NB), COMPUTE),)
    # rows H - 1 down to CH (the top stripe's rows carry nothing further up); a row's inputs are
    # loaded while the row below is computed
    n_rows = H - CH
    nxt = _col_row_inputs(H - 1, n_rows > 0, delta_ptr, dout_ptr, z_ptr, Ct_ptr, plane, cols, m_col, col0, b, H, W,
                          N, m_state, zero, NB, HAS_Z)
    for k in range(0, n_rows):
        i = H - 1 - k
        delta_t, dout_t, z_t, Cs = nxt
        nxt = _col_row_inputs(i - 1, k + 1 < n_rows, delta_ptr, dout_ptr, z_ptr, Ct_ptr, plane, cols, m_col, col0, b,
                              H, W, N, m_state, zero, NB, HAS_Z)
        dt, _ = _dt_of(delta_t.to(COMPUTE), m_col, bias, HAS_BIAS, SOFTPLUS)
        dy = dout_t.to(COMPUTE)
        if HAS_Z:
            zv = z_t.to(COMPUTE)
            dy = dy * zv * tl.sigmoid(zv)
        new_q = ()
        for j in tl.static_range(NB):
            a = tl.exp2(_lane_bcast(dt, j, lanes, FAST) * A2)
            new_q = new_q + (a * (Cs[j].to(COMPUTE) * _lane_bcast(dy, j, lanes, FAST) + q[j]),)
        q = new_q
        if i % CH == 0:
            for j in tl.static_range(NB):
                tl.store(carry_rows + ((i // CH - 1) * W + col0 + j) * NB, q[j], mask=m_chan & (zero + col0 + j < W))


@triton.jit
def _col_row_inputs(i, valid, delta_ptr, dout_ptr, z_ptr, Ct_ptr, plane, cols, m_col, col0, b, H, W, N, m_state,
                    zero, NB: tl.constexpr, HAS_Z: tl.constexpr):
    """Row i's inputs for _col_carry_kernel (nothing is read unless valid)."""
    m_pos = m_col & ((zero + valid.to(tl.int32)) != 0)
    offs = plane + i * W + cols
    delta_t = tl.load(delta_ptr + offs, mask=m_pos, other=0.0)
    dout_t = tl.load(dout_ptr + offs, mask=m_pos, other=0.0)
    z_t = delta_t  # a placeholder without z (never read then)
    if HAS_Z:
        z_t = tl.load(z_ptr + offs, mask=m_pos, other=0.0)
    Cs = ()
    C_row = Ct_ptr + (b * H + i) * W * N + tl.arange(0, NB)[None, :] + zero
    for j in tl.static_range(NB):
        m_c = m_state & (zero + col0 + j < W) & ((zero + valid.to(tl.int32)) != 0)
        Cs = Cs + (tl.load(C_row + (col0 + j) * N, mask=m_c, other=0.0),)
    return delta_t, dout_t, z_t, Cs


@triton.jit
def _tile_positions(p, plane, row0, j0, m_chan, lanes, zero, H, W, NB: tl.constexpr, CH: tl.constexpr,
                    CW: tl.constexpr):
    """Offsets and mask of position tile p of the (CH, CW) tile at (row0, j0): its positions
    p * NB + lane in row-major order, one per lane of each channel."""
    qpos = p * NB + lanes[None, :] + zero
    rows = row0 + qpos // CW
    cols = j0 + qpos % CW
    return plane + rows * W + cols, m_chan & (qpos < CH * CW) & (rows < H) & (cols < W)


@triton.jit
def _prepend(x, rest):
    return (x,) + rest


@triton.jit
def _bwd_kernel(
    delta_ptr, bias_ptr, u_ptr, z_ptr, dout_ptr, Bt_ptr, Ct_ptr, A_ptr, D_ptr,
    row_carry_ptr, ckpt_ptr, col_carry_ptr,
    ddelta_ptr, du_ptr, dz_ptr, dBt_ptr, dCt_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr,
    H, W, DIM, N, N_CW, N_RC, N_CH,
    DB: tl.constexpr, NB: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr, RC: tl.constexpr,
    SG: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr, HAS_D: tl.constexpr,
    FAST: tl.constexpr, COMPUTE: tl.constexpr,
):
    """One program per (row stripe of CH, block of DB channels, batch), one (channel, state) per
    thread; tiles of CW columns right to left. A tile's CH x CW states h are recomputed into
    registers from g on its left (the row carry before its block of RC columns, taken across
    the block's tiles on its left by the row pass) and the checkpoint above it, then walked from
    the bottom-right corner with the column adjoint of each column and the row adjoint of each
    row in registers. The tile's positions, in row-major order, are read NB at a time as
    position tiles (delta, u, z, dout in; ddelta, du, dz out); the sums over states land there
    through the lane exchange, SG positions at a time. B, C and their gradients are (batch, H,
    W, N); each row of a tile sums its dB and dC over the program's channels into a (CW, NB)
    tile, added by relaxed atomics (one lane per position and state)."""
    pid_s = tl.program_id(0)
    chans, b, lanes, zero, m_chan, m_state, A2, bias = _program_lanes(A_ptr, bias_ptr, DIM, N, DB, NB, HAS_BIAS,
                                                                      COMPUTE)
    A_nat = A2 * LN2
    skip = 0.0
    if HAS_D:
        skip = tl.load(D_ptr + chans[:, None] + zero, mask=m_chan, other=0.0).to(COMPUTE)
    plane = (b * DIM + chans[:, None]) * H * W
    row0 = pid_s * CH
    NQ: tl.constexpr = (CH * CW + NB - 1) // NB  # position tiles per tile
    row_carry_rows = row_carry_ptr + (b * DIM + chans[:, None]) * (N_RC - 1) * H * NB + lanes[None, :]
    ckpt_rows = ckpt_ptr + ((b * DIM + chans[:, None]) * (N_CH - 1) + pid_s - 1) * W * NB + lanes[None, :]
    col_carry_rows = col_carry_ptr + ((b * DIM + chans[:, None]) * (N_CH - 1) + pid_s) * W * NB + lanes[None, :]
    m_top = m_chan & (zero + pid_s > 0)
    m_bottom = m_chan & (zero + pid_s < N_CH - 1)
    B_plane = Bt_ptr + b * H * W * N + lanes[None, :] + zero
    C_plane = Ct_ptr + b * H * W * N + lanes[None, :] + zero
    tile_cols = tl.arange(0, CW)
    tile_states = tl.arange(0, NB)
    zero_bc = tl.zeros((CW, NB), tl.int32)
    r = ()  # per row: a dg at the first column of the tile on the right
    for row_init in tl.static_range(CH):
        r = r + (tl.zeros((DB, NB), COMPUTE),)
    dA_acc = tl.zeros((DB, NB), COMPUTE)
    dD_acc = tl.zeros((DB, NB), COMPUTE)
    dbias_acc = tl.zeros((DB, NB), COMPUTE)
    for kt in range(0, N_CW):
        c = N_CW - 1 - kt
        j0 = c * CW
        # the tile's positions, NB at a time in row-major order: position p * NB + lane. dt, dt u
        # and dy are kept; the rest is read again where the position tile's gradients are formed
        dts = ()
        xs = ()
        dys = ()
        for p in tl.static_range(NQ):
            offs, m_pos = _tile_positions(p, plane, row0, j0, m_chan, lanes, zero, H, W, NB, CH, CW)
            dt, _ = _load_dt(delta_ptr, offs, m_pos, bias, HAS_BIAS, SOFTPLUS, COMPUTE)
            dy = tl.load(dout_ptr + offs, mask=m_pos, other=0.0).to(COMPUTE)
            if HAS_Z:
                zv = tl.load(z_ptr + offs, mask=m_pos, other=0.0).to(COMPUTE)
                dy = dy * zv * tl.sigmoid(zv)
            dts = dts + (dt,)
            xs = xs + (dt * tl.load(u_ptr + offs, mask=m_pos, other=0.0).to(COMPUTE),)
            dys = dys + (dy,)
        # g at column j0 - 1 of each row: the row carry before this tile's block of RC columns,
        # taken by the row pass across the block's tiles left of this one
        blk = j0 // RC
        m_carry = m_chan & (zero + blk > 0)
        g_left = ()
        for i in tl.static_range(CH):
            m_row = (zero + row0 + i) < H
            g_left = g_left + (tl.load(row_carry_rows + ((blk - 1) * H + row0 + i) * NB, mask=m_carry & m_row,
                                       other=0.0).to(COMPUTE),)
        for t in range(0, (j0 % RC) // CW):
            jt = blk * RC + t * CW
            dts_t = ()
            xs_t = ()
            for p in tl.static_range(NQ):
                offs, m_pos = _tile_positions(p, plane, row0, jt, m_chan, lanes, zero, H, W, NB, CH, CW)
                dt, _ = _load_dt(delta_ptr, offs, m_pos, bias, HAS_BIAS, SOFTPLUS, COMPUTE)
                dts_t = dts_t + (dt,)
                xs_t = xs_t + (dt * tl.load(u_ptr + offs, mask=m_pos, other=0.0).to(COMPUTE),)
            new_g = ()
            for i in tl.static_range(CH):
                g = g_left[i]
                for j in tl.static_range(CW):
                    m_bc = m_state & ((zero + row0 + i) < H)
                    a = tl.exp2(_lane_bcast(dts_t[(i * CW + j) // NB], (i * CW + j) % NB, lanes, FAST) * A2)
                    Bj = tl.load(B_plane + ((row0 + i) * W + jt + j) * N, mask=m_bc, other=0.0).to(COMPUTE)
                    g = a * g + _lane_bcast(xs_t[(i * CW + j) // NB], (i * CW + j) % NB, lanes, FAST) * Bj
                new_g = new_g + (g,)
            g_left = new_g
        # forward states of the tile, rows top to bottom, from the checkpoint above and g_left
        h_top = ()
        for j in tl.static_range(CW):
            h_top = h_top + (tl.load(ckpt_rows + (j0 + j) * NB, mask=m_top & (zero + j0 + j < W),
                                     other=0.0).to(COMPUTE),)
        hs = ()  # row-major, CH * CW
        hcol = h_top
        for i in tl.static_range(CH):
            m_row = (zero + row0 + i) < H
            g = g_left[i]
            new_col = ()
            for j in tl.static_range(CW):
                m_bc = m_state & m_row & (zero + j0 + j < W)
                pos = ((row0 + i) * W + j0 + j) * N
                a = tl.exp2(_lane_bcast(dts[(i * CW + j) // NB], (i * CW + j) % NB, lanes, FAST) * A2)
                Bj = tl.load(B_plane + pos, mask=m_bc, other=0.0).to(COMPUTE)
                g = a * g + _lane_bcast(xs[(i * CW + j) // NB], (i * CW + j) % NB, lanes, FAST) * Bj
                hn = a * hcol[j] + g
                new_col = new_col + (hn,)
                hs = hs + (hn,)
            hcol = new_col
        # adjoints, from the bottom-right corner: qcol[j] = a dh flowing up from the row below,
        # rr = a dg flowing left from the column on the right
        qcol = ()
        for j in tl.static_range(CW):
            qcol = qcol + (tl.load(col_carry_rows + (j0 + j) * NB, mask=m_bottom & (zero + j0 + j < W),
                                   other=0.0).to(COMPUTE),)
        new_r = ()
        # sums over states, SG positions at a time, gathered into a position tile (acc_*)
        acc_ddt = tl.zeros((DB, NB), COMPUTE)
        acc_gB = tl.zeros((DB, NB), COMPUTE)
        acc_y = tl.zeros((DB, NB), COMPUTE)
        t_ddt = ()
        t_gB = ()
        t_y = ()
        # a tile of fewer than SG positions fills its one group with zeros
        for pad in tl.static_range((SG - (CH * CW) % SG) % SG):
            t_ddt = _prepend(tl.zeros((DB, NB), COMPUTE), t_ddt)
            t_gB = _prepend(tl.zeros((DB, NB), COMPUTE), t_gB)
            t_y = _prepend(tl.zeros((DB, NB), COMPUTE), t_y)
        # (static indices are written out in full: a name assigned in the loop would not be one)
        for bi in tl.static_range(CH - 1, -1, -1):
            rr = r[bi]
            new_q = ()
            row_dB = ()
            row_dC = ()
            m_row = (zero + row0 + bi) < H
            for bj in tl.static_range(CW - 1, -1, -1):
                m_bc = m_state & m_row & (zero + j0 + bj < W)
                pos = ((row0 + bi) * W + j0 + bj) * N
                dt_b = _lane_bcast(dts[(bi * CW + bj) // NB], (bi * CW + bj) % NB, lanes, FAST)
                x_b = _lane_bcast(xs[(bi * CW + bj) // NB], (bi * CW + bj) % NB, lanes, FAST)
                dy_b = _lane_bcast(dys[(bi * CW + bj) // NB], (bi * CW + bj) % NB, lanes, FAST)
                a = tl.exp2(dt_b * A2)
                Bj = tl.load(B_plane + pos, mask=m_bc, other=0.0).to(COMPUTE)
                Cj = tl.load(C_plane + pos, mask=m_bc, other=0.0).to(COMPUTE)
                h = hs[bi * CW + bj]
                if bi > 0:
                    h_up = hs[bi * CW + bj - CW]
                else:
                    h_up = h_top[bj]
                g = h - a * h_up
                dh = Cj * dy_b + qcol[bj]
                dg = dh + rr
                dlog = dg * (g - x_b * Bj) + dh * (h - g)  # d(out)/d(log a)
                dA_acc += dlog * dt_b
                t_ddt = _prepend(dlog * A_nat, t_ddt)
                t_gB = _prepend(dg * Bj, t_gB)
                if HAS_Z:
                    t_y = _prepend(Cj * h, t_y)
                row_dB = _prepend(dg * x_b, row_dB)
                row_dC = _prepend(h * dy_b, row_dC)
                new_q = _prepend(a * dh, new_q)
                rr = a * dg
                if (bi * CW + bj) % SG == 0:
                    # a group of SG positions is done: its sums over states go to their lanes
                    in_group = (lanes[None, :] + zero) // SG == ((bi * CW + bj) % NB) // SG
                    acc_ddt = tl.where(in_group, _lane_sums(t_ddt, lanes, FAST), acc_ddt)
                    acc_gB = tl.where(in_group, _lane_sums(t_gB, lanes, FAST), acc_gB)
                    if HAS_Z:
                        acc_y = tl.where(in_group, _lane_sums(t_y, lanes, FAST), acc_y)
                    t_ddt = ()
                    t_gB = ()
                    t_y = ()
                if (bi * CW + bj) % NB == 0:
                    # position tile (bi * CW + bj) / NB is done: its gradients
                    offs, m_pos = _tile_positions((bi * CW + bj) // NB, plane, row0, j0, m_chan, lanes, zero, H, W,
                                                  NB, CH, CW)
                    dt_p, raw = _load_dt(delta_ptr, offs, m_pos, bias, HAS_BIAS, SOFTPLUS, COMPUTE)
                    u_p = tl.load(u_ptr + offs, mask=m_pos, other=0.0).to(COMPUTE)
                    dy_p = dys[(bi * CW + bj) // NB]
                    ddt = acc_ddt + u_p * acc_gB
                    du = dt_p * acc_gB
                    if HAS_D:
                        du = du + skip * dy_p
                        dD_acc += tl.where(m_pos, dy_p * u_p, 0.0)
                    if HAS_Z:
                        y = acc_y
                        if HAS_D:
                            y = y + skip * u_p
                        z_p = tl.load(z_ptr + offs, mask=m_pos, other=0.0).to(COMPUTE)
                        dout_p = tl.load(dout_ptr + offs, mask=m_pos, other=0.0).to(COMPUTE)
                        sig = tl.sigmoid(z_p)
                        tl.store(dz_ptr + offs, dout_p * y * sig * (1.0 + z_p * (1.0 - sig)), mask=m_pos)
                    if SOFTPLUS:
                        ddt = ddt * tl.sigmoid(raw)
                    ddt = tl.where(m_pos, ddt, 0.0)
                    dbias_acc += ddt
                    tl.store(ddelta_ptr + offs, ddt, mask=m_pos)
                    tl.store(du_ptr + offs, du, mask=m_pos)
            # the row's dB and dC, summed over the program's channels, then added atomically
            offs_bc = ((row0 + bi) * W + j0 + tile_cols[:, None]) * N + tile_states[None, :]
            m_bc_row = (((zero_bc + tile_states[None, :]) < N) & ((zero_bc + j0 + tile_cols[:, None]) < W)
                        & ((zero_bc + row0 + bi) < H))
            tl.atomic_add(dBt_ptr + b * H * W * N + offs_bc, tl.sum(_stack(row_dB), axis=1), mask=m_bc_row,
                          sem="relaxed")
            tl.atomic_add(dCt_ptr + b * H * W * N + offs_bc, tl.sum(_stack(row_dC), axis=1), mask=m_bc_row,
                          sem="relaxed")
            qcol = new_q
            new_r = _prepend(rr, new_r)
        r = new_r
    part = (b * N_CH + pid_s) * DIM + chans
    m_c = chans < DIM
    tl.store(dA_part_ptr + part[:, None] * NB + lanes[None, :], dA_acc, mask=m_chan)
    tl.store(dD_part_ptr + part, tl.sum(dD_acc, axis=1), mask=m_c)
    tl.store(dbias_part_ptr + part, tl.sum(dbias_acc, axis=1), mask=m_c)


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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _padded_states(n_state: int) -> int:
    """N rounded up to a power of two, at least 2."""
    return max(1 << (n_state - 1).bit_length(), 2)


def _lane_tiles(n_padded: int, compute: torch.dtype, warps: int = 1) -> tuple[int, int, bool]:
    """(channels per program, num_warps, FAST) for NP padded states and programs of ``warps``
    warps' worth of (channel, state) pairs: the channels fill each warp's lanes with their states
    (a channel spans several warps beyond 32 states); FAST (warp shuffles) needs compiled float32
    kernels and a channel's states inside one warp."""
    channels = max(1, 32 // n_padded) * warps
    num_warps = max(1, channels * n_padded // 32)
    fast = not INTERPRETED and compute == torch.float32 and n_padded <= 32
    return channels, num_warps, fast


@dataclass(frozen=True)
class _Plan:
    """What the launches of one shape and set of options need besides the tensors, worked out
    once per shape (``_plan``): a call at a shape seen before spends no host time on it."""

    NP: int  # padded states
    n_rc: int  # column blocks of carry_cols (row carries stored at the first n_rc - 1 ends)
    n_ch: int  # row stripes of CH (column checkpoints at the first n_ch - 1 ends)
    n_cw: int  # tile columns of CW
    fwd_channels: int
    stripe: int  # columns of one forward program
    fwd_flags: dict  # constexprs and options shared by the forward's two kernels
    bwd_channels: int
    bwd_flags: dict  # those shared by the backward's two kernels
    bwd_options: dict  # the backward tile kernel's own launch options
    carry_options: dict  # the column adjoint kernel's


@functools.lru_cache(maxsize=256)
def _plan(height: int, width: int, n_state: int, compute: torch.dtype, has_bias: bool, softplus: bool,
          has_z: bool, cfg: TileConfig) -> _Plan:
    NP = _padded_states(n_state)
    fwd_channels, fwd_warps, fast = _lane_tiles(NP, compute)
    common = dict(HAS_BIAS=has_bias, SOFTPLUS=softplus, FAST=fast, COMPUTE=_tl_dtype(compute))
    fwd_flags = dict(common, num_warps=fwd_warps)
    if cfg.fwd_maxnreg is not None and not INTERPRETED:
        fwd_flags["maxnreg"] = cfg.fwd_maxnreg
    bwd_channels, bwd_warps, _ = _lane_tiles(NP, compute, cfg.bwd_warps)
    bwd_options = dict(maxnreg=cfg.bwd_maxnreg) if cfg.bwd_maxnreg is not None and not INTERPRETED else {}
    carry_options = dict(maxnreg=cfg.carry_maxnreg) if cfg.carry_maxnreg is not None and not INTERPRETED else {}
    return _Plan(NP=NP, n_rc=_cdiv(width, cfg.carry_cols), n_ch=_cdiv(height, cfg.CH), n_cw=_cdiv(width, cfg.CW),
                 fwd_channels=fwd_channels,
                 stripe=max(cfg.fwd_cols, NP),  # whole groups of NP columns, whole blocks of carry_cols
                 fwd_flags=fwd_flags, bwd_channels=bwd_channels,
                 bwd_flags=dict(common, HAS_Z=has_z, num_warps=bwd_warps), bwd_options=bwd_options,
                 carry_options=carry_options)


@functools.lru_cache(maxsize=16)
def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor passed for an absent input or output, which the kernels never touch."""
    return torch.empty(1, device=device, dtype=dtype)


def _states_last(t: torch.Tensor) -> torch.Tensor:
    """(batch, N, H, W) -> a (batch, H, W, N) copy: a position's states contiguous."""
    return t.permute(0, 2, 3, 1).contiguous()


def _launch_forward(u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus, save_ckpt, cfg):
    batch, dim, height, width = u.shape
    n_state = A.shape[1]
    compute = _compute_dtype(u)
    plan = _plan(height, width, n_state, compute, delta_bias is not None, delta_softplus, z is not None, cfg)
    NP, n_rc, n_ch, channels = plan.NP, plan.n_rc, plan.n_ch, plan.fwd_channels
    dummy = _dummy(u.device, compute)
    row_carry = (torch.empty(batch, dim, n_rc - 1, height, NP, device=u.device, dtype=compute)
                 if n_rc > 1 else dummy)
    save_ckpt = save_ckpt and n_ch > 1
    ckpt = torch.empty(batch, dim, n_ch - 1, width, NP, device=u.device, dtype=compute) if save_ckpt else dummy
    bias_arg = delta_bias if delta_bias is not None else dummy
    if n_rc > 1:
        launcher(_row_carry_kernel)[(height, _cdiv(dim, channels), batch)](
            delta, bias_arg, u, Bt, A, row_carry, height, width, dim, n_state, n_rc,
            DB=channels, NB=NP, RC=cfg.carry_cols, **plan.fwd_flags)
    y = torch.empty(u.shape, device=u.device, dtype=u.dtype)
    launcher(_fwd_kernel)[(_cdiv(width, plan.stripe), _cdiv(dim, channels), batch)](
        delta, bias_arg, u, z if z is not None else dummy, Bt, Ct, A, D if D is not None else dummy,
        row_carry, ckpt, y, height, width, dim, n_state, n_rc, n_ch,
        DB=channels, NB=NP, TW=plan.stripe, RC=cfg.carry_cols, CH=cfg.CH,
        HAS_Z=z is not None, HAS_D=D is not None, STORE_CKPT=save_ckpt, **plan.fwd_flags)
    return y, row_carry, ckpt


def _launch_backward(dout, u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus, row_carry, ckpt, cfg):
    batch, dim, height, width = u.shape
    n_state = A.shape[1]
    compute = _compute_dtype(u)
    plan = _plan(height, width, n_state, compute, delta_bias is not None, delta_softplus, z is not None, cfg)
    NP, n_ch, channels = plan.NP, plan.n_ch, plan.bwd_channels
    dev = u.device
    dummy = _dummy(dev, compute)
    bias_arg = delta_bias if delta_bias is not None else dummy
    z_arg = z if z is not None else dummy
    col_carry = (torch.empty(batch, dim, n_ch - 1, width, NP, device=dev, dtype=compute)
                 if n_ch > 1 else dummy)
    if n_ch > 1:
        launcher(_col_carry_kernel)[(_cdiv(width, NP), _cdiv(dim, channels), batch)](
            delta, bias_arg, z_arg, dout, Ct, A, col_carry, height, width, dim, n_state, n_ch,
            DB=channels, NB=NP, CH=cfg.CH, **plan.bwd_flags, **plan.carry_options)
    ddelta = torch.empty(delta.shape, device=dev, dtype=delta.dtype)
    du = torch.empty(u.shape, device=dev, dtype=u.dtype)
    dz = torch.empty(z.shape, device=dev, dtype=z.dtype) if z is not None else dummy
    # B and C are shared by all channels: their gradients are summed across programs atomically,
    # (batch, H, W, N) like Bt and Ct
    dBt = torch.zeros(2, batch, height, width, n_state, device=dev, dtype=compute)
    # per-stripe partial sums of dA, dD and ddelta_bias, added up below (deterministic)
    dA_part = torch.empty(batch, n_ch, dim, NP, device=dev, dtype=compute)
    dD_part = torch.empty(batch, n_ch, dim, device=dev, dtype=compute)
    dbias_part = torch.empty(batch, n_ch, dim, device=dev, dtype=compute)
    launcher(_bwd_kernel)[(n_ch, _cdiv(dim, channels), batch)](
        delta, bias_arg, u, z_arg, dout, Bt, Ct, A, D if D is not None else dummy,
        row_carry, ckpt, col_carry,
        ddelta, du, dz, dBt[0], dBt[1], dA_part, dD_part, dbias_part,
        height, width, dim, n_state, plan.n_cw, plan.n_rc, n_ch,
        DB=channels, NB=NP, CH=cfg.CH, CW=cfg.CW, RC=cfg.carry_cols, SG=min(SUM_GROUP, NP), HAS_D=D is not None,
        **plan.bwd_flags, **plan.bwd_options)
    dA = dA_part.sum(dim=(0, 1))[:, :n_state].to(A.dtype)
    dD = dD_part.sum(dim=(0, 1)).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum(dim=(0, 1)).to(delta_bias.dtype) if delta_bias is not None else None
    dB, dC = dBt.permute(0, 1, 4, 2, 3)
    return (du, ddelta, dA, dB.to(Bt.dtype), dC.to(Ct.dtype), dD, dz if z is not None else None, dbias)


class SelectiveScan2DFn(torch.autograd.Function):
    """Autograd wiring: the forward keeps only the N/carry_cols- and N/CH-fold carries, never the states."""

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
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    if needs_autograd(inputs):
        return SelectiveScan2DFn.apply(*inputs, bool(delta_softplus), cfg)
    # nothing to differentiate (inference): the forward kernels without autograd's bookkeeping
    y, _, _ = _launch_forward(u, delta, A, _states_last(B), _states_last(C), D, z, delta_bias, bool(delta_softplus),
                              False, cfg)
    return y


# True when this copy of the module was loaded under TRITON_INTERPRET=1 (the CPU interpreter)
INTERPRETED = isinstance(_fwd_kernel, InterpretedFunction)
