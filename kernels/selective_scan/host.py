"""Host-side steps shared by chunk.py and chunk_many_states.py: the inputs laid out for the
kernels, whether a call needs autograd (the 2D scan's tiled.py asks too), and the last state
handed back. Plain PyTorch, no Triton, so the kernel files use it in either mode (compiled or
interpreted)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class KernelInputs(NamedTuple):
    """The inputs as the kernels read them: u, delta, z with unit stride along L; B and C as
    (b, g, N, L) with unit stride along L; A, D, delta_bias, initial_state float32 and
    contiguous. ``squeeze_B``/``squeeze_C``: B/C came as (b, N, L) (one group)."""

    u: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor | None
    z: torch.Tensor | None
    delta_bias: torch.Tensor | None
    initial_state: torch.Tensor | None
    squeeze_B: bool
    squeeze_C: bool


def unit_stride(t):
    """``t`` itself where its last dimension is contiguous (or it is None), else a copy."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _float32(t):
    return t.float().contiguous() if t is not None else None


def kernel_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, same_bc_strides: bool) -> KernelInputs:
    """The inputs laid out for the kernels (see KernelInputs). With ``same_bc_strides`` B and C
    also share their strides (kernels that address both with one set), copied where they differ."""
    squeeze_B, squeeze_C = B.dim() == 3, C.dim() == 3
    B4 = unit_stride(B.unsqueeze(1) if squeeze_B else B)
    C4 = unit_stride(C.unsqueeze(1) if squeeze_C else C)
    if same_bc_strides and B4.stride() != C4.stride():
        B4, C4 = B4.contiguous(), C4.contiguous()
    return KernelInputs(unit_stride(u), unit_stride(delta), _float32(A), B4, C4, _float32(D), unit_stride(z),
                        _float32(delta_bias), _float32(initial_state), squeeze_B, squeeze_C)


def needs_autograd(tensors) -> bool:
    """Whether a call must record a graph: gradients are on and some input requires one. A call
    that needs none (inference, under no_grad) runs the kernels without autograd's bookkeeping
    and without what only the backward reads."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def last_state(chunk_states: torch.Tensor, inputs: KernelInputs, n_state: int) -> torch.Tensor:
    """The state after the last step: the last chunk's end state, or for L = 0 the initial
    state (zeros without one), float32 (batch, dim, N)."""
    batch, dim, length = inputs.u.shape
    if length == 0:
        if inputs.initial_state is not None:
            return inputs.initial_state.clone()
        return torch.zeros(batch, dim, n_state, dtype=torch.float32, device=inputs.u.device)
    return chunk_states[:, -1].clone()
