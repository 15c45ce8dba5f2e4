"""MambaBack: training forward, streaming == parallel, padding, merging, Hilbert order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mambapath.models import Bag, create_model
from mambapath.models.mambaback import TokenMerge
from mambapath.order import tile_order

IN_DIM = 12
STREAM_ATOL = 1e-5  # float32, the target the design promises


def _slide(n_tiles, seed=0):
    """n_tiles tiles scattered over a grid about twice their number, in storage order."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(2 * n_tiles)))
    cells = rng.choice(side * (side + 3), size=n_tiles, replace=False)
    grid = torch.as_tensor(np.stack([cells // (side + 3), cells % (side + 3)], axis=1), dtype=torch.long)
    features = torch.as_tensor(rng.normal(size=(n_tiles, IN_DIM)), dtype=torch.float32)
    return features, grid


def _model(**kwargs):
    torch.manual_seed(0)
    return create_model("mambaback_tiny", in_dim=IN_DIM, n_outputs=3, **kwargs)


def test_shape_and_backward():
    model = _model(dims=(16, 16, 16), depths=(1, 1, 1))
    assert model.input_kind == "features" and model.tile_order == "hilbert"
    features, grid = _slide(70, seed=1)
    out = model(Bag.single(features, grid=grid))
    assert out.shape == (1, 3)
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize(
    "length,chunk_sizes",
    [(37, (1, 6, 1000)), (101, (8, 30)), (203, (64,))],  # no length is a multiple of its chunks
    ids=["L37", "L101", "L203"],
)
def test_streaming_equals_the_parallel_forward(length, chunk_sizes):
    model = _model(dims=(16, 16, 16), depths=(1, 1, 1)).eval()
    features, grid = _slide(length, seed=length)
    bag = Bag.single(features, grid=grid)
    with torch.no_grad():
        parallel = model.forward_parallel(bag)
    for chunk_size in chunk_sizes:
        streamed = model.stream(bag, chunk_size)
        torch.testing.assert_close(streamed, parallel, atol=STREAM_ATOL, rtol=0, msg=f"chunk_size={chunk_size}")


def test_eval_forward_streams_and_train_forward_does_not_need_to():
    model = _model(inference_chunk_size=8)
    features, grid = _slide(45, seed=2)
    bag = Bag.single(features, grid=grid)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(bag), model.forward_parallel(bag), atol=STREAM_ATOL, rtol=0)
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        model.stream(bag, 8)


def test_stream_sequence_reads_only_the_chunks_it_needs():
    model = _model().eval()
    features, grid = _slide(50, seed=3)
    seq = features[torch.from_numpy(tile_order(grid.numpy(), "hilbert"))]
    reads = []

    def read_chunk(start, end):
        reads.append((start, end))
        return seq[start:end][None]

    streamed = model.stream_sequence(read_chunk, len(seq), chunk_size=16)
    assert max(end - start for start, end in reads) <= 16
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 2 * 4  # each chunk once per direction
    with torch.no_grad():
        torch.testing.assert_close(streamed, model.forward_parallel(Bag.single(features, grid=grid)),
                                   atol=STREAM_ATOL, rtol=0)


def test_padding_does_not_change_outputs():
    model = _model().eval()
    slides = [_slide(40, seed=4), _slide(23, seed=5)]
    features = torch.full((2, 48, IN_DIM), float("nan"))
    grid = torch.full((2, 48, 2), 3, dtype=torch.long)
    mask = torch.zeros(2, 48, dtype=torch.bool)
    for b, (f, g) in enumerate(slides):
        features[b, : len(f)], grid[b, : len(g)], mask[b, : len(f)] = f, g, True
    bag = Bag(features, grid.flip(-1), grid, mask)
    alone = torch.cat([model.forward_parallel(Bag.single(f, grid=g)) for f, g in slides])
    with torch.no_grad():
        torch.testing.assert_close(model.forward_parallel(bag), alone, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(bag), alone, atol=STREAM_ATOL, rtol=0)


def test_both_directions_and_every_stage_reach_the_output():
    model = _model(dims=(16, 16), depths=(1, 1)).eval()
    features, grid = _slide(30, seed=6)
    order = torch.from_numpy(tile_order(grid.numpy(), "hilbert"))
    bag = Bag.single(features, grid=grid)
    with torch.no_grad():
        out = model.forward_parallel(bag)
        x = model.stem(features[order][None])
        pooled_forward = model.forward_stack(x)
        pooled_backward = model.backward_stack(x.flip(1))
        assert len(pooled_forward) == len(pooled_backward) == 2
        torch.testing.assert_close(model._head(pooled_forward + pooled_backward), out)
        # the first tile's state in the backward stack has seen the last tile
        first_tile_changed = features.clone()
        first_tile_changed[order[-1]] += 1.0
        x2 = model.stem(first_tile_changed[order][None])
        assert (model.backward_stack(x2.flip(1))[0] - pooled_backward[0]).abs().max() > 1e-6


@pytest.mark.parametrize("length", [8, 9, 11])
def test_token_merge_concatenates_runs_and_zero_pads_the_last(length):
    torch.manual_seed(0)
    merge = TokenMerge(3, 5, rate=4).double()
    x = torch.randn(1, length, 3, dtype=torch.float64)
    out = merge(x)[0]
    assert out.shape == (-(-length // 4), 5)
    for k in range(out.shape[0]):
        run = [x[0, t] if t < length else torch.zeros(3, dtype=torch.float64) for t in range(4 * k, 4 * k + 4)]
        flat = torch.cat(run)
        normed = (flat - flat.mean()) / torch.sqrt(flat.var(unbiased=False) + merge.norm.eps)
        expected = merge.reduction.weight @ (normed * merge.norm.weight + merge.norm.bias)
        torch.testing.assert_close(out[k], expected, atol=1e-10, rtol=0)


def test_tile_order_is_a_choice_and_recorded():
    for order in ("raster", "snake", "column", "hilbert"):
        assert _model(tile_order=order).tile_order == order
    with pytest.raises(ValueError, match="tile_order"):
        _model(tile_order="zigzag")
    with pytest.raises(ValueError, match="stages"):
        _model(dims=(16, 16), depths=(1,))
