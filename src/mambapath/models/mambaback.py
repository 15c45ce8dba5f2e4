"""MambaBack: local gated CNNs and global bidirectional Mamba2 over a Hilbert-ordered slide.

The paper (seed 000_ff7f2ecc1751be6d.txt) is known here by its abstract only. It names
three parts: Hilbert sampling of the tiles, a hierarchy pairing a 1D gated CNN block
(MambaOut) for local structure with a BiMamba2 block for global context, and "asymmetric
chunking": parallel training, chunked streaming inference that accumulates its output, for
a low memory peak. Everything below that the abstract does not fix is a choice made here,
with its reason.

Tile order. Tiles are ordered along the generalised Hilbert curve over the slide's tile
grid (mambapath.order, ``tile_order="hilbert"``): a continuous curve over the bounding box
of any shape, skipping cells without tissue. Consecutive tiles are grid neighbours, and a
window of 4^k consecutive tiles mostly covers a 2^k x 2^k block. ``tile_order`` can be set
to the other orders for the ablation; the attribute records the order used.

Architecture (defaults in brackets):

    features (n, in_dim) in Hilbert order
    -> stem: Linear(in_dim, dims[0]) -> GELU -> Dropout                       [dims 128, 128, 128]
    -> two directional stacks, the same architecture with their own weights: one reads the
       sequence first to last, the other last to first. Each stack:
         stage s = 1..S: depths[s] x [GatedCNNBlock (local) -> pre-norm residual Mamba2 (global)]
                         [depths 1, 1, 1]
           -> LayerNorm -> attention pooling of the stage's tokens -> a (dims[s],) vector
           -> between stages: merge each run of r consecutive tokens (concatenate, LayerNorm,
              Linear to dims[s+1]); the last, incomplete run is zero-padded       [r = 4]
    -> the 2 S pooled vectors concatenated (multi-scale, both directions)
    -> LayerNorm -> Linear(2 * sum(dims), n_outputs)

- Local: the gated CNN block (layers/gated_cnn.py) is MambaOut's block with a causal depthwise
  1D convolution of width 7 [kernel_size]; MambaOut's finding that the state-space scan is
  unnecessary for local mixing is why local structure gets a convolution and no scan.
- Global: Mamba2 (layers/mamba2.py) with d_state 16, headdim 32, expand 2 [d_state, headdim].
  A small state is enough for a slide-level summary and keeps the reference scan fast.
- Merging r = 4 consecutive Hilbert tokens merges (mostly) a 2 x 2 block of the grid, the
  1D analogue of the patch merging of hierarchical vision backbones: each stage sees the
  slide at half the resolution of the one before, and the Mamba2 of stage s mixes context
  over 4^(s-1)-tile regions.
- Pooling every stage (multi-scale) follows the abstract's "multi-scale representation".

Bidirectional Mamba2, and why the directions are separate stacks. In a Vision-Mamba-style
BiMamba2 block (layers/bidirectional.py) each position's output mixes a forward scan and a
reversed scan, and the next layer reads that mix. Stacked, such blocks make every output
depend on every input through alternating directions, and an exact chunked inference would
have to keep each layer's reverse-scan state at every chunk boundary (memory growing with the
slide) or recompute layers over and over (time growing with its square). Here the two
directions of every BiMamba2 block live in two stacks: the forward stack's Mamba2 blocks scan
first to last, the backward stack's last to first, and the stacks meet only in the pooled
vectors. Every position's slide-level context still comes from both sides (the backward stack
pools tiles that have seen everything after them, the forward stack everything before), as in
a bidirectional language model with separate forward and backward towers. Each stack is
causal in its own direction, convolutions included, which is what makes exact streaming
possible.

Asymmetric chunking.

- Training (``forward`` in train mode, or ``forward_parallel``) runs each stack over the whole
  sequence at once: the scans are parallel (chunked) scans over all positions, and gradients
  flow through everything.
- Inference (``forward`` in eval mode with ``inference_chunk_size`` set, or
  ``stream(bag, chunk_size)``) streams: pass 1 reads the sequence chunk by chunk from first
  to last through the forward stack, pass 2 reads it chunk by chunk from last to first
  (each chunk reversed) through the backward stack. Each block carries its state from one
  chunk to the next (the convolutions' last inputs, the scans' hidden states via
  ``initial_state``/``return_last_state``), each merge carries the fewer than r tokens
  not yet merged, and each stage's attention pooling is accumulated with an online softmax
  (running max, sum of weights, weighted sum). Outputs of a chunk are pooled and dropped, so
  memory holds one chunk's activations plus fixed-size states, whatever the slide's size,
  and the result equals the parallel forward up to float rounding (tested to 1e-5).
  ``stream_sequence(read_chunk, length, chunk_size)`` streams from any reader, for example
  features read from disk chunk by chunk, so that the bag itself need not be in memory.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mambapath.order import ORDERS

from .bag import Bag
from .layers.attention_pool import AttentionPool, StreamingAttentionPool
from .layers.gated_cnn import GatedCNNBlock
from .layers.mamba2 import Mamba2
from .mamba_mil import init_xavier, ordered_tile_indices
from .registry import register_model


class PreNormResidual(nn.Module):
    """x + block(LayerNorm(x)) for a block with ``forward_chunk(x, state)``."""

    def __init__(self, dim: int, block: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.block = block

    def forward_chunk(self, x: torch.Tensor, state=None):
        y, state = self.block.forward_chunk(self.norm(x), state)
        return x + y, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(self.norm(x))


class TokenMerge(nn.Module):
    """Merge runs of ``rate`` consecutive tokens: (B, L, D) -> (B, ceil(L / rate), D_out).
    The last run is zero-padded when L is not a multiple of ``rate``."""

    def __init__(self, dim_in: int, dim_out: int, rate: int):
        super().__init__()
        self.rate = rate
        self.norm = nn.LayerNorm(rate * dim_in)
        self.reduction = nn.Linear(rate * dim_in, dim_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        x = F.pad(x, (0, 0, 0, (-length) % self.rate))
        return self.reduction(self.norm(x.reshape(batch, x.shape[1] // self.rate, self.rate * dim)))


class Stage(nn.Module):
    def __init__(self, dim: int, depth: int, next_dim: int | None, merge_rate: int, attention_dim: int,
                 kernel_size: int, dropout: float, mamba2_kwargs: dict):
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(depth):
            blocks.append(GatedCNNBlock(dim, kernel_size=kernel_size, dropout=dropout))
            blocks.append(PreNormResidual(dim, Mamba2(dim, **mamba2_kwargs)))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.pool = AttentionPool(dim, attention_dim)
        self.merge = TokenMerge(dim, next_dim, merge_rate) if next_dim is not None else None


class _StreamState:
    """Everything a directional stack carries between chunks."""

    def __init__(self, stack: "DirectionalStack"):
        self.block_states = [[None] * len(stage.blocks) for stage in stack.stages]
        self.pools = [StreamingAttentionPool(stage.pool) for stage in stack.stages]
        self.unmerged: list[torch.Tensor | None] = [None] * len(stack.stages)


class DirectionalStack(nn.Module):
    """One direction of MambaBack: stages of causal blocks, merges and per-stage pooling."""

    def __init__(self, dims, depths, merge_rate, attention_dim, kernel_size, dropout, mamba2_kwargs):
        super().__init__()
        self.stages = nn.ModuleList(
            Stage(
                dims[s], depths[s], dims[s + 1] if s + 1 < len(dims) else None, merge_rate,
                attention_dim, kernel_size, dropout, mamba2_kwargs,
            )
            for s in range(len(dims))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x (1, L, dims[0]) in this stack's reading order -> pooled (1, dims[s]) per stage."""
        pooled = []
        for stage in self.stages:
            for block in stage.blocks:
                x = block(x)
            pooled.append(stage.pool(stage.norm(x)))
            if stage.merge is not None:
                x = stage.merge(x)
        return pooled

    def stream_init(self) -> _StreamState:
        return _StreamState(self)

    def stream_push(self, x: torch.Tensor, state: _StreamState, last: bool) -> None:
        """Feed the next chunk x (1, T, dims[0]); ``last`` marks the end of the sequence,
        where the merges flush their incomplete runs."""
        for s, stage in enumerate(self.stages):
            if x.shape[1] > 0:
                for k, block in enumerate(stage.blocks):
                    x, state.block_states[s][k] = block.forward_chunk(x, state.block_states[s][k])
                state.pools[s].update(stage.norm(x))
            if stage.merge is None:
                break
            pending = x if state.unmerged[s] is None else torch.cat([state.unmerged[s], x], dim=1)
            rate = stage.merge.rate
            n_ready = pending.shape[1] if last else pending.shape[1] // rate * rate
            x = stage.merge(pending[:, :n_ready])  # (1, ceil(n_ready / rate), dims[s + 1])
            state.unmerged[s] = pending[:, n_ready:]

    def stream_result(self, state: _StreamState) -> list[torch.Tensor]:
        return [pool.result() for pool in state.pools]


class MambaBack(nn.Module):
    input_kind = "features"

    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        dims: tuple[int, ...] = (128, 128, 128),
        depths: tuple[int, ...] = (1, 1, 1),
        merge_rate: int = 4,
        kernel_size: int = 7,
        d_state: int = 16,
        headdim: int = 32,
        expand: int = 2,
        d_conv: int = 4,
        dropout: float = 0.25,
        attention_dim: int = 64,
        tile_order: str = "hilbert",
        inference_chunk_size: int | None = 4096,
        scan_backend: str = "auto",
    ):
        super().__init__()
        dims, depths = tuple(dims), tuple(depths)
        if len(dims) != len(depths) or not dims:
            raise ValueError(f"dims {dims} and depths {depths} must name the same number (>= 1) of stages")
        if tile_order not in ORDERS:
            raise ValueError(f"unknown tile_order {tile_order!r}; choose one of {', '.join(ORDERS)}")
        if merge_rate < 2:
            raise ValueError(f"merge_rate must be >= 2, got {merge_rate}")
        if inference_chunk_size is not None and inference_chunk_size < 1:
            raise ValueError(f"inference_chunk_size must be >= 1 or null, got {inference_chunk_size}")
        self.tile_order = tile_order
        self.inference_chunk_size = inference_chunk_size
        self.stem = nn.Sequential(nn.Linear(in_dim, dims[0]), nn.GELU(), nn.Dropout(dropout))
        mamba2_kwargs = dict(d_state=d_state, headdim=headdim, expand=expand, d_conv=d_conv, scan_backend=scan_backend)
        stack_args = (dims, depths, merge_rate, attention_dim, kernel_size, dropout, mamba2_kwargs)
        self.forward_stack = DirectionalStack(*stack_args)
        self.backward_stack = DirectionalStack(*stack_args)
        self.head_norm = nn.LayerNorm(2 * sum(dims))
        self.classifier = nn.Linear(2 * sum(dims), n_outputs)
        init_xavier(self.stem, self.classifier)

    def _head(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.head_norm(torch.cat(pooled, dim=-1)))

    def forward(self, bag: Bag) -> torch.Tensor:
        if not self.training and self.inference_chunk_size is not None:
            return self.stream(bag, self.inference_chunk_size)
        return self.forward_parallel(bag)

    def forward_parallel(self, bag: Bag) -> torch.Tensor:
        """Whole sequences at once (training, and the reference the streaming path matches)."""
        logits = []
        for b in range(bag.batch_size):
            idx = ordered_tile_indices(bag, b, self.tile_order)
            x = self.stem(bag.features[b, idx][None])  # (1, n, dims[0])
            pooled = self.forward_stack(x) + self.backward_stack(x.flip(1))
            logits.append(self._head(pooled))
        return torch.cat(logits, dim=0)  # (B, n_outputs)

    def stream(self, bag: Bag, chunk_size: int) -> torch.Tensor:
        """Streaming inference, one bag at a time, ``chunk_size`` tiles at a time."""
        logits = []
        for b in range(bag.batch_size):
            idx = ordered_tile_indices(bag, b, self.tile_order)
            features = bag.features[b]
            logits.append(
                self.stream_sequence(lambda start, end: features[idx[start:end]][None], idx.numel(), chunk_size)
            )
        return torch.cat(logits, dim=0)

    @torch.no_grad()
    def stream_sequence(
        self, read_chunk: Callable[[int, int], torch.Tensor], length: int, chunk_size: int
    ) -> torch.Tensor:
        """Streaming inference over a sequence of ``length`` tiles already in tile order;
        ``read_chunk(start, end)`` returns tiles start..end-1 as (1, end - start, in_dim).
        Returns (1, n_outputs) logits."""
        if self.training:
            raise RuntimeError("streaming is inference: call model.eval() first (dropout would differ per chunk)")
        if length < 1:
            raise ValueError("cannot stream an empty sequence")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        forward_state = self.forward_stack.stream_init()
        for start in range(0, length, chunk_size):
            end = min(start + chunk_size, length)
            self.forward_stack.stream_push(self.stem(read_chunk(start, end)), forward_state, last=end == length)
        backward_state = self.backward_stack.stream_init()
        for end in range(length, 0, -chunk_size):
            start = max(end - chunk_size, 0)
            chunk = self.stem(read_chunk(start, end)).flip(1)  # the backward stack reads last to first
            self.backward_stack.stream_push(chunk, backward_state, last=start == 0)
        pooled = self.forward_stack.stream_result(forward_state) + self.backward_stack.stream_result(backward_state)
        return self._head([p.to(self.classifier.weight.dtype) for p in pooled])


TINY = dict(dims=(16, 16), depths=(1, 1), d_state=4, headdim=8, expand=2, kernel_size=3, attention_dim=8,
            inference_chunk_size=64)


@register_model
def mambaback(in_dim: int, n_outputs: int, **kwargs) -> MambaBack:
    return MambaBack(in_dim, n_outputs, **kwargs)


@register_model
def mambaback_tiny(in_dim: int, n_outputs: int, **kwargs) -> MambaBack:
    return MambaBack(in_dim, n_outputs, **{**TINY, **kwargs})
