"""Scan kernels, one public function per operator, each with a ``backend=`` switch.

``backend="auto"`` runs the Triton kernel on CUDA tensors and the PyTorch reference twin
on the CPU; ``"triton"`` and ``"reference"`` force one; ``"mamba_ssm"`` calls mamba-ssm's
CUDA kernel where that package is importable (imported lazily, never at package import).
"""

from .selective_scan import selective_scan, selective_scan_ref
from .selective_scan_2d import selective_scan_2d, selective_scan_2d_ref

__all__ = ["selective_scan", "selective_scan_ref", "selective_scan_2d", "selective_scan_2d_ref"]
