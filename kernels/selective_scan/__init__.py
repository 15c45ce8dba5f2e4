"""Selective scan (Mamba's S6 recurrence): reference twin, Triton kernels, backend switch."""

from .naive import selective_scan_ref

__all__ = ["selective_scan_ref"]
