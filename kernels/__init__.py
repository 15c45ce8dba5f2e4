"""Scan kernels behind one function per operator, with a ``backend=`` switch.

``backend="auto"`` runs the Triton kernel on CUDA tensors and the PyTorch reference twin
on the CPU; ``"triton"`` and ``"reference"`` force one; ``"mamba_ssm"`` calls mamba-ssm's
CUDA kernel when that package is importable (imported lazily, never at package import).
"""

from __future__ import annotations

from .selective_scan import selective_scan_ref
from .selective_scan_2d import selective_scan_2d_ref


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   reverse=False, initial_state=None, return_last_state=False, backend="auto"):
    """Selective scan with mamba-ssm's conventions; see kernels/selective_scan/naive.py."""
    if backend not in ("auto", "reference"):
        raise ValueError(f"selective_scan: backend {backend!r} is not available yet")
    return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                              delta_softplus=delta_softplus, reverse=reverse,
                              initial_state=initial_state, return_last_state=return_last_state)


def selective_scan_2d(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend="auto"):
    """2DMamba's 2D selective scan; see kernels/selective_scan_2d/naive.py."""
    if backend not in ("auto", "reference"):
        raise ValueError(f"selective_scan_2d: backend {backend!r} is not available yet")
    return selective_scan_2d_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)


__all__ = ["selective_scan", "selective_scan_2d", "selective_scan_ref", "selective_scan_2d_ref"]
