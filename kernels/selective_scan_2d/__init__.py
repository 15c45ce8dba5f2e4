"""2D selective scan (2DMamba): reference twin, Triton kernels, backend switch."""

from .naive import selective_scan_2d_ref

__all__ = ["selective_scan_2d_ref"]
