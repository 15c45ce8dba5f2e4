"""2D selective scan (2DMamba): reference twin, Triton kernels, backend switch."""

from .naive import selective_scan_2d_ref


def selective_scan_2d(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, backend="auto"):
    """2DMamba's 2D selective scan; see naive.py for the recurrence."""
    if backend not in ("auto", "reference"):
        raise ValueError(f"selective_scan_2d: unknown backend {backend!r}")
    return selective_scan_2d_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)


__all__ = ["selective_scan_2d", "selective_scan_2d_ref"]
