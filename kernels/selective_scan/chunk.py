"""Selective scan in Triton: a chunked parallel scan, forward and backward.

The maths (chunk summaries, the carries between chunks, the adjoint recurrence and every
gradient) is in README.md beside this file; the kernels keep shape comments only.

Layout: the sequence is cut into chunks of ``n_sub`` sub-tiles of ``BT`` positions (BT = 2 or 4).
One program owns (batch b, BD channels, one chunk). Its state is a (BN, BD) tile: every state
of a channel in one thread's registers, the channels on the lanes (and warps) of the program.
A sub-tile's inputs are loaded as (BD, BT) tiles (B and C as one such tile per state, the same
values for every channel), BT positions per vector load, and split into per-position columns
in registers; the recurrence then advances one position at a time, h = exp(delta A) h +
delta B u, so the sums over states (y, and in the backward du and ddelta) never leave a thread.
Suited to N <= 16; for more states the package runs chunk_many_states.py.

Forward, three launches:
  1. ``_scan_fwd_kernel`` with STATE_ONLY: per chunk, the end state from a zero start and the
     sum of delta.
  2. ``_chunk_carry_kernel``: per (b, channel block), a scan over chunks: true chunk end states.
  3. ``_scan_fwd_kernel``: per chunk, the states again from the true start, and the outputs;
     when a gradient will be needed, also the state entering every segment of the backward.
Backward, three launches (states are recomputed, never stored per position):
  1. ``_chunk_adjoint_kernel``: per chunk, the adjoint at the chunk start from a zero right carry.
  2. ``_chunk_carry_kernel`` run from the last chunk to the first: the adjoint entering each chunk.
  3. ``_scan_bwd_kernel``: per chunk, segment by segment from the last, from the segment's start
     state (saved by the forward): the start states of its sub-tiles (kept in a per-program
     scratch), then its sub-tiles from last to first: states, adjoints, gradients.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from mambapath.kernels.launch import launcher
from mambapath.kernels.selective_scan.host import kernel_inputs, last_state, needs_autograd, unit_stride

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@dataclass(frozen=True)
class ScanConfig:
    """Tile sizes. A program owns block_d channels (32 * num_warps puts each on its own thread,
    with all its states) and steps block_t positions (2 or 4) at a time, out_block_t in the
    forward's output pass (None: block_t); the backward has its own bwd_block_d, bwd_block_t and
    bwd_num_warps. A chunk is at most max_sub sub-tiles of the
    forward, at least min_chunk positions (short sequences: fewer, longer chunks cost less than
    many carries), and otherwise short enough to give programs_per_sm forward programs per
    multiprocessor; the backward runs bwd_programs_per_sm persistent programs per
    multiprocessor. The carry kernel
    moves block_c chunks of carry_block_d channels per step. fast_reduce sums dB and dC over a
    warp's channels with a transposing exchange of lanes (compiled kernels only) instead of one
    reduction per value. prefetch_state and prefetch_out load the next sub-tile's inputs
    before the current one is worked on, in the forward's chunk-state and output passes.
    maxnreg, out_maxnreg and bwd_maxnreg cap the registers per thread of the forward's
    chunk-state pass and the adjoint kernel, of the forward's output pass, and of the gradient
    kernel: more warps per multiprocessor, at the price of spills.
    When a gradient is needed the forward saves the state entering every segment of about
    seg_factor * sqrt(backward sub-tiles per chunk) sub-tiles; the backward recomputes a
    segment's sub-tile start states into its scratch (seg_factor * sqrt of them)."""

    block_d: int = 32
    block_t: int = 4
    out_block_t: int | None = None
    num_warps: int = 1
    bwd_block_d: int = 32
    bwd_block_t: int = 2
    bwd_num_warps: int = 1
    max_sub: int = 512
    min_chunk: int = 64
    block_c: int = 32
    carry_block_d: int = 4
    carry_num_warps: int = 4
    programs_per_sm: int = 16
    bwd_programs_per_sm: int = 8
    fast_reduce: bool = True
    prefetch_state: bool = False
    prefetch_out: bool = False
    maxnreg: int | None = None
    out_maxnreg: int | None = None
    bwd_maxnreg: int | None = None
    seg_factor: int = 1


@functools.lru_cache(maxsize=16)
def default_config(n_state: int, interpret: bool) -> ScanConfig:
    """Tile sizes for N states; tiny ones for Triton's interpreter."""
    if interpret:
        # the interpreter runs a program's loop iterations in Python: small tiles, few programs
        return ScanConfig(block_d=8, block_t=4, num_warps=1, bwd_block_d=8, bwd_block_t=4, bwd_num_warps=1,
                          max_sub=4, min_chunk=4, block_c=4, carry_block_d=4, carry_num_warps=1, programs_per_sm=4,
                          bwd_programs_per_sm=4, fast_reduce=False)
    block_n = triton.next_power_of_2(n_state)
    if block_n <= 16:
        # measured on an H100 (benchmarks/tune_selective_scan.py): a register cap of 168 on the
        # chunk-state pass and the adjoint kernel (12 warps per multiprocessor instead of 8) beat
        # no cap and 128; the output pass runs faster uncapped (no spills) than at 168 (spills)
        return ScanConfig(maxnreg=168)
    # correct for any N, but beyond 16 states a thread's registers overflow: selective_scan runs
    # chunk_many_states.py there
    return ScanConfig(block_t=2, bwd_block_t=2, carry_block_d=4)


def _block_d_for(block_d: int, dim: int, dim_per_group: int) -> int:
    """Largest power of two <= block_d that divides the group size, so that every program
    reads a single group of B and C."""
    while dim_per_group % block_d:
        block_d //= 2
    return block_d


# ---------------------------------------------------------------------------------------------
# device helpers
#
# Layouts. The (BN, BD) state tiles keep a channel's states in one thread and put the channels
# on the lanes: every tile that reaches memory is either (BD, BT) (channels by positions,
# positions contiguous: Triton's coalescing puts the positions in a thread's registers and the
# channels on the lanes, in every Triton version) or one (BD,) or (BD, BT) row per state,
# stacked into a tile with joins and reshapes, which only rename registers. A (BN, BD) pointer
# tile has no contiguous dimension, and Triton versions differ in which of the two they then
# spread over the lanes.


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
def _columns(x, BT: tl.constexpr):
    """The BT (2 or 4) columns of a (..., BT) tile, in memory order."""
    if BT == 4:
        a, b = tl.split(tl.reshape(x, x.shape[:-1] + (2, 2)))
        c0, c2 = tl.split(a)
        c1, c3 = tl.split(b)
        cols = (c0, c1, c2, c3)
    else:
        cols = tl.split(x)
    return cols


@triton.jit
def _put(tile, col, j, offs_t):
    """``tile`` (BD, BT) with column j replaced by ``col`` (BD,)."""
    return tl.where(offs_t[None, :] == j, col[:, None], tile)


@triton.jit
def _cat(a, b):
    """The rows of a (R, ...) above those of b: (2R, ...)."""
    if len(a.shape) == 2:
        return tl.reshape(tl.permute(tl.join(a, b), (2, 0, 1)), (2 * a.shape[0], a.shape[1]))
    else:
        return tl.reshape(tl.permute(tl.join(a, b), (3, 0, 1, 2)), (2 * a.shape[0], a.shape[1], a.shape[2]))


@triton.jit
def _stack(rows):
    """A tuple of 2^k tensors of one shape S -> (2^k, *S), row i = rows[i]."""
    level = ()
    for i in tl.static_range(len(rows)):
        level = level + (tl.expand_dims(rows[i], 0),)
    for _ in tl.static_range(8):
        if len(level) > 1:
            pairs = ()
            for j in tl.static_range(len(level) // 2):
                pairs = pairs + (_cat(level[2 * j], level[2 * j + 1]),)
            level = pairs
    return level[0]


@triton.jit
def _halves(x):
    """(2R, ...) -> its first R rows and its last R rows."""
    R: tl.constexpr = x.shape[0] // 2
    if len(x.shape) == 2:
        y = tl.permute(tl.reshape(x, (2, R, x.shape[1])), (1, 2, 0))
    else:
        y = tl.permute(tl.reshape(x, (2, R, x.shape[1], x.shape[2])), (1, 2, 3, 0))
    return tl.split(y)


@triton.jit
def _unstack(x):
    """(2^k, *S) -> a tuple of its 2^k rows, each S."""
    level = (x,)
    for _ in tl.static_range(8):
        if level[0].shape[0] > 1:
            parts = ()
            for j in tl.static_range(len(level)):
                lo, hi = _halves(level[j])
                parts = parts + (lo, hi)
            level = parts
    rows = ()
    for i in tl.static_range(len(level)):
        if len(x.shape) == 2:
            rows = rows + (tl.reshape(level[i], (x.shape[1],)),)
        else:
            rows = rows + (tl.reshape(level[i], (x.shape[1], x.shape[2])),)
    return rows


@triton.jit
def _load_states(base, offs_d, n_state, BN: tl.constexpr, MASK_N: tl.constexpr):
    """(BN, BD) float32 tile of a (..., dim, N) tensor at ``base``: a (BD,) load per state."""
    rows = ()
    for n in tl.static_range(BN):
        if MASK_N:
            row = tl.load(base + offs_d * n_state + n, mask=(offs_d * 0 + n) < n_state, other=0.0)
        else:
            row = tl.load(base + offs_d * n_state + n)
        rows = rows + (row.to(tl.float32),)
    return _stack(rows)


@triton.jit
def _store_states(base, offs_d, n_state, tile, MASK_N: tl.constexpr, ATOMIC: tl.constexpr = False):
    """Store (or with ATOMIC add) a (BN, BD) tile into a (..., dim, N) tensor at ``base``."""
    rows = _unstack(tile)
    for n in tl.static_range(len(rows)):
        ptrs = base + offs_d * n_state + n
        mask = (offs_d * 0 + n) < n_state if MASK_N else None
        if ATOMIC:
            tl.atomic_add(ptrs, rows[n], mask=mask, sem="relaxed")
        else:
            tl.store(ptrs, rows[n], mask=mask)


@triton.jit
def _load_state_rows(base, offs_d, dim, n_state, BN: tl.constexpr, MASK_N: tl.constexpr):
    """(BN, BD) float32 tile of a (..., N, dim) tensor at ``base`` (a state's channels
    contiguous): one coalesced (BD,) load per state."""
    rows = ()
    for n in tl.static_range(BN):
        if MASK_N:
            row = tl.load(base + n * dim + offs_d, mask=(offs_d * 0 + n) < n_state, other=0.0)
        else:
            row = tl.load(base + n * dim + offs_d)
        rows = rows + (row,)
    return _stack(rows)


@triton.jit
def _store_state_rows(base, offs_d, dim, n_state, tile, MASK_N: tl.constexpr):
    """Store a (BN, BD) tile into a (..., N, dim) tensor at ``base``."""
    rows = _unstack(tile)
    for n in tl.static_range(len(rows)):
        mask = (offs_d * 0 + n) < n_state if MASK_N else None
        tl.store(base + n * dim + offs_d, rows[n], mask=mask)


@triton.jit
def _load_scratch(rows_ptr, BN: tl.constexpr):
    """(BN, BD) tile from BN rows of BD floats (a thread's own values: no barrier needed)."""
    BD: tl.constexpr = rows_ptr.shape[0]
    rows = ()
    for n in tl.static_range(BN):
        rows = rows + (tl.load(rows_ptr + n * BD),)
    return _stack(rows)


@triton.jit
def _store_scratch(rows_ptr, tile):
    BD: tl.constexpr = rows_ptr.shape[0]
    rows = _unstack(tile)
    for n in tl.static_range(len(rows)):
        tl.store(rows_ptr + n * BD, rows[n])


@triton.jit
def _load_bc_tile(base, stride_n, p, mask_t, zero_d, n_state, BN: tl.constexpr, MASK_N: tl.constexpr):
    """(BN, BD, BT) float32 tile of B or C at positions p (BT,): a (BD, BT) load per state (BT
    positions a vector load, the same values for every channel), stacked."""
    rows = ()
    for n in tl.static_range(BN):
        mask = mask_t[None, :]
        if MASK_N:
            mask = mask & ((zero_d[:, None] + n) < n_state)
        rows = rows + (tl.load(base + n * stride_n + (p[None, :] + zero_d[:, None]), mask=mask,
                               other=0.0).to(tl.float32),)
    return _stack(rows)


@triton.jit
def _load_bc(base, stride_n, p, mask_t, zero_d, n_state, BN: tl.constexpr, BT: tl.constexpr,
             MASK_N: tl.constexpr):
    """The BT columns, each (BN, BD), of B or C at positions p (BT,)."""
    return _columns(_load_bc_tile(base, stride_n, p, mask_t, zero_d, n_state, BN, MASK_N), BT)


@triton.jit
def _positions(chunk, sub, n_chunks, n_sub, offs_t, REVERSE: tl.constexpr, BT: tl.constexpr):
    """Memory positions (BT,) of sub-tile ``sub`` of chunk ``chunk``, both counted in scan
    order. Chunks and sub-tiles are aligned in memory; a reverse scan walks them from the
    end (and each sub-tile's columns from its last)."""
    if REVERSE:
        return ((n_chunks - 1 - chunk) * n_sub + (n_sub - 1 - sub)) * BT + offs_t
    else:
        return (chunk * n_sub + sub) * BT + offs_t


@triton.jit
def _steps(raw, mask_t, dbias, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(BD, BT) raw delta -> (raw + bias, step delta); positions outside [0, L) get step 0,
    which makes them the identity of the recurrence (decay 1, input 0)."""
    if HAS_DBIAS:
        raw = raw + dbias[:, None]
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    return raw, tl.where(mask_t[None, :], dt, 0.0)


@triton.jit
def _shfl_xor(x, lane_mask):
    # the value held by the lane whose id differs from this one's by the bits of lane_mask
    return tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=f,f,r",
                                     [x, lane_mask], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _lane_id(like):
    # the lane of each element's thread (``like`` only gives the shape)
    return tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [like], dtype=tl.int32, is_pure=True,
                                     pack=1)


@triton.jit
def _halve(x, lane, M: tl.constexpr):
    """One step of a transposing sum over the lanes of a warp: x (K, BD), K values per thread.
    Lanes whose id has bit M keep the upper half of the rows and hand the lower half to the
    lane that differs in that bit, the others the reverse; returns the kept rows (K/2, BD),
    summed over the pair. ``lane`` (1, BD): the lane of each column's thread."""
    lo, hi = _halves(x)
    upper = (lane & M) != 0
    keep = tl.where(upper, hi, lo)
    send = tl.where(upper, lo, hi)
    return keep + _shfl_xor(send, tl.full(send.shape, M, tl.int32))


@triton.jit
def _add_state_sums(dB_t, dC_t, dB_base, dC_base, p, L, FAST: tl.constexpr, LANES_D: tl.constexpr):
    """dB[p, n] += sum over the tile's channels of dB_t[n, :] (BN, BD), the same for dC, at one
    position p (nothing when p >= L); dB and dC laid out (L, BN). FAST: inside each warp a
    transposing exchange over the LANES_D lanes that hold different channels (each exchange
    halves the values a thread holds, instead of one exchange per value and level) leaves
    each lane with a share of the sums, each added atomically; the warps of a program add
    theirs separately. Otherwise Triton's reduction and one atomic per state."""
    BN: tl.constexpr = dB_t.shape[0]
    if FAST:
        BD: tl.constexpr = dB_t.shape[1]
        lane = _lane_id(tl.zeros((1, BD), tl.int32))
        x = _cat(dB_t, dC_t)  # (2 BN, BD): the dB rows, then the dC rows
        if LANES_D > 16:
            x = _halve(x, lane, 16)
        if LANES_D > 8:
            x = _halve(x, lane, 8)
        if LANES_D > 4:
            x = _halve(x, lane, 4)
        if LANES_D > 2:
            x = _halve(x, lane, 2)
        if LANES_D > 1:
            x = _halve(x, lane, 1)
        R: tl.constexpr = x.shape[0]
        # row r of lane l now sums row (l mod LANES_D) * R + r of (dB; dC)
        k = (lane & (LANES_D - 1)) * R + tl.arange(0, R)[:, None]
        base = tl.where(k < BN, dB_base, dC_base)
        tl.atomic_add(base + (p * BN + k % BN), x, mask=k * 0 + p < L, sem="relaxed")
    else:
        offs_n = tl.arange(0, BN)
        mask = offs_n * 0 + p < L
        tl.atomic_add(dB_base + (p * BN + offs_n), tl.sum(dB_t, axis=1), mask=mask, sem="relaxed")
        tl.atomic_add(dC_base + (p * BN + offs_n), tl.sum(dC_t, axis=1), mask=mask, sem="relaxed")


# ---------------------------------------------------------------------------------------------
# forward kernels


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dbias_ptr, h0_ptr, hend_ptr, dsum_ptr, out_ptr, seg_ptr,
    L, dim, n_state, dim_per_group, n_sub, n_chunks, seg_pos, n_seg,
    stride_ub, stride_ud, stride_db, stride_dd, stride_Bb, stride_Bg, stride_Bn,
    stride_zb, stride_zd, stride_ob, stride_od,
    STATE_ONLY: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DBIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr, REVERSE: tl.constexpr, MASK_N: tl.constexpr,
    SAVE_SEG: tl.constexpr, PREFETCH: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
    J0: tl.constexpr, J1: tl.constexpr, JS: tl.constexpr,
):
    # STATE_ONLY: the chunk's end state from a zero start (hend) and its sum of delta (dsum).
    # Otherwise: from the true state entering the chunk (h0 or hend of the chunk before), the
    # outputs, and with SAVE_SEG the state entering every segment of seg_pos positions (scan order)
    # for the backward: seg[b, chunk, k] = the state before position k * seg_pos of the chunk.
    # J0, J1, JS: a sub-tile's columns in scan order, static_range(J0, J1, JS).
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_t = tl.arange(0, BT)
    A2 = _load_states(A_ptr, offs_d, n_state, BN, MASK_N) * LOG2E  # (BN, BD)
    dbias = tl.zeros((BD,), tl.float32)
    if HAS_DBIAS:
        dbias = tl.load(dbias_ptr + offs_d).to(tl.float32)
    Dv = tl.zeros((BD,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d).to(tl.float32)
    group = (pid_d * BD) // dim_per_group
    u_rows = u_ptr + pid_b * stride_ub + offs_d[:, None] * stride_ud  # (BD, 1)
    delta_rows = delta_ptr + pid_b * stride_db + offs_d[:, None] * stride_dd
    z_rows = z_ptr + pid_b * stride_zb + offs_d[:, None] * stride_zd
    out_rows = out_ptr + pid_b * stride_ob + offs_d[:, None] * stride_od
    # B and C have the same strides
    B_base = B_ptr + pid_b * stride_Bb + group * stride_Bg
    C_base = C_ptr + pid_b * stride_Bb + group * stride_Bg
    zero_d = offs_d * 0

    if STATE_ONLY:
        h = tl.zeros((BN, BD), tl.float32)
        dsum = tl.zeros((BD,), tl.float32)
    elif pid_c == 0:
        if HAS_H0:
            h = _load_states(h0_ptr + pid_b * dim * n_state, offs_d, n_state, BN, MASK_N)
        else:
            h = tl.zeros((BN, BD), tl.float32)
    else:
        h = _load_states(hend_ptr + (pid_b * n_chunks + pid_c - 1) * dim * n_state, offs_d, n_state, BN, MASK_N)
    # PREFETCH: the next sub-tile's inputs are loaded before the current one is worked on
    p_n = _positions(pid_c, 0, n_chunks, n_sub, offs_t, REVERSE, BT)  # (BT,)
    mask_n_t = p_n < L
    if PREFETCH:
        raw_n = tl.load(delta_rows + p_n[None, :], mask=mask_n_t[None, :], other=0.0).to(tl.float32)
        u_n = tl.load(u_rows + p_n[None, :], mask=mask_n_t[None, :], other=0.0).to(tl.float32)
        B_n = _load_bc_tile(B_base, stride_Bn, p_n, mask_n_t, zero_d, n_state, BN, MASK_N)
        if not STATE_ONLY:
            C_n = _load_bc_tile(C_base, stride_Bn, p_n, mask_n_t, zero_d, n_state, BN, MASK_N)
    for s in range(0, n_sub):
        if SAVE_SEG:
            if (s * BT) % seg_pos == 0:
                _store_state_rows(seg_ptr + ((pid_b * n_chunks + pid_c) * n_seg + (s * BT) // seg_pos) * dim * n_state,
                                  offs_d, dim, n_state, h, MASK_N)
        p = p_n
        mask_t = mask_n_t
        mask_dt = mask_t[None, :]
        p_n = _positions(pid_c, s + 1, n_chunks, n_sub, offs_t, REVERSE, BT)
        mask_n_t = (p_n < L) & (p_n * 0 + s + 1 < n_sub)
        if PREFETCH:
            raw_c, u, B_t = raw_n, u_n, B_n
            if not STATE_ONLY:
                C_t = C_n
            raw_n = tl.load(delta_rows + p_n[None, :], mask=mask_n_t[None, :], other=0.0).to(tl.float32)
            u_n = tl.load(u_rows + p_n[None, :], mask=mask_n_t[None, :], other=0.0).to(tl.float32)
            B_n = _load_bc_tile(B_base, stride_Bn, p_n, mask_n_t, zero_d, n_state, BN, MASK_N)
            if not STATE_ONLY:
                C_n = _load_bc_tile(C_base, stride_Bn, p_n, mask_n_t, zero_d, n_state, BN, MASK_N)
        else:
            raw_c = tl.load(delta_rows + p[None, :], mask=mask_dt, other=0.0).to(tl.float32)
            u = tl.load(u_rows + p[None, :], mask=mask_dt, other=0.0).to(tl.float32)
            B_t = _load_bc_tile(B_base, stride_Bn, p, mask_t, zero_d, n_state, BN, MASK_N)
            if not STATE_ONLY:
                C_t = _load_bc_tile(C_base, stride_Bn, p, mask_t, zero_d, n_state, BN, MASK_N)
        raw, dt = _steps(raw_c, mask_t, dbias, HAS_DBIAS, SOFTPLUS)  # (BD, BT)
        dts = _columns(dt, BT)
        xs = _columns(dt * u, BT)
        Bs = _columns(B_t, BT)  # BT x (BN, BD)
        if STATE_ONLY:
            for j in tl.static_range(J0, J1, JS):
                h = tl.exp2(dts[j][None, :] * A2) * h + xs[j][None, :] * Bs[j]
            dsum += tl.sum(dt, axis=1)
        else:
            Cs = _columns(C_t, BT)
            y = tl.zeros((BD, BT), tl.float32)
            for j in tl.static_range(J0, J1, JS):
                h = tl.exp2(dts[j][None, :] * A2) * h + xs[j][None, :] * Bs[j]
                y = _put(y, tl.sum(h * Cs[j], axis=0), j, offs_t)
            if HAS_D:
                y += Dv[:, None] * u
            if HAS_Z:
                z = tl.load(z_rows + p[None, :], mask=mask_dt, other=0.0).to(tl.float32)
                y = y * z * tl.sigmoid(z)
            tl.store(out_rows + p[None, :], y.to(out_ptr.dtype.element_ty), mask=mask_dt)
    if STATE_ONLY:
        row = pid_b * n_chunks + pid_c
        _store_states(hend_ptr + row * dim * n_state, offs_d, n_state, h, MASK_N)
        tl.store(dsum_ptr + row * dim + offs_d, dsum)


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


# ---------------------------------------------------------------------------------------------
# backward kernels


@triton.jit
def _chunk_adjoint_kernel(
    dout_ptr, z_ptr, delta_ptr, A_ptr, C_ptr, dbias_ptr, gloc_ptr,
    L, dim, n_state, dim_per_group, n_sub, n_chunks,
    stride_ob, stride_od, stride_zb, stride_zd, stride_db, stride_dd, stride_Cb, stride_Cg, stride_Cn,
    HAS_Z: tl.constexpr, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    MASK_N: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
    J0: tl.constexpr, J1: tl.constexpr, JS: tl.constexpr,
):
    # the adjoint leaving the chunk's start with no carry from the right:
    # sum_t P_t C_t dy_t, P_t the product of the decays from the chunk start to t inclusive
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_t = tl.arange(0, BT)
    A2 = _load_states(A_ptr, offs_d, n_state, BN, MASK_N) * LOG2E  # (BN, BD)
    dbias = tl.zeros((BD,), tl.float32)
    if HAS_DBIAS:
        dbias = tl.load(dbias_ptr + offs_d).to(tl.float32)
    group = (pid_d * BD) // dim_per_group
    dout_rows = dout_ptr + pid_b * stride_ob + offs_d[:, None] * stride_od
    z_rows = z_ptr + pid_b * stride_zb + offs_d[:, None] * stride_zd
    delta_rows = delta_ptr + pid_b * stride_db + offs_d[:, None] * stride_dd
    C_base = C_ptr + pid_b * stride_Cb + group * stride_Cg
    zero_d = offs_d * 0

    g = tl.zeros((BN, BD), tl.float32)
    P = tl.full((BN, BD), 1.0, tl.float32)
    for s in range(0, n_sub):
        p = _positions(pid_c, s, n_chunks, n_sub, offs_t, REVERSE, BT)
        mask_t = p < L
        mask_dt = mask_t[None, :]
        _, dt = _steps(tl.load(delta_rows + p[None, :], mask=mask_dt, other=0.0).to(tl.float32), mask_t,
                       dbias, HAS_DBIAS, SOFTPLUS)
        dy = tl.load(dout_rows + p[None, :], mask=mask_dt, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_rows + p[None, :], mask=mask_dt, other=0.0).to(tl.float32)
            dy = dy * z * tl.sigmoid(z)
        dts = _columns(dt, BT)
        dys = _columns(dy, BT)
        Cs = _load_bc(C_base, stride_Cn, p, mask_t, zero_d, n_state, BN, BT, MASK_N)
        for j in tl.static_range(J0, J1, JS):
            P = P * tl.exp2(dts[j][None, :] * A2)
            g += P * (Cs[j] * dys[j][None, :])
    _store_states(gloc_ptr + (pid_b * n_chunks + pid_c) * dim * n_state, offs_d, n_state, g, MASK_N)


@triton.jit(do_not_specialize=["stride_scratch"])
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dbias_ptr, dout_ptr,
    seg_ptr, gcarry_ptr, dlast_ptr, scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, ddbias_ptr,
    L, dim, n_state, dim_per_group, n_sub, n_chunks, n_dblocks, n_items, seg_len, n_seg, stride_scratch,
    stride_ub, stride_ud, stride_db, stride_dd, stride_Bb, stride_Bg, stride_Bn,
    stride_zb, stride_zd, stride_ob, stride_od,
    stride_gb, stride_gg, stride_dub, stride_dud, stride_ddb, stride_ddd, stride_dzb, stride_dzd,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DBIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, REVERSE: tl.constexpr, MASK_N: tl.constexpr,
    FAST_REDUCE: tl.constexpr, LANES_D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr,
    J0: tl.constexpr, J1: tl.constexpr, JS: tl.constexpr,
):
    # Persistent: each program takes items pid, pid + n_programs, ... (an item is a chunk of a
    # channel block). The state entering every segment of seg_len sub-tiles comes from the
    # forward (seg, (batch, n_chunks, n_seg, N, dim)); the program's scratch holds seg_len states
    # of BN rows of BD: the start states of the sub-tiles of the segment at hand.
    # stride_scratch (1 at run time, unspecialised) keeps Triton from vectorising the rows, so
    # that a thread reads back the values it wrote.
    pid = tl.program_id(0)
    offs_dl = tl.arange(0, BD)
    offs_t = tl.arange(0, BT)
    scratch_rows = scratch_ptr + pid.to(tl.int64) * seg_len * BN * BD + offs_dl * stride_scratch  # (BD,)
    for item in range(pid, n_items, tl.num_programs(0)):
        pid_c = item % n_chunks
        pid_d = (item // n_chunks) % n_dblocks
        pid_b = (item // (n_chunks * n_dblocks)).to(tl.int64)
        offs_d = pid_d * BD + offs_dl
        A2 = _load_states(A_ptr, offs_d, n_state, BN, MASK_N) * LOG2E  # (BN, BD)
        dbias = tl.zeros((BD,), tl.float32)
        if HAS_DBIAS:
            dbias = tl.load(dbias_ptr + offs_d).to(tl.float32)
        Dv = tl.zeros((BD,), tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + offs_d).to(tl.float32)
        group = (pid_d * BD) // dim_per_group
        u_rows = u_ptr + pid_b * stride_ub + offs_d[:, None] * stride_ud  # (BD, 1)
        delta_rows = delta_ptr + pid_b * stride_db + offs_d[:, None] * stride_dd
        z_rows = z_ptr + pid_b * stride_zb + offs_d[:, None] * stride_zd
        dout_rows = dout_ptr + pid_b * stride_ob + offs_d[:, None] * stride_od
        du_rows = du_ptr + pid_b * stride_dub + offs_d[:, None] * stride_dud
        ddelta_rows = ddelta_ptr + pid_b * stride_ddb + offs_d[:, None] * stride_ddd
        dz_rows = dz_ptr + pid_b * stride_dzb + offs_d[:, None] * stride_dzd
        B_base = B_ptr + pid_b * stride_Bb + group * stride_Bg
        C_base = C_ptr + pid_b * stride_Bb + group * stride_Bg
        zero_d = offs_d * 0
        # dB and dC: (batch, groups, L, BN)
        dB_base = dB_ptr + pid_b * stride_gb + group * stride_gg
        dC_base = dC_ptr + pid_b * stride_gb + group * stride_gg

        # segments from last to first; q = a_{t+1} g_{t+1} carries the adjoint leftwards
        if pid_c == n_chunks - 1:
            if HAS_DLAST:
                q = _load_states(dlast_ptr + pid_b * dim * n_state, offs_d, n_state, BN, MASK_N)
            else:
                q = tl.zeros((BN, BD), tl.float32)
        else:
            q = _load_states(gcarry_ptr + (pid_b * n_chunks + pid_c + 1) * dim * n_state, offs_d, n_state, BN,
                             MASK_N)
        dA_acc = tl.zeros((BN, BD), tl.float32)
        dD_acc = tl.zeros((BD,), tl.float32)
        ddbias_acc = tl.zeros((BD,), tl.float32)
        for jseg in range(0, n_seg):
            seg = n_seg - 1 - jseg
            s_first = seg * seg_len
            n_here = tl.minimum(seg_len, n_sub - s_first)
            # start states of the segment's sub-tiles -> scratch slots [0, n_here)
            h = _load_state_rows(seg_ptr + ((pid_b * n_chunks + pid_c) * n_seg + seg) * dim * n_state, offs_d, dim,
                                 n_state, BN, MASK_N)
            for i in range(0, n_here):
                _store_scratch(scratch_rows + i * BN * BD, h)
                p = _positions(pid_c, s_first + i, n_chunks, n_sub, offs_t, REVERSE, BT)
                mask_t = p < L
                _, dt = _steps(tl.load(delta_rows + p[None, :], mask=mask_t[None, :], other=0.0).to(tl.float32),
                               mask_t, dbias, HAS_DBIAS, SOFTPLUS)
                u = tl.load(u_rows + p[None, :], mask=mask_t[None, :], other=0.0).to(tl.float32)
                dts = _columns(dt, BT)
                xs = _columns(dt * u, BT)
                Bs = _load_bc(B_base, stride_Bn, p, mask_t, zero_d, n_state, BN, BT, MASK_N)
                for j in tl.static_range(J0, J1, JS):
                    h = tl.exp2(dts[j][None, :] * A2) * h + xs[j][None, :] * Bs[j]
            tl.debug_barrier()

            # the segment's sub-tiles from last to first
            for k in range(0, n_here):
                i = n_here - 1 - k
                h = _load_scratch(scratch_rows + i * BN * BD, BN)  # state entering the sub-tile
                p = _positions(pid_c, s_first + i, n_chunks, n_sub, offs_t, REVERSE, BT)
                p0 = _positions(pid_c, s_first + i, n_chunks, n_sub, 0, REVERSE, BT)  # its first memory position
                mask_t = p < L
                mask_dt = mask_t[None, :]
                raw, dt = _steps(tl.load(delta_rows + p[None, :], mask=mask_dt, other=0.0).to(tl.float32),
                                 mask_t, dbias, HAS_DBIAS, SOFTPLUS)
                u = tl.load(u_rows + p[None, :], mask=mask_dt, other=0.0).to(tl.float32)
                dout = tl.load(dout_rows + p[None, :], mask=mask_dt, other=0.0).to(tl.float32)
                dts = _columns(dt, BT)
                us = _columns(u, BT)
                xs = _columns(dt * u, BT)
                douts = _columns(dout, BT)
                Bs = _load_bc(B_base, stride_Bn, p, mask_t, zero_d, n_state, BN, BT, MASK_N)
                Cs = _load_bc(C_base, stride_Bn, p, mask_t, zero_d, n_state, BN, BT, MASK_N)
                if HAS_Z:
                    z = tl.load(z_rows + p[None, :], mask=mask_dt, other=0.0).to(tl.float32)
                    zs = _columns(z, BT)
                # forward through the sub-tile, keeping every step's decay a_t, decayed previous
                # state a_t h_{t-1} and inputs, in scan order (tuples indexed by the step)
                decays = ()
                decayed = ()
                dt_s = ()
                u_s = ()
                x_s = ()
                dout_s = ()
                z_s = ()
                B_s = ()
                C_s = ()
                for j in tl.static_range(J0, J1, JS):
                    a = tl.exp2(dts[j][None, :] * A2)
                    ah = a * h
                    h = ah + xs[j][None, :] * Bs[j]
                    decays = decays + (a,)
                    decayed = decayed + (ah,)
                    dt_s = dt_s + (dts[j],)
                    u_s = u_s + (us[j],)
                    x_s = x_s + (xs[j],)
                    dout_s = dout_s + (douts[j],)
                    B_s = B_s + (Bs[j],)
                    C_s = C_s + (Cs[j],)
                    if HAS_Z:
                        z_s = z_s + (zs[j],)
                # backward through it: step kk of the scan is memory column J0 + kk * JS
                du_t = tl.zeros((BD, BT), tl.float32)
                ddt_t = tl.zeros((BD, BT), tl.float32)
                dz_t = tl.zeros((BD, BT), tl.float32)
                for kk in tl.static_range(BT - 1, -1, -1):
                    col = J0 + kk * JS
                    h = decayed[kk] + x_s[kk][None, :] * B_s[kk]  # the state after the step, again
                    if HAS_Z:
                        zj = z_s[kk]
                        y = tl.sum(h * C_s[kk], axis=0) + Dv * u_s[kk]
                        sig = tl.sigmoid(zj)
                        dz_t = _put(dz_t, dout_s[kk] * y * sig * (1.0 + zj * (1.0 - sig)), col, offs_t)
                        dy = dout_s[kk] * zj * sig
                    else:
                        dy = dout_s[kk]
                    g = C_s[kk] * dy[None, :] + q  # (BN, BD): the adjoint of the state at this step
                    dlog = g * decayed[kk]  # d loss / d (delta A)
                    dA_acc += dlog * dt_s[kk][None, :]
                    gB = tl.sum(g * B_s[kk], axis=0)  # (BD,)
                    ddt_t = _put(ddt_t, tl.sum(dlog * A2, axis=0) * LN2 + u_s[kk] * gB, col, offs_t)
                    du = dt_s[kk] * gB
                    if HAS_D:
                        du += Dv * dy
                        dD_acc += dy * u_s[kk]
                    du_t = _put(du_t, du, col, offs_t)
                    _add_state_sums(g * x_s[kk][None, :], h * dy[None, :], dB_base, dC_base, p0 + col, L,
                                    FAST_REDUCE, LANES_D)
                    q = decays[kk] * g
                if SOFTPLUS:
                    ddt_t = ddt_t * tl.sigmoid(raw)
                ddt_t = tl.where(mask_dt, ddt_t, 0.0)
                if HAS_DBIAS:
                    ddbias_acc += tl.sum(ddt_t, axis=1)
                tl.store(du_rows + p[None, :], du_t.to(du_ptr.dtype.element_ty), mask=mask_dt)
                tl.store(ddelta_rows + p[None, :], ddt_t.to(ddelta_ptr.dtype.element_ty), mask=mask_dt)
                if HAS_Z:
                    tl.store(dz_rows + p[None, :], dz_t.to(dz_ptr.dtype.element_ty), mask=mask_dt)
            # the next segment rewrites the sub-tile slots
            tl.debug_barrier()

        _store_states(dA_ptr, offs_d, n_state, dA_acc, MASK_N, ATOMIC=True)
        if HAS_D:
            tl.atomic_add(dD_ptr + offs_d, dD_acc, sem="relaxed")
        if HAS_DBIAS:
            tl.atomic_add(ddbias_ptr + offs_d, ddbias_acc, sem="relaxed")
        # the next chunk of this program rewrites the sub-tile slots
        tl.debug_barrier()


# ---------------------------------------------------------------------------------------------
# launchers


@dataclass(frozen=True)
class _Plan:
    """Launch geometry shared by the forward and the backward of one call. Chunks are
    chunk_len positions, aligned in memory; the forward steps them in n_sub sub-tiles of
    block_t positions (out_n_sub of out_block_t in its output pass), the backward in bwd_n_sub
    sub-tiles of bwd_block_t."""

    batch: int
    dim: int
    length: int
    n_state: int
    groups: int
    block_n: int
    chunk_len: int
    n_chunks: int
    block_d: int
    block_t: int
    n_sub: int
    out_block_t: int
    out_n_sub: int
    bwd_block_d: int
    bwd_block_t: int
    bwd_n_sub: int
    seg_len: int
    n_seg: int


@functools.lru_cache(maxsize=256)
def _plan(batch, dim, length, n_state, groups, config: ScanConfig, device) -> _Plan:
    out_block_t = config.block_t if config.out_block_t is None else config.out_block_t
    for name, value in (("block_t", config.block_t), ("bwd_block_t", config.bwd_block_t), ("out_block_t", out_block_t)):
        if value not in (2, 4):
            raise ValueError(f"ScanConfig.{name} must be 2 or 4, got {value}")
    if config.seg_factor < 1:
        raise ValueError(f"ScanConfig.seg_factor must be at least 1, got {config.seg_factor}")
    dim_per_group = dim // groups
    block_d = _block_d_for(config.block_d, dim, dim_per_group)
    bwd_block_d = _block_d_for(config.bwd_block_d, dim, dim_per_group)
    block_n = max(2, triton.next_power_of_2(n_state))
    # chunks are whole groups of 4 positions (whole sub-tiles of either pass), as long as
    # filling the GPU with programs_per_sm programs per multiprocessor allows
    quads = max(1, triton.cdiv(length, 4))
    target = config.programs_per_sm * _multiprocessors(device)
    per_chunk = max(1, config.min_chunk // 4,
                    min(config.max_sub * config.block_t // 4, (quads * (dim // block_d) * batch) // target))
    chunk_len = 4 * per_chunk
    n_chunks = triton.cdiv(max(length, 1), chunk_len)
    bwd_n_sub = chunk_len // config.bwd_block_t
    # the forward saves the state entering every segment of seg_len backward sub-tiles, and the
    # backward keeps the start state of every sub-tile of one segment: about seg_factor *
    # sqrt(n_sub) states per program, n_sub / that many per chunk. A segment is whole sub-tiles
    # of the output pass (seg_len * bwd_block_t a multiple of out_block_t).
    seg_len = config.seg_factor * (math.isqrt(bwd_n_sub - 1) + 1)
    while (seg_len * config.bwd_block_t) % out_block_t:
        seg_len += 1
    n_seg = triton.cdiv(bwd_n_sub, seg_len)
    return _Plan(batch, dim, length, n_state, groups, block_n, chunk_len, n_chunks, block_d, config.block_t,
                 chunk_len // config.block_t, out_block_t, chunk_len // out_block_t, bwd_block_d,
                 config.bwd_block_t, bwd_n_sub, seg_len, n_seg)


@functools.lru_cache(maxsize=16)
def _multiprocessors(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _launch_options(num_warps: int, maxnreg) -> dict:
    """num_warps, and the register cap where one is set (compiled kernels only)."""
    if maxnreg is None or INTERPRETED:
        return dict(num_warps=num_warps)
    return dict(num_warps=num_warps, maxnreg=maxnreg)


def _column_order(block_t: int, reverse: bool) -> dict:
    """static_range(J0, J1, JS): a sub-tile's columns in scan order."""
    return dict(J0=block_t - 1, J1=-1, JS=-1) if reverse else dict(J0=0, J1=block_t, JS=1)


def scan_fwd(u, delta, A, B4, C4, D, z, delta_bias, initial_state, delta_softplus, reverse, config,
             save_segments=False):
    """u, delta, z (b, d, L) with unit stride along L; A (d, N) float32; B4, C4 (b, g, N, L)
    with unit stride along L and the same strides. Returns out (b, d, L) in u's dtype, chunk
    end states (b, nc, d, N) float32, delta sums (b, nc, d) float32, with save_segments the
    states entering the backward's segments (b, nc, n_seg, N, d) float32 (else None), and the
    plan."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    plan = _plan(batch, dim, length, n_state, B4.shape[1], config, u.device)
    f32 = dict(dtype=torch.float32, device=u.device)
    # chunk end states: first from a zero start, then, in place, from the true start
    hend = torch.empty(batch, plan.n_chunks, dim, n_state, **f32)
    dsum = torch.empty(batch, plan.n_chunks, dim, **f32)
    out = torch.empty(batch, dim, length, dtype=u.dtype, device=u.device)
    seg = torch.empty(batch, plan.n_chunks, plan.n_seg, n_state, dim, **f32) if save_segments else None
    if length == 0:
        return out, hend, dsum, seg, plan
    grid = (plan.n_chunks, dim // plan.block_d, batch)
    common = dict(HAS_DBIAS=delta_bias is not None, SOFTPLUS=delta_softplus, REVERSE=reverse,
                  MASK_N=n_state < plan.block_n, BD=plan.block_d, BN=plan.block_n)
    head = (u, delta, A, B4, C4, D if D is not None else A, z if z is not None else u,
            delta_bias if delta_bias is not None else A, initial_state if initial_state is not None else A,
            hend, dsum, out, seg if seg is not None else hend,
            length, dim, n_state, dim // plan.groups)
    tail = (plan.n_chunks, plan.seg_len * plan.bwd_block_t, plan.n_seg,
            u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B4.stride(0), B4.stride(1), B4.stride(2),
            z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
            out.stride(0), out.stride(1))
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=initial_state is not None)
    launcher(_scan_fwd_kernel)[grid](*head, plan.n_sub, *tail, STATE_ONLY=True, SAVE_SEG=False,
                                     PREFETCH=config.prefetch_state, **{k: False for k in flags}, **common,
                                     BT=plan.block_t, **_column_order(plan.block_t, reverse),
                                     **_launch_options(config.num_warps, config.maxnreg))
    _launch_carry(dsum, hend, A, initial_state, plan, config, reverse_chunks=False)
    launcher(_scan_fwd_kernel)[grid](*head, plan.out_n_sub, *tail, STATE_ONLY=False, SAVE_SEG=save_segments,
                                     PREFETCH=config.prefetch_out, **flags, **common,
                                     BT=plan.out_block_t, **_column_order(plan.out_block_t, reverse),
                                     **_launch_options(config.num_warps, config.out_maxnreg))
    return out, hend, dsum, seg, plan


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
        BC=config.block_c, BD=carry_bd, BN=plan.block_n, num_warps=config.carry_num_warps)


def _fast_reduce(config: ScanConfig, plan: _Plan) -> bool:
    """The lane-exchange sum of dB and dC needs compiled kernels, every lane of a warp on its own
    channel (32 channels or more per warp: Triton's default layout then puts the channels on
    the lanes and the warps; with fewer, lanes would hold copies and add them twice) and at
    least 32 (dB; dC) rows per thread (16 states or more)."""
    return (config.fast_reduce and not INTERPRETED and plan.block_n >= 16
            and plan.bwd_block_d >= 32 * config.bwd_num_warps)


def scan_bwd(dout, dlast, u, delta, A, B4, C4, D, z, delta_bias, seg, dsum, delta_softplus, reverse, config,
             plan: _Plan, need_dh0=True):
    """Gradients for u, delta, A, B, C, D, z, delta_bias and, with need_dh0, initial_state
    (None without; float32 for A, B, C, D, delta_bias, initial_state; the inputs' dtypes
    otherwise); those of B and C laid out (b, g, L, BN), the states side by side (zero-padded
    to BN)."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = B4.shape[1]
    f32 = dict(dtype=torch.float32, device=u.device)
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    ddelta = torch.empty(delta.shape, dtype=delta.dtype, device=u.device)
    dz = torch.empty(z.shape, dtype=z.dtype, device=u.device) if z is not None else None
    # the sums the kernel adds into atomically, zeroed together: dA, dD, ddelta_bias; dB, dC
    sums = torch.zeros(dim * (n_state + 2), **f32)
    dA = sums[:dim * n_state].view(dim, n_state)
    dD = sums[dim * n_state:dim * (n_state + 1)] if D is not None else None
    ddbias = sums[dim * (n_state + 1):] if delta_bias is not None else None
    dB, dC = torch.zeros(2, batch, groups, length, plan.block_n, **f32).unbind(0)
    # adjoint at each chunk's start: first from a zero right carry, then, in place, the true one
    gcarry = torch.empty(batch, plan.n_chunks, dim, n_state, **f32)
    if length == 0:
        dh0 = None
        if need_dh0:
            dh0 = torch.zeros(batch, dim, n_state, **f32) if dlast is None else dlast.float().clone()
        return du, ddelta, dA, dB, dC, dD, dz, ddbias, dh0
    flags = dict(HAS_DBIAS=delta_bias is not None, SOFTPLUS=delta_softplus, REVERSE=reverse,
                 MASK_N=n_state < plan.block_n)
    zz = z if z is not None else dout
    launcher(_chunk_adjoint_kernel)[(plan.n_chunks, dim // plan.block_d, batch)](
        dout, zz, delta, A, C4, delta_bias if delta_bias is not None else A, gcarry,
        length, dim, n_state, dim // groups, plan.n_sub, plan.n_chunks,
        dout.stride(0), dout.stride(1), zz.stride(0), zz.stride(1), delta.stride(0), delta.stride(1),
        C4.stride(0), C4.stride(1), C4.stride(2),
        HAS_Z=z is not None, BD=plan.block_d, BN=plan.block_n, BT=plan.block_t,
        **_launch_options(config.num_warps, config.maxnreg), **_column_order(plan.block_t, reverse), **flags)
    _launch_carry(dsum, gcarry, A, dlast, plan, config, reverse_chunks=True)

    n_dblocks = dim // plan.bwd_block_d
    n_items = plan.n_chunks * n_dblocks * batch
    n_programs = min(n_items, config.bwd_programs_per_sm * _multiprocessors(u.device))
    scratch = torch.empty(n_programs, plan.seg_len, plan.block_n, plan.bwd_block_d, **f32)
    dzz = dz if dz is not None else du
    launcher(_scan_bwd_kernel)[(n_programs,)](
        u, delta, A, B4, C4, D if D is not None else A, zz, delta_bias if delta_bias is not None else A, dout,
        seg, gcarry, dlast if dlast is not None else A,
        scratch, du, ddelta, dzz, dA, dB, dC, dD if dD is not None else dA, ddbias if ddbias is not None else dA,
        length, dim, n_state, dim // groups, plan.bwd_n_sub, plan.n_chunks, n_dblocks, n_items,
        plan.seg_len, plan.n_seg, 1,
        u.stride(0), u.stride(1), delta.stride(0), delta.stride(1), B4.stride(0), B4.stride(1), B4.stride(2),
        zz.stride(0), zz.stride(1), dout.stride(0), dout.stride(1),
        dB.stride(0), dB.stride(1), du.stride(0), du.stride(1), ddelta.stride(0), ddelta.stride(1),
        dzz.stride(0), dzz.stride(1),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_DLAST=dlast is not None,
        FAST_REDUCE=_fast_reduce(config, plan), LANES_D=32,
        BD=plan.bwd_block_d, BN=plan.block_n, BT=plan.bwd_block_t,
        **_launch_options(config.bwd_num_warps, config.bwd_maxnreg),
        **_column_order(plan.bwd_block_t, reverse), **flags)
    # the adjoint that leaves the first chunk: d loss / d initial_state
    dh0 = gcarry[:, 0].clone() if need_dh0 else None
    return du, ddelta, dA, dB, dC, dD, dz, ddbias, dh0


# ---------------------------------------------------------------------------------------------
# autograd


def _scan_forward(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, config, need_last,
                  save_segments):
    """The forward on inputs laid out for the kernels: (KernelInputs, out, last state or None,
    delta sums, segment states or None, plan)."""
    x = kernel_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, same_bc_strides=True)
    out, hend, dsum, seg, plan = scan_fwd(x.u, x.delta, x.A, x.B, x.C, x.D, x.z, x.delta_bias, x.initial_state,
                                          delta_softplus, reverse, config, save_segments=save_segments)
    return x, out, last_state(hend, x, A.shape[1]) if need_last else None, dsum, seg, plan


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, config,
                need_last):
        x, out, last, dsum, seg, plan = _scan_forward(
            u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, config, need_last,
            save_segments=any(ctx.needs_input_grad))
        ctx.save_for_backward(x.u, x.delta, x.A, x.B, x.C, x.D, x.z, x.delta_bias, seg, dsum)
        ctx.set_materialize_grads(False)
        ctx.meta = (delta_softplus, reverse, config, plan, x.squeeze_B, x.squeeze_C,
                    B.dtype, C.dtype, A.dtype, None if D is None else D.dtype,
                    None if delta_bias is None else delta_bias.dtype,
                    None if initial_state is None else initial_state.dtype)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B4, C4, D, z, bias, seg, dsum = ctx.saved_tensors
        (delta_softplus, reverse, config, plan, squeeze_B, squeeze_C,
         B_dtype, C_dtype, A_dtype, D_dtype, bias_dtype, h0_dtype) = ctx.meta
        dout = torch.zeros_like(u) if dout is None else unit_stride(dout)
        dlast = dlast.float().contiguous() if dlast is not None else None
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = scan_bwd(
            dout, dlast, u, delta, A, B4, C4, D, z, bias, seg, dsum, delta_softplus, reverse, config, plan,
            need_dh0=ctx.needs_input_grad[8])
        n_state = A.shape[1]
        # (b, g, N, L) views of the (b, g, L, BN) sums, not copied: autograd lays out a leaf's
        # gradient like the leaf, and in a layer B and C are themselves transposed projections
        dB = dB[..., :n_state].transpose(-1, -2).to(B_dtype)
        dC = dC[..., :n_state].transpose(-1, -2).to(C_dtype)
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
        _, out, last, _, _, _ = _scan_forward(*inputs, delta_softplus, reverse, config, return_last_state,
                                              save_segments=False)
    return (out, last) if return_last_state else out


# True when this copy of the module was loaded under TRITON_INTERPRET=1 (the CPU interpreter)
INTERPRETED = isinstance(_scan_fwd_kernel, InterpretedFunction)
