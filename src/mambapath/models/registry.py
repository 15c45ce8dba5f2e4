"""Model registry: ``@register_model`` builders, ``create_model(name, **kwargs)``, ``list_models()``.

A builder is a function that returns an ``nn.Module``; its name is the model name used in
config/methods/*.yaml. Every family registers a ``*_tiny`` variant for tests, and the
tests parametrize over ``list_models()``, so a new model is tested the day it is registered.
"""

from __future__ import annotations

import fnmatch
from typing import Callable

_REGISTRY: dict[str, Callable] = {}
_FAMILY_MODULES = (
    "mambapath.models.baselines",
    "mambapath.models.mamba_mil",
    "mambapath.models.mamba2d_mil",
    "mambapath.models.mambaback",
    "mambapath.models.pixel_mamba",
)


def register_model(fn: Callable) -> Callable:
    name = fn.__name__
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def _load_families() -> None:
    import importlib
    import importlib.util

    for module in _FAMILY_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def list_models(pattern: str = "*") -> list[str]:
    _load_families()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **kwargs):
    _load_families()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)
