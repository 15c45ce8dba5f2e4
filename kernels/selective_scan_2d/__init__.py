"""2D selective scan (2DMamba): reference twin, Triton kernels, backend switch.

``backend="auto"`` runs the Triton kernels on CUDA tensors and the PyTorch reference on the
CPU; ``"triton"`` forces the kernels (on the CPU only under ``TRITON_INTERPRET=1``, Triton's
interpreter); ``"reference"`` forces the twin in naive.py. mamba-ssm has no 2D scan, so
``"mamba_ssm"`` is refused. ``resolve_backend_2d`` says which backend a call runs, and every call
logs it at DEBUG level on the ``mambapath.kernels.selective_scan_2d`` logger. No backend falls
back to another: one that cannot run raises an error that says why and what to use instead.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch

from ..selective_scan import interpreter_active
from .naive import selective_scan_2d_ref

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "reference")


@functools.lru_cache(maxsize=2)
def triton_module(interpret: bool):
    """tiled.py (the kernels), defined for one mode, compiled or interpreted, to match Triton's
    own library (``interpreter_active()``): Triton fixes the mode when it defines a kernel."""
    name = f"{__name__}._tiled_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("tiled.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


def resolve_backend_2d(backend: str, u: torch.Tensor) -> str:
    """The backend that ``selective_scan_2d(..., backend=backend)`` runs for input ``u``:
    "triton" or "reference". Raises for a backend that cannot run here."""
    if backend == "mamba_ssm":
        raise ValueError("selective_scan_2d: mamba-ssm has no 2D selective scan; "
                         "use backend='auto', 'triton' or 'reference'")
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan_2d: unknown backend {backend!r}; use one of {BACKENDS}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if u.is_cuda else "reference"
    if not u.is_cuda:
        if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("1", "true", "yes", "on", "y"):
            raise RuntimeError(
                f"selective_scan_2d: backend='triton' needs a CUDA tensor, got one on {u.device}; set the "
                "environment variable TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter "
                "(slow, for tests), or use backend='reference'")
        if not interpreter_active():
            raise RuntimeError(
                "selective_scan_2d: TRITON_INTERPRET=1 is set, but triton was imported before it was set, so "
                "Triton compiles for the GPU in this process; set TRITON_INTERPRET=1 before anything "
                "imports triton (in the environment of the process), or use backend='reference'")
    return "triton"


def selective_scan_2d(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      backend="auto"):
    """2DMamba's 2D selective scan; the recurrence is in naive.py, the kernels' maths in README.md.

    u, delta, z (batch, dim, H, W); A (dim, N); B, C (batch, N, H, W); D, delta_bias (dim,).
    Returns y (batch, dim, H, W) in u's dtype; states are float32 (float64 for float64 inputs).
    Gradients reach every tensor input.
    """
    name = resolve_backend_2d(backend, u)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("selective_scan_2d: backend=%s%s device=%s dtype=%s shape=%s N=%d", name,
                  " (interpreter)" if name == "triton" and interpreter_active() else "", u.device, u.dtype,
                  tuple(u.shape), A.shape[-1])
    if name == "reference":
        return selective_scan_2d_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                     delta_softplus=delta_softplus)
    return triton_module(interpreter_active()).selective_scan_2d_triton(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)


__all__ = ["BACKENDS", "resolve_backend_2d", "selective_scan_2d", "selective_scan_2d_ref", "triton_module"]
