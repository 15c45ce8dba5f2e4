"""Selective scan (Mamba's S6 recurrence): reference twin, Triton kernels, backend switch."""

from .naive import selective_scan_ref


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   reverse=False, initial_state=None, return_last_state=False, backend="auto"):
    """Selective scan with mamba-ssm's conventions; see naive.py for the recurrence."""
    if backend not in ("auto", "reference"):
        raise ValueError(f"selective_scan: unknown backend {backend!r}")
    return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                              delta_softplus=delta_softplus, reverse=reverse,
                              initial_state=initial_state, return_last_state=return_last_state)


__all__ = ["selective_scan", "selective_scan_ref"]
