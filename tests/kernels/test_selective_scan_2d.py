"""2D selective scan on the CPU: the reference and the Triton kernels (in Triton's interpreter,
at tiny sizes) against a plain float64 per-position loop, on the output and every gradient; a
grid of one row or one column against the 1D scan; the backend switch.

The loop below is the independent ground truth: the recurrence transcribed one grid position at
a time (vectorised over batch, channels and states only), differentiated by autograd in float64.
Small tile configurations make even these grids span several tiles in both directions, so every
carry between tiles is exercised.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from mambapath.kernels import selective_scan, selective_scan_2d, selective_scan_2d_ref
from mambapath.kernels.selective_scan import interpreter_active
from mambapath.kernels.selective_scan_2d import resolve_backend_2d, triton_module

from conftest import assert_close_named, case_id, float64_leaves, leaves, needs_interpreter

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

# float32 kernels against float64: the 1D scan's bound; float64 against float64: rounding only
TOL_FP32 = {name: 1e-5 for name in ("y",) + tuple(f"d{n}" for n in INPUT_NAMES)}
TOL_FP64 = {name: 1e-10 for name in TOL_FP32}


def scan_loop_2d(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence one grid position at a time, row-major, in float64: g[i, j] needs g[i, j-1]
    (this row, already done) and h[i, j] needs h[i-1, j] (the row above, already done)."""
    u, delta, A, B, C = (t.to(torch.float64) for t in (u, delta, A, B, C))
    batch, dim, height, width = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.to(torch.float64)[None, :, None, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h_above = [torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)] * width
    rows = []
    for i in range(height):
        g = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
        row = []
        for j in range(width):
            a = torch.exp(delta[:, :, i, j, None] * A)  # (batch, dim, N)
            g = a * g + (delta[:, :, i, j] * u[:, :, i, j])[:, :, None] * B[:, None, :, i, j]
            h_above[j] = a * h_above[j] + g
            row.append((h_above[j] * C[:, None, :, i, j]).sum(-1))  # (batch, dim)
        rows.append(torch.stack(row, dim=-1))
    y = torch.stack(rows, dim=-2)  # (batch, dim, H, W)
    if D is not None:
        y = y + D.to(torch.float64)[None, :, None, None] * u
    if z is not None:
        y = y * F.silu(z.to(torch.float64))
    return y


def make_inputs(batch, dim, height, width, n_state, full=True, dtype=torch.float32, seed=0, softplus=True):
    """Random inputs like a 2D Mamba layer's; without softplus the steps are given positive."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dt)

    grid = (batch, dim, height, width)
    param = torch.float64 if dtype == torch.float64 else torch.float32  # A, D, delta_bias
    return dict(
        u=randn(*grid),
        delta=randn(*grid, scale=0.5) if softplus else randn(*grid).abs().mul(0.3).to(dtype),
        A=-torch.exp(randn(dim, n_state, scale=0.5, dt=param)),
        B=randn(batch, n_state, height, width),
        C=randn(batch, n_state, height, width),
        D=randn(dim, dt=param) if full else None,
        z=randn(*grid) if full else None,
        delta_bias=randn(dim, scale=0.3, dt=param) if full else None,
    )


def run_with_grads(fn, inputs, softplus, seed=1):
    """Output and the gradients of <y, w> for random weights w."""
    tensors = [inputs[name] for name in INPUT_NAMES]
    y = fn(*tensors[:5], D=tensors[5], z=tensors[6], delta_bias=tensors[7], delta_softplus=softplus)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (y.to(torch.float64) * w).sum().backward()
    result = {"y": y}
    for name, t in zip(INPUT_NAMES, tensors):
        if t is not None:
            result[f"d{name}"] = t.grad
    return result


def ground_truth(inputs, softplus):
    return run_with_grads(scan_loop_2d, dict(zip(INPUT_NAMES, float64_leaves([inputs[n] for n in INPUT_NAMES]))),
                          softplus)


def _tiled():
    return triton_module(interpreter_active())


def small_configs():
    cfg = _tiled().TileConfig
    return {
        # tiles of 2x2 (a 5x7 grid has 3x4 of them): one position tile of 4 (N = 3 pads to 4);
        # forward stripes of 4 columns (one group of 4 padded states); row carries every two
        # tiles, so every other tile first takes the row pass across the tile on its left
        "small": cfg(CW=2, CH=2, carry_cols=4, fwd_cols=4),
        # forward stripes twice the carry width; with N <= 2, groups of 2 columns, shorter than a
        # carry block; backward tiles of 16 positions in 8 position tiles, a row carry at each
        "mixed": cfg(CW=4, CH=4, carry_cols=4, fwd_cols=8),
        # row carries every 4 tiles: up to 3 tiles of row pass before a tile
        "sparse": cfg(CW=2, CH=2, carry_cols=8, fwd_cols=8),
        "default": _tiled().DEFAULT_CONFIG,
    }


# ---------------------------------------------------------------------------------------------
# the reference against the loop (float64, pure PyTorch)

REFERENCE_CASES = [
    # batch, dim, H, W, N, full (z, D, bias), softplus
    (2, 2, 3, 4, 2, True, True),
    (2, 2, 3, 4, 2, False, False),
    (1, 2, 1, 5, 3, True, True),
    (1, 3, 4, 1, 2, True, False),
    (1, 1, 1, 1, 1, False, True),
]


@pytest.mark.parametrize("batch,dim,height,width,n_state,full,softplus", [
    pytest.param(*c, id=case_id(B=c[0], D=c[1], H=c[2], W=c[3], N=c[4], full=c[5], softplus=c[6]))
    for c in REFERENCE_CASES])
def test_reference_matches_loop(batch, dim, height, width, n_state, full, softplus):
    inputs = make_inputs(batch, dim, height, width, n_state, full, dtype=torch.float64, softplus=softplus,
                         seed=height * 10 + width)
    expected = ground_truth(inputs, softplus)
    got = run_with_grads(selective_scan_2d_ref,
                         dict(zip(INPUT_NAMES, float64_leaves([inputs[n] for n in INPUT_NAMES]))), softplus)
    assert_close_named(got, expected, TOL_FP64, "reference vs float64 loop")


def test_reference_worked_example():
    """The 2x2 example of naive.py's docstring: every a = 0.5 and x = [[1, 2], [3, 4]]."""
    dt = torch.log(torch.tensor(2.0, dtype=torch.float64))  # with A = -1, a = exp(-dt) = 0.5
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    ones = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    y = selective_scan_2d_ref(u=(x / dt).view(1, 1, 2, 2), delta=ones * dt, A=-torch.ones(1, 1, dtype=torch.float64),
                              B=ones, C=ones)
    torch.testing.assert_close(y.view(2, 2), torch.tensor([[1.0, 2.5], [3.5, 6.75]], dtype=torch.float64))


def test_reference_keeps_dtype_and_rejects_bad_shapes():
    inputs = make_inputs(1, 2, 3, 4, 2, dtype=torch.bfloat16)
    y = selective_scan_2d_ref(**inputs, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    assert_close_named({"y": y}, {"y": scan_loop_2d(**inputs, delta_softplus=True)}, {"y": 1e-2})
    inputs = make_inputs(1, 2, 3, 4, 2)
    inputs["B"] = inputs["B"].transpose(-1, -2)
    with pytest.raises(ValueError, match="B, C"):
        selective_scan_2d_ref(**inputs)


# ---------------------------------------------------------------------------------------------
# the Triton kernels (interpreter) against the loop

TRITON_CASES = [
    # batch, dim, H, W, N, full, softplus, config, dtype
    (2, 3, 5, 7, 3, True, True, "small", torch.float32),
    (2, 3, 5, 7, 3, True, True, "small", torch.float64),
    (1, 2, 7, 5, 2, False, False, "small", torch.float32),
    (1, 2, 1, 7, 3, True, True, "small", torch.float32),
    (1, 2, 6, 1, 3, True, True, "small", torch.float32),
    (1, 1, 1, 1, 2, True, True, "small", torch.float32),
    (2, 2, 9, 6, 2, True, True, "mixed", torch.float32),
    (1, 4, 4, 4, 1, False, False, "mixed", torch.float32),
    (1, 2, 5, 11, 3, True, True, "sparse", torch.float32),
    (1, 2, 5, 7, 3, True, True, "default", torch.float32),
]


@needs_interpreter
@pytest.mark.parametrize("batch,dim,height,width,n_state,full,softplus,config,dtype", [
    pytest.param(*c, id=case_id(B=c[0], D=c[1], H=c[2], W=c[3], N=c[4], full=c[5], softplus=c[6]) + f"-{c[7]}-"
                 + str(c[8]).removeprefix("torch.")) for c in TRITON_CASES])
def test_triton_matches_loop(poison_empty, batch, dim, height, width, n_state, full, softplus, config, dtype):
    inputs = make_inputs(batch, dim, height, width, n_state, full, dtype=dtype, softplus=softplus,
                         seed=batch + dim + height + width)
    expected = ground_truth(inputs, softplus)
    cfg = small_configs()[config]
    got = run_with_grads(lambda *a, **k: _tiled().selective_scan_2d_triton(*a, **k, config=cfg),
                         dict(zip(INPUT_NAMES, leaves([inputs[n] for n in INPUT_NAMES]))), softplus)
    assert got["y"].dtype == dtype and all(got[f"d{n}"].dtype == inputs[n].dtype for n in INPUT_NAMES
                                           if inputs[n] is not None)
    assert_close_named(got, expected, TOL_FP64 if dtype == torch.float64 else TOL_FP32,
                       "triton (interpreter) vs float64 loop")


@needs_interpreter
@pytest.mark.parametrize("config", ["small", "default"])
def test_inference_forward_matches_loop(poison_empty, config):
    """Under no_grad (or with no input needing a gradient) the forward kernels run without
    autograd and without storing checkpoints; y is the same scan."""
    inputs = make_inputs(1, 3, 6, 9, 3, seed=21)
    expected = scan_loop_2d(**inputs, delta_softplus=True)
    cfg = small_configs()[config]
    params = {n: (t.clone().requires_grad_(True) if t is not None else None) for n, t in inputs.items()}
    with torch.no_grad():
        y = _tiled().selective_scan_2d_triton(**params, delta_softplus=True, config=cfg)
    assert y.grad_fn is None and not y.requires_grad
    assert_close_named({"y": y}, {"y": expected}, TOL_FP32, "triton inference forward vs float64 loop")
    y = _tiled().selective_scan_2d_triton(**inputs, delta_softplus=True, config=cfg)
    assert_close_named({"y": y}, {"y": expected}, TOL_FP32, "triton forward of constants vs float64 loop")


@needs_interpreter
def test_one_row_and_one_column_grids_equal_the_1d_scan(poison_empty):
    """H = 1: the column pass adds nothing and the scan is the 1D scan along W; W = 1: the row
    pass only forms x and the column pass is the 1D scan along H."""
    config = small_configs()["small"]
    for height, width in ((1, 9), (9, 1)):
        inputs = make_inputs(2, 3, height, width, 3, seed=height)
        got = run_with_grads(lambda *a, **k: _tiled().selective_scan_2d_triton(*a, **k, config=config),
                             dict(zip(INPUT_NAMES, leaves([inputs[n] for n in INPUT_NAMES]))), True)
        flat = {n: (t.flatten(2) if t is not None and t.dim() == 4 else t) for n, t in inputs.items()}
        expected = run_with_grads(lambda *a, **k: selective_scan(*a, **k, backend="reference"),
                                  dict(zip(INPUT_NAMES, float64_leaves([flat[n] for n in INPUT_NAMES]))), True)
        got = {k: v.reshape(expected[k].shape) for k, v in got.items()}
        assert_close_named(got, expected, TOL_FP32, f"{height}x{width} grid vs 1D scan")


# ---------------------------------------------------------------------------------------------
# backend switch


def test_auto_runs_reference_on_cpu_and_says_so(caplog):
    inputs = make_inputs(1, 2, 3, 4, 2)
    assert resolve_backend_2d("auto", inputs["u"]) == "reference"
    with caplog.at_level(logging.DEBUG, logger="mambapath.kernels.selective_scan_2d"):
        y = selective_scan_2d(**inputs, delta_softplus=True)
    assert "backend=reference" in caplog.text
    assert_close_named({"y": y}, {"y": scan_loop_2d(**inputs, delta_softplus=True)}, {"y": 1e-5})


@needs_interpreter
def test_triton_backend_runs_the_interpreter_and_says_so(poison_empty, caplog):
    inputs = make_inputs(1, 2, 3, 5, 2, seed=7)
    with caplog.at_level(logging.DEBUG, logger="mambapath.kernels.selective_scan_2d"):
        y = selective_scan_2d(**inputs, delta_softplus=True, backend="triton")
    assert "backend=triton (interpreter)" in caplog.text
    assert_close_named({"y": y}, {"y": scan_loop_2d(**inputs, delta_softplus=True)}, {"y": 1e-5})


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        selective_scan_2d(**make_inputs(1, 1, 2, 2, 2), backend="triton")


@pytest.mark.parametrize("backend,message", [("mamba_ssm", "no 2D selective scan"), ("cuda", "unknown backend")])
def test_other_backends_are_refused(backend, message):
    with pytest.raises(ValueError, match=message):
        selective_scan_2d(**make_inputs(1, 1, 2, 2, 2), backend=backend)


@needs_interpreter
def test_triton_rejects_mismatched_shapes():
    inputs = make_inputs(1, 2, 3, 4, 2)
    inputs["z"] = inputs["z"][..., :3]
    with pytest.raises(ValueError, match="z must have"):
        _tiled().selective_scan_2d_triton(**inputs)


@pytest.mark.parametrize("fields,message", [
    (dict(fwd_cols=24), "fwd_cols=24 must be a power of two"),
    (dict(CW=32, fwd_cols=16), "must be a multiple of CW"),
    (dict(carry_cols=32), r"fwd_cols \(16\) must be a multiple of carry_cols"),
    (dict(fwd_maxnreg=8), "fwd_maxnreg=8 must be None"),
    (dict(fwd_maxnreg=300), "fwd_maxnreg=300 must be None"),
    (dict(bwd_maxnreg=16), "bwd_maxnreg=16 must be None"),
    (dict(bwd_warps=3), "bwd_warps=3 must be a power of two"),
    (dict(carry_maxnreg=20), "carry_maxnreg=20 must be None"),
], ids=["stripe", "carry-vs-tile", "stripe-vs-carry", "cap-low", "cap-high", "bwd-cap", "bwd-warps", "carry-cap"])
def test_tile_config_rejects_bad_values(fields, message):
    inputs = make_inputs(1, 2, 3, 4, 2)
    cfg = _tiled().TileConfig(**fields)
    with pytest.raises(ValueError, match=message):
        _tiled().selective_scan_2d_triton(**inputs, config=cfg)

