"""Selective scan (Mamba's S6 recurrence): reference twin, Triton kernels, backend switch.

``backend="auto"`` runs the Triton kernels on CUDA tensors and the PyTorch reference on the
CPU; ``"triton"`` forces the kernels (on the CPU only under ``TRITON_INTERPRET=1``, Triton's
interpreter); ``"reference"`` forces the twin in naive.py; ``"mamba_ssm"`` calls mamba-ssm's
CUDA ``selective_scan_fn`` (imported on first use), which has no ``reverse`` or
``initial_state``. ``resolve_backend`` says which backend a call runs, and every call logs it at
DEBUG level on the ``mambapath.kernels.selective_scan`` logger. No backend falls back to
another: a backend that cannot run raises an error that says why and what to use instead.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch

from .naive import check_scan_inputs, selective_scan_ref

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "reference", "mamba_ssm")


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


@functools.cache
def interpreter_active() -> bool:
    """Whether Triton runs kernels in its CPU interpreter in this process. Triton reads
    TRITON_INTERPRET when it defines a kernel, its own library included, so the first import
    of triton.language (which this call makes) fixes the mode for the whole process: the
    answer is kept."""
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.zeros, InterpretedFunction)


# above this many states a channel's states no longer fit one thread's registers: chunk.py's
# layout spills, and chunk_many_states.py (the states over the warps) is faster
MANY_STATES = 16


def uses_many_states(n_state: int) -> bool:
    """Whether ``selective_scan`` runs chunk_many_states.py (N > 16) rather than chunk.py."""
    return n_state > MANY_STATES


@functools.lru_cache(maxsize=4)
def _kernel_module(file_name: str, interpret: bool):
    """A kernel file of this package, defined for one mode: compiled or interpreted. The kernels
    must match Triton's own library (``interpreter_active()``); each mode gets its own copy of
    the module, defined with TRITON_INTERPRET set accordingly."""
    name = f"{__name__}._{Path(file_name).stem}_{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(file_name))
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


def triton_module(interpret: bool, many_states: bool = False):
    """The Triton kernels for one mode (compiled or interpreted): chunk.py, or with
    ``many_states`` chunk_many_states.py (the layout ``selective_scan`` uses for N > 16)."""
    return _kernel_module("chunk_many_states.py" if many_states else "chunk.py", interpret)


def resolve_backend(backend: str, u: torch.Tensor, reverse: bool = False, initial_state=None) -> str:
    """The backend that ``selective_scan(..., backend=backend)`` runs for input ``u``:
    "triton", "reference" or "mamba_ssm". Raises for a backend that cannot run here."""
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan: unknown backend {backend!r}; use one of {BACKENDS}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if u.is_cuda else "reference"
    if backend == "mamba_ssm":
        lacking = [name for name, used in (("reverse=True", reverse), ("initial_state", initial_state is not None))
                   if used]
        if lacking:
            raise ValueError(f"selective_scan: mamba-ssm's selective_scan_fn has no {' or '.join(lacking)}; "
                             "use backend='triton' (CUDA) or 'reference'")
        if not u.is_cuda:
            raise ValueError(f"selective_scan: backend='mamba_ssm' needs CUDA tensors, got one on {u.device}; "
                             "use backend='reference' on the CPU")
        _import_mamba_ssm()
        return "mamba_ssm"
    if not u.is_cuda:
        if not _interpret_requested():
            raise RuntimeError(
                f"selective_scan: backend='triton' needs a CUDA tensor, got one on {u.device}; set the "
                "environment variable TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter "
                "(slow, for tests), or use backend='reference'")
        if not interpreter_active():
            raise RuntimeError(
                "selective_scan: TRITON_INTERPRET=1 is set, but triton was imported before it was set, so "
                "Triton compiles for the GPU in this process; set TRITON_INTERPRET=1 before anything "
                "imports triton (in the environment of the process), or use backend='reference'")
    return "triton"


def _import_mamba_ssm():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as err:
        raise ImportError(
            "selective_scan: backend='mamba_ssm' needs the mamba-ssm package, which did not import "
            f"({err}); install it on a machine with nvcc and a CUDA GPU (pip install 'mambapath[gpu]'), "
            "or use backend='triton' or 'reference'") from err
    return selective_scan_fn


class _NoStateGradient(torch.autograd.Function):
    """mamba-ssm returns the last state without a gradient path: refuse a gradient through it
    rather than drop it."""

    @staticmethod
    def forward(ctx, state):
        return state.view_as(state)

    @staticmethod
    def backward(ctx, grad):
        if grad is not None and bool(grad.ne(0).any()):
            raise RuntimeError("selective_scan: mamba-ssm does not backpropagate through the last state; "
                               "use backend='triton' or 'reference' to train through a carried state")
        return grad


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   reverse=False, initial_state=None, return_last_state=False, backend="auto"):
    """Selective scan with mamba-ssm's conventions; the recurrence is in naive.py, the kernels'
    maths in README.md.

    u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) or (batch, groups, N, L);
    D, delta_bias (dim,); initial_state (batch, dim, N). Returns y (batch, dim, L) in u's
    dtype, and with ``return_last_state`` also the state after the last step, (batch, dim, N)
    float32 (float64 for float64 inputs on the reference). Gradients reach every tensor input,
    and through the last state (except on mamba-ssm, which refuses one).
    """
    name = resolve_backend(backend, u, reverse=reverse, initial_state=initial_state)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("selective_scan: backend=%s%s device=%s dtype=%s shape=%s N=%d", name,
                  " (interpreter)" if name == "triton" and interpreter_active() else "", u.device, u.dtype,
                  tuple(u.shape), A.shape[-1])
    if name == "reference":
        return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, reverse=reverse, initial_state=initial_state,
                                  return_last_state=return_last_state)
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if name == "mamba_ssm":
        out = _import_mamba_ssm()(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                  delta_softplus=delta_softplus, return_last_state=return_last_state)
        if return_last_state:
            y, last_state = out
            return y, _NoStateGradient.apply(last_state)
        return out
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias, initial_state) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"selective_scan: all tensors must be on one device, got {sorted(map(str, devices))}")
    return triton_module(interpreter_active(), uses_many_states(A.shape[-1])).selective_scan_triton(
        u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, reverse=reverse,
        initial_state=initial_state, return_last_state=return_last_state)


__all__ = ["BACKENDS", "interpreter_active", "resolve_backend", "selective_scan", "selective_scan_ref",
           "triton_module", "uses_many_states"]
