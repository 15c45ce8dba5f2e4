"""MambaMIL: shapes, gradients, padding, tile order and the SR re-ordering."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mambapath.errors import DataError
from mambapath.models import Bag, create_model
from mambapath.models.mamba_mil import sequence_reorder, sequence_restore
from mambapath.order import ORDERS, tile_order

TINY = ("mamba_mil_tiny", "bimamba_mil_tiny", "srmamba_mil_tiny")
IN_DIM = 12


def _slide(n_rows=5, n_cols=7, keep=0.75, seed=0, in_dim=IN_DIM):
    """One slide's tiles on a grid with holes, stored in a shuffled order."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:n_rows, :n_cols]
    grid = np.stack([rows.ravel(), cols.ravel()], axis=1)
    grid = grid[rng.random(len(grid)) < keep]
    grid = grid[rng.permutation(len(grid))] + [3, 8]
    grid = torch.as_tensor(grid, dtype=torch.long)
    features = torch.as_tensor(rng.normal(size=(len(grid), in_dim)), dtype=torch.float32)
    return features, grid


def _batch(slides, pad_to):
    """Pad bags to ``pad_to`` slots with junk features and junk grid positions."""
    B = len(slides)
    features = torch.full((B, pad_to, IN_DIM), float("nan"))
    grid = torch.full((B, pad_to, 2), -7, dtype=torch.long)
    mask = torch.zeros(B, pad_to, dtype=torch.bool)
    for b, (f, g) in enumerate(slides):
        features[b, : len(f)] = f
        grid[b, : len(g)] = g
        mask[b, : len(f)] = True
    return Bag(features=features, coords=grid.flip(-1) * 112, grid=grid, mask=mask)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", TINY)
def test_shape_and_backward(name):
    model = create_model(name, in_dim=IN_DIM, n_outputs=4)
    assert model.input_kind == "features"
    bag = _batch([_slide(seed=1), _slide(seed=2, n_rows=3)], pad_to=40)
    out = model(bag)
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    out.sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", TINY)
def test_padding_does_not_change_outputs(name):
    model = create_model(name, in_dim=IN_DIM, n_outputs=3).eval()
    slides = [_slide(seed=3), _slide(seed=4, n_rows=2, n_cols=4)]
    batched = model(_batch(slides, pad_to=45))
    alone = torch.cat([model(Bag(f[None], g.flip(-1)[None], g[None], torch.ones(1, len(f), dtype=torch.bool)))
                       for f, g in slides])
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)


@pytest.mark.parametrize("order", ORDERS)
def test_model_reads_tiles_in_tile_order_whatever_the_storage_order(order):
    model = create_model("mamba_mil_tiny", in_dim=IN_DIM, n_outputs=2, tile_order=order).eval()
    assert model.tile_order == order
    features, grid = _slide(seed=5)
    perm = torch.randperm(len(features))
    out = model(Bag.single(features, grid=grid))
    out_shuffled = model(Bag.single(features[perm], grid=grid[perm]))
    torch.testing.assert_close(out, out_shuffled, atol=1e-6, rtol=0)
    # the same as feeding the sequence already in that order through the layers
    seq = features[torch.from_numpy(tile_order(grid.numpy(), order))]
    expected = model.classifier(model.pool(model.encode(seq[None])))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_orders_give_different_sequences_to_a_causal_model():
    features, grid = _slide(seed=6, keep=1.0)
    outs = {}
    for order in ORDERS:
        torch.manual_seed(1)  # same weights for every order
        model = create_model("mamba_mil_tiny", in_dim=IN_DIM, n_outputs=2, tile_order=order).eval()
        outs[order] = model(Bag.single(features, grid=grid))
    assert (outs["raster"] - outs["column"]).abs().max() > 1e-4
    assert (outs["raster"] - outs["hilbert"]).abs().max() > 1e-4


@pytest.mark.parametrize("length,rate", [(10, 3), (12, 4), (7, 7), (5, 10), (1, 2)])
def test_sequence_reorder_reads_the_table_by_columns(length, rate):
    xz = torch.arange(length, dtype=torch.float32).repeat(2, 3, 1) + 1  # (2, 3, L), values 1..L
    out = sequence_reorder(xz, rate)
    rows = -(-length // rate)
    expected = []
    for r in range(rate):  # column r of the (rows, rate) table holds positions r, r + R, r + 2R, ...
        for k in range(rows):
            position = k * rate + r
            expected.append(position + 1 if position < length else 0)  # 0 = padding
    assert out[0, 0].tolist() == expected
    torch.testing.assert_close(sequence_restore(out, rate, length), xz)


def test_srmamba_second_branch_changes_the_output():
    torch.manual_seed(2)
    model = create_model("srmamba_mil_tiny", in_dim=IN_DIM, n_outputs=2, rate=3).eval()
    features, grid = _slide(seed=7)
    bag = Bag.single(features, grid=grid)
    out = model(bag)
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer_reordered.D.zero_()
            layer.mixer_reordered.dt_proj.bias.fill_(-30.0)  # softplus ~ 0: the reordered scan outputs ~0
    assert (model(bag) - out).abs().max() > 1e-4


def test_bad_arguments_and_empty_bags_are_refused():
    with pytest.raises(ValueError, match="mixer"):
        create_model("mamba_mil", in_dim=IN_DIM, n_outputs=2, mixer="transformer")
    with pytest.raises(ValueError, match="tile_order"):
        create_model("mamba_mil_tiny", in_dim=IN_DIM, n_outputs=2, tile_order="spiral")
    with pytest.raises(TypeError):
        create_model("bimamba_mil", in_dim=IN_DIM, n_outputs=2, mixer="mamba")
    model = create_model("mamba_mil_tiny", in_dim=IN_DIM, n_outputs=2)
    empty = _batch([_slide(seed=8), (torch.zeros(0, IN_DIM), torch.zeros(0, 2, dtype=torch.long))], pad_to=40)
    with pytest.raises(DataError, match="no tiles"):
        model(empty)


def test_full_size_defaults_follow_the_paper():
    model = create_model("srmamba_mil", in_dim=1024, n_outputs=4)
    assert model.tile_order == "column"
    assert len(model.layers) == 2 and model.layers[0].rate == 10
    assert model.embed[0].out_features == 512
    assert model.layers[0].block.mixer.d_state == 16 and model.layers[0].block.d_inner == 1024
