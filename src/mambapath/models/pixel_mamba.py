"""Pixel-Mamba (Qiu et al.; seed 002_149db968a6886ee2.txt): end-to-end slide models from pixels.

    image (1, 3, H, W) in [0, 1], at low magnification (2.5x by default)
    -> pad to whole scan windows with white, normalise with the ImageNet mean and std
    -> serialise (mambapath.serialize): one token per pixel, regions of scan_window^2 pixels in
       zigzag order, zigzag inside each region, a learned CLS token at each region's centre;
       optionally without the regions that hold no tissue                     (n, w*w + 1, 3)
    -> L = 24 Pixel-Mamba layers, each:
         Mamba Block (Eq. 1): T <- T + BiMamba(RMSNorm(T)) over the whole series, all regions
                              chained, as one sequence (1, n * (h*w + 1), C)
         Region Fusion:       merge the k = ceil(alpha * n / L) most similar region pairs
         Token Expansion:     where Tables 7/8 say so, horizontal or vertical, Cat or Avg
    -> RMSNorm of the remaining regions' CLS tokens, averaged: the slide representation
    -> Linear head: staging logits, or survival hazard logits (Eq. 2, mambapath.tasks)

Mamba Block. Eq. 1 is Vision Mamba's bidirectional block: a shared input projection (fc_x,
fc_z), a forward and a backward selective scan each gated by SiLU(z), summed, and a shared
output projection, with a residual. ``mambapath.models.layers.bidirectional.BiMamba`` is that
block (each direction has its own depthwise Conv1D psi and its own scan parameters, as in Vision
Mamba's code; Eq. 1 writes one psi for both). The norm is RMSNorm, as in Vision Mamba. Widths
follow Tables 7/8's Channels column (3 at the first layer), with Mamba's expand 2, d_state 16,
conv width 4 and dt rank ceil(C / 16).

Region Fusion (Section 3.3). The n regions, in chain order, are split into a gallery (even
positions) and a probe set (odd positions), each half of them; the paper fixes the split's size,
not how it is drawn, and alternating keeps both halves spread over the slide (as token merging
in ToMe does). Each probe region is paired with its most similar gallery region by the cosine
similarity of their CLS tokens; the k pairs of highest similarity are merged by averaging their
token series position by position (CLS with CLS, the t-th token with the t-th), the merged
region taking the gallery region's place in the chain. Should several chosen probes pick one
gallery region, all of them are averaged together, so exactly k regions leave the series.
k = ceil(alpha * n / L), with n the regions entering the layer and L the number of layers, so a
slide keeps about exp(-alpha) of its regions after L layers; with n the regions of the input the
fusions of Table 9's alpha = 1.0 would remove every region.

Token Expansion (Section 3.3, Fig. 3). Per region: take the CLS out, put the zigzag sequence
back on its (h, w) grid, shift-merge (vertical: pad one row of zeros on top, shift the map down
one row, average with the unshifted map; horizontal: the same along the columns), then join
adjacent pairs of rows (vertical) or columns (horizontal) by concatenating their channels (Cat,
C -> 2C) or averaging them (Avg, C -> C), and re-serialise the coarser grid in zigzag order
with the CLS back at the centre. The CLS token, which has no neighbour to pair with, is paired
with itself: [cls, cls] for Cat, cls for Avg, so that it keeps the widths of the region tokens.
Ten expansions (five per axis) take tokens from 1x1 to 32x32 pixels, so the scan window must be
a multiple of 32 for the paper's schedules.

Memory. Activations of a layer grow with tokens x channels, which Cat expansions keep constant
(tokens halve, channels double) and Avg expansions and Region Fusion shrink. With
``checkpointing`` every Mamba Block is recomputed in the backward pass, so training holds one
block's activations plus the (small) inputs of every layer; with ``bf16`` the network runs under
bfloat16 autocast on CUDA (the scan state stays float32 in the kernel). The CPU always runs in
float32.

Beyond the paper (choices made here, stated): images with other than 3 channels get a
pixel-wise linear stem to the first width; ``token_scale`` > 1 replaces pixel tokens by patch
tokens (a strided convolution, as Vision Mamba's patch embedding) for the fixed-token-scale
ablation of Table 4 (``pixel_mamba_fixed``: Vim-Ti sizes, no Token Expansion).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from ..serialize import (
    grid_to_sequence,
    insert_cls,
    region_tissue_fraction,
    sequence_to_grid,
    serialize,
    split_cls,
)
from .layers.bidirectional import BiMamba
from .registry import register_model

log = logging.getLogger(__name__)

#: Token Expansion kinds: direction (h = along the width, v = along the height) and join
EXPANSIONS = ("h-cat", "v-cat", "h-avg", "v-avg")

#: Table 7 (Pixel-Mamba-6M), the Token Expansion after each of the 24 layers (None: none)
SCHEDULE_6M = (
    "h-cat", "v-cat", "h-cat", "v-cat", None, "h-cat", None, "v-cat",  # layers 1-8
    None, None, "h-avg", None, None, "v-avg", None, None,  # layers 9-16
    None, None, None, "h-avg", None, "v-cat", None, None,  # layers 17-24
)
#: Table 8 (Pixel-Mamba-21M): as Table 7 but layer 11 concatenates (192 -> 384 channels)
SCHEDULE_21M = SCHEDULE_6M[:10] + ("h-cat",) + SCHEDULE_6M[11:]

#: ImageNet statistics: the paper's backbone is pre-trained on ImageNet
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class SlideImage:
    """A slide at low magnification, the input of a pixel model.

    image:        (1, C, H, W) float in [0, 1]
    tissue_mask:  (1, H, W) bool, True on tissue, or None (every region is kept)
    """

    image: torch.Tensor
    tissue_mask: torch.Tensor | None = None

    def to(self, device) -> "SlideImage":
        mask = None if self.tissue_mask is None else self.tissue_mask.to(device)
        return SlideImage(self.image.to(device), mask)


def fusion_count(n_regions: int, alpha: float, n_layers: int) -> int:
    """k = ceil(alpha * n / L) region pairs to merge, at most one per probe region (n // 2)."""
    if n_regions < 2 or alpha <= 0:
        return 0
    return min(math.ceil(alpha * n_regions / n_layers), n_regions // 2)


def region_fusion(tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the k most similar (gallery, probe) region pairs by averaging (see the module doc).

    tokens: (n, S, C) region sequences with the CLS at ``(S - 1) // 2``.
    Returns (merged (n - k, S, C), destination (n,) long: the output region each input region
    ended in).
    """
    n = tokens.shape[0]
    destination = torch.arange(n, device=tokens.device)
    if k <= 0 or n < 2:
        return tokens, destination
    gallery = torch.arange(0, n, 2, device=tokens.device)  # (ng,)
    probe = torch.arange(1, n, 2, device=tokens.device)  # (np,)
    k = min(k, probe.numel())
    _, cls = split_cls(tokens)
    cls = F.normalize(cls.detach().float(), dim=-1)  # (n, C); selection takes no gradient
    similarity = cls[probe] @ cls[gallery].t()  # (np, ng) cosine similarities
    best, match = similarity.max(dim=1)  # each probe's most similar gallery region
    chosen = best.topk(k).indices  # (k,) the k pairs of highest similarity
    source, target = probe[chosen], gallery[match[chosen]]
    summed = tokens.index_add(0, target, tokens[source])  # (n, S, C)
    counts = torch.ones(n, device=tokens.device, dtype=tokens.dtype).index_add(
        0, target, torch.ones(k, device=tokens.device, dtype=tokens.dtype))
    averaged = summed / counts[:, None, None]
    keep = torch.ones(n, dtype=torch.bool, device=tokens.device)
    keep[source] = False
    new_index = torch.cumsum(keep, 0) - 1  # output position of each kept region
    destination = new_index.clone()
    destination[source] = new_index[target]
    return averaged[keep], destination


def token_expansion(tokens: torch.Tensor, grid_hw: tuple[int, int], kind: str) -> tuple[torch.Tensor,
                                                                                         tuple[int, int]]:
    """Token Expansion of every region (see the module doc).

    tokens: (n, h * w + 1, C) with ``grid_hw = (h, w)``; kind one of :data:`EXPANSIONS`.
    Returns (tokens (n, h' * w' + 1, C'), (h', w')), halving h (vertical) or w (horizontal)
    and doubling C (Cat).
    """
    if kind not in EXPANSIONS:
        raise ValueError(f"token expansion {kind!r}: use one of {EXPANSIONS}")
    height, width = grid_hw
    direction, join = kind.split("-")
    body, cls = split_cls(tokens)
    grid = sequence_to_grid(body, height, width)  # (n, h, w, C)
    axis = 1 if direction == "v" else 2
    if grid.shape[axis] % 2:
        raise ValueError(f"token expansion {kind}: the region's token grid {height} x {width} cannot be halved "
                         "along that axis; use a scan window that is a multiple of 32 (2 ** expansions per axis)")
    # shift merging: pad the first row (column) with zeros, shift down (right) by one, average
    shifted = torch.cat([torch.zeros_like(grid.narrow(axis, 0, 1)), grid.narrow(axis, 0, grid.shape[axis] - 1)],
                        dim=axis)
    merged = (grid + shifted) * 0.5
    n, h, w, c = merged.shape
    if direction == "v":
        pairs = merged.reshape(n, h // 2, 2, w, c)
        first, second = pairs[:, :, 0], pairs[:, :, 1]  # (n, h/2, w, C) upper and lower
        new_hw = (h // 2, w)
    else:
        pairs = merged.reshape(n, h, w // 2, 2, c)
        first, second = pairs[:, :, :, 0], pairs[:, :, :, 1]  # (n, h, w/2, C) left and right
        new_hw = (h, w // 2)
    if join == "cat":
        expanded = torch.cat([first, second], dim=-1)  # (n, h', w', 2C)
        cls = torch.cat([cls, cls], dim=-1)
    else:
        expanded = (first + second) * 0.5  # (n, h', w', C)
    return insert_cls(grid_to_sequence(expanded), cls), new_hw


class MambaBlock(nn.Module):
    """Eq. 1: T <- T + BiMamba(RMSNorm(T)), over the whole series as one sequence."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, scan_backend: str = "auto"):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.mixer = BiMamba(dim, d_state=d_state, d_conv=d_conv, expand=expand, scan_backend=scan_backend)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, s, c = tokens.shape
        sequence = tokens.reshape(1, n * s, c)  # all regions chained: (1, M, C)
        return tokens + self.mixer(self.norm(sequence)).reshape(n, s, c)


class PixelMambaLayer(nn.Module):
    """Mamba Block + Region Fusion + (optional) Token Expansion."""

    def __init__(self, dim: int, expansion: str | None, **block_kwargs):
        super().__init__()
        self.dim = dim
        self.expansion = expansion
        self.block = MambaBlock(dim, **block_kwargs)

    @property
    def out_dim(self) -> int:
        return 2 * self.dim if self.expansion in ("h-cat", "v-cat") else self.dim


def _normalise_schedule(schedule) -> tuple[str | None, ...]:
    out = []
    for i, kind in enumerate(schedule):
        kind = None if kind in (None, "none", "-", "") else str(kind).lower()
        if kind is not None and kind not in EXPANSIONS:
            raise ConfigError(f"pixel_mamba schedule, layer {i + 1}: {kind!r} is not a Token Expansion; use one of "
                              f"{EXPANSIONS} or null")
        out.append(kind)
    return tuple(out)


class PixelMamba(nn.Module):
    """Pixel-Mamba: slide image -> (1, n_outputs) logits. See the module docstring.

    schedule: one entry per layer, the Token Expansion after it (one of :data:`EXPANSIONS`, or
    None); embed_dim: the first layer's width; token_scale: pixels per token side before the
    first layer (1: pixel tokens); scan_window: region edge in pixels; alpha: Region Fusion rate;
    d_state, d_conv, expand: the Mamba blocks; drop_background, region_min_tissue: leave out
    regions whose tissue fraction is at most this (needs a SlideImage with a tissue mask);
    magnification: the scale the slides are read at, kept with the model's settings (the pixel
    dataset reads it); pad_value: padding in [0, 1] image units; normalize: ImageNet mean/std
    (default for RGB); checkpointing, bf16: see Memory above; pretrained, pretrained_strict: see
    :func:`load_backbone`.
    """

    input_kind = "pixels"

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        schedule=SCHEDULE_6M,
        embed_dim: int = 3,
        token_scale: int = 1,
        scan_window: int = 224,
        alpha: float = 0.8,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        drop_background: bool = True,
        region_min_tissue: float = 0.0,
        magnification: float = 2.5,
        pad_value: float = 1.0,
        normalize: bool | None = None,
        checkpointing: bool = False,
        bf16: bool = True,
        head_dropout: float = 0.0,
        scan_backend: str = "auto",
        pretrained: str | None = None,
        pretrained_strict: bool = False,
    ):
        super().__init__()
        self.schedule = _normalise_schedule(schedule)
        if not self.schedule:
            raise ConfigError("pixel_mamba: the schedule has no layer")
        if token_scale < 1 or scan_window % token_scale:
            raise ConfigError(f"pixel_mamba: scan_window {scan_window} must be a multiple of token_scale "
                              f"{token_scale}")
        grid = scan_window // token_scale
        n_h = sum(k is not None and k.startswith("h") for k in self.schedule)
        n_v = sum(k is not None and k.startswith("v") for k in self.schedule)
        if grid % (1 << n_h) or grid % (1 << n_v):
            raise ConfigError(f"pixel_mamba: scan_window {scan_window} / token_scale {token_scale} = {grid} tokens "
                              f"per region side cannot be halved {max(n_h, n_v)} times by Token Expansion; use a "
                              f"scan window that is a multiple of {token_scale * (1 << max(n_h, n_v))}")
        if not 0 <= alpha <= 1:
            raise ConfigError(f"pixel_mamba: alpha {alpha} must lie in [0, 1] (Table 9 uses 0.4 .. 1.0)")
        self.in_dim = in_dim
        self.n_outputs = n_outputs
        self.embed_dim = embed_dim
        self.token_scale = token_scale
        self.scan_window = scan_window
        self.alpha = alpha
        self.drop_background = drop_background
        self.region_min_tissue = region_min_tissue
        self.magnification = magnification
        self.pad_value = pad_value
        self.checkpointing = checkpointing
        self.bf16 = bf16
        #: (H, W) of the input the model tests use: a few regions, one of them padded
        self.example_input_size = (scan_window + scan_window // 2, 2 * scan_window)

        self.normalize = (in_dim == 3) if normalize is None else normalize
        if self.normalize and in_dim != 3:
            raise ConfigError(f"pixel_mamba: normalize uses the ImageNet RGB statistics, but in_dim is {in_dim}")
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN[:in_dim] if self.normalize else [0.0]),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD[:in_dim] if self.normalize else [1.0]),
                             persistent=False)
        if token_scale > 1:
            # fixed token scale: token_scale x token_scale patches, as a Vision Mamba patch embedding
            self.stem = nn.Conv2d(in_dim, embed_dim, token_scale, stride=token_scale)
        elif in_dim != embed_dim:
            self.stem = nn.Conv2d(in_dim, embed_dim, 1)
        else:
            self.stem = nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(embed_dim))
        nn.init.normal_(self.cls_token, std=0.02)

        block_kwargs = dict(d_state=d_state, d_conv=d_conv, expand=expand, scan_backend=scan_backend)
        self.layers = nn.ModuleList()
        dim = embed_dim
        for kind in self.schedule:
            layer = PixelMambaLayer(dim, kind, **block_kwargs)
            self.layers.append(layer)
            dim = layer.out_dim
        self.out_dim = dim
        self.norm_f = nn.RMSNorm(dim, eps=1e-5)
        self.head_dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(dim, n_outputs)
        self.pretrained_report = None
        if pretrained:
            self.pretrained_report = load_backbone(self, pretrained, strict=pretrained_strict)

    # -- serialisation --------------------------------------------------------------------------

    def region_keep_mask(self, tissue_mask: torch.Tensor | None, height: int, width: int) -> torch.Tensor | None:
        """(n_rows, n_cols) bool regions to keep, or None for all (no mask, or dropping is off)."""
        if tissue_mask is None or not self.drop_background:
            return None
        if tuple(tissue_mask.shape[-2:]) != (height, width):
            raise ValueError(f"pixel_mamba: tissue mask {tuple(tissue_mask.shape)} does not match the image "
                             f"({height}, {width})")
        fraction = region_tissue_fraction(tissue_mask.reshape(height, width), self.scan_window)
        keep = fraction > self.region_min_tissue
        if not bool(keep.any()):
            raise ValueError(f"pixel_mamba: no region of {self.scan_window} px holds more than "
                             f"{self.region_min_tissue:.0%} tissue; slides without tissue must be skipped before "
                             "the model (the pixel dataset records them as dropped)")
        return keep

    def serialize(self, x) -> tuple[torch.Tensor, tuple[int, int]]:
        """Input (a (1, C, H, W) tensor or a :class:`SlideImage`) -> (tokens (n, S, C), (h, w))."""
        image, tissue_mask = (x.image, x.tissue_mask) if isinstance(x, SlideImage) else (x, None)
        if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != self.in_dim:
            raise ValueError(f"pixel_mamba: expected one image (1, {self.in_dim}, H, W), got {tuple(image.shape)}")
        _, _, height, width = image.shape
        keep = self.region_keep_mask(tissue_mask, height, width)
        window = self.scan_window
        n_rows, n_cols = math.ceil(height / window), math.ceil(width / window)
        # white padding (glass) in [0, 1] units, before normalisation
        padded = F.pad(image[0], (0, n_cols * window - width, 0, n_rows * window - height), value=self.pad_value)
        padded = (padded - self.pixel_mean[:, None, None]) / self.pixel_std[:, None, None]
        embedded = self.stem(padded[None])[0]  # (E, H_pad / s, W_pad / s)
        grid = window // self.token_scale
        tokens, _ = serialize(embedded, grid, self.cls_token, keep=keep)
        return tokens, (grid, grid)

    # -- forward --------------------------------------------------------------------------------

    def forward_features(self, x, trace: list | None = None) -> torch.Tensor:
        """The slide representation (1, out_dim). ``trace``, when a list, receives one dict per
        layer: the regions, token grid and channels it read, and the regions it left."""
        tokens, grid_hw = self.serialize(x)
        n_layers = len(self.layers)
        for index, layer in enumerate(self.layers):
            entry = {"layer": index + 1, "regions": tokens.shape[0], "grid": grid_hw, "channels": tokens.shape[-1]}
            if self.checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(layer.block, tokens, use_reentrant=False)
            else:
                tokens = layer.block(tokens)
            k = fusion_count(tokens.shape[0], self.alpha, n_layers)
            tokens, _ = region_fusion(tokens, k)
            if layer.expansion is not None:
                tokens, grid_hw = token_expansion(tokens, grid_hw, layer.expansion)
            if trace is not None:
                trace.append({**entry, "merged": k, "regions_out": tokens.shape[0]})
        _, cls = split_cls(tokens)  # (n_final, C)
        return self.norm_f(cls).mean(dim=0, keepdim=True)  # (1, C)

    def forward(self, x) -> torch.Tensor:
        image = x.image if isinstance(x, SlideImage) else x
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16 and image.is_cuda):
            features = self.forward_features(x)
            logits = self.head(self.head_dropout(features))
        return logits.float()  # (1, n_outputs)


# -- pre-trained weights -------------------------------------------------------------------------


def load_backbone(model: PixelMamba, path: str | Path, strict: bool = False) -> dict:
    """Load backbone weights from a local file (a state_dict, or a dict holding one under
    ``state_dict``/``model``). The task head is never loaded (its size is the task's).

    Returns ``{"file", "loaded", "missing", "unexpected"}``; with ``strict`` any missing or
    unexpected backbone key is an error that lists them. Shape mismatches are always an error.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"pixel_mamba: pre-trained weights {path} not found; set kwargs.pretrained to a local "
                          "state_dict file, or null to train from scratch")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: not a state_dict (a mapping of parameter names to tensors)")
    state = {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and v.shape != own[k].shape]
    if mismatched:
        raise ConfigError(f"{path}: {len(mismatched)} tensor(s) of another shape than this model's, e.g. "
                          f"{mismatched[:3]}; the weights are for another Pixel-Mamba configuration")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise ConfigError(f"{path}: strict loading failed: {len(missing)} missing key(s) {missing[:5]}, "
                          f"{len(unexpected)} unexpected key(s) {unexpected[:5]}; set pretrained_strict: false to "
                          "load what matches")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    report = {"file": str(path), "loaded": len(state) - len(unexpected), "missing": missing,
              "unexpected": unexpected}
    log.info("pixel_mamba: loaded %d tensors from %s; %d missing (%s), %d unexpected (%s)", report["loaded"], path,
             len(missing), ", ".join(missing[:5]) or "-", len(unexpected), ", ".join(unexpected[:5]) or "-")
    if missing:
        log.warning("pixel_mamba: %d backbone tensor(s) not in %s keep their random initialisation: %s", len(missing),
                    path, ", ".join(missing[:10]))
    return report


# -- registered models ---------------------------------------------------------------------------

#: the CPU test and demo size: 4 layers, two Cat and two Avg expansions, 16 px regions
TINY = dict(schedule=("h-cat", "v-cat", "h-avg", "v-avg"), scan_window=16, d_state=4)


@register_model
def pixel_mamba_6m(in_dim: int, n_outputs: int, **kwargs) -> PixelMamba:
    """Pixel-Mamba-6M (Table 7): widths 3 -> 384."""
    return PixelMamba(in_dim, n_outputs, **{"schedule": SCHEDULE_6M, **kwargs})


@register_model
def pixel_mamba_21m(in_dim: int, n_outputs: int, **kwargs) -> PixelMamba:
    """Pixel-Mamba-21M (Table 8): widths 3 -> 768."""
    return PixelMamba(in_dim, n_outputs, **{"schedule": SCHEDULE_21M, **kwargs})


@register_model
def pixel_mamba_fixed(in_dim: int, n_outputs: int, **kwargs) -> PixelMamba:
    """Fixed token scale (Table 4's Vision-Mamba-Surv rows): 16 x 16 px patch tokens, 24 Mamba
    Blocks of width 192 (Vim-Ti), Region Fusion as in Pixel-Mamba, no Token Expansion."""
    return PixelMamba(in_dim, n_outputs, **{"schedule": (None,) * 24, "embed_dim": 192, "token_scale": 16, **kwargs})


@register_model
def pixel_mamba_tiny(in_dim: int, n_outputs: int, **kwargs) -> PixelMamba:
    return PixelMamba(in_dim, n_outputs, **{**TINY, **kwargs})
