"""Selective scan in Triton for many states (N > 16): a chunked parallel scan, forward and
backward, with the states spread over the warps of a program.

The same algorithm as chunk.py (chunk summaries, carries between chunks, segment checkpoints in
the backward; the maths is in README.md beside this file), in a layout that suits large N:
chunk.py keeps all of a channel's states in one thread, which for N = 64 runs out of registers.
Here tiles are (BT, N, BD): positions, states, channels; the channels on the lanes of a warp,
the states on the warps, a thread's BT positions in its registers. ``selective_scan`` picks
this module for N > 16 (``uses_many_states``).

Layout: the sequence is cut into chunks of ``n_sub`` sub-tiles of ``BT`` positions. One program
owns (batch b, BD channels, one chunk). Within a sub-tile the state recurrence over BT positions
is an in-register ``tl.associative_scan`` of (decay, input) pairs; sub-tiles of a chunk follow
one another in a loop that carries the (N, BD) state.

Forward, three launches:
  1. ``_chunk_state_fwd_kernel``: per chunk, the end state from a zero start and the sum of delta.
  2. ``_chunk_carry_kernel``: per (b, channel block), a scan over chunks: true chunk end states.
  3. ``_scan_fwd_kernel``: per chunk, the states again from the true start, and the outputs.
Backward, three launches (states are recomputed, never stored per position):
  1. ``_chunk_adjoint_kernel``: per chunk, the adjoint at the chunk start from a zero right carry.
  2. ``_chunk_carry_kernel`` run from the last chunk to the first: the adjoint entering each chunk.
  3. ``_scan_bwd_kernel``: per chunk, the start states of segments of sub-tiles (a forward
     pass, kept in a per-program scratch), then segment by segment from the last: the segment's
     sub-tile start states, then its sub-tiles from last to first: states, adjoints, gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from mambapath.kernels.launch import launcher
from mambapath.kernels.selective_scan.host import kernel_inputs, last_state, needs_autograd, unit_stride

LOG2E = tl.constexpr(1.4426950408889634)


@dataclass(frozen=True)
class ScanConfig:
    """Tile sizes: block_d channels (the lanes of a warp) and block_t positions (registers of
    one thread) per program step, the states spread over num_warps warps. A chunk is at most
    max_sub sub-tiles, and short enough to give programs_per_sm programs per multiprocessor;
    the backward runs bwd_programs_per_sm persistent programs per multiprocessor. The carry
    kernel moves block_c chunks of carry_block_d channels per step."""

    block_d: int = 32
    block_t: int = 8
    num_warps: int = 4
    bwd_num_warps: int = 4
    max_sub: int = 256
    block_c: int = 16
    carry_block_d: int = 8
    programs_per_sm: int = 8
    bwd_programs_per_sm: int = 2


def default_config(n_state: int, interpret: bool) -> ScanConfig:
    """Tile sizes for N states; tiny ones for Triton's interpreter."""
    if interpret:
        # the interpreter runs a program's loop iterations in Python: small tiles, few programs
        return ScanConfig(block_d=4, block_t=8, num_warps=1, bwd_num_warps=1, max_sub=4, block_c=4,
                          carry_block_d=4, programs_per_sm=4, bwd_programs_per_sm=4)
    block_n = triton.next_power_of_2(n_state)
    # measured on an H100 (benchmarks/tune_selective_scan.py): four warps and four positions
    # per thread beat eight warps or eight positions, forward and backward
    carry_block_d = 8 if block_n <= 32 else 4
    return ScanConfig(block_d=32, block_t=4, num_warps=4, bwd_num_warps=4, max_sub=512, programs_per_sm=8,
                      block_c=16, carry_block_d=carry_block_d)


def _block_d_for(config: ScanConfig, dim: int, dim_per_group: int) -> int:
    """Largest power of two <= config.block_d that divides the group size, so that every
    program reads a single group of B and C."""
    block_d = config.block_d
    while dim_per_group % block_d:
        block_d //= 2
    return block_d


# ---------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _affine_combine(a_left, x_left, a_right, x_right):
    # composition of h -> a_left h + x_left, then h -> a_right h + x_right
    return a_left * a_right, a_right * x_left + x_right


@triton.jit
def _softplus(x):
    # log(1 + e^x), with log1p(e) = log(1 + e) * e / ((1 + e) - 1) for small e, and x above 20
    e = tl.exp(x)
    one_plus = 1.0 + e
    small = tl.where(one_plus == 1.0, e, tl.log(one_plus) * e / (one_plus - 1.0))
    return tl.where(x > 20.0, x, small)


@triton.jit
def _tile(tile, t_lo, t_hi, L, offs_j, REVERSE: tl.constexpr, BT: tl.constexpr, SHIFT: tl.constexpr = 0):
    """Memory positions (BT,) of scan positions t + SHIFT for the t of sub-tile ``tile``, and
    which of them to read: t_lo <= t < t_hi (t_hi <= L) and t + SHIFT < L."""
    t = tile * BT + offs_j
    mask = (t >= t_lo) & (t < t_hi) & (t + SHIFT < L)
    if REVERSE:
        return L - 1 - (t + SHIFT), mask
    else:
        return t + SHIFT, mask


@triton.jit
def _load_rows(cols, pos, mask_t):
    """(BT, BD) float32 tile of a (batch, dim, L) tensor; ``cols`` points at (batch, channels)."""
    return tl.load(cols + pos[:, None], mask=mask_t[:, None], other=0.0).to(tl.float32)


@triton.jit
def _load_states(cols, pos, mask_t, mask_n):
    """(BT, BN) float32 tile of B or C; ``cols`` points at (batch, group, states)."""
    return tl.load(cols + pos[:, None], mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)


@triton.jit
def _step(raw, mask_t, dbias, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(BT, BD) raw delta -> (raw + bias, step delta); positions outside [0, L) get step 0."""
    if HAS_DBIAS:
        raw = raw + dbias[None, :]
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    return raw, tl.where(mask_t[:, None], dt, 0.0)


@triton.jit
def _advance(h, dt, u, Bt, A2):
    """The (BN, BD) state after a sub-tile from the state h before it, as a sum over the
    sub-tile (no scan): exp(A sum delta) h + sum_t exp(A * delta summed after t) x_t; also the
    sub-tile's sum of delta (BD,)."""
    total = tl.sum(dt, axis=0)  # (BD,)
    after = tl.cumsum(dt, axis=0, reverse=True) - dt  # (BT, BD): delta summed after t
    w = tl.exp2(after[:, None, :] * A2[None, :, :])  # (BT, BN, BD)
    x = (dt * u)[:, None, :] * Bt[:, :, None]
    return tl.exp2(A2 * total[None, :]) * h + tl.sum(w * x, axis=0), total


# ---------------------------------------------------------------------------------------------
# forward kernels
#
# Tiles are oriented (BT, BN, BD): positions, states, channels. Triton's default layout gives
# the channels to the lanes of a warp, the states to the warps and keeps the BT positions of a
# (state, channel) pair in one thread's registers, so the scan along positions and the sums
# over states need no shuffles. Every loop loads the next sub-tile's inputs before it works on
# the current one, so that memory latency overlaps the arithmetic.


@triton.jit
def _chunk_state_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, dbias_ptr, hloc_ptr, dsum_ptr,
    L, dim, n_state, dim_per_group, n_sub, n_chunks,
    stride_ub, stride_ud, stride_db, stride_dd, stride_Bb, stride_Bg, stride_Bn,
    HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    offs_j = tl.arange(0, BT)
    mask_n = offs_n < n_state
    A2 = tl.load(A_ptr + offs_d[None, :] * n_state + offs_n[:, None], mask=mask_n[:, None], other=0.0) * LOG2E
    dbias = tl.zeros((BD,), tl.float32)
    if HAS_DBIAS:
        dbias = tl.load(dbias_ptr + offs_d).to(tl.float32)
    group = (pid_d * BD) // dim_per_group
    u_cols = u_ptr + pid_b * stride_ub + offs_d[None, :] * stride_ud
    delta_cols = delta_ptr + pid_b * stride_db + offs_d[None, :] * stride_dd
    B_cols = B_ptr + pid_b * stride_Bb + group * stride_Bg + offs_n[None, :] * stride_Bn

    h = tl.zeros((BN, BD), tl.float32)
    dsum = tl.zeros((BD,), tl.float32)
    t_lo = pid_c * n_sub * BT
    t_hi = tl.minimum(L, t_lo + n_sub * BT)
    pos, mask_t = _tile(pid_c * n_sub, t_lo, t_hi, L, offs_j, REVERSE, BT)
    raw_n, u_n, B_n = _load_rows(delta_cols, pos, mask_t), _load_rows(u_cols, pos, mask_t), \
        _load_states(B_cols, pos, mask_t, mask_n)
    for s in range(0, n_sub):
        raw, u, Bt, mask_c = raw_n, u_n, B_n, mask_t
        pos, mask_t = _tile(pid_c * n_sub + s + 1, t_lo, t_hi, L, offs_j, REVERSE, BT)
        raw_n, u_n, B_n = _load_rows(delta_cols, pos, mask_t), _load_rows(u_cols, pos, mask_t), \
            _load_states(B_cols, pos, mask_t, mask_n)
        _, dt = _step(raw, mask_c, dbias, HAS_DBIAS, SOFTPLUS)  # (BT, BD)
        h, total = _advance(h, dt, u, Bt, A2)
        dsum += total
    row = (pid_b * n_chunks + pid_c) * dim + offs_d
    tl.store(hloc_ptr + row[None, :] * n_state + offs_n[:, None], h, mask=mask_n[:, None])
    tl.store(dsum_ptr + row, dsum)


@triton.jit
def _chunk_carry_kernel(
    dsum_ptr, loc_ptr, A_ptr, init_ptr, out_ptr,
    n_chunks, dim, n_state,
    HAS_INIT: tl.constexpr, REVERSE: tl.constexpr,
    BC: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
):
    # out[c] = exp(A * dsum[c]) * out[c -/+ 1] + loc[c], from init, over the chunks of one
    # (b, channel block); REVERSE walks from the last chunk to the first. out may be loc.
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    offs_r = tl.arange(0, BC)
    mask_n = offs_n < n_state
    A2 = tl.load(A_ptr + offs_d[None, :] * n_state + offs_n[:, None], mask=mask_n[:, None], other=0.0) * LOG2E
    carry = tl.zeros((BN, BD), tl.float32)
    if HAS_INIT:
        carry = tl.load(init_ptr + (pid_b * dim + offs_d[None, :]) * n_state + offs_n[:, None],
                        mask=mask_n[:, None], other=0.0).to(tl.float32)
    first = offs_r[:, None, None] == 0
    last = offs_r[:, None, None] == BC - 1
    # block k of BC chunks: its dsum (BC, BD) and local states (BC, BN, BD), loaded one block ahead
    r = offs_r
    if REVERSE:
        c = n_chunks - 1 - r
    else:
        c = r
    rows = (pid_b * n_chunks + c[:, None]) * dim + offs_d[None, :]
    mask3 = (r < n_chunks)[:, None, None] & mask_n[None, :, None]
    dsum_n = tl.load(dsum_ptr + rows, mask=(r < n_chunks)[:, None], other=0.0)
    loc_n = tl.load(loc_ptr + rows[:, None, :] * n_state + offs_n[None, :, None], mask=mask3, other=0.0)
    for k in range(0, tl.cdiv(n_chunks, BC)):
        dsum, loc, rows_c, mask3_c = dsum_n, loc_n, rows, mask3
        r = (k + 1) * BC + offs_r
        if REVERSE:
            c = n_chunks - 1 - r
        else:
            c = r
        rows = (pid_b * n_chunks + c[:, None]) * dim + offs_d[None, :]
        mask3 = (r < n_chunks)[:, None, None] & mask_n[None, :, None]
        dsum_n = tl.load(dsum_ptr + rows, mask=(r < n_chunks)[:, None], other=0.0)
        loc_n = tl.load(loc_ptr + rows[:, None, :] * n_state + offs_n[None, :, None], mask=mask3, other=0.0)
        P = tl.exp2(dsum[:, None, :] * A2[None, :, :])  # (BC, BN, BD)
        loc = tl.where(first, loc + P * carry[None, :, :], loc)
        _, H = tl.associative_scan((P, loc), 0, _affine_combine)
        tl.store(out_ptr + rows_c[:, None, :] * n_state + offs_n[None, :, None], H, mask=mask3_c)
        carry = tl.sum(tl.where(last, H, 0.0), axis=0)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dbias_ptr, h0_ptr, hend_ptr, out_ptr,
    L, dim, n_state, dim_per_group, n_sub, n_chunks,
    stride_ub, stride_ud, stride_db, stride_dd, stride_Bb, stride_Bg, stride_Bn,
    stride_Cb, stride_Cg, stride_Cn, stride_zb, stride_zd, stride_ob, stride_od,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, REVERSE: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    offs_j = tl.arange(0, BT)
    mask_n = offs_n < n_state
    A2 = tl.load(A_ptr + offs_d[None, :] * n_state + offs_n[:, None], mask=mask_n[:, None], other=0.0) * LOG2E
    dbias = tl.zeros((BD,), tl.float32)
    if HAS_DBIAS:
        dbias = tl.load(dbias_ptr + offs_d).to(tl.float32)
    Dv = tl.zeros((BD,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d).to(tl.float32)
    group = (pid_d * BD) // dim_per_group
    u_cols = u_ptr + pid_b * stride_ub + offs_d[None, :] * stride_ud
    delta_cols = delta_ptr + pid_b * stride_db + offs_d[None, :] * stride_dd
    z_cols = z_ptr + pid_b * stride_zb + offs_d[None, :] * stride_zd
    out_cols = out_ptr + pid_b * stride_ob + offs_d[None, :] * stride_od
    B_cols = B_ptr + pid_b * stride_Bb + group * stride_Bg + offs_n[None, :] * stride_Bn
    C_cols = C_ptr + pid_b * stride_Cb + group * stride_Cg + offs_n[None, :] * stride_Cn
    state_ptrs = offs_d[None, :] * n_state + offs_n[:, None]  # (BN, BD)

    # (BN, BD) state entering the chunk
    if pid_c == 0:
        if HAS_H0:
            h = tl.load(h0_ptr + pid_b * dim * n_state + state_ptrs, mask=mask_n[:, None], other=0.0).to(tl.float32)
        else:
            h = tl.zeros((BN, BD), tl.float32)
    else:
        h = tl.load(hend_ptr + (pid_b * n_chunks + pid_c - 1) * dim * n_state + state_ptrs,
                    mask=mask_n[:, None], other=0.0)
    first = offs_j[:, None, None] == 0
    last = offs_j[:, None, None] == BT - 1
    t_lo = pid_c * n_sub * BT
    t_hi = tl.minimum(L, t_lo + n_sub * BT)
    pos, mask_t = _tile(pid_c * n_sub, t_lo, t_hi, L, offs_j, REVERSE, BT)
    raw_n, u_n = _load_rows(delta_cols, pos, mask_t), _load_rows(u_cols, pos, mask_t)
    B_n, C_n = _load_states(B_cols, pos, mask_t, mask_n), _load_states(C_cols, pos, mask_t, mask_n)
    for s in range(0, n_sub):
        raw, u, Bt, Ct, pos_c, mask_c = raw_n, u_n, B_n, C_n, pos, mask_t
        pos, mask_t = _tile(pid_c * n_sub + s + 1, t_lo, t_hi, L, offs_j, REVERSE, BT)
        raw_n, u_n = _load_rows(delta_cols, pos, mask_t), _load_rows(u_cols, pos, mask_t)
        B_n, C_n = _load_states(B_cols, pos, mask_t, mask_n), _load_states(C_cols, pos, mask_t, mask_n)
        _, dt = _step(raw, mask_c, dbias, HAS_DBIAS, SOFTPLUS)  # (BT, BD)
        a = tl.exp2(dt[:, None, :] * A2[None, :, :])  # (BT, BN, BD)
        x = (dt * u)[:, None, :] * Bt[:, :, None]
        x = tl.where(first, x + a * h[None, :, :], x)
        _, hs = tl.associative_scan((a, x), 0, _affine_combine)  # (BT, BN, BD) states
        y = tl.sum(hs * Ct[:, :, None], axis=1)  # (BT, BD)
        if HAS_D:
            y += Dv[None, :] * u
        if HAS_Z:
            z = _load_rows(z_cols, pos_c, mask_c)
            y = y * z * tl.sigmoid(z)
        tl.store(out_cols + pos_c[:, None], y.to(out_ptr.dtype.element_ty), mask=mask_c[:, None])
        h = tl.sum(tl.where(last, hs, 0.0), axis=0)


# ---------------------------------------------------------------------------------------------
# backward kernels


@triton.jit
def _chunk_adjoint_kernel(
    dout_ptr, z_ptr, delta_ptr, A_ptr, C_ptr, dbias_ptr, gloc_ptr,
    L, dim, n_state, dim_per_group, n_sub, n_chunks,
    stride_ob, stride_od, stride_zb, stride_zd, stride_db, stride_dd, stride_Cb, stride_Cg, stride_Cn,
    HAS_Z: tl.constexpr, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    offs_j = tl.arange(0, BT)
    mask_n = offs_n < n_state
    A2 = tl.load(A_ptr + offs_d[None, :] * n_state + offs_n[:, None], mask=mask_n[:, None], other=0.0) * LOG2E
    dbias = tl.zeros((BD,), tl.float32)
    if HAS_DBIAS:
        dbias = tl.load(dbias_ptr + offs_d).to(tl.float32)
    group = (pid_d * BD) // dim_per_group
    dout_cols = dout_ptr + pid_b * stride_ob + offs_d[None, :] * stride_od
    z_cols = z_ptr + pid_b * stride_zb + offs_d[None, :] * stride_zd
    delta_cols = delta_ptr + pid_b * stride_db + offs_d[None, :] * stride_dd
    C_cols = C_ptr + pid_b * stride_Cb + group * stride_Cg + offs_n[None, :] * stride_Cn

    g = tl.zeros((BN, BD), tl.float32)
    before = tl.zeros((BD,), tl.float32)  # delta summed over the chunk's earlier sub-tiles
    t_lo = pid_c * n_sub * BT
    t_hi = tl.minimum(L, t_lo + n_sub * BT)
    pos, mask_t = _tile(pid_c * n_sub, t_lo, t_hi, L, offs_j, REVERSE, BT)
    raw_n, dy_n, C_n = _load_rows(delta_cols, pos, mask_t), _load_rows(dout_cols, pos, mask_t), \
        _load_states(C_cols, pos, mask_t, mask_n)
    if HAS_Z:
        z_n = _load_rows(z_cols, pos, mask_t)
    for s in range(0, n_sub):
        raw, dy, Ct, mask_c = raw_n, dy_n, C_n, mask_t
        if HAS_Z:
            z = z_n
        pos, mask_t = _tile(pid_c * n_sub + s + 1, t_lo, t_hi, L, offs_j, REVERSE, BT)
        raw_n, dy_n, C_n = _load_rows(delta_cols, pos, mask_t), _load_rows(dout_cols, pos, mask_t), \
            _load_states(C_cols, pos, mask_t, mask_n)
        if HAS_Z:
            z_n = _load_rows(z_cols, pos, mask_t)
            dy = dy * z * tl.sigmoid(z)
        _, dt = _step(raw, mask_c, dbias, HAS_DBIAS, SOFTPLUS)  # (BT, BD)
        upto = before[None, :] + tl.cumsum(dt, axis=0)  # (BT, BD): delta summed from chunk start to t
        w = tl.exp2(upto[:, None, :] * A2[None, :, :])  # (BT, BN, BD)
        g += tl.sum(w * (Ct[:, :, None] * dy[:, None, :]), axis=0)
        before += tl.sum(dt, axis=0)
    row = (pid_b * n_chunks + pid_c) * dim + offs_d
    tl.store(gloc_ptr + row[None, :] * n_state + offs_n[:, None], g, mask=mask_n[:, None])


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dbias_ptr, dout_ptr,
    h0_ptr, hend_ptr, gcarry_ptr, dlast_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, ddbias_ptr,
    L, dim, n_state, dim_per_group, n_sub, n_chunks, n_dblocks, n_items, seg_len, n_seg,
    stride_ub, stride_ud, stride_db, stride_dd, stride_Bb, stride_Bg, stride_Bn,
    stride_Cb, stride_Cg, stride_Cn, stride_zb, stride_zd, stride_ob, stride_od,
    stride_gb, stride_gg, stride_gn, stride_dub, stride_dud, stride_ddb, stride_ddd, stride_dzb, stride_dzd,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_DLAST: tl.constexpr, REVERSE: tl.constexpr,
    BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
):
    # Persistent: each program takes chunks pid, pid + n_programs, ... Its scratch rows hold
    # (n_seg + seg_len) states of (BN, BD): the start state of every segment of seg_len
    # sub-tiles of the chunk, then the start states of the sub-tiles of the segment at hand.
    pid = tl.program_id(0)
    offs_dl = tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    offs_j = tl.arange(0, BT)
    mask_n = offs_n < n_state
    first = offs_j[:, None, None] == 0
    last = offs_j[:, None, None] == BT - 1
    scratch_tile = (scratch_ptr + pid.to(tl.int64) * (n_seg + seg_len) * BN * BD
                    + offs_n[:, None] * BD + offs_dl[None, :])
    for item in range(pid, n_items, tl.num_programs(0)):
        pid_c = item % n_chunks
        pid_d = (item // n_chunks) % n_dblocks
        pid_b = (item // (n_chunks * n_dblocks)).to(tl.int64)
        offs_d = pid_d * BD + offs_dl
        A = tl.load(A_ptr + offs_d[None, :] * n_state + offs_n[:, None], mask=mask_n[:, None], other=0.0)  # (BN, BD)
        A2 = A * LOG2E
        dbias = tl.zeros((BD,), tl.float32)
        if HAS_DBIAS:
            dbias = tl.load(dbias_ptr + offs_d).to(tl.float32)
        Dv = tl.zeros((BD,), tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d).to(tl.float32)
        group = (pid_d * BD) // dim_per_group
        u_cols = u_ptr + pid_b * stride_ub + offs_d[None, :] * stride_ud
        delta_cols = delta_ptr + pid_b * stride_db + offs_d[None, :] * stride_dd
        z_cols = z_ptr + pid_b * stride_zb + offs_d[None, :] * stride_zd
        dout_cols = dout_ptr + pid_b * stride_ob + offs_d[None, :] * stride_od
        du_cols = du_ptr + pid_b * stride_dub + offs_d[None, :] * stride_dud
        ddelta_cols = ddelta_ptr + pid_b * stride_ddb + offs_d[None, :] * stride_ddd
        dz_cols = dz_ptr + pid_b * stride_dzb + offs_d[None, :] * stride_dzd
        B_cols = B_ptr + pid_b * stride_Bb + group * stride_Bg + offs_n[None, :] * stride_Bn
        C_cols = C_ptr + pid_b * stride_Cb + group * stride_Cg + offs_n[None, :] * stride_Cn
        dB_cols = dB_ptr + pid_b * stride_gb + group * stride_gg + offs_n[None, :] * stride_gn
        dC_cols = dC_ptr + pid_b * stride_gb + group * stride_gg + offs_n[None, :] * stride_gn
        state_ptrs = offs_d[None, :] * n_state + offs_n[:, None]  # (BN, BD)

        # phase 1: start state of every segment of the chunk -> scratch rows [0, n_seg)
        if pid_c == 0:
            if HAS_H0:
                h = tl.load(h0_ptr + pid_b * dim * n_state + state_ptrs, mask=mask_n[:, None],
                            other=0.0).to(tl.float32)
            else:
                h = tl.zeros((BN, BD), tl.float32)
        else:
            h = tl.load(hend_ptr + (pid_b * n_chunks + pid_c - 1) * dim * n_state + state_ptrs,
                        mask=mask_n[:, None], other=0.0)
        t_lo = pid_c * n_sub * BT
        t_hi = tl.minimum(L, t_lo + n_sub * BT)
        pos, mask_t = _tile(pid_c * n_sub, t_lo, t_hi, L, offs_j, REVERSE, BT)
        raw_n, u_n, B_n = _load_rows(delta_cols, pos, mask_t), _load_rows(u_cols, pos, mask_t), \
            _load_states(B_cols, pos, mask_t, mask_n)
        for s in range(0, n_sub):
            raw, u, Bt, mask_c = raw_n, u_n, B_n, mask_t
            pos, mask_t = _tile(pid_c * n_sub + s + 1, t_lo, t_hi, L, offs_j, REVERSE, BT)
            raw_n, u_n, B_n = _load_rows(delta_cols, pos, mask_t), _load_rows(u_cols, pos, mask_t), \
                _load_states(B_cols, pos, mask_t, mask_n)
            if s % seg_len == 0:
                tl.store(scratch_tile + (s // seg_len) * BN * BD, h)
            _, dt = _step(raw, mask_c, dbias, HAS_DBIAS, SOFTPLUS)
            h, _ = _advance(h, dt, u, Bt, A2)
        tl.debug_barrier()

        # phase 2: segments from last to first, the adjoint carried leftwards
        if pid_c == n_chunks - 1:
            if HAS_DLAST:
                carry = tl.load(dlast_ptr + pid_b * dim * n_state + state_ptrs, mask=mask_n[:, None],
                                other=0.0).to(tl.float32)
            else:
                carry = tl.zeros((BN, BD), tl.float32)
        else:
            carry = tl.load(gcarry_ptr + (pid_b * n_chunks + pid_c + 1) * dim * n_state + state_ptrs,
                            mask=mask_n[:, None], other=0.0)
        dA_acc = tl.zeros((BN, BD), tl.float32)
        dD_acc = tl.zeros((BD,), tl.float32)
        ddbias_acc = tl.zeros((BD,), tl.float32)
        for j in range(0, n_seg):
            seg = n_seg - 1 - j
            s_first = seg * seg_len
            n_here = tl.minimum(seg_len, n_sub - s_first)
            # start states of the segment's sub-tiles -> scratch rows [n_seg, n_seg + n_here)
            h = tl.load(scratch_tile + seg * BN * BD)
            seg_lo = (pid_c * n_sub + s_first) * BT
            seg_hi = tl.minimum(L, seg_lo + n_here * BT)
            pos, mask_t = _tile(pid_c * n_sub + s_first, seg_lo, seg_hi, L, offs_j, REVERSE, BT)
            raw_n, u_n, B_n = _load_rows(delta_cols, pos, mask_t), _load_rows(u_cols, pos, mask_t), \
                _load_states(B_cols, pos, mask_t, mask_n)
            for i in range(0, n_here):
                raw, u, Bt, mask_c = raw_n, u_n, B_n, mask_t
                pos, mask_t = _tile(pid_c * n_sub + s_first + i + 1, seg_lo, seg_hi, L, offs_j, REVERSE, BT)
                raw_n, u_n, B_n = _load_rows(delta_cols, pos, mask_t), _load_rows(u_cols, pos, mask_t), \
                    _load_states(B_cols, pos, mask_t, mask_n)
                tl.store(scratch_tile + (n_seg + i) * BN * BD, h)
                _, dt = _step(raw, mask_c, dbias, HAS_DBIAS, SOFTPLUS)
                h, _ = _advance(h, dt, u, Bt, A2)
            tl.debug_barrier()

            # the segment's sub-tiles from last to first; the inputs of the one before are
            # loaded while the current one is worked on
            tile_last = pid_c * n_sub + s_first + n_here - 1
            pos, mask_t = _tile(tile_last, seg_lo, seg_hi, L, offs_j, REVERSE, BT)
            pos_nx, mask_nx = _tile(tile_last, seg_lo, seg_hi, L, offs_j, REVERSE, BT, 1)  # one step later
            raw_n, rawnx_n, u_n = _load_rows(delta_cols, pos, mask_t), _load_rows(delta_cols, pos_nx, mask_nx), \
                _load_rows(u_cols, pos, mask_t)
            dout_n, B_n, C_n = _load_rows(dout_cols, pos, mask_t), _load_states(B_cols, pos, mask_t, mask_n), \
                _load_states(C_cols, pos, mask_t, mask_n)
            if HAS_Z:
                z_n = _load_rows(z_cols, pos, mask_t)
            for k in range(0, n_here):
                raw, raw_next, u, dout, Bt, Ct, pos_c, mask_c, mask_cnx = \
                    raw_n, rawnx_n, u_n, dout_n, B_n, C_n, pos, mask_t, mask_nx
                if HAS_Z:
                    z = z_n
                pos, mask_t = _tile(tile_last - k - 1, seg_lo, seg_hi, L, offs_j, REVERSE, BT)
                pos_nx, mask_nx = _tile(tile_last - k - 1, seg_lo, seg_hi, L, offs_j, REVERSE, BT, 1)
                raw_n, rawnx_n, u_n = _load_rows(delta_cols, pos, mask_t), \
                    _load_rows(delta_cols, pos_nx, mask_nx), _load_rows(u_cols, pos, mask_t)
                dout_n, B_n, C_n = _load_rows(dout_cols, pos, mask_t), _load_states(B_cols, pos, mask_t, mask_n), \
                    _load_states(C_cols, pos, mask_t, mask_n)
                if HAS_Z:
                    z_n = _load_rows(z_cols, pos, mask_t)
                h_in = tl.load(scratch_tile + (n_seg + n_here - 1 - k) * BN * BD)  # (BN, BD)

                raw, dt = _step(raw, mask_c, dbias, HAS_DBIAS, SOFTPLUS)  # (BT, BD)
                _, dt_next = _step(raw_next, mask_cnx, dbias, HAS_DBIAS, SOFTPLUS)
                a = tl.exp2(dt[:, None, :] * A2[None, :, :])  # (BT, BN, BD)
                x = (dt * u)[:, None, :] * Bt[:, :, None]
                _, hs = tl.associative_scan((a, tl.where(first, x + a * h_in[None, :, :], x)), 0, _affine_combine)

                if HAS_Z:
                    y = tl.sum(hs * Ct[:, :, None], axis=1)
                    if HAS_D:
                        y += Dv[None, :] * u
                    sig = tl.sigmoid(z)
                    dz = dout * y * sig * (1.0 + z * (1.0 - sig))
                    tl.store(dz_cols + pos_c[:, None], dz.to(dz_ptr.dtype.element_ty), mask=mask_c[:, None])
                    dy = dout * z * sig
                else:
                    dy = dout

                # adjoint: g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}, the carry entering at the right
                a_next = tl.exp2(dt_next[:, None, :] * A2[None, :, :])
                c = Ct[:, :, None] * dy[:, None, :]
                c = tl.where(last, c + carry[None, :, :], c)
                _, g = tl.associative_scan((a_next, c), 0, _affine_combine, reverse=True)
                carry = tl.sum(tl.where(first, a * g, 0.0), axis=0)
                g = tl.where(mask_c[:, None, None], g, 0.0)

                dlog = g * (hs - x)  # d loss / d (delta_t A) per state
                dA_acc += tl.sum(dlog * dt[:, None, :], axis=0)
                gB = tl.sum(g * Bt[:, :, None], axis=1)  # (BT, BD)
                ddt = tl.sum(dlog * A[None, :, :], axis=1) + u * gB
                du = dt * gB
                if HAS_D:
                    du += Dv[None, :] * dy
                    dD_acc += tl.sum(dy * u, axis=0)
                if SOFTPLUS:
                    ddt = ddt * tl.sigmoid(raw)
                ddt = tl.where(mask_c[:, None], ddt, 0.0)
                if HAS_DBIAS:
                    ddbias_acc += tl.sum(ddt, axis=0)
                tl.store(du_cols + pos_c[:, None], du.to(du_ptr.dtype.element_ty), mask=mask_c[:, None])
                tl.store(ddelta_cols + pos_c[:, None], ddt.to(ddelta_ptr.dtype.element_ty), mask=mask_c[:, None])
                dBt = tl.sum(g * (dt * u)[:, None, :], axis=2)  # (BT, BN)
                dCt = tl.sum(hs * dy[:, None, :], axis=2)
                mask_tn = mask_c[:, None] & mask_n[None, :]
                tl.atomic_add(dB_cols + pos_c[:, None], dBt, mask=mask_tn, sem="relaxed")
                tl.atomic_add(dC_cols + pos_c[:, None], dCt, mask=mask_tn, sem="relaxed")
            # the next segment rewrites the sub-tile rows
            tl.debug_barrier()

        tl.atomic_add(dA_ptr + state_ptrs, dA_acc, mask=mask_n[:, None], sem="relaxed")
        if HAS_D:
            tl.atomic_add(dD_ptr + offs_d, dD_acc, sem="relaxed")
        if HAS_DBIAS:
            tl.atomic_add(ddbias_ptr + offs_d, ddbias_acc, sem="relaxed")
        # the next chunk of this program rewrites the segment rows
        tl.debug_barrier()


# ---------------------------------------------------------------------------------------------
# launchers


@dataclass
class _Plan:
    """Launch geometry shared by the forward and the backward of one call."""

    batch: int
    dim: int
    length: int
    n_state: int
    groups: int
    block_d: int
    block_n: int
    block_t: int
    n_sub: int
    n_chunks: int
    n_dblocks: int
    seg_len: int
    n_seg: int


def _plan(batch, dim, length, n_state, groups, config: ScanConfig, device) -> _Plan:
    block_d = _block_d_for(config, dim, dim // groups)
    block_n = triton.next_power_of_2(n_state)
    n_tiles = max(1, triton.cdiv(length, config.block_t))
    n_dblocks = dim // block_d
    # enough programs to fill the GPU, in chunks as long as that allows (fewer chunk states)
    target = config.programs_per_sm * _multiprocessors(device)
    n_sub = max(1, min(config.max_sub, (n_tiles * n_dblocks * batch) // target))
    n_chunks = triton.cdiv(n_tiles, n_sub)
    # the backward keeps a start state per segment of seg_len sub-tiles, and per sub-tile of
    # one segment: about 2 sqrt(n_sub) states per program instead of n_sub
    seg_len = math.isqrt(n_sub - 1) + 1 if n_sub > 1 else 1
    n_seg = triton.cdiv(n_sub, seg_len)
    return _Plan(batch, dim, length, n_state, groups, block_d, block_n, config.block_t, n_sub, n_chunks,
                 n_dblocks, seg_len, n_seg)


def _multiprocessors(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def scan_fwd(u, delta, A, B4, C4, D, z, delta_bias, initial_state, delta_softplus, reverse, config):
    """u, delta, z (b, d, L) with unit stride along L; A (d, N) float32; B4, C4 (b, g, N, L).
    Returns out (b, d, L) in u's dtype, chunk end states (b, nc, d, N) float32, delta sums
    (b, nc, d) float32, and the plan."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    plan = _plan(batch, dim, length, n_state, B4.shape[1], config, u.device)
    f32 = dict(dtype=torch.float32, device=u.device)
    # chunk end states: first from a zero start, then, in place, from the true start
    hend = torch.empty(batch, plan.n_chunks, dim, n_state, **f32)
    dsum = torch.empty(batch, plan.n_chunks, dim, **f32)
    out = torch.empty(batch, dim, length, dtype=u.dtype, device=u.device)
    if length == 0:
        return out, hend, dsum, plan
    grid = (plan.n_chunks, plan.n_dblocks, batch)
    flags = dict(HAS_DBIAS=delta_bias is not None, SOFTPLUS=delta_softplus, REVERSE=reverse)
    launcher(_chunk_state_fwd_kernel)[grid](
        u, delta, A, B4, delta_bias if delta_bias is not None else A, hend, dsum,
        length, dim, n_state, dim // plan.groups, plan.n_sub, plan.n_chunks,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B4.stride(0), B4.stride(1), B4.stride(2),
        BD=plan.block_d, BN=plan.block_n, BT=plan.block_t, num_warps=config.num_warps, **flags)
    _launch_carry(dsum, hend, A, initial_state, plan, config, reverse_chunks=False)
    launcher(_scan_fwd_kernel)[grid](
        u, delta, A, B4, C4, D if D is not None else A, z if z is not None else u,
        delta_bias if delta_bias is not None else A, initial_state if initial_state is not None else A,
        hend, out,
        length, dim, n_state, dim // plan.groups, plan.n_sub, plan.n_chunks,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B4.stride(0), B4.stride(1), B4.stride(2),
        C4.stride(0), C4.stride(1), C4.stride(2),
        z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
        out.stride(0), out.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=initial_state is not None,
        BD=plan.block_d, BN=plan.block_n, BT=plan.block_t, num_warps=config.num_warps, **flags)
    return out, hend, dsum, plan


def _launch_carry(dsum, states, A, init, plan: _Plan, config: ScanConfig, reverse_chunks: bool):
    """Chunk-local states -> true chunk states, in place."""
    carry_bd = config.carry_block_d
    while plan.dim % carry_bd:
        carry_bd //= 2
    grid = (plan.dim // carry_bd, plan.batch)
    launcher(_chunk_carry_kernel)[grid](
        dsum, states, A, init if init is not None else A, states,
        plan.n_chunks, plan.dim, plan.n_state,
        HAS_INIT=init is not None, REVERSE=reverse_chunks,
        BC=config.block_c, BD=carry_bd, BN=plan.block_n, num_warps=config.num_warps)


def scan_bwd(dout, dlast, u, delta, A, B4, C4, D, z, delta_bias, initial_state, hend, dsum,
             delta_softplus, reverse, config, plan: _Plan, need_dh0=True):
    """Gradients for u, delta, A, B4, C4, D, z, delta_bias and, with need_dh0, initial_state
    (None without; float32 for A, D, delta_bias, initial_state; the inputs' dtypes otherwise)."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = B4.shape[1]
    f32 = dict(dtype=torch.float32, device=u.device)
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    ddelta = torch.empty(delta.shape, dtype=delta.dtype, device=u.device)
    dz = torch.empty(z.shape, dtype=z.dtype, device=u.device) if z is not None else None
    dA = torch.zeros(dim, n_state, **f32)
    dB = torch.zeros(batch, groups, n_state, length, **f32)
    dC = torch.zeros(batch, groups, n_state, length, **f32)
    dD = torch.zeros(dim, **f32) if D is not None else None
    ddbias = torch.zeros(dim, **f32) if delta_bias is not None else None
    # adjoint at each chunk's start: first from a zero right carry, then, in place, the true one
    gcarry = torch.empty(batch, plan.n_chunks, dim, n_state, **f32)
    if length == 0:
        dh0 = None
        if need_dh0:
            dh0 = torch.zeros(batch, dim, n_state, **f32) if dlast is None else dlast.float().clone()
        return du, ddelta, dA, dB, dC, dD, dz, ddbias, dh0
    flags = dict(HAS_DBIAS=delta_bias is not None, SOFTPLUS=delta_softplus, REVERSE=reverse)
    grid = (plan.n_chunks, plan.n_dblocks, batch)
    zz = z if z is not None else dout
    launcher(_chunk_adjoint_kernel)[grid](
        dout, zz, delta, A, C4, delta_bias if delta_bias is not None else A, gcarry,
        length, dim, n_state, dim // groups, plan.n_sub, plan.n_chunks,
        dout.stride(0), dout.stride(1), zz.stride(0), zz.stride(1), delta.stride(0), delta.stride(1),
        C4.stride(0), C4.stride(1), C4.stride(2),
        HAS_Z=z is not None, BD=plan.block_d, BN=plan.block_n, BT=plan.block_t,
        num_warps=config.num_warps, **flags)
    _launch_carry(dsum, gcarry, A, dlast, plan, config, reverse_chunks=True)

    n_items = plan.n_chunks * plan.n_dblocks * batch
    n_programs = min(n_items, config.bwd_programs_per_sm * _multiprocessors(u.device))
    scratch = torch.empty(n_programs, plan.n_seg + plan.seg_len, plan.block_n, plan.block_d, **f32)
    dzz = dz if dz is not None else du
    launcher(_scan_bwd_kernel)[(n_programs,)](
        u, delta, A, B4, C4, D if D is not None else A, zz, delta_bias if delta_bias is not None else A, dout,
        initial_state if initial_state is not None else A, hend, gcarry, dlast if dlast is not None else A,
        scratch, du, ddelta, dzz, dA, dB, dC, dD if dD is not None else dA, ddbias if ddbias is not None else dA,
        length, dim, n_state, dim // groups, plan.n_sub, plan.n_chunks, plan.n_dblocks, n_items,
        plan.seg_len, plan.n_seg,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B4.stride(0), B4.stride(1), B4.stride(2),
        C4.stride(0), C4.stride(1), C4.stride(2), zz.stride(0), zz.stride(1), dout.stride(0), dout.stride(1),
        dB.stride(0), dB.stride(1), dB.stride(2), du.stride(0), du.stride(1), ddelta.stride(0), ddelta.stride(1),
        dzz.stride(0), dzz.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=initial_state is not None, HAS_DLAST=dlast is not None,
        BD=plan.block_d, BN=plan.block_n, BT=plan.block_t, num_warps=config.bwd_num_warps, **flags)
    # the adjoint that leaves the first chunk: d loss / d initial_state
    dh0 = gcarry[:, 0].clone() if need_dh0 else None
    return du, ddelta, dA, dB, dC, dD, dz, ddbias, dh0


# ---------------------------------------------------------------------------------------------
# autograd


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, config, need_last):
    """The forward on inputs laid out for the kernels: (KernelInputs, out, last state or None,
    chunk end states, delta sums, plan)."""
    x = kernel_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, same_bc_strides=False)
    out, hend, dsum, plan = scan_fwd(x.u, x.delta, x.A, x.B, x.C, x.D, x.z, x.delta_bias, x.initial_state,
                                     delta_softplus, reverse, config)
    return x, out, last_state(hend, x, A.shape[1]) if need_last else None, hend, dsum, plan


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, config,
                need_last):
        x, out, last, hend, dsum, plan = _scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                                       delta_softplus, reverse, config, need_last)
        ctx.save_for_backward(x.u, x.delta, x.A, x.B, x.C, x.D, x.z, x.delta_bias, x.initial_state, hend, dsum)
        ctx.set_materialize_grads(False)
        ctx.meta = (delta_softplus, reverse, config, plan, x.squeeze_B, x.squeeze_C,
                    B.dtype, C.dtype, A.dtype, None if D is None else D.dtype,
                    None if delta_bias is None else delta_bias.dtype,
                    None if initial_state is None else initial_state.dtype)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B4, C4, D, z, bias, h0, hend, dsum = ctx.saved_tensors
        (delta_softplus, reverse, config, plan, squeeze_B, squeeze_C,
         B_dtype, C_dtype, A_dtype, D_dtype, bias_dtype, h0_dtype) = ctx.meta
        dout = torch.zeros_like(u) if dout is None else unit_stride(dout)
        dlast = dlast.float().contiguous() if dlast is not None else None
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = scan_bwd(
            dout, dlast, u, delta, A, B4, C4, D, z, bias, h0, hend, dsum, delta_softplus, reverse, config, plan,
            need_dh0=ctx.needs_input_grad[8])
        dB = dB.to(B_dtype)
        dC = dC.to(C_dtype)
        return (du, ddelta, dA.to(A_dtype), dB.squeeze(1) if squeeze_B else dB, dC.squeeze(1) if squeeze_C else dC,
                dD.to(D_dtype) if dD is not None else None, dz,
                dbias.to(bias_dtype) if dbias is not None else None,
                dh0.to(h0_dtype) if dh0 is not None else None,
                None, None, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          reverse=False, initial_state=None, return_last_state=False, config=None):
    """The Triton selective scan with autograd; see ``selective_scan`` for the arguments.
    ``config`` overrides the tile sizes (a ScanConfig)."""
    if config is None:
        config = default_config(A.shape[1], INTERPRETED)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if needs_autograd(inputs):
        out, last = SelectiveScanFn.apply(*inputs, delta_softplus, reverse, config, return_last_state)
    else:
        # nothing to differentiate (inference): the kernels without autograd's bookkeeping
        _, out, last, _, _, _ = _scan_forward(*inputs, delta_softplus, reverse, config, return_last_state)
    return (out, last) if return_last_state else out


# True when this copy of the module was loaded under TRITON_INTERPRET=1 (the CPU interpreter)
INTERPRETED = isinstance(_scan_fwd_kernel, InterpretedFunction)
