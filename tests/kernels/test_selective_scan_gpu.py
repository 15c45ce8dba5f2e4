"""Selective scan on the GPU at real sizes: the compiled Triton kernels against the PyTorch
reference in float64 (itself checked against a per-step loop in test_selective_scan.py), on the
output, the last state and every gradient; mamba-ssm's kernel against the same reference where
mamba-ssm is installed. Skipped without CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mambapath.kernels.selective_scan import resolve_backend, selective_scan, selective_scan_ref, triton_module

from conftest import assert_close_named, case_id

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
TOL = {
    torch.float32: {name: 1e-5 for name in ("y", "last_state") + tuple(f"d{n}" for n in INPUT_NAMES)},
    torch.bfloat16: {name: 1e-2 for name in ("y", "last_state") + tuple(f"d{n}" for n in INPUT_NAMES)},
}


def make_inputs(batch, dim, length, n_state, groups=1, z=False, h0=False, dtype=torch.float32, seed=0):
    """Mamba-like inputs on the GPU: softplus steps around 0.1 to 1, A = -exp(A_log)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dt)

    bc_shape = (batch, n_state, length) if groups == 1 else (batch, groups, n_state, length)
    return dict(
        u=randn(batch, dim, length),
        delta=randn(batch, dim, length, scale=0.5),
        A=-torch.exp(randn(dim, n_state, scale=0.5, dt=torch.float32)),
        B=randn(*bc_shape),
        C=randn(*bc_shape),
        D=randn(dim, dt=torch.float32),
        z=randn(batch, dim, length) if z else None,
        delta_bias=randn(dim, scale=0.3, dt=torch.float32) - 1.0,
        initial_state=randn(batch, dim, n_state, dt=torch.float32) if h0 else None,
    )


def run(backend, inputs, reverse=False, dtype=None, seed=1, with_last=True):
    """Output, last state and gradients of <y, wy> + <last, wl>, inputs cast to dtype."""
    leaves = {}
    for name, t in inputs.items():
        if t is None:
            leaves[name] = None
            continue
        t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        leaves[name] = t.requires_grad_()
    kwargs = dict(D=leaves["D"], z=leaves["z"], delta_bias=leaves["delta_bias"], delta_softplus=True,
                  reverse=reverse, initial_state=leaves["initial_state"], return_last_state=with_last)
    args = [leaves[n] for n in ("u", "delta", "A", "B", "C")]
    if backend == "reference":
        out = selective_scan_ref(*args, **kwargs)
    elif callable(backend):
        out = backend(*args, **kwargs)
    else:
        out = selective_scan(*args, backend=backend, **kwargs)
    y, last = out if with_last else (out, None)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    loss = (y.double() * torch.randn(y.shape, generator=gen, device="cuda", dtype=torch.float64)).sum()
    if last is not None:
        loss = loss + (last.double() * torch.randn(last.shape, generator=gen, device="cuda",
                                                   dtype=torch.float64)).sum()
    loss.backward()
    result = {"y": y.detach()}
    if last is not None:
        result["last_state"] = last.detach()
    for name, t in leaves.items():
        if t is not None:
            result[f"d{name}"] = t.grad
    return result


CASES = [
    # batch, dim, length, N, groups, z, h0, reverse
    (1, 256, 4113, 16, 1, True, False, False),
    (1, 512, 65536, 16, 1, False, False, False),
    (2, 128, 16384, 64, 2, True, True, True),
    (1, 128, 262144, 16, 1, False, True, False),
    (3, 96, 1000, 4, 3, True, True, True),
    (1, 64, 1, 16, 1, True, True, False),
]


@pytest.mark.parametrize("batch,dim,length,n_state,groups,z,h0,reverse", [
    pytest.param(*c, id=case_id(B=c[0], D=c[1], L=c[2], N=c[3], G=c[4], z=c[5], h0=c[6], rev=c[7])) for c in CASES])
def test_triton_matches_reference_float32(poison_empty, batch, dim, length, n_state, groups, z, h0, reverse):
    inputs = make_inputs(batch, dim, length, n_state, groups, z, h0)
    assert resolve_backend("auto", inputs["u"]) == "triton"
    expected = run("reference", inputs, reverse, dtype=torch.float64)
    # the first call launches through Triton, the second through the kept compiled kernels
    for launch in ("first call", "second call"):
        got = run("triton", inputs, reverse)
        assert_close_named(got, expected, TOL[torch.float32], f"triton float32 ({launch}) vs float64 reference")
    # inference (no gradient needed): the kernels without segment states or autograd
    with torch.no_grad():
        y, last = selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"], D=inputs["D"],
                                 z=inputs["z"], delta_bias=inputs["delta_bias"], delta_softplus=True,
                                 reverse=reverse, initial_state=inputs["initial_state"], return_last_state=True)
    assert_close_named({"y": y, "last_state": last}, {k: expected[k] for k in ("y", "last_state")},
                       TOL[torch.float32], "triton float32 inference vs float64 reference")


CONFIG_CHANGES = {
    # the backward's sums of dB and dC over 32 channels a warp (lane exchange), over 16 (the
    # states spread over two lanes), and Triton's own reduction; two warps per program
    "bwd-d32": dict(bwd_block_d=32),
    "bwd-d16": dict(bwd_block_d=16),
    "bwd-butterfly": dict(fast_reduce=False),
    "w2": dict(block_d=64, num_warps=2, block_t=2, bwd_block_d=64, bwd_num_warps=2),
    # the forward's output pass under a register cap (it spills), and in sub-tiles of 2 positions
    # with and without one
    "out-nreg168": dict(out_maxnreg=168),
    "out-t2": dict(out_block_t=2),
    "out-t2-nreg168": dict(out_block_t=2, out_maxnreg=168),
}


@pytest.mark.parametrize("name", sorted(CONFIG_CHANGES))
def test_triton_tile_configs_match_reference(poison_empty, name):
    """Every tile layout the tuning script may pick computes the same scan."""
    module = triton_module(False)
    config = dataclasses.replace(module.default_config(16, False), **CONFIG_CHANGES[name])

    def triton_with_config(*args, **kwargs):
        return module.selective_scan_triton(*args, config=config, **kwargs)

    inputs = make_inputs(1, 128, 5003, 16, z=True, h0=True, seed=6)
    expected = run("reference", inputs, reverse=True, dtype=torch.float64)
    got = run(triton_with_config, inputs, reverse=True)
    assert_close_named(got, expected, TOL[torch.float32], f"triton ({name}) float32 vs float64 reference")


def test_triton_matches_reference_bfloat16(poison_empty):
    inputs = make_inputs(1, 256, 8192, 16, z=True, h0=True, seed=2)
    for name in ("u", "delta", "B", "C", "z"):
        inputs[name] = inputs[name].to(torch.bfloat16)
    expected = run("reference", inputs, dtype=torch.float64)
    got = run("triton", inputs)
    assert got["y"].dtype == torch.bfloat16 and got["dB"].dtype == torch.bfloat16
    assert_close_named(got, expected, TOL[torch.bfloat16], "triton bf16 vs float64 reference")


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_triton_carried_state_equals_one_pass(poison_empty, reverse):
    inputs = make_inputs(1, 128, 20000, 16, z=True, h0=True, seed=3)
    one_pass = run("triton", inputs, reverse)
    length, cut = 20000, 7777
    leaves = {k: (None if v is None else v.detach().clone().requires_grad_()) for k, v in inputs.items()}
    first, second = (slice(0, cut), slice(cut, length)) if not reverse else (slice(cut, length), slice(0, cut))

    def part(name, sl):
        return leaves[name][..., sl]

    common = dict(D=leaves["D"], delta_bias=leaves["delta_bias"], delta_softplus=True, reverse=reverse,
                  return_last_state=True, backend="triton")
    y1, h1 = selective_scan(*(part(n, first) for n in ("u", "delta")), leaves["A"], part("B", first),
                            part("C", first), z=part("z", first), initial_state=leaves["initial_state"], **common)
    y2, h2 = selective_scan(*(part(n, second) for n in ("u", "delta")), leaves["A"], part("B", second),
                            part("C", second), z=part("z", second), initial_state=h1, **common)
    y = torch.cat([y1, y2], -1) if not reverse else torch.cat([y2, y1], -1)
    gen = torch.Generator(device="cuda").manual_seed(1)
    loss = (y.double() * torch.randn(y.shape, generator=gen, device="cuda", dtype=torch.float64)).sum()
    loss = loss + (h2.double() * torch.randn(h2.shape, generator=gen, device="cuda", dtype=torch.float64)).sum()
    loss.backward()
    got = {"y": y.detach(), "last_state": h2.detach()}
    got.update({f"d{k}": v.grad for k, v in leaves.items() if v is not None})
    assert_close_named(got, one_pass, TOL[torch.float32], "carried state vs one pass")


def test_mamba_ssm_matches_reference():
    pytest.importorskip("mamba_ssm.ops.selective_scan_interface", reason="mamba-ssm is not installed")
    inputs = make_inputs(1, 256, 4096, 16, z=True, seed=4)
    expected = run("reference", inputs, dtype=torch.float64, with_last=False)
    got = run("mamba_ssm", inputs, with_last=False)
    # mamba-ssm computes exp with --use_fast_math, hence a looser bound than our kernels'
    assert_close_named(got, expected, {k: 1e-4 for k in expected}, "mamba-ssm vs float64 reference")
