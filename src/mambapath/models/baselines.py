"""Classic MIL baselines, as the Pixel-Mamba paper's Table 2 names them.

- ``mean_mil`` / ``max_mil``: one linear instance classifier applied to every tile, then the
  mean (MeanMIL) or the maximum (MaxMIL) of the tiles' logits. With 1024-d features and four
  classes this has 4.1K parameters, the count Table 2 gives. ``hidden_dim`` adds the
  Linear-ReLU-Dropout layer that MambaMIL's versions of these baselines put in front.
- ``abmil``: gated attention MIL (Ilse et al., ICML 2018): a tile embedding, attention
  weights from ``w^T (tanh(V h) * sigmoid(U h))``, softmax over the bag's tiles, the weighted
  sum of embeddings, a linear classifier. Sizes 1024 -> 512 -> 384 (CLAM's "big" sizes)
  give Table 2's 0.9M parameters.
- ``transmil``: TransMIL (Shao et al., NeurIPS 2021): tile embedding, the sequence padded to a
  square by repeating its first tiles, a class token, two Nystrom self-attention layers with
  the PPEG positional encoder (depthwise 7x7, 5x5 and 3x3 convolutions on the square) between
  them, and a classifier on the class token. 2.7M parameters at 1024-d input.
- ``ilra_mil``: ILRA-MIL (Xiang and Zhang, ICLR 2023): gated attention blocks (GAB) that
  project the bag onto a small set of learned latent vectors and back (a low-rank
  attention), then non-local pooling by attention from one learned query. 3.7M parameters.
  Defaults follow the authors' released configuration: rank 1, layer norms on.

Every model takes a :class:`~mambapath.models.Bag` and returns ``(B, n_outputs)`` logits.
Padding (``mask == False``) never changes a bag's output: pooled models mask it out of the
pooling, ILRA-MIL masks it out of every attention over the bag, and TransMIL, whose square
padding and Nystrom landmarks depend on the bag's length, runs bag by bag on the real tiles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .bag import Bag
from .registry import register_model


def _init_linear(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases for linear layers (as CLAM and its descendants do)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _masked_features(bag: Bag) -> torch.Tensor:
    """Bag features with padded positions zeroed, so that NaN or junk in padding cannot leak."""
    return bag.features.masked_fill(~bag.mask[..., None], 0.0)  # (B, N, D)


class _InstancePoolMIL(nn.Module):
    """Per-tile classifier, then a pooling of the tiles' logits over the bag."""

    input_kind = "features"

    def __init__(self, in_dim: int, n_outputs: int, pooling: str, hidden_dim: int | None, dropout: float):
        super().__init__()
        if pooling not in ("mean", "max"):
            raise ValueError(f"pooling must be 'mean' or 'max', got {pooling!r}")
        self.pooling = pooling
        layers: list[nn.Module] = []
        if hidden_dim:
            layers += [nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout)]
            in_dim = hidden_dim
        layers.append(nn.Linear(in_dim, n_outputs))
        self.instance_classifier = nn.Sequential(*layers)
        _init_linear(self)

    def forward(self, bag: Bag) -> torch.Tensor:
        logits = self.instance_classifier(_masked_features(bag))  # (B, N, K)
        mask = bag.mask[..., None]  # (B, N, 1)
        if self.pooling == "mean":
            n_tiles = mask.sum(dim=1).clamp(min=1)  # (B, 1)
            return (logits * mask).sum(dim=1) / n_tiles
        return logits.masked_fill(~mask, float("-inf")).amax(dim=1)


class MeanMIL(_InstancePoolMIL):
    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int | None = None, dropout: float = 0.25):
        super().__init__(in_dim, n_outputs, "mean", hidden_dim, dropout)


class MaxMIL(_InstancePoolMIL):
    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int | None = None, dropout: float = 0.25):
        super().__init__(in_dim, n_outputs, "max", hidden_dim, dropout)


class GatedAttention(nn.Module):
    """Attention scores ``w^T (tanh(V h) * sigmoid(U h))`` (Ilse et al., Eq. 9)."""

    def __init__(self, dim: int, attn_dim: int, dropout: float):
        super().__init__()
        self.attention_v = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.attention_u = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_w = nn.Linear(attn_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attention_w(self.attention_v(h) * self.attention_u(h)).squeeze(-1)  # (B, N)


class ABMIL(nn.Module):
    input_kind = "features"

    def __init__(self, in_dim: int, n_outputs: int, hidden_dim: int = 512, attn_dim: int = 384, dropout: float = 0.25):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden_dim, attn_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, n_outputs)
        _init_linear(self)

    def attention_weights(self, bag: Bag) -> tuple[torch.Tensor, torch.Tensor]:
        """Tile embeddings (B, N, H) and attention weights (B, N), zero on padding."""
        h = self.embed(_masked_features(bag))  # (B, N, H)
        scores = self.attention(h).masked_fill(~bag.mask, float("-inf"))  # (B, N)
        return h, torch.softmax(scores, dim=1)

    def forward(self, bag: Bag) -> torch.Tensor:
        h, a = self.attention_weights(bag)
        slide_embedding = torch.einsum("bn,bnh->bh", a, h)  # (B, H)
        return self.classifier(slide_embedding)


# TransMIL ----------------------------------------------------------------------------------


def _iterative_pinv(x: torch.Tensor, iters: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of each (m, m) matrix in ``x`` by the Newton-Schulz
    iteration the Nystromformer uses (Razavi et al., 2014), started from
    ``x^T / (||x||_1 ||x||_inf)`` per matrix so that batch items do not influence each other."""
    abs_x = x.abs()
    col_max = abs_x.sum(dim=-1).amax(dim=-1, keepdim=True)  # (..., 1) max row sum = ||x||_inf
    row_max = abs_x.sum(dim=-2).amax(dim=-1, keepdim=True)  # (..., 1) max column sum = ||x||_1
    z = x.transpose(-1, -2) / (col_max * row_max)[..., None]
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Nystrom self-attention (Xiong et al., AAAI 2021) with TransMIL's settings: landmarks are
    the means of consecutive segments of queries and keys, the (m x m) landmark kernel is
    inverted by :func:`_iterative_pinv`, and a depthwise convolution of the values along the
    sequence is added as a residual. The sequence is padded at the front to a multiple of the
    number of landmarks; padded positions are masked out of every softmax and landmark mean."""

    def __init__(self, dim: int, heads: int, dim_head: int, num_landmarks: int, pinv_iterations: int = 6,
                 residual_kernel: int = 33, dropout: float = 0.1):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.scale = dim_head ** -0.5
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                  groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = self.num_landmarks
        pad = (-n) % m
        mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
        if pad:
            x = F.pad(x, (0, 0, pad, 0))
            mask = F.pad(mask, (pad, 0), value=False)
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        # (B, L, h*d) -> (B, h, L, d), padding zeroed
        q, k, v = (t.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2) * mask[:, None, :, None]
                   for t in (q, k, v))
        q = q * self.scale
        seg = q.shape[2] // m  # tiles per landmark segment
        counts = mask.reshape(b, m, seg).sum(-1)  # (B, m) real tiles per segment
        landmark_mask = counts > 0  # (B, m)
        denom = counts.clamp(min=1)[:, None, :, None]
        q_land = q.reshape(b, self.heads, m, seg, self.dim_head).sum(-2) / denom  # (B, h, m, d)
        k_land = k.reshape(b, self.heads, m, seg, self.dim_head).sum(-2) / denom

        neg = torch.finfo(q.dtype).min
        sim1 = (q @ k_land.transpose(-1, -2)).masked_fill(~landmark_mask[:, None, None, :], neg)  # (B, h, L, m)
        sim2 = (q_land @ k_land.transpose(-1, -2)).masked_fill(~landmark_mask[:, None, None, :], neg)  # (B, h, m, m)
        sim3 = (q_land @ k.transpose(-1, -2)).masked_fill(~mask[:, None, None, :], neg)  # (B, h, m, L)
        attn1, attn2, attn3 = (torch.softmax(s, dim=-1) for s in (sim1, sim2, sim3))
        # Rows of empty landmarks are zeroed so the kernel is block-diagonal and its
        # pseudo-inverse on the real landmarks is that of the real block alone.
        land = landmark_mask[:, None, :, None].to(attn2.dtype)  # (B, 1, m, 1)
        attn2 = attn2 * land
        attn3 = attn3 * land
        out = (attn1 @ _iterative_pinv(attn2, self.pinv_iterations)) @ (attn3 @ v)  # (B, h, L, d)
        out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head)  # (B, L, h*d)
        return self.to_out(out)[:, pad:]


class TransLayer(nn.Module):
    def __init__(self, dim: int, heads: int, num_landmarks: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads=heads, dim_head=dim // heads, num_landmarks=num_landmarks,
                                     dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7x7, 5x5 and 3x3 convolutions of the
    tokens laid out on a square, added to the tokens; the class token passes through."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, c = x.shape
        cls_token, tokens = x[:, :1], x[:, 1:]
        feat = tokens.transpose(1, 2).reshape(b, c, side, side)  # (B, C, side, side)
        feat = feat + self.proj7(feat) + self.proj5(feat) + self.proj3(feat)
        return torch.cat([cls_token, feat.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    input_kind = "features"

    def __init__(self, in_dim: int, n_outputs: int, dim: int = 512, heads: int = 8, num_landmarks: int | None = None,
                 dropout: float = 0.1):
        super().__init__()
        num_landmarks = num_landmarks or dim // 2
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TransLayer(dim, heads, num_landmarks, dropout)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, heads, num_landmarks, dropout)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_outputs)

    def _forward_one(self, features: torch.Tensor) -> torch.Tensor:
        """One bag's real tiles (1, n, D) -> (1, n_outputs)."""
        h = self.embed(features)  # (1, n, dim)
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        # square padding by repeating the first tiles, as TransMIL does (cycling for tiny bags)
        if extra:
            reps = torch.arange(extra, device=h.device) % n
            h = torch.cat([h, h[:, reps]], dim=1)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)  # (1, 1 + side^2, dim)
        h = self.layer1(h)
        h = self.ppeg(h, side)
        h = self.layer2(h)
        return self.classifier(self.norm(h)[:, 0])

    def forward(self, bag: Bag) -> torch.Tensor:
        # Square padding and landmark segments depend on each bag's length, so bags run one
        # at a time on their real tiles (MIL trains with one slide per step anyway).
        outs = [self._forward_one(bag.features[i, bag.mask[i]][None]) for i in range(bag.batch_size)]
        return torch.cat(outs, dim=0)


# ILRA-MIL ----------------------------------------------------------------------------------


class ILRAAttention(nn.Module):
    """ILRA's multi-head attention block: project queries, keys and values to ``dim``, attend,
    add the projected queries, then ``O + relu(fc_o(O))`` with optional layer norms, and an
    optional SiLU gate computed from the raw queries."""

    def __init__(self, dim_q: int, dim_k: int, dim: int, heads: int, layer_norm: bool, gated: bool):
        super().__init__()
        self.fc_q = nn.Linear(dim_q, dim)
        self.fc_k = nn.Linear(dim_k, dim)
        self.fc_v = nn.Linear(dim_k, dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc_o = nn.Linear(dim, dim)
        self.ln0 = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.ln1 = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.gate = nn.Sequential(nn.Linear(dim_q, dim), nn.SiLU()) if gated else None

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_padding: torch.Tensor | None = None):
        q = self.fc_q(queries)  # (B, Lq, dim)
        k, v = self.fc_k(keys), self.fc_v(keys)  # (B, Lk, dim)
        a, _ = self.attention(q, k, v, key_padding_mask=key_padding, need_weights=False)
        o = self.ln0(q + a)
        o = self.ln1(o + F.relu(self.fc_o(o)))
        if self.gate is not None:
            o = o * self.gate(queries)
        return o


class GAB(nn.Module):
    """Gated attention block with a low-rank latent matrix (ILRA Eq. 16): the bag is projected
    onto ``rank`` learned latent vectors (forward projection) and recovered from them
    (backward projection), an attention of rank ``rank`` instead of a full N x N one."""

    def __init__(self, dim_in: int, dim: int, heads: int, rank: int, layer_norm: bool):
        super().__init__()
        self.latent = nn.Parameter(torch.empty(1, rank, dim))
        nn.init.xavier_uniform_(self.latent)
        self.project_forward = ILRAAttention(dim, dim_in, dim, heads, layer_norm, gated=True)
        self.project_backward = ILRAAttention(dim_in, dim, dim, heads, layer_norm, gated=True)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        latent = self.latent.expand(x.shape[0], -1, -1)  # (B, rank, dim)
        low_rank = self.project_forward(latent, x, key_padding=padding)  # (B, rank, dim)
        return self.project_backward(x, low_rank)  # (B, N, dim)


class ILRAMIL(nn.Module):
    input_kind = "features"

    def __init__(self, in_dim: int, n_outputs: int, dim: int = 256, heads: int = 8, rank: int = 1,
                 num_layers: int = 2, layer_norm: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(
            GAB(in_dim if i == 0 else dim, dim, heads, rank, layer_norm) for i in range(num_layers)
        )
        # non-local pooling: one learned query attends over the bag
        self.pool_query = nn.Parameter(torch.empty(1, 1, dim))
        nn.init.xavier_uniform_(self.pool_query)
        self.pool = ILRAAttention(dim, dim, dim, heads, layer_norm, gated=False)
        self.classifier = nn.Linear(dim, n_outputs)
        _init_linear(self)

    def forward(self, bag: Bag) -> torch.Tensor:
        padding = ~bag.mask  # (B, N) True = ignore
        x = _masked_features(bag)
        for block in self.blocks:
            x = block(x, padding)  # (B, N, dim)
        query = self.pool_query.expand(x.shape[0], -1, -1)
        slide_embedding = self.pool(query, x, key_padding=padding)[:, 0]  # (B, dim)
        return self.classifier(slide_embedding)


# Registry ------------------------------------------------------------------------------------
# Full sizes follow the papers; the _tiny variants keep every code path at toy widths for tests.


@register_model
def mean_mil(in_dim: int, n_outputs: int, **kwargs) -> nn.Module:
    return MeanMIL(in_dim, n_outputs, **kwargs)


@register_model
def mean_mil_tiny(in_dim: int, n_outputs: int, **kwargs) -> nn.Module:
    return MeanMIL(in_dim, n_outputs, **{"hidden_dim": 8, **kwargs})


@register_model
def max_mil(in_dim: int, n_outputs: int, **kwargs) -> nn.Module:
    return MaxMIL(in_dim, n_outputs, **kwargs)


@register_model
def max_mil_tiny(in_dim: int, n_outputs: int, **kwargs) -> nn.Module:
    return MaxMIL(in_dim, n_outputs, **{"hidden_dim": 8, **kwargs})


@register_model
def abmil(in_dim: int, n_outputs: int, **kwargs) -> nn.Module:
    return ABMIL(in_dim, n_outputs, **kwargs)


@register_model
def abmil_tiny(in_dim: int, n_outputs: int, **kwargs) -> nn.Module:
    return ABMIL(in_dim, n_outputs, **{"hidden_dim": 16, "attn_dim": 8, **kwargs})


@register_model
def transmil(in_dim: int, n_outputs: int, **kwargs) -> nn.Module:
    return TransMIL(in_dim, n_outputs, **kwargs)


@register_model
def transmil_tiny(in_dim: int, n_outputs: int, **kwargs) -> nn.Module:
    return TransMIL(in_dim, n_outputs, **{"dim": 16, "heads": 2, "num_landmarks": 4, **kwargs})


@register_model
def ilra_mil(in_dim: int, n_outputs: int, **kwargs) -> nn.Module:
    return ILRAMIL(in_dim, n_outputs, **kwargs)


@register_model
def ilra_mil_tiny(in_dim: int, n_outputs: int, **kwargs) -> nn.Module:
    return ILRAMIL(in_dim, n_outputs, **{"dim": 16, "heads": 2, "rank": 2, **kwargs})
