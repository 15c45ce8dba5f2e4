"""Shared helpers for kernel tests: NaN-poisoned allocations, named per-tensor tolerances,
readable case ids, Triton's CPU interpreter, and float64 copies of inputs.

- ``poison_empty``: every ``torch.empty``/``empty_like``/``new_empty`` made during the test is
  filled with NaN (integers with their minimum), so an output element that a kernel never
  writes shows up as NaN instead of passing by luck.
- ``assert_close_named``: norm-wise relative errors ||a - e|| / ||e|| for a dict of named tensors,
  each against its own tolerance; the failure lists every tensor over its bound.
- ``case_id(B=2, D=8, L=37)`` -> "B2-D8-L37", for ``pytest.param(..., id=...)``.
- Triton's interpreter: Triton reads TRITON_INTERPRET once per process, when triton.language is
  first imported. On a machine without CUDA this conftest sets it (before any test imports
  triton), so kernel tests on CPU tensors run interpreted; ``needs_interpreter`` skips such
  tests on a CUDA machine, where the GPU test modules cover the compiled kernels.
- Triton's interpreter runs a scan with a custom combine function one element at a time; the
  session fixture below runs it one step of the scanned axis at a time instead (the same left
  fold, vectorised over the other axes), which makes interpreted kernels many times faster.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="CUDA machine: Triton compiles in this process; the *_gpu.py modules test the kernels")

# ---------------------------------------------------------------------------------------------
# ids and tolerances


def case_id(**dims) -> str:
    """case_id(B=2, D=8, L=37, N=4) -> 'B2-D8-L37-N4'; booleans print as the name or 'no<name>'."""
    parts = []
    for key, value in dims.items():
        if isinstance(value, bool):
            parts.append(key if value else f"no{key}")
        elif value is None:
            continue
        else:
            parts.append(f"{key}{value}")
    return "-".join(parts)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; inf when actual has a NaN or an inf."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        return math.inf
    scale = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / scale if scale > 0 else diff


def assert_close_named(actual: dict, expected: dict, tolerances: dict, context: str = "") -> dict:
    """Compare named tensors; ``tolerances`` maps each name to its bound on the relative error.
    Returns the errors; fails once, listing every name over its bound (and missing names)."""
    missing = sorted(set(expected) - set(actual))
    errors = {name: rel_error(actual[name], expected[name]) for name in expected if name in actual}
    over = {name: err for name, err in errors.items() if not err <= tolerances[name]}
    if missing or over:
        lines = [f"  {name}: rel err {errors[name]:.3g} > {tolerances[name]:.1g}" for name in sorted(over)]
        lines += [f"  {name}: missing" for name in missing]
        raise AssertionError(f"{context}\n" + "\n".join(lines))
    return errors


# ---------------------------------------------------------------------------------------------
# NaN-poisoned allocations


def _poison_value(dtype: torch.dtype):
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    if dtype == torch.bool:
        return True
    return torch.iinfo(dtype).min


@pytest.fixture
def poison_empty(monkeypatch):
    """Make uninitialised allocations NaN for the duration of the test."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poisoned_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(_poison_value(out.dtype)) if out.numel() else out

    def poisoned_empty_like(*args, **kwargs):
        out = empty_like(*args, **kwargs)
        return out.fill_(_poison_value(out.dtype)) if out.numel() else out

    def poisoned_new_empty(self, *args, **kwargs):
        out = new_empty(self, *args, **kwargs)
        return out.fill_(_poison_value(out.dtype)) if out.numel() else out

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", poisoned_empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned_new_empty)
    yield


# ---------------------------------------------------------------------------------------------
# Triton's interpreter


def _vectorised_generic_scan(self, input):
    """ScanOps.generic_scan, one step along the axis at a time: acc[i] = combine(acc[i-1], x[i])."""
    datas = [arg.handle.data for arg in input]
    axis = self.axis
    length = datas[0].shape[axis]

    def at(i):
        return (slice(None),) * axis + (i,)

    outs = [np.empty_like(data) for data in datas]
    acc = [data[at(0)] for data in datas]
    for out, value in zip(outs, acc):
        out[at(0)] = value
    for i in range(1, length):
        left = [self.to_tensor(value, arg.dtype) for value, arg in zip(acc, input)]
        right = [self.to_tensor(data[at(i)], arg.dtype) for data, arg in zip(datas, input)]
        result = self.combine_fn.fn(*left, *right)
        result = result if isinstance(result, tuple) else (result,)
        acc = [np.broadcast_to(r.handle.data, data[at(i)].shape) for r, data in zip(result, datas)]
        for out, value in zip(outs, acc):
            out[at(i)] = value
    return [self.to_tensor(out, arg.dtype) for out, arg in zip(outs, input)]


@pytest.fixture(autouse=True, scope="session")
def _fast_interpreter_scans():
    try:
        from triton.runtime.interpreter import ScanOps
    except ImportError:  # another Triton layout: keep its own scan
        yield
        return
    if not hasattr(ScanOps, "generic_scan"):
        yield
        return
    original = ScanOps.generic_scan
    ScanOps.generic_scan = _vectorised_generic_scan
    try:
        yield
    finally:
        ScanOps.generic_scan = original


# ---------------------------------------------------------------------------------------------
# inputs


def float64_leaves(tensors):
    """Detached float64 copies that require grad (None stays None)."""
    return [None if t is None else t.detach().to(torch.float64).requires_grad_() for t in tensors]


def leaves(tensors):
    """Detached copies that require grad, in their own dtype (None stays None)."""
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
