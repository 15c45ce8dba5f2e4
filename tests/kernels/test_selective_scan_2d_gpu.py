"""2D selective scan on a CUDA GPU at real sizes: the compiled Triton kernels against the float64
reference (run on the GPU too) on every output and gradient. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close_named, case_id

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
# Relative error ||out - ref|| / ||ref|| against float64, per tensor: the 1D scan's bounds.
NAMES = ("y",) + tuple(f"d{n}" for n in INPUT_NAMES)
TOL = {
    torch.float32: dict.fromkeys(NAMES, 1e-5),
    torch.bfloat16: dict.fromkeys(NAMES, 1e-2),
    torch.float64: dict.fromkeys(NAMES, 1e-10),
}


def _tiled():
    from mambapath.kernels.selective_scan_2d import triton_module

    return triton_module(False)


def make_inputs(batch, dim, height, width, n_state, dtype=torch.float32, seed=0, full=True):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float64)

    param = torch.float64 if dtype == torch.float64 else torch.float32  # A, D, delta_bias
    tensors = {
        "u": rnd(batch, dim, height, width),
        # softplus(delta + bias) lands in about (0.05, 1.5), Mamba's usual range of steps
        "delta": rnd(batch, dim, height, width) * 0.5 - 1.5,
        "A": -torch.exp(rnd(dim, n_state) * 0.5),
        "B": rnd(batch, n_state, height, width),
        "C": rnd(batch, n_state, height, width),
        "D": rnd(dim) if full else None,
        "z": rnd(batch, dim, height, width) if full else None,
        "delta_bias": rnd(dim) * 0.3 if full else None,
    }
    return {k: (v.to(param if k in ("A", "D", "delta_bias") else dtype) if v is not None else None)
            for k, v in tensors.items()}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_with_grads(fn, inputs, dout, softplus=True):
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    y = fn(**leaves, delta_softplus=softplus)
    y.backward(dout.to(y.dtype))
    return {"y": y.detach(), **{f"d{k}": v.grad for k, v in leaves.items() if v is not None}}


def check(inputs, dtype, fn, softplus=True):
    from mambapath.kernels import selective_scan_2d_ref

    ref_inputs = {k: (v.double() if v is not None else None) for k, v in inputs.items()}
    dout = torch.randn(inputs["u"].shape, device="cuda", dtype=torch.float64,
                       generator=torch.Generator(device="cuda").manual_seed(7))
    expected = run_with_grads(selective_scan_2d_ref, ref_inputs, dout, softplus)
    # the first call launches through Triton, the second through the kept compiled kernels
    for launch in ("first call", "second call"):
        got = run_with_grads(fn, inputs, dout, softplus)
        assert got["y"].dtype == dtype
        assert_close_named(got, expected, TOL[dtype], f"triton ({launch}) vs float64 reference")
    # inference (no gradient needed): the forward kernels alone, without checkpoints or autograd
    with torch.no_grad():
        y = fn(**inputs, delta_softplus=softplus)
    assert_close_named({"y": y}, {"y": expected["y"]}, TOL[dtype], "triton inference forward vs float64 reference")


CASES = [
    # (batch, dim, H, W, N), dtype
    ((1, 64, 64, 64, 16), torch.float32),
    ((2, 30, 100, 77, 16), torch.float32),  # no side (nor dim) a multiple of a tile
    ((1, 128, 128, 128, 16), torch.float32),
    ((1, 16, 1, 1000, 16), torch.float32),  # one row
    ((1, 16, 1000, 1, 16), torch.float32),  # one column
    ((1, 8, 33, 257, 5), torch.float32),  # N not a power of two
    ((1, 64, 64, 64, 16), torch.bfloat16),
    ((1, 16, 48, 40, 16), torch.float64),
]


@pytest.mark.parametrize("case", CASES, ids=[case_id(B=s[0], D=s[1], H=s[2], W=s[3], N=s[4])
                                             + "-" + str(t).removeprefix("torch.") for s, t in CASES])
def test_triton_matches_reference(case, poison_empty):
    from mambapath.kernels import selective_scan_2d

    shape, dtype = case
    inputs = make_inputs(*shape, dtype=dtype, seed=sum(shape))
    check(inputs, dtype, lambda **kw: selective_scan_2d(**kw, backend="auto"))


def test_bare_scan_without_gate_skip_or_bias(poison_empty):
    from mambapath.kernels import selective_scan_2d

    inputs = make_inputs(2, 32, 70, 90, 16, full=False, seed=3)
    inputs["delta"] = inputs["delta"].abs() * 0.3
    check(inputs, torch.float32, lambda **kw: selective_scan_2d(**kw, backend="triton"), softplus=False)


@pytest.mark.parametrize("config", [
    dict(CW=8, CH=4, carry_cols=32, fwd_cols=32, bwd_maxnreg=168, carry_maxnreg=None),
    dict(CW=2, CH=16, carry_cols=8, fwd_cols=8, fwd_maxnreg=64),
    dict(CW=2, CH=2, carry_cols=4, fwd_cols=4),
], ids=["wide", "tall", "tiny"])
def test_other_tile_configs(config, poison_empty):
    tiled = _tiled()
    cfg = tiled.TileConfig(**config)
    inputs = make_inputs(1, 16, 45, 37, 16, seed=5)
    check(inputs, torch.float32, lambda **kw: tiled.selective_scan_2d_triton(**kw, config=cfg))


def test_one_row_grid_equals_the_1d_scan():
    from mambapath.kernels import selective_scan, selective_scan_2d

    inputs = make_inputs(1, 64, 1, 4096, 16, seed=11)
    y_2d = selective_scan_2d(**inputs, delta_softplus=True)
    flat = {k: (v.reshape(*v.shape[:2], -1) if v is not None and v.dim() == 4 else v) for k, v in inputs.items()}
    y_1d = selective_scan(**{k: v.double() if v is not None else None for k, v in flat.items()},
                          delta_softplus=True, backend="reference")
    assert rel_err(y_2d.reshape(y_1d.shape), y_1d) < 1e-5


def test_repeated_runs_agree():
    """Programs never depend on each other within a launch; only the atomic sums of dB and dC
    may differ, by rounding."""
    from mambapath.kernels import selective_scan_2d

    inputs = make_inputs(1, 64, 96, 96, 16, seed=13)
    dout = torch.randn_like(inputs["u"])
    first = run_with_grads(lambda **kw: selective_scan_2d(**kw), inputs, dout)
    second = run_with_grads(lambda **kw: selective_scan_2d(**kw), inputs, dout)
    for name in ("y", "du", "ddelta", "dz", "dA", "dD", "ddelta_bias"):
        assert torch.equal(first[name], second[name]), name
    for name in ("dB", "dC"):
        assert rel_err(first[name], second[name]) < 1e-6, name


def test_memory_holds_no_state_sized_tensor():
    """Forward and backward together stay far below one (batch, dim, H, W, N) float32 tensor."""
    from mambapath.kernels import selective_scan_2d

    inputs = make_inputs(1, 128, 256, 256, 16, seed=17)
    leaves = {k: v.requires_grad_(True) for k, v in inputs.items()}
    dout = torch.randn_like(inputs["u"])
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    selective_scan_2d(**leaves, delta_softplus=True).backward(dout)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    u_bytes = inputs["u"].numel() * 4
    state_bytes = u_bytes * 16
    # expected about 9 x u: y, the gradients of u, delta and z, the row carries (N/16 x u with
    # carries every 16 columns), the column checkpoints and the column adjoints (N/8 x u each,
    # every 8 rows); one state tensor is 16 x u
    assert extra < 0.6 * state_bytes, f"peak {extra / 2**20:.0f} MiB over the inputs ({extra / u_bytes:.1f} x u); " \
                                      f"one state tensor is {state_bytes / 2**20:.0f} MiB"
