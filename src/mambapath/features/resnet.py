"""ResNet-50 truncated after ``layer3``: the 1024-d tile encoder of CLAM and the Mamba papers.

A plain-PyTorch copy of the torchvision ResNet-50 layout (bottleneck blocks, stride on the
3x3 convolution, "v1.5"), kept only up to ``layer3`` and followed by global average pooling.
Module names equal torchvision's, so the ``state_dict`` of a torchvision or timm
``resnet50`` (ImageNet weights saved to a local file) loads here once its ``layer4.*`` and
``fc.*`` entries are dropped; :func:`load_trunk_state_dict` does that and checks every key.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: (blocks, bottleneck width, stride) of layer1..layer3 of ResNet-50
RESNET50_TRUNK_LAYERS = ((3, 64, 1), (4, 128, 2), (6, 256, 2))
EXPANSION = 4
FEATURE_DIM = 256 * EXPANSION  # 1024 channels out of layer3


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 convolutions with a residual connection."""

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            # Named like torchvision's Sequential(conv, bn) so keys read downsample.0 / downsample.1.
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Trunk(nn.Module):
    """ResNet-50 stem + layer1..layer3 + adaptive average pooling: (B, 3, H, W) -> (B, 1024)."""

    feature_dim = FEATURE_DIM

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for i, (blocks, width, stride) in enumerate(RESNET50_TRUNK_LAYERS, start=1):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(in_channels, width, stride if b == 0 else 1))
                in_channels = width * EXPANSION
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torchvision's initialisation: He-normal (fan_out) convolutions, unit BatchNorm.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 1024, H/16, W/16)
        return torch.flatten(self.avgpool(x), 1)  # (B, 1024)


def random_init_trunk(seed: int) -> ResNet50Trunk:
    """A trunk initialised from ``seed`` alone, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNet50Trunk()


#: prefixes that wrappers put before the torchvision names (DataParallel, timm/Lightning wrappers)
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "trunk.")
#: the parts of a full ResNet-50 checkpoint the trunk does not have
_DROPPED_PREFIXES = ("layer4.", "fc.")


def unwrap_state_dict(checkpoint, source: str) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a checkpoint (a bare state_dict or {'state_dict': ...})."""
    state = checkpoint
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            f"{source}: not a state_dict (a mapping of parameter names to tensors); "
            "save the network with torch.save(model.state_dict(), path)"
        )
    return dict(state)


def load_trunk_state_dict(model: ResNet50Trunk, state: dict[str, torch.Tensor], source: str) -> None:
    """Load torchvision/timm ResNet-50 weights into the trunk; every trunk key must be present."""
    state = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    dropped = [k for k in state if k.startswith(_DROPPED_PREFIXES)]
    trunk_state = {k: v for k, v in state.items() if not k.startswith(_DROPPED_PREFIXES)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(trunk_state))
    unexpected = sorted(set(trunk_state) - set(expected))
    if missing or unexpected:
        raise ConfigError(
            f"{source}: not a ResNet-50 checkpoint in torchvision/timm layout "
            f"({len(missing)} trunk keys missing, e.g. {missing[:3]}; {len(unexpected)} unknown keys, "
            f"e.g. {unexpected[:3]}); give the state_dict of a torchvision or timm resnet50"
        )
    wrong_shape = [k for k, v in trunk_state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong_shape:
        k = wrong_shape[0]
        raise ConfigError(
            f"{source}: {len(wrong_shape)} tensors have the wrong shape for ResNet-50 "
            f"(e.g. {k}: {tuple(trunk_state[k].shape)} instead of {tuple(expected[k].shape)}); "
            "give the state_dict of a torchvision or timm resnet50"
        )
    model.load_state_dict(trunk_state, strict=True)
    log.info("%s: loaded %d trunk tensors, ignored %d (layer4/fc)", source, len(trunk_state), len(dropped))
