"""Pixel-Mamba: the network of Tables 7/8, Region Fusion, Token Expansion, and a training step.

The references here are the paper's tables typed in as data and float64 loops over regions,
rows and columns; none of them calls the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mambapath.errors import ConfigError
from mambapath.models import create_model
from mambapath.models.pixel_mamba import SlideImage, fusion_count, load_backbone, region_fusion, token_expansion
from mambapath.serialize import zigzag_order


@pytest.fixture(autouse=True)
def one_thread():
    """These models run many small ops: one thread is faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Tables 7 and 8 of the paper, row by row: (token receptive field h x w, channels, expansion
# after the layer; "" for none). Typed in from the paper's text, independent of the code.
TABLE7 = """
1x1 3 H-Cat; 1x2 6 V-Cat; 2x2 12 H-Cat; 2x4 24 V-Cat; 4x4 48 -; 4x4 48 H-Cat; 4x8 96 -; 4x8 96 V-Cat;
8x8 192 -; 8x8 192 -; 8x8 192 H-Avg; 8x16 192 -; 8x16 192 -; 8x16 192 V-Avg; 16x16 192 -; 16x16 192 -;
16x16 192 -; 16x16 192 -; 16x16 192 -; 16x16 192 H-Avg; 16x32 192 -; 16x32 192 V-Cat; 32x32 384 -; 32x32 384 -
"""
TABLE8 = """
1x1 3 H-Cat; 1x2 6 V-Cat; 2x2 12 H-Cat; 2x4 24 V-Cat; 4x4 48 -; 4x4 48 H-Cat; 4x8 96 -; 4x8 96 V-Cat;
8x8 192 -; 8x8 192 -; 8x8 192 H-Cat; 8x16 384 -; 8x16 384 -; 8x16 384 V-Avg; 16x16 384 -; 16x16 384 -;
16x16 384 -; 16x16 384 -; 16x16 384 -; 16x16 384 H-Avg; 16x32 384 -; 16x32 384 V-Cat; 32x32 768 -; 32x32 768 -
"""


def _rows(table: str) -> list[tuple[tuple[int, int], int, str]]:
    rows = []
    for item in table.replace("\n", " ").split(";"):
        token, channels, expansion = item.split()
        h, w = (int(v) for v in token.split("x"))
        rows.append(((h, w), int(channels), "" if expansion == "-" else expansion.lower()))
    return rows


@pytest.mark.parametrize("name,table", [("pixel_mamba_6m", TABLE7), ("pixel_mamba_21m", TABLE8)])
def test_token_expansion_shapes_follow_the_tables_layer_by_layer(name, table):
    rows = _rows(table)
    assert len(rows) == 24
    window = 32  # 32 x 32 px regions end as one 32 x 32 px token
    torch.manual_seed(0)
    model = create_model(name, in_dim=3, n_outputs=4, scan_window=window, alpha=0.0).eval()
    trace = []
    with torch.no_grad():
        model.forward_features(torch.rand(1, 3, window, 2 * window), trace=trace)
    assert len(trace) == 24
    for layer, entry, ((tok_h, tok_w), channels, expansion) in zip(model.layers, trace, rows):
        grid_h, grid_w = entry["grid"]
        assert (window // grid_h, window // grid_w) == (tok_h, tok_w), f"layer {entry['layer']}"
        assert entry["channels"] == channels, f"layer {entry['layer']}"
        assert layer.block.norm.weight.shape == (channels,)  # the Mamba block runs at the table's width
        assert (layer.expansion or "") == expansion
    assert model.out_dim == rows[-1][1]


def test_parameter_counts_are_near_the_papers():
    """The paper: 6.2M and 21M. Ours (backbone without the task head) are within 5%."""
    for name, published in (("pixel_mamba_6m", 6.2e6), ("pixel_mamba_21m", 21e6)):
        model = create_model(name, in_dim=3, n_outputs=4)
        backbone = sum(p.numel() for k, p in model.named_parameters() if not k.startswith("head."))
        assert abs(backbone - published) / published < 0.05, f"{name}: {backbone}"


def _expansion_reference(tokens: np.ndarray, h: int, w: int, kind: str) -> np.ndarray:
    """Token Expansion with loops: un-zigzag, shift-merge, join pairs, re-zigzag, CLS at centre."""
    n, _, c = tokens.shape
    centre = h * w // 2
    cls = tokens[:, centre]
    body = np.concatenate([tokens[:, :centre], tokens[:, centre + 1:]], axis=1)
    walk = zigzag_order(h, w).tolist()
    grid = np.zeros((n, h, w, c))
    for step, cell in enumerate(walk):
        grid[:, cell // w, cell % w] = body[:, step]
    merged = np.zeros_like(grid)
    for i in range(h):
        for j in range(w):
            if kind[0] == "v":
                above = grid[:, i - 1, j] if i > 0 else 0.0
                merged[:, i, j] = (grid[:, i, j] + above) / 2
            else:
                left = grid[:, i, j - 1] if j > 0 else 0.0
                merged[:, i, j] = (grid[:, i, j] + left) / 2
    nh, nw = (h // 2, w) if kind[0] == "v" else (h, w // 2)
    cat = kind.endswith("cat")
    out = np.zeros((n, nh, nw, 2 * c if cat else c))
    for i in range(nh):
        for j in range(nw):
            a = merged[:, 2 * i, j] if kind[0] == "v" else merged[:, i, 2 * j]
            b = merged[:, 2 * i + 1, j] if kind[0] == "v" else merged[:, i, 2 * j + 1]
            out[:, i, j] = np.concatenate([a, b], axis=-1) if cat else (a + b) / 2
    new_walk = zigzag_order(nh, nw).tolist()
    sequence = [out[:, cell // nw, cell % nw] for cell in new_walk]
    new_cls = np.concatenate([cls, cls], axis=-1) if cat else cls
    sequence.insert(nh * nw // 2, new_cls)
    return np.stack(sequence, axis=1)


@pytest.mark.parametrize("kind", ["h-cat", "v-cat", "h-avg", "v-avg"])
def test_token_expansion_matches_a_loop_reference(kind):
    n, h, w, c = 3, 4, 6, 2
    tokens = torch.randn(n, h * w + 1, c, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out, new_hw = token_expansion(tokens, (h, w), kind)
    expected = _expansion_reference(tokens.numpy(), h, w, kind)
    assert new_hw == ((h // 2, w) if kind[0] == "v" else (h, w // 2))
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-12)


def test_token_expansion_refuses_an_odd_grid():
    with pytest.raises(ValueError, match="multiple of 32"):
        token_expansion(torch.zeros(1, 3 * 4 + 1, 2), (3, 4), "v-cat")


def _fusion_reference(tokens: np.ndarray, k: int) -> tuple[np.ndarray, list[list[int]]]:
    """Region Fusion with loops: gallery = even, probe = odd regions; each probe's best gallery
    by the cosine of CLS tokens; the k best pairs averaged (with every probe that chose the same
    gallery region). Returns the merged series and, per output region, its source regions."""
    n, s, _ = tokens.shape
    centre = (s - 1) // 2
    cls = tokens[:, centre]
    gallery, probe = list(range(0, n, 2)), list(range(1, n, 2))
    pairs = []
    for j in probe:
        scores = [float(cls[i] @ cls[j] / (np.linalg.norm(cls[i]) * np.linalg.norm(cls[j]))) for i in gallery]
        best = int(np.argmax(scores))
        pairs.append((scores[best], j, gallery[best]))
    chosen = sorted(pairs, reverse=True)[:k]
    groups = {i: [i] for i in range(n)}
    for _, j, i in chosen:
        groups[i].append(j)
        del groups[j]
    sources = [groups[i] for i in sorted(groups)]
    return np.stack([tokens[g].mean(axis=0) for g in sources]), sources


@pytest.mark.parametrize("n,k", [(9, 1), (10, 3), (7, 3), (2, 1), (12, 6)])
def test_region_fusion_merges_exactly_k_pairs_and_keeps_cls_correspondence(n, k):
    s, c = 2 * 3 + 1, 4
    g = torch.Generator().manual_seed(n * 10 + k)
    tokens = torch.randn(n, s, c, dtype=torch.float64, generator=g)
    # make a few probe regions near copies of gallery regions (and one gallery region the
    # favourite of two probes), so that the top-k is not decided by noise alone
    tokens[1] = tokens[0] + 0.01 * torch.randn(s, c, dtype=torch.float64, generator=g)
    if n > 3:
        tokens[3] = tokens[0] + 0.02 * torch.randn(s, c, dtype=torch.float64, generator=g)
    merged, destination = region_fusion(tokens, k)
    expected, sources = _fusion_reference(tokens.numpy(), k)
    assert merged.shape == (n - k, s, c)  # exactly k regions left the series
    np.testing.assert_allclose(merged.numpy(), expected, rtol=0, atol=1e-12)
    centre = (s - 1) // 2
    for out_index, group in enumerate(sources):
        # the CLS of every output region is the mean of its source regions' CLS tokens, at the centre
        np.testing.assert_allclose(merged[out_index, centre].numpy(), tokens[group, centre].mean(0).numpy(),
                                   atol=1e-12)
        assert all(int(destination[i]) == out_index for i in group)


def test_fusion_count_is_ceil_alpha_n_over_l():
    assert fusion_count(100, 0.8, 24) == 4  # ceil(3.33)
    assert fusion_count(24, 0.8, 24) == 1  # ceil(0.8)
    assert fusion_count(1000, 1.0, 24) == 42  # ceil(41.67)
    assert fusion_count(1, 0.8, 24) == 0  # nothing to pair
    assert fusion_count(50, 0.0, 24) == 0
    assert fusion_count(3, 1.0, 2) == 1  # at most one merge per probe region (n // 2)


def _tissue_input(seed: int, height: int = 48, width: int = 64, window: int = 16):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, height, width, generator=g)
    tissue = torch.zeros(1, height, width, dtype=torch.bool)
    tissue[:, :window, :] = True  # the first row of regions holds tissue
    tissue[:, 20:40, 40:50] = True  # and a blob across four more regions
    return SlideImage(image, tissue)


def test_tissue_free_regions_do_not_reach_the_output():
    torch.manual_seed(0)
    model = create_model("pixel_mamba_tiny", in_dim=3, n_outputs=2, drop_background=True).eval()
    x = _tissue_input(0)
    tokens, _ = model.serialize(x)
    assert tokens.shape[0] == 4 + 4  # the 4 regions of the first row, 4 more under the blob (of 12)
    with torch.no_grad():
        out = model(x)
        background = x.image.clone()
        background[:, :, 32:, :16] = torch.rand(1, 3, 16, 16)  # a region without tissue
        assert torch.equal(model(SlideImage(background, x.tissue_mask)), out)
        tissue = x.image.clone()
        tissue[:, :, :16, :16] = torch.rand(1, 3, 16, 16)  # a region with tissue
        assert not torch.allclose(model(SlideImage(tissue, x.tissue_mask)), out)
        # the same slide without the option keeps all 12 regions
        keep_all = create_model("pixel_mamba_tiny", in_dim=3, n_outputs=2, drop_background=False)
        assert keep_all.serialize(x)[0].shape[0] == 12


def test_tiny_model_trains_forward_and_backward_with_and_without_checkpointing():
    x = _tissue_input(3)
    target = torch.tensor([1])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = create_model("pixel_mamba_tiny", in_dim=3, n_outputs=2, checkpointing=checkpointing)
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        assert all(g is not None and torch.isfinite(g).all() for g in grads[-1].values())
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:  # recomputation in the backward gives the same gradients
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)

    # a few AdamW steps on two slides of different classes fit them
    torch.manual_seed(0)
    model = create_model("pixel_mamba_tiny", in_dim=3, n_outputs=2)
    batch = [(_tissue_input(4), torch.tensor([0])), (_tissue_input(5), torch.tensor([1]))]
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def total_loss():
        return sum(torch.nn.functional.cross_entropy(model(img), y) for img, y in batch)

    with torch.no_grad():
        before = float(total_loss())
    for _ in range(8):
        optimiser.zero_grad()
        total_loss().backward()
        optimiser.step()
    with torch.no_grad():
        after = float(total_loss())
    assert after < 0.5 * before


def test_small_image_is_padded_to_one_region():
    model = create_model("pixel_mamba_tiny", in_dim=3, n_outputs=3).eval()
    tokens, grid = model.serialize(torch.rand(1, 3, 5, 9))
    assert tokens.shape == (1, 16 * 16 + 1, 3) and grid == (16, 16)
    assert model(torch.rand(1, 3, 5, 9)).shape == (1, 3)


def test_bad_configurations_are_config_errors():
    with pytest.raises(ConfigError, match="multiple of 32"):
        create_model("pixel_mamba_6m", in_dim=3, n_outputs=2, scan_window=48)
    with pytest.raises(ConfigError, match="not a Token Expansion"):
        create_model("pixel_mamba_tiny", in_dim=3, n_outputs=2, schedule=["h-cat", "diagonal"])
    with pytest.raises(ConfigError, match="alpha"):
        create_model("pixel_mamba_tiny", in_dim=3, n_outputs=2, alpha=1.5)


def test_fixed_token_scale_variant_uses_patch_tokens():
    model = create_model("pixel_mamba_fixed", in_dim=3, n_outputs=2, scan_window=32)
    tokens, grid = model.serialize(torch.rand(1, 3, 32, 64))
    assert grid == (2, 2) and tokens.shape == (2, 2 * 2 + 1, 192)
    assert all(layer.expansion is None for layer in model.layers) and len(model.layers) == 24


def test_backbone_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = create_model("pixel_mamba_tiny", in_dim=3, n_outputs=1000)  # e.g. an ImageNet head
    path = tmp_path / "backbone.pt"
    state = source.state_dict()
    removed = "layers.3.block.norm.weight"
    partial = {k: v for k, v in state.items() if k != removed}
    partial["extra.unused"] = torch.zeros(1)
    torch.save({"model": partial}, path)

    torch.manual_seed(2)
    model = create_model("pixel_mamba_tiny", in_dim=3, n_outputs=4, pretrained=str(path))
    report = model.pretrained_report
    assert report["missing"] == [removed] and report["unexpected"] == ["extra.unused"]
    for name, value in model.state_dict().items():
        if name.startswith("head.") or name == removed:
            continue
        assert torch.equal(value, state[name]), name
    assert model.head.weight.shape == (4, model.out_dim)  # the task head is never loaded

    with pytest.raises(ConfigError, match="strict loading failed.*layers.3.block.norm.weight"):
        create_model("pixel_mamba_tiny", in_dim=3, n_outputs=4, pretrained=str(path), pretrained_strict=True)
    with pytest.raises(ConfigError, match="another shape"):
        create_model("pixel_mamba_tiny", in_dim=3, n_outputs=4, pretrained=str(path), d_state=8)
    with pytest.raises(ConfigError, match="not found"):
        create_model("pixel_mamba_tiny", in_dim=3, n_outputs=4, pretrained=str(tmp_path / "none.pt"))
    with torch.no_grad():
        assert math.isfinite(float(model(torch.rand(1, 3, 16, 16)).sum()))
