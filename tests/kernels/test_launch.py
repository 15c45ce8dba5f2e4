"""The kernel Launcher (kernels/launch.py): its cache key separates every launch that Triton
would compile differently, an interpreted kernel always launches through Triton, and on a GPU a
launch through the kept compiled kernel writes what Triton's own launch writes."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from mambapath.kernels.launch import Launcher, launcher, specialization_key

from conftest import needs_interpreter


@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, n, scale, BLOCK: tl.constexpr, SQUARE: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    if SQUARE:
        x = x * x
    tl.store(out_ptr + offs, scale * x + tl.load(y_ptr + offs, mask=mask), mask=mask)


def test_key_separates_alignment_dtype_and_values():
    buf = torch.zeros(64)
    aligned, shifted = buf[:32], buf[1:33]  # 4-byte offset: not a multiple of 16 bytes
    assert aligned.data_ptr() % 16 == 0 and shifted.data_ptr() % 16 == 4
    base = specialization_key((aligned, 32), {"BLOCK": 16})
    assert specialization_key((buf[4:36], 32), {"BLOCK": 16}) == base  # 16-byte offset: same kernel
    assert specialization_key((shifted, 32), {"BLOCK": 16}) != base
    assert specialization_key((aligned.double(), 32), {"BLOCK": 16}) != base
    assert specialization_key((aligned, 33), {"BLOCK": 16}) != base
    assert specialization_key((aligned, 32), {"BLOCK": 32}) != base
    assert specialization_key((aligned, 32), {"BLOCK": 16, "num_warps": 2}) != base


@needs_interpreter
def test_interpreted_kernel_launches_through_triton():
    run = Launcher(_axpy_kernel)
    assert run.params is None
    x, y = torch.arange(40.0), torch.ones(40)
    out = torch.full((40,), float("nan"))
    run[(triton.cdiv(40, 16),)](x, y, out, 40, 2.0, BLOCK=16, SQUARE=True)
    torch.testing.assert_close(out, 2.0 * x * x + 1.0, rtol=0, atol=0)
    assert run.compiled == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kept_kernel_matches_triton_launch():
    run = launcher(_axpy_kernel)
    assert launcher(_axpy_kernel) is run
    run.compiled.clear()
    gen = torch.Generator(device="cuda").manual_seed(0)
    buf = torch.randn(2, 1001, device="cuda", generator=gen, dtype=torch.float64)
    for x, y, n, square in ((buf[0, :1000], buf[1, :1000], 1000, False),
                            (buf[0, 1:998], buf[1, 1:998], 997, True),  # unaligned, n not a multiple of 16
                            (buf[0, :1000], buf[1, :1000], 1000, True)):
        expected = 0.5 * (x * x if square else x) + y
        for _ in range(2):  # the first launch goes through Triton, the second through the kept kernel
            out = torch.full_like(x, float("nan"))
            run[(triton.cdiv(n, 128),)](x, y, out, n, 0.5, BLOCK=128, SQUARE=square)
            torch.testing.assert_close(out, expected, rtol=1e-15, atol=0)
    assert len(run.compiled) == 3


@triton.jit
def _fill_kernel(out_ptr, value, BLOCK: tl.constexpr, TWICE: tl.constexpr = False):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, value * 2 if TWICE else value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_parameter_must_be_passed():
    """The kept kernel takes every parameter, so a default left out is refused before launching."""
    out = torch.full((16,), float("nan"), device="cuda")
    with pytest.raises(TypeError, match=r"\['TWICE'\] were not passed"):
        Launcher(_fill_kernel)[(1,)](out, 3.0, BLOCK=16)
    assert out.isnan().all()
    Launcher(_fill_kernel)[(1,)](out, 3.0, 16, TWICE=True)  # positional constexprs are fine
    assert (out == 6.0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tensor_off_the_gpu_goes_through_triton():
    """The kept kernel gets addresses, unchecked; a tensor in host memory with a kept kernel's
    specialisation must still reach Triton's launch, which refuses it, and nothing is written."""
    run = Launcher(_axpy_kernel)
    x, y = torch.ones(64, device="cuda"), torch.ones(64, device="cuda")
    out = torch.full_like(x, float("nan"))
    for _ in range(2):
        run[(1,)](x, y, out, 64, 1.0, BLOCK=64, SQUARE=False)
    assert len(run.compiled) == 1 and (out == 2.0).all()
    host_out = torch.full((64,), float("nan"))
    with pytest.raises(ValueError, match="cannot be accessed from Triton"):
        run[(1,)](x, y, host_out, 64, 1.0, BLOCK=64, SQUARE=False)
    torch.cuda.synchronize()
    assert host_out.isnan().all() and len(run.compiled) == 1
