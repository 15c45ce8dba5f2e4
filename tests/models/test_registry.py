"""Every registered model, whatever its family, builds, trains a step, and ignores padding.

Parametrized over ``list_models()``, so a model is tested the day it is registered. Pixel
models (``input_kind == "pixels"``) get a random image; a pixel model may name the image size
it needs in an ``example_input_size`` attribute ((H, W); default 64 x 64).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import mambapath
from mambapath.models import Bag, create_model, list_models

IN_DIM = 24
N_OUTPUTS = 3
TINY = list_models("*_tiny")
FULL = [m for m in list_models() if not m.endswith("_tiny")]


def _build(name: str, n_outputs: int = N_OUTPUTS):
    torch.manual_seed(0)
    model = create_model(name, in_dim=IN_DIM, n_outputs=n_outputs)
    if getattr(model, "input_kind", "features") == "pixels":
        torch.manual_seed(0)
        model = create_model(name, in_dim=3, n_outputs=n_outputs)
    return model


def _grid_with_holes(n: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 2) distinct (row, col) cells of a side x side grid, in raster order, with holes."""
    cells = torch.randperm(side * side, generator=generator)[:n].sort().values
    return torch.stack([cells // side, cells % side], dim=1)


def _bag(n: int, seed: int, side: int = 9) -> Bag:
    g = torch.Generator().manual_seed(seed)
    grid = _grid_with_holes(n, side, g)
    return Bag.single(torch.randn(n, IN_DIM, generator=g), coords=grid.flip(-1) * 256, grid=grid)


def _pad(bags: list[Bag], length: int, seed: int) -> Bag:
    """Bags padded to ``length`` with large junk features and far-away coordinates, mask False."""
    g = torch.Generator().manual_seed(seed)
    feats, coords, grids, masks = [], [], [], []
    for bag in bags:
        n = bag.features.shape[1]
        extra = length - n
        feats.append(torch.cat([bag.features[0], 1e3 * torch.randn(extra, IN_DIM, generator=g)]))
        grid_pad = torch.randint(20, 40, (extra, 2), generator=g)
        coords.append(torch.cat([bag.coords[0], grid_pad * 256]))
        grids.append(torch.cat([bag.grid[0], grid_pad]))
        masks.append(torch.cat([torch.ones(n, dtype=torch.bool), torch.zeros(extra, dtype=torch.bool)]))
    return Bag(torch.stack(feats), torch.stack(coords), torch.stack(grids), torch.stack(masks))


def _example_input(model):
    if getattr(model, "input_kind", "features") == "pixels":
        h, w = getattr(model, "example_input_size", (64, 64))
        return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    return _bag(37, seed=1)


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_trains_a_step(name):
    model = _build(name)
    model.train()
    inputs = _example_input(model)
    out = model(inputs)
    assert out.shape == (1, N_OUTPUTS) and torch.isfinite(out).all()
    loss = torch.nn.functional.cross_entropy(out, torch.tensor([1]))
    loss.backward()
    params = dict(model.named_parameters())
    no_grad = [n for n, p in params.items() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient (unused in forward): {no_grad}"
    bad = [n for n, p in params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"
    assert any(p.grad.abs().sum() > 0 for p in params.values() if p.grad is not None)
    # one SGD step on the same input lowers the loss (dropout off to compare like with like)
    model.eval()
    with torch.no_grad():
        before = torch.nn.functional.cross_entropy(model(inputs), torch.tensor([1]))
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad / (p.grad.norm() + 1e-12)
        after = torch.nn.functional.cross_entropy(model(inputs), torch.tensor([1]))
    assert after < before


@pytest.mark.parametrize("name", TINY)
def test_padding_does_not_change_output(name):
    model = _build(name)
    if getattr(model, "input_kind", "features") != "features":
        pytest.skip(f"{name} reads pixels; padding masks apply to feature bags")
    model.eval()
    short, long = _bag(21, seed=2), _bag(33, seed=3)
    with torch.no_grad():
        alone = torch.cat([model(short), model(long)])
        padded_one = model(_pad([short], 40, seed=4))
        batched = model(_pad([short, long], 45, seed=5))
    torch.testing.assert_close(padded_one, alone[:1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", FULL)
def test_full_model_builds_and_has_a_tiny_family_member(name):
    model = _build(name)
    assert isinstance(model, torch.nn.Module)
    assert getattr(model, "input_kind", None) in ("features", "pixels")
    family = name.split("_")[0]
    assert any(t.startswith(family) for t in TINY), f"no *_tiny variant registered for {name}'s family"


PUBLISHED = Path(mambapath.__file__).parent / "data" / "published" / "pixel_mamba_table2.csv"
# Pixel-Mamba Table 2 names -> registered models
TABLE2_MODELS = {"MeanMIL": "mean_mil", "MaxMIL": "max_mil", "ABMIL": "abmil", "TransMIL": "transmil",
                 "ILRA-MIL": "ilra_mil"}


@pytest.mark.parametrize("method", sorted(TABLE2_MODELS))
def test_baseline_sizes_match_pixel_mamba_table2(method):
    """Parameter counts on 1024-d features with a 4-class head, as Table 2 lists them
    ("25M + 0.9M": extractor + aggregator), to the table's rounding."""
    if not PUBLISHED.exists():
        pytest.skip(f"{PUBLISHED} not found: published numbers are not shipped in this checkout")
    table = pd.read_csv(PUBLISHED, comment="#")
    row = table[(table["method"] == method) & (table["group"] == "two_stage_resnet50")].iloc[0]
    published = row["params"].split("+")[1].strip()  # e.g. "0.9M", "4.1K"
    scale = {"K": 1e3, "M": 1e6}[published[-1]]
    model = create_model(TABLE2_MODELS[method], in_dim=1024, n_outputs=4)
    n_params = sum(p.numel() for p in model.parameters())
    assert round(n_params / scale, 1) == float(published[:-1]), f"{n_params} parameters vs published {published}"
