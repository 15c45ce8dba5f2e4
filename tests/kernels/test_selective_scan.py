"""Selective scan on the CPU: the reference against a plain float64 per-step loop, the Triton
kernels (in Triton's interpreter, at small sizes) against that loop on the output, the last
state and every gradient, and the backend switch.

The loop below is the independent ground truth: a direct transcription of the recurrence,
one position at a time, differentiated by autograd in float64.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from mambapath.kernels.selective_scan import (resolve_backend, selective_scan, selective_scan_ref, triton_module,
                                              uses_many_states)

from conftest import assert_close_named, case_id, float64_leaves, leaves, needs_interpreter

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

# float32 kernels against float64: the bound; bf16 inputs round every load and store
TOL_FP32 = {name: 1e-5 for name in ("y", "last_state") + tuple(f"d{n}" for n in INPUT_NAMES)}
TOL_BF16 = {name: 1e-2 for name in TOL_FP32}
TOL_REFERENCE = {name: 1e-10 for name in TOL_FP32}  # float64 reference against the float64 loop


def scan_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse=False,
              initial_state=None):
    """The recurrence, one position at a time, in float64. Returns (y, last_state)."""
    u, delta, A, B, C = (t.to(torch.float64) for t in (u, delta, A, B, C))
    batch, dim, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.to(torch.float64)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    per_group = dim // B.shape[1]
    B = B.repeat_interleave(per_group, dim=1)  # (batch, dim, N, L)
    C = C.repeat_interleave(per_group, dim=1)
    h = (torch.zeros(batch, dim, A.shape[1], dtype=torch.float64) if initial_state is None
         else initial_state.to(torch.float64))
    ys = [None] * length
    for t in (range(length - 1, -1, -1) if reverse else range(length)):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[:, :, None] * B[:, :, :, t]
        ys[t] = (h * C[:, :, :, t]).sum(-1)
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(torch.float64)[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.to(torch.float64))
    return y, h


def make_inputs(batch, dim, length, n_state, groups=1, z=False, D=False, bias=False, h0=False,
                dtype=torch.float32, seed=0, softplus=True):
    """Random inputs like a Mamba layer's. Without softplus the steps are given positive, as a
    caller that skips the softplus must (a negative step makes exp(delta A) > 1, a growing state)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(dt)

    bc_shape = (batch, n_state, length) if groups == 1 else (batch, groups, n_state, length)
    return dict(
        u=randn(batch, dim, length),
        delta=randn(batch, dim, length, scale=0.5) if softplus else randn(batch, dim, length).abs().to(dtype) * 0.3,
        # Mamba's A = -exp(A_log): negative, a spread of decay rates
        A=-torch.exp(randn(dim, n_state, scale=0.5, dt=torch.float32)),
        B=randn(*bc_shape),
        C=randn(*bc_shape),
        D=randn(dim, dt=torch.float32) if D else None,
        z=randn(batch, dim, length) if z else None,
        delta_bias=(randn(dim, scale=0.3, dt=torch.float32) if softplus else randn(dim, dt=torch.float32).abs() * 0.05)
        if bias else None,
        initial_state=randn(batch, dim, n_state, dt=torch.float32) if h0 else None,
    )


def run_with_grads(fn, inputs, softplus, reverse, seed=1):
    """Output, last state and the gradients of <y, wy> + <last, wl> for random weights."""
    tensors = [inputs[name] for name in INPUT_NAMES]
    y, last = fn(*tensors[:5], D=tensors[5], z=tensors[6], delta_bias=tensors[7], delta_softplus=softplus,
                 reverse=reverse, initial_state=tensors[8])
    gen = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=gen).to(y.device)
    wl = torch.randn(last.shape, generator=gen).to(last.device)
    ((y.to(torch.float64) * wy).sum() + (last.to(torch.float64) * wl).sum()).backward()
    result = {"y": y, "last_state": last}
    for name, t in zip(INPUT_NAMES, tensors):
        if t is not None:
            result[f"d{name}"] = t.grad
    return result


def loop_fn(u, delta, A, B, C, **kw):
    return scan_loop(u, delta, A, B, C, **kw)


def reference_fn(u, delta, A, B, C, chunk_size=64, window_elements=None, **kw):
    extra = {} if window_elements is None else {"window_elements": window_elements}
    return selective_scan_ref(u, delta, A, B, C, return_last_state=True, chunk_size=chunk_size, **kw, **extra)


def triton_fn(config=None):
    def run(u, delta, A, B, C, **kw):
        return triton_module(True).selective_scan_triton(u, delta, A, B, C, return_last_state=True, config=config,
                                                         **kw)
    return run


def small_config(**fields):
    """Interpreter-sized tiles (two channels a program, one warp, a carry of two chunks a step)
    with ``fields`` (block_t, bwd_block_t, max_sub, ...) chosen by the test."""
    base = dict(block_d=2, num_warps=1, bwd_block_d=2, bwd_num_warps=1, min_chunk=4, block_c=2, carry_block_d=2,
                carry_num_warps=1, programs_per_sm=4, bwd_programs_per_sm=2, fast_reduce=False)
    return triton_module(True).ScanConfig(**{**base, **fields})


def triton_and_loop(config, inputs, reverse):
    """(Triton in the interpreter with ``config``, the float64 loop): outputs and gradients, softplus on."""
    expected = ground_truth(inputs, True, reverse)
    got = run_with_grads(triton_fn(config), dict(zip(INPUT_NAMES, leaves([inputs[n] for n in INPUT_NAMES]))),
                         True, reverse)
    return got, expected


def ground_truth(inputs, softplus, reverse):
    as64 = dict(zip(INPUT_NAMES, float64_leaves([inputs[n] for n in INPUT_NAMES])))
    return run_with_grads(loop_fn, as64, softplus, reverse)


# ---------------------------------------------------------------------------------------------
# the reference against the loop (float64, pure PyTorch, fast)

REFERENCE_CASES = [
    # batch, dim, length, N, groups, z, D, bias, softplus, reverse, h0, chunk_size, window positions
    (1, 3, 1, 2, 1, False, False, False, False, False, False, 64, None),
    (2, 4, 37, 3, 1, True, True, True, True, False, True, 8, None),
    (2, 4, 37, 3, 1, True, True, True, True, True, True, 8, None),
    (2, 6, 50, 4, 3, False, True, False, True, False, True, 7, 16),  # windows of 16 positions, chunks of 7
    (1, 4, 29, 5, 2, True, False, True, False, True, False, 4, 12),
]


@pytest.mark.parametrize(
    "batch,dim,length,n_state,groups,z,D,bias,softplus,reverse,h0,chunk,window",
    [pytest.param(*c, id=case_id(B=c[0], D=c[1], L=c[2], N=c[3], G=c[4], z=c[5], skip=c[6], bias=c[7],
                                 softplus=c[8], rev=c[9], h0=c[10], T=c[11], W=c[12]))
     for c in REFERENCE_CASES])
def test_reference_matches_loop(batch, dim, length, n_state, groups, z, D, bias, softplus, reverse, h0,
                                chunk, window):
    inputs = make_inputs(batch, dim, length, n_state, groups, z, D, bias, h0, dtype=torch.float64,
                         softplus=softplus)
    expected = ground_truth(inputs, softplus, reverse)
    window_elements = None if window is None else batch * dim * n_state * window
    as64 = dict(zip(INPUT_NAMES, float64_leaves([inputs[n] for n in INPUT_NAMES])))
    got = run_with_grads(lambda *a, **k: reference_fn(*a, chunk_size=chunk, window_elements=window_elements, **k),
                         as64, softplus, reverse)
    assert_close_named(got, expected, TOL_REFERENCE, "reference vs float64 loop")


def test_reference_keeps_dtypes():
    inputs = make_inputs(1, 4, 20, 3, z=True, D=True, dtype=torch.bfloat16)
    y, last = selective_scan_ref(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
                                 D=inputs["D"], z=inputs["z"], return_last_state=True)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
    y64, _ = scan_loop(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], D=inputs["D"],
                       z=inputs["z"])
    assert_close_named({"y": y}, {"y": y64}, {"y": 1e-2})


@pytest.mark.parametrize("bad,message", [
    (dict(A=torch.zeros(5, 3)), "A must be"),
    (dict(B=torch.zeros(1, 3, 3, 10), C=torch.zeros(1, 3, 3, 10)), "multiple of the 3 groups"),
    (dict(B=torch.zeros(1, 3, 9)), "B must be"),
    (dict(D=torch.zeros(3)), "D must be"),
    (dict(initial_state=torch.zeros(1, 4, 2)), "initial_state must be"),
], ids=["A-shape", "groups", "B-length", "D-shape", "h0-shape"])
def test_reference_rejects_bad_shapes(bad, message):
    inputs = dict(u=torch.zeros(1, 4, 10), delta=torch.zeros(1, 4, 10), A=torch.zeros(4, 3),
                  B=torch.zeros(1, 3, 10), C=torch.zeros(1, 3, 10))
    inputs.update(bad)
    with pytest.raises(ValueError, match=message):
        selective_scan_ref(**inputs)


# ---------------------------------------------------------------------------------------------
# the Triton kernels (interpreter) against the loop

TRITON_CASES = [
    # batch, dim, length, N, groups, z, D, bias, softplus, reverse, h0
    (1, 4, 1, 4, 1, False, False, False, False, False, False),
    (2, 8, 37, 4, 2, True, True, True, True, False, True),
    (2, 8, 37, 4, 2, True, True, True, True, True, True),
    (1, 8, 70, 3, 1, False, False, False, False, True, False),
    (2, 6, 45, 4, 3, False, True, False, True, False, False),
    (1, 4, 33, 2, 1, True, False, True, False, False, True),
]


@needs_interpreter
@pytest.mark.parametrize(
    "batch,dim,length,n_state,groups,z,D,bias,softplus,reverse,h0",
    [pytest.param(*c, id=case_id(B=c[0], D=c[1], L=c[2], N=c[3], G=c[4], z=c[5], skip=c[6], bias=c[7],
                                 softplus=c[8], rev=c[9], h0=c[10]))
     for c in TRITON_CASES])
def test_triton_matches_loop(poison_empty, batch, dim, length, n_state, groups, z, D, bias, softplus, reverse, h0):
    inputs = make_inputs(batch, dim, length, n_state, groups, z, D, bias, h0, softplus=softplus)
    expected = ground_truth(inputs, softplus, reverse)
    got = run_with_grads(triton_fn(), dict(zip(INPUT_NAMES, leaves([inputs[n] for n in INPUT_NAMES]))),
                         softplus, reverse)
    assert_close_named(got, expected, TOL_FP32, "triton (interpreter) vs float64 loop")


@needs_interpreter
def test_triton_many_chunks_matches_loop(poison_empty):
    """Chunks of 12 positions in sub-tiles of 2 (the backward's segments of three), and a carry
    kernel that moves 2 chunks per step: six chunks, three carry steps in each direction."""
    config = small_config(block_t=2, bwd_block_t=2, max_sub=6)
    inputs = make_inputs(2, 4, 70, 3, z=True, D=True, bias=True, h0=True, seed=3)
    got, expected = triton_and_loop(config, inputs, reverse=False)
    assert_close_named(got, expected, TOL_FP32, "triton, many chunks")


@needs_interpreter
@pytest.mark.parametrize("block_t,bwd_block_t,max_sub,seg_factor,reverse", [
    (4, 2, 5, 1, True),  # chunks of 20: 10 backward sub-tiles in segments of 4, 4, 2 (the GPU's 4 / 2 split)
    (2, 4, 6, 2, False),  # chunks of 12: 3 backward sub-tiles, one segment of 4 (longer than the chunk)
])
def test_triton_segment_states_match_loop(poison_empty, block_t, bwd_block_t, max_sub, seg_factor, reverse):
    """The states the forward saves at the backward's segment starts, with forward and backward
    sub-tiles of different lengths, a partial last segment, and a segment longer than the chunk."""
    config = small_config(block_t=block_t, bwd_block_t=bwd_block_t, max_sub=max_sub, seg_factor=seg_factor)
    plan = triton_module(True)._plan(1, 4, 61, 3, 1, config, torch.device("cpu"))
    assert plan.n_chunks > 1 and (plan.seg_len * bwd_block_t) % block_t == 0
    inputs = make_inputs(1, 4, 61, 3, z=True, D=True, bias=True, h0=True, seed=5)
    got, expected = triton_and_loop(config, inputs, reverse=reverse)
    assert_close_named(got, expected, TOL_FP32, "triton, segment states")


@needs_interpreter
@pytest.mark.parametrize("block_t,out_block_t,bwd_block_t,reverse", [
    (4, 2, 4, False),  # the output pass in sub-tiles of 2, the state pass and the backward in 4
    (2, 4, 2, True),  # the output pass in 4: segments of whole sub-tiles of 4
])
def test_triton_output_pass_sub_tiles_match_loop(poison_empty, block_t, out_block_t, bwd_block_t, reverse):
    """The forward's output pass in sub-tiles of its own length (out_block_t), saving the
    segment states the backward reads: a length that is not a multiple of either sub-tile,
    several chunks, with gradients; and the same call without autograd."""
    config = small_config(block_t=block_t, out_block_t=out_block_t, bwd_block_t=bwd_block_t, max_sub=5)
    plan = triton_module(True)._plan(1, 4, 53, 3, 1, config, torch.device("cpu"))
    assert plan.n_chunks > 1 and plan.out_n_sub * out_block_t == plan.chunk_len
    assert (plan.seg_len * bwd_block_t) % out_block_t == 0
    inputs = make_inputs(1, 4, 53, 3, z=True, D=True, bias=True, h0=True, seed=13)
    got, expected = triton_and_loop(config, inputs, reverse=reverse)
    assert_close_named(got, expected, TOL_FP32, "triton, output pass sub-tiles")
    with torch.no_grad():
        y, last = triton_fn(config)(**inputs, delta_softplus=True, reverse=reverse)
    assert_close_named({"y": y, "last_state": last}, {"y": expected["y"], "last_state": expected["last_state"]},
                       TOL_FP32, "triton, output pass sub-tiles, no autograd")


@needs_interpreter
def test_scan_config_refuses_other_sub_tiles():
    with pytest.raises(ValueError, match="out_block_t must be 2 or 4"):
        triton_module(True)._plan(1, 4, 61, 3, 1, small_config(out_block_t=3), torch.device("cpu"))


@needs_interpreter
def test_scan_config_refuses_empty_segments():
    with pytest.raises(ValueError, match="seg_factor must be at least 1"):
        triton_module(True)._plan(1, 4, 61, 3, 1, small_config(seg_factor=0), torch.device("cpu"))


@needs_interpreter
@pytest.mark.parametrize("h0", [True, False], ids=["h0", "no-h0"])
def test_triton_many_states_matches_loop(poison_empty, h0):
    """N > 16 runs chunk_many_states.py (the states over the warps)."""
    assert uses_many_states(20) and not uses_many_states(16)
    inputs = make_inputs(1, 4, 21, 20, z=True, D=True, bias=True, h0=h0, seed=8)
    expected = ground_truth(inputs, True, True)

    def run(u, delta, A, B, C, **kw):
        return triton_module(True, many_states=True).selective_scan_triton(u, delta, A, B, C,
                                                                           return_last_state=True, **kw)

    got = run_with_grads(run, dict(zip(INPUT_NAMES, leaves([inputs[n] for n in INPUT_NAMES]))), True, True)
    assert_close_named(got, expected, TOL_FP32, "triton (many states, interpreter) vs float64 loop")


@needs_interpreter
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_triton_many_states_inference_matches_loop(poison_empty, reverse):
    """N > 16 under no_grad: no autograd, y and the last state of the same scan; without
    return_last_state the state is not handed back."""
    inputs = make_inputs(1, 4, 21, 20, z=True, D=True, bias=True, h0=True, seed=12)
    y64, last64 = scan_loop(**inputs, delta_softplus=True, reverse=reverse)
    params = {n: (t.clone().requires_grad_(True) if t is not None else None) for n, t in inputs.items()}
    run = triton_module(True, many_states=True).selective_scan_triton
    with torch.no_grad():
        y, last = run(**params, delta_softplus=True, reverse=reverse, return_last_state=True)
        y_only = run(**params, delta_softplus=True, reverse=reverse)
    assert y.grad_fn is None and last.grad_fn is None and isinstance(y_only, torch.Tensor)
    assert_close_named({"y": y, "last_state": last}, {"y": y64, "last_state": last64}, TOL_FP32,
                       "triton (many states) inference vs float64 loop")
    assert_close_named({"y": y_only}, {"y": y64}, TOL_FP32, "without the last state")


@needs_interpreter
def test_triton_bfloat16_matches_loop(poison_empty):
    inputs = make_inputs(1, 8, 40, 4, z=True, D=True, bias=True, dtype=torch.bfloat16, seed=4)
    expected = ground_truth(inputs, True, False)
    got = run_with_grads(triton_fn(), dict(zip(INPUT_NAMES, leaves([inputs[n] for n in INPUT_NAMES]))), True, False)
    assert got["y"].dtype == torch.bfloat16 and got["du"].dtype == torch.bfloat16
    assert got["dB"].dtype == torch.bfloat16 and got["last_state"].dtype == torch.float32
    assert_close_named(got, expected, TOL_BF16, "triton bf16 vs float64 loop")


@needs_interpreter
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_triton_inference_forward_matches_loop(poison_empty, reverse):
    """Under no_grad the kernels run without autograd and without the backward's segment
    states; y and the last state are the same scan."""
    inputs = make_inputs(2, 4, 37, 3, groups=2, z=True, D=True, bias=True, h0=True, seed=9)
    y64, last64 = scan_loop(**inputs, delta_softplus=True, reverse=reverse)
    params = {n: (t.clone().requires_grad_(True) if t is not None else None) for n, t in inputs.items()}
    with torch.no_grad():
        y, last = triton_fn(small_config(block_t=2, bwd_block_t=2, max_sub=3))(**params, delta_softplus=True,
                                                                             reverse=reverse)
    assert y.grad_fn is None and last.grad_fn is None
    assert_close_named({"y": y, "last_state": last}, {"y": y64, "last_state": last64},
                       TOL_FP32, "triton inference vs float64 loop")


@needs_interpreter
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_triton_carried_state_equals_one_pass(poison_empty, reverse):
    """Two calls with the state carried (the second starts from the first's last state) give the
    one-pass outputs and, through the carried state, the one-pass gradients."""
    length, cut = 50, 23
    inputs = make_inputs(1, 4, length, 3, z=True, D=True, bias=True, h0=True, seed=5)
    expected = run_with_grads(triton_fn(), dict(zip(INPUT_NAMES, leaves([inputs[n] for n in INPUT_NAMES]))),
                              True, reverse)
    run = triton_fn()

    def two_calls(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, initial_state):
        # scan order: forward visits [0, cut) first; reverse visits [cut, L) first
        first, second = (slice(0, cut), slice(cut, length)) if not reverse else (slice(cut, length), slice(0, cut))
        part = lambda t, sl: None if t is None else t[..., sl]  # noqa: E731
        y1, h1 = run(part(u, first), part(delta, first), A, part(B, first), part(C, first), D=D, z=part(z, first),
                     delta_bias=delta_bias, delta_softplus=delta_softplus, reverse=reverse,
                     initial_state=initial_state)
        y2, h2 = run(part(u, second), part(delta, second), A, part(B, second), part(C, second), D=D,
                     z=part(z, second), delta_bias=delta_bias, delta_softplus=delta_softplus, reverse=reverse,
                     initial_state=h1)
        return (torch.cat([y1, y2], -1) if not reverse else torch.cat([y2, y1], -1)), h2

    got = run_with_grads(two_calls, dict(zip(INPUT_NAMES, leaves([inputs[n] for n in INPUT_NAMES]))), True, reverse)
    assert_close_named(got, expected, TOL_FP32, "carried state vs one pass")


# ---------------------------------------------------------------------------------------------
# backend switch


def test_auto_runs_reference_on_cpu_and_says_so(caplog):
    inputs = make_inputs(1, 4, 9, 2, softplus=False)
    assert resolve_backend("auto", inputs["u"]) == "reference"
    with caplog.at_level(logging.DEBUG, logger="mambapath.kernels.selective_scan"):
        y = selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    assert "backend=reference" in caplog.text
    y64, _ = scan_loop(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    assert_close_named({"y": y}, {"y": y64}, {"y": 1e-5})


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs = make_inputs(1, 4, 9, 2, softplus=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], backend="triton")


@needs_interpreter
def test_triton_backend_runs_the_interpreter_and_says_so(caplog):
    inputs = make_inputs(1, 4, 9, 2, seed=7, softplus=False)
    with caplog.at_level(logging.DEBUG, logger="mambapath.kernels.selective_scan"):
        y = selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], backend="triton")
    assert "backend=triton" in caplog.text
    assert "(interpreter)" in caplog.text and triton_module(True).INTERPRETED
    y64, _ = scan_loop(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    assert_close_named({"y": y}, {"y": y64}, {"y": 1e-5})


@pytest.mark.parametrize("options,message", [
    (dict(reverse=True), "no reverse=True"),
    (dict(initial_state=torch.zeros(1, 4, 2)), "no initial_state"),
    (dict(), "needs CUDA tensors"),
], ids=["reverse", "initial_state", "cpu"])
def test_mamba_ssm_backend_refuses_what_it_lacks(options, message):
    inputs = make_inputs(1, 4, 9, 2, softplus=False)
    with pytest.raises(ValueError, match=message):
        selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], backend="mamba_ssm",
                       **options)


def test_unknown_backend_is_refused():
    inputs = make_inputs(1, 4, 9, 2, softplus=False)
    with pytest.raises(ValueError, match="unknown backend"):
        selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], backend="cuda")


def test_poison_fixture_fills_nan(poison_empty):
    assert torch.isnan(torch.empty(3)).all() and torch.isnan(torch.empty_like(torch.zeros(2))).all()
    assert (torch.empty(2, dtype=torch.int32) == torch.iinfo(torch.int32).min).all()
