"""Attention pooling over a bag's tiles (Ilse et al., 2018), whole or streamed.

score_i = w^T tanh(V h_i); weights = softmax(score) over the real tiles; pooled = sum_i
weight_i h_i. MambaMIL and 2DMambaMIL pool this way (the ungated form of ABMIL).

:class:`StreamingAttentionPool` computes the same pooled vector from tiles that arrive in
chunks, with a running maximum of the scores, the running sum of exp(score - max) and the
running weighted sum of tiles (the online softmax): memory is one vector, whatever the number
of tiles, and the result equals the whole-bag softmax up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn


class AttentionPool(nn.Module):
    """(B, L, D) tiles [+ (B, L) bool mask, True = real] -> (B, D)."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        return self.score(h).squeeze(-1)  # (B, L)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.scores(h)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        # half-precision scores are promoted so the softmax's sums stay accurate
        weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(h.dtype)
        return torch.einsum("bl,bld->bd", weights, h)


class StreamingAttentionPool:
    """Accumulates :class:`AttentionPool` over chunks of tiles: ``update`` per chunk, then
    ``result``. Accumulators are float32 (float64 for float64 tiles)."""

    def __init__(self, pool: AttentionPool):
        self.pool = pool
        self.max_score: torch.Tensor | None = None  # (B,)
        self.weight_sum: torch.Tensor | None = None  # (B,)
        self.weighted: torch.Tensor | None = None  # (B, D)

    def update(self, h: torch.Tensor) -> None:
        if h.shape[1] == 0:
            return
        work = torch.float64 if h.dtype == torch.float64 else torch.float32
        scores = self.pool.scores(h).to(work)  # (B, T)
        h = h.to(work)
        chunk_max = scores.amax(dim=1)
        if self.max_score is None:
            new_max = chunk_max
            self.weight_sum = torch.zeros_like(chunk_max)
            self.weighted = h.new_zeros(h.shape[0], h.shape[2])
        else:
            new_max = torch.maximum(self.max_score, chunk_max)
            rescale = torch.exp(self.max_score - new_max)  # earlier terms, re-referenced to the new max
            self.weight_sum = self.weight_sum * rescale
            self.weighted = self.weighted * rescale[:, None]
        weights = torch.exp(scores - new_max[:, None])  # (B, T)
        self.weight_sum = self.weight_sum + weights.sum(dim=1)
        self.weighted = self.weighted + torch.einsum("bt,btd->bd", weights, h)
        self.max_score = new_max

    def result(self) -> torch.Tensor:
        if self.weighted is None:
            raise ValueError("no tiles were pooled: the sequence was empty")
        return self.weighted / self.weight_sum[:, None]
