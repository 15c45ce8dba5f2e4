"""Tile encoders: a registry of builders that return a ready-to-run :class:`Extractor`.

Built-in:

- ``resnet50_trunc``: ResNet-50 up to layer3 + average pooling, 1024-d, ImageNet
  normalisation (CLAM's encoder, used by MambaMIL/2DMamba baselines). ImageNet weights come
  from a local file (a torchvision/timm ``resnet50`` state_dict as ``.pth``/``.pt``/``.bin``,
  or ``.safetensors``). Without a file the network is initialised from a fixed seed; the
  provenance then says ``random-init`` and a warning is logged.
- ``uni``, ``gigapath``: UNI (ViT-L/16) and Prov-GigaPath (ViT-g/14) tile encoders built with
  timm and loaded from a local checkpoint.
- ``timm-<architecture>``: any timm architecture (``num_classes=0``, pooled output) loaded
  from a local checkpoint, with extra ``model_kwargs`` for ``timm.create_model``.

timm is an optional dependency (``pip install 'mambapath[encoders]'``); it is imported only
when a timm-based extractor is asked for.

New encoders register with ``@register_extractor`` on a function
``name(weights: Path | None, seed: int, **model_kwargs) -> Extractor``.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..io import sha256_file
from .resnet import ResNet50Trunk, load_trunk_state_dict, random_init_trunk, unwrap_state_dict

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT = "random-init"
TIMM_PREFIX = "timm-"


@dataclass
class Extractor:
    """A tile encoder and how to feed it: (B, 3, input_size, input_size) in [0, 1] -> (B, feature_dim)."""

    name: str
    model: nn.Module
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: edge the tiles are resized to before the network; None = the tiles' own patch_size
    input_size: int | None
    #: sha256 of the weights file, or "random-init"
    weights_sha256: str
    weights_file: str | None = None
    seed: int | None = None
    model_kwargs: dict = field(default_factory=dict)

    def provenance(self) -> dict:
        """What identifies the network that produced a features file."""
        return {
            "extractor": self.name,
            "weights_sha256": self.weights_sha256,
            "weights_file": Path(self.weights_file).name if self.weights_file else "",
            "seed": -1 if self.seed is None else int(self.seed),
            "feature_dim": int(self.feature_dim),
            "model_kwargs": json.dumps(self.model_kwargs, sort_keys=True),
        }


_EXTRACTORS: dict[str, Callable[..., Extractor]] = {}


def register_extractor(fn: Callable[..., Extractor]) -> Callable[..., Extractor]:
    """Register an extractor builder under its function name."""
    if fn.__name__ in _EXTRACTORS:
        raise ValueError(f"extractor {fn.__name__!r} registered twice")
    _EXTRACTORS[fn.__name__] = fn
    return fn


def list_extractors() -> list[str]:
    return sorted(_EXTRACTORS) + [f"{TIMM_PREFIX}<architecture>"]


def create_extractor(name: str, weights: str | Path | None = None, seed: int = 0, **model_kwargs) -> Extractor:
    """Build extractor ``name`` (eval mode, on the CPU) with weights from a local file or a seed."""
    weights = Path(weights) if weights else None
    if weights is not None and not weights.is_file():
        raise ConfigError(f"features.weights: weights file {weights} not found; give a local file or null for random init")
    if name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX):
        extractor = _timm_extractor(name, name[len(TIMM_PREFIX) :], weights, model_kwargs)
    elif name in _EXTRACTORS:
        extractor = _EXTRACTORS[name](weights=weights, seed=seed, **model_kwargs)
    else:
        raise ConfigError(
            f"features.extractor: unknown extractor {name!r}; known: {', '.join(list_extractors())}"
        )
    extractor.model.eval()
    return extractor


# --- weights files ------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file (8-byte header length, JSON header, raw little-endian data).

    The format is small enough to read directly, which keeps the ``safetensors`` package an
    unneeded dependency.
    """
    path = Path(path)
    blob = path.read_bytes()
    try:
        (header_len,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + header_len])
    except (struct.error, ValueError) as exc:
        raise ConfigError(f"{path}: not a safetensors file ({exc}); re-export the weights") from exc
    data = memoryview(blob)[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ConfigError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        flat = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype)
        tensors[name] = flat.reshape(shape)
    return tensors


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a local ``.safetensors`` or torch pickle (``.pth``/``.pt``/``.bin``/``.ckpt``)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad pickles
        raise ConfigError(
            f"{path}: cannot be read as a torch state_dict ({type(exc).__name__}: {exc}); "
            "save it with torch.save(model.state_dict(), path) or as .safetensors"
        ) from exc
    return unwrap_state_dict(checkpoint, str(path))


# --- built-in extractors ------------------------------------------------------------------


@register_extractor
def resnet50_trunc(weights: Path | None = None, seed: int = 0, **model_kwargs) -> Extractor:
    """ImageNet ResNet-50 truncated after layer3, 1024-d (CLAM's ``resnet50_trunc``)."""
    if model_kwargs:
        raise ConfigError(f"features.model_kwargs: resnet50_trunc takes none (got {sorted(model_kwargs)})")
    if weights is None:
        model = random_init_trunk(seed)
        log.warning(
            "resnet50_trunc: no weights file given, so the network is randomly initialised (seed %d) and "
            "its features carry no ImageNet knowledge; fine for testing the pipeline, not for reproducing "
            "the papers: set features.weights to a local torchvision resnet50 state_dict",
            seed,
        )
        sha, used_seed = RANDOM_INIT, seed
    else:
        model = ResNet50Trunk()
        load_trunk_state_dict(model, load_weights_file(weights), str(weights))
        sha, used_seed = sha256_file(weights), None
        log.info("resnet50_trunc: weights %s (sha256 %s)", weights, sha)
    return Extractor(
        name="resnet50_trunc",
        model=model,
        feature_dim=ResNet50Trunk.feature_dim,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        input_size=None,  # CLAM practice: the tile as read, no resize to 224
        weights_sha256=sha,
        weights_file=str(weights) if weights else None,
        seed=used_seed,
    )


# Published model arguments of the pathology foundation models (their model cards).
_TIMM_PRESETS = {
    "uni": ("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}),
    "gigapath": (
        "vit_giant_patch14_dinov2",
        {"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
         "init_values": 1e-5, "mlp_ratio": 5.33334},
    ),
}


@register_extractor
def uni(weights: Path | None = None, seed: int = 0, **model_kwargs) -> Extractor:
    """UNI (ViT-L/16, 1024-d) from a local ``pytorch_model.bin``; needs timm."""
    arch, kwargs = _TIMM_PRESETS["uni"]
    return _timm_extractor("uni", arch, weights, {**kwargs, **model_kwargs})


@register_extractor
def gigapath(weights: Path | None = None, seed: int = 0, **model_kwargs) -> Extractor:
    """Prov-GigaPath tile encoder (ViT-g/14, 1536-d) from a local checkpoint; needs timm."""
    arch, kwargs = _TIMM_PRESETS["gigapath"]
    return _timm_extractor("gigapath", arch, weights, {**kwargs, **model_kwargs})


def import_timm():
    """timm, or a ConfigError that says how to install it."""
    try:
        import timm
    except ImportError as exc:
        raise ConfigError(
            "this extractor is built with timm, which is not installed: run "
            "`pip install 'mambapath[encoders]'` (or choose features.extractor: resnet50_trunc)"
        ) from exc
    return timm


def _timm_extractor(name: str, architecture: str, weights: Path | None, model_kwargs: dict) -> Extractor:
    timm = import_timm()
    if weights is None:
        raise ConfigError(
            f"features.weights: extractor {name} needs its local checkpoint (a randomly initialised "
            f"foundation model is meaningless); set features.weights to the {name} weights file"
        )
    try:
        model = timm.create_model(architecture, pretrained=False, num_classes=0, **model_kwargs)
    except Exception as exc:  # noqa: BLE001 - timm raises RuntimeError/TypeError for bad names/args
        raise ConfigError(
            f"features.extractor: timm cannot build {architecture!r} with {model_kwargs} ({exc}); "
            "check the architecture name (timm.list_models()) and features.model_kwargs"
        ) from exc
    state = load_weights_file(weights)
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    # A pooled encoder has no classifier head: head.* keys of a full checkpoint may be left out.
    unexpected = [k for k in result.unexpected_keys if not k.startswith(("head.", "fc."))]
    if result.missing_keys or unexpected:
        raise ConfigError(
            f"{weights}: does not fit timm {architecture} ({len(result.missing_keys)} missing keys, e.g. "
            f"{result.missing_keys[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); "
            "check features.extractor and features.model_kwargs against the checkpoint's model card"
        )
    from timm.data import resolve_data_config

    data_config = resolve_data_config({}, model=model)
    sha = sha256_file(weights)
    log.info("%s: timm %s, weights %s (sha256 %s), input %s", name, architecture, weights, sha, data_config["input_size"])
    return Extractor(
        name=name,
        model=model,
        feature_dim=int(model.num_features),
        mean=tuple(float(v) for v in data_config["mean"]),
        std=tuple(float(v) for v in data_config["std"]),
        input_size=int(data_config["input_size"][-1]),
        weights_sha256=sha,
        weights_file=str(weights),
        seed=None,
        model_kwargs={"architecture": architecture, **model_kwargs},
    )
