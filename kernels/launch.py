"""Kernel launches with little host time.

``kernel[grid](*args, **kwargs)`` on a ``triton.jit`` function binds and specialises every
argument in Python before each launch: 40 to 100 us of CPU time for the scan kernels, whose
launches carry 8 to 60 arguments (measured on the H100 benchmark machine, Triton 3.6). At
batch 1 and L = 16k a forward's GPU work is shorter than that, so the launches, not the
kernels, set the time of a call. ``launcher(kernel)[grid](*args, **kwargs)`` does the first
launch for a specialisation through Triton and keeps the compiled kernel it returns; later
launches with the same specialisation call that compiled kernel directly (12 to 20 us).

The cache key is finer than Triton's specialisation, so a kept kernel is only reused where
Triton would have picked the same one: every tensor argument by dtype and whether its address
is a multiple of 16 bytes (Triton specialises pointers on that), every other argument by its
value (Triton specialises integers on divisibility by 16 and on their width), every keyword
(the constexprs and the launch options) by value, plus the current CUDA device.

The kept kernel is handed each tensor as its address, an integer, which Triton's launcher
takes as it is. Given the tensor, it would call ``data_ptr()`` again and ask the CUDA driver
(``cuPointerGetAttribute``) whether the address is device memory, for every pointer of every
launch (the scan's gradient kernel takes 22). Passing addresses cut the host time of a 1D scan
at dim 128, L 16k by 4 % (forward) and 3 % (forward + backward): median per-call ratios over
1,100 interleaved calls on the H100 machine. The driver's check matters only for tensors that
are not on a GPU, so a launch with such a tensor goes through Triton, which refuses it with its
own error.

Under ``TRITON_INTERPRET=1`` kernels are interpreted and every launch goes through Triton.
"""

from __future__ import annotations

import torch
from triton.runtime.jit import JITFunction

_MAX_ENTRIES = 4096
_Tensor = torch.Tensor


def specialization_key(args, kwargs) -> tuple:
    """What decides which compiled kernel a launch needs (see the module docstring)."""
    return _key_and_addresses(args, kwargs)[0]


def _key_and_addresses(args, kwargs) -> tuple[tuple, list, bool]:
    """(the specialisation key, the arguments with every tensor replaced by its address,
    whether every tensor is on a GPU), in one pass over the arguments."""
    key, call, on_gpu = [], [], True
    for a in args:
        if isinstance(a, _Tensor):
            address = a.data_ptr()
            call.append(address)
            key.append((a.dtype, not address & 15))
            on_gpu = on_gpu and a.is_cuda
        else:
            call.append(a)
            key.append(a)
    return (tuple(key), tuple(kwargs.items())), call, on_gpu


class Launcher:
    """``Launcher(kernel)[grid](*args, **kwargs)``: the launch ``kernel[grid](*args, **kwargs)``
    (grid a tuple), through the kept compiled kernel after the first time (module docstring).
    Every parameter is passed, those with defaults included."""

    def __init__(self, kernel):
        self.kernel = kernel
        # an interpreted kernel (TRITON_INTERPRET=1) has no binary to keep
        self.params = kernel.params if isinstance(kernel, JITFunction) else None
        self.compiled: dict[tuple, tuple] = {}

    def __getitem__(self, grid: tuple):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple, args: tuple, kwargs: dict) -> None:
        if self.params is None:
            self.kernel[grid](*args, **kwargs)
            return
        key, addressed, on_gpu = _key_and_addresses(args, kwargs)
        key = (torch.cuda.current_device(), key)
        entry = self.compiled.get(key) if on_gpu else None
        if entry is None:
            # the compiled kernel takes every parameter positionally, constexprs included
            tail = tuple(p.name for p in self.params[len(args):])
            missing = [name for name in tail if name not in kwargs]
            if missing:
                raise TypeError(f"{self.kernel.__name__}: parameters {missing} were not passed; a Launcher "
                                "passes every parameter to the compiled kernel, defaults included: name them")
            binary = self.kernel[grid](*args, **kwargs)
            if on_gpu:
                if len(self.compiled) >= _MAX_ENTRIES:
                    self.compiled.clear()
                self.compiled[key] = (binary, tail)
            return
        binary, tail = entry
        addressed.extend([kwargs[name] for name in tail])
        binary[tuple(grid) + (1,) * (3 - len(grid))](*addressed)


def launcher(kernel) -> Launcher:
    """The Launcher of ``kernel`` (one per kernel, kept on it)."""
    found = getattr(kernel, "_launcher", None)
    if found is None:
        found = kernel._launcher = Launcher(kernel)
    return found
