"""Tile feature extraction: features files, the DataLoader path, weights, extractor registry.

Every test builds its own tiny Aperio-style pyramidal TIFF (tifffile, JPEG tiles) and its own
tiles HDF5 following the tiles contract, so these tests need no other stage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
import tifffile
import torch

import mambapath
from mambapath.cli import main as cli_main
from mambapath.errors import ConfigError, DataError, SlideError
from mambapath.features import create_extractor
from mambapath.features.dataset import TileReadPlan, read_tile
from mambapath.features.extract import extract_features
from mambapath.features.resnet import ResNet50Trunk

LEVEL0_MPP = 0.5
SLIDE_W, SLIDE_H = 1024, 768
# ImageNet statistics, written out here so the reference below does not borrow them from the code.
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


# --- fixtures: a slide and tiles files made here --------------------------------------------


def write_aperio_tiff(path: Path, level0: np.ndarray, mpp: float = LEVEL0_MPP, n_levels: int = 2) -> None:
    """Pyramidal TIFF, one page per level (downsample 4), JPEG tiles, Aperio ImageDescription."""
    h, w = level0.shape[:2]
    description = (
        f"Aperio Image Library v12.0.0 \n {w}x{h} [0,0 {w}x{h}] (256x256) JPEG/RGB Q=90"
        f"|AppMag = {10 / mpp:g}|MPP = {mpp}"
    )
    with tifffile.TiffWriter(path) as tif:
        image = level0
        for level in range(n_levels):
            if level:
                hh, ww = image.shape[0] // 4, image.shape[1] // 4
                image = image[: hh * 4, : ww * 4].reshape(hh, 4, ww, 4, 3).mean((1, 3)).astype(np.uint8)
            tif.write(
                image, tile=(256, 256), compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                description=description if level == 0 else None, metadata=None, subfiletype=0 if level == 0 else 1,
            )


def tissue_like_image(seed: int = 0) -> np.ndarray:
    """Blocks of pink/purple hues with texture, so tiles differ from each other."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(60, 230, (SLIDE_H // 64, SLIDE_W // 64, 3)).astype(np.uint8)
    image = np.kron(blocks, np.ones((64, 64, 1), np.uint8)).astype(np.int16)
    image += rng.integers(-25, 25, image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_tiles_h5(path: Path, target_mpp: float, patch_size: int, n_tiles: int | None = None,
                   status: str = "ok", slide_id: str = "slide-A") -> tuple[np.ndarray, np.ndarray]:
    """A tiles file per the contract: a full raster grid, optionally cut to its first n_tiles."""
    patch_size_level0 = int(round(patch_size * target_mpp / LEVEL0_MPP))
    rows, cols = SLIDE_H // patch_size_level0, SLIDE_W // patch_size_level0
    grid = np.array([(r, c) for r in range(rows) for c in range(cols)], dtype=np.int64).reshape(-1, 2)
    if n_tiles is not None:
        grid = grid[:n_tiles]
    coords = grid[:, ::-1] * patch_size_level0  # (N, 2) x, y
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=coords.astype(np.int64))
        f.create_dataset("grid", data=grid)
        f.attrs.update(
            patch_size=patch_size, patch_size_level0=patch_size_level0, level0_mpp=LEVEL0_MPP,
            target_mpp=target_mpp, magnification=10 / target_mpp, overlap=0, scan_order="raster",
            slide_id=slide_id, mpp_source="slide-mpp", status=status,
        )
    return coords, grid


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("slide") / "slide-A.tiff"
    write_aperio_tiff(path, tissue_like_image())
    return path


def reference_features(model: torch.nn.Module, slide_path: Path, coords: np.ndarray, level: int,
                       read_size: int, factor: int) -> np.ndarray:
    """The plain way: one read_region, an integer box-average shrink and one forward per tile."""
    slide = openslide.OpenSlide(str(slide_path))
    rows = []
    for x, y in coords:
        rgb = np.asarray(slide.read_region((int(x), int(y)), level, (read_size, read_size)).convert("RGB"))
        n = read_size // factor
        # each output pixel is the mean of a factor x factor block, rounded half up to uint8
        block_mean = rgb.astype(np.float64).reshape(n, factor, n, factor, 3).mean(axis=(1, 3))
        image = np.floor(block_mean + 0.5)
        pixels = (image / 255.0 - MEAN) / STD  # (H, W, 3)
        tensor = torch.from_numpy(pixels.transpose(2, 0, 1)[None]).float()  # (1, 3, H, W)
        with torch.no_grad():
            rows.append(model(tensor)[0].numpy())
    slide.close()
    return np.stack(rows)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def write_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Written from the format's description: u64 header length, JSON header, raw bytes."""
    dtypes = {torch.float32: "F32", torch.int64: "I64"}
    header, chunks, offset = {}, [], 0
    for name, tensor in state.items():
        raw = tensor.detach().contiguous().numpy().tobytes()
        header[name] = {"dtype": dtypes[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


# --- features file ----------------------------------------------------------------------------


def test_features_file_round_trip(slide_file, tmp_path):
    tiles = tmp_path / "tiles.h5"
    coords, grid = write_tiles_h5(tiles, target_mpp=2.0, patch_size=32, n_tiles=10)
    out = tmp_path / "out" / "slide-A.h5"
    rc = cli_main(["extract", "--in", str(tiles), "--slide", str(slide_file), "--out", str(out),
                   "--num-workers", "0", "--batch-size", "4", "--device", "cpu", "--no-progress"])
    assert rc == 0
    with h5py.File(out, "r") as f:
        features = f["features"][...]
        assert features.shape == (10, 1024) and features.dtype == np.float32
        assert np.isfinite(features).all() and features.std(axis=0).max() > 0
        np.testing.assert_array_equal(f["coords"][...], coords)
        np.testing.assert_array_equal(f["grid"][...], grid)
        attrs = dict(f.attrs)
    assert attrs["extractor"] == "resnet50_trunc"
    assert attrs["weights_sha256"] == "random-init" and attrs["seed"] == 0
    assert attrs["mambapath_version"] == mambapath.__version__
    assert len(attrs["config_hash"]) == 16
    # tiling attributes are carried over
    for key, value in dict(patch_size=32, patch_size_level0=128, level0_mpp=0.5, target_mpp=2.0, overlap=0,
                           scan_order="raster", slide_id="slide-A", status="ok", mpp_source="slide-mpp").items():
        assert attrs[key] == value, key
    # 2.0 mpp on a 0.5 mpp slide with 4x levels: level 1 (2.0 mpp) is read, 32 px, no resize
    assert (attrs["read_level"], attrs["read_size"], attrs["input_size"]) == (1, 32, 32)
    assert leftovers(out.parent) == []


def test_dataloader_matches_plain_loop(slide_file, tmp_path):
    # 1.0 mpp: no level has it, so level 0 (0.5 mpp) is read at 64 px and resized to 32 px.
    tiles = tmp_path / "tiles.h5"
    coords, _ = write_tiles_h5(tiles, target_mpp=1.0, patch_size=32, n_tiles=13)
    out = tmp_path / "features.h5"
    summary = extract_features(slide_file, tiles, out, batch_size=5, num_workers=2, device="cpu", progress=False)
    assert (summary["read_level"], summary["read_size"]) == (0, 64)
    with h5py.File(out, "r") as f:
        features = f["features"][...]
    model = create_extractor("resnet50_trunc", seed=0).model
    expected = reference_features(model, slide_file, coords, level=0, read_size=64, factor=2)
    # float32 convolutions batched vs one at a time differ only by summation order
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_tile_reaching_outside_the_slide_is_white_there(slide_file):
    slide = openslide.OpenSlide(str(slide_file))
    plan = TileReadPlan(level=0, level_mpp=LEVEL0_MPP, read_size=64, input_size=64)
    tile = read_tile(slide, SLIDE_W - 24, 0, plan)  # 24 px inside, 40 px beyond the right edge
    expected_inside = np.asarray(slide.read_region((SLIDE_W - 24, 0), 0, (24, 64)).convert("RGB"))
    slide.close()
    assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8
    np.testing.assert_array_equal(tile[:, :24], expected_inside)
    assert (tile[:, 24:] == 255).all()


def test_empty_tiles_file_gives_empty_features(slide_file, tmp_path):
    tiles = tmp_path / "tiles.h5"
    write_tiles_h5(tiles, target_mpp=2.0, patch_size=32, n_tiles=0, status="no_tissue")
    out = tmp_path / "features.h5"
    extract_features(slide_file, tiles, out, num_workers=0, device="cpu", progress=False)
    with h5py.File(out, "r") as f:
        assert f["features"].shape == (0, 1024)
        assert f["coords"].shape == (0, 2) and f["grid"].shape == (0, 2)
        assert f.attrs["status"] == "no_tissue" and f.attrs["n_tiles"] == 0
        assert f.attrs["weights_sha256"] == "random-init"


def test_tiles_file_without_contract_attrs_is_a_data_error(slide_file, tmp_path):
    tiles = tmp_path / "tiles.h5"
    with h5py.File(tiles, "w") as f:
        f.create_dataset("coords", data=np.zeros((2, 2), np.int64))
        f.create_dataset("grid", data=np.zeros((2, 2), np.int64))
    with pytest.raises(DataError, match=r"patch_size.*re-run `mambapath tile`"):
        extract_features(slide_file, tiles, tmp_path / "f.h5", num_workers=0, device="cpu", progress=False)
    assert not (tmp_path / "f.h5").exists()


# --- bad slides -------------------------------------------------------------------------------


def test_corrupt_tile_is_a_slide_error_and_leaves_no_output(slide_file, tmp_path):
    broken = tmp_path / "broken.tiff"
    shutil.copy(slide_file, broken)
    with tifffile.TiffFile(broken) as tif:  # the first JPEG tile of level 1
        offset = tif.pages[1].dataoffsets[0]
    with open(broken, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * 64)
    tiles = tmp_path / "tiles.h5"
    write_tiles_h5(tiles, target_mpp=2.0, patch_size=32, n_tiles=12)
    out_dir = tmp_path / "out"
    with pytest.raises(SlideError, match=r"slide slide-A: tile 0 at level-0 x=0, y=0: .*broken\.tiff.*re-download"):
        extract_features(broken, tiles, out_dir / "f.h5", batch_size=4, num_workers=2, device="cpu", progress=False)
    assert not (out_dir / "f.h5").exists() and leftovers(out_dir) == []


def test_corrupt_tile_cli_exits_2_with_one_line(slide_file, tmp_path, capsys):
    broken = tmp_path / "broken.tiff"
    shutil.copy(slide_file, broken)
    with tifffile.TiffFile(broken) as tif:
        offset = tif.pages[0].dataoffsets[5]  # level-0 JPEG tile (row 1, col 1): x, y in [256, 512)
    with open(broken, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\x00" * 64)
    # 1.0 mpp, 32 px: 64 level-0 px tiles on a 16 x 12 grid, so the first batch of 64 reads
    # fine and the second one meets the broken JPEG tile (grid row 4, col 4 = tile 68).
    tiles = tmp_path / "tiles.h5"
    write_tiles_h5(tiles, target_mpp=1.0, patch_size=32)
    out = tmp_path / "f.h5"
    rc = cli_main(["extract", "--in", str(tiles), "--slide", str(broken), "--out", str(out),
                   "--batch-size", "64", "--num-workers", "0", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "tile 68 at level-0 x=256, y=256" in err[0] and "re-download" in err[0]
    assert not out.exists() and leftovers(tmp_path) == []


def test_shared_unreadable_slide(shared_data, tmp_path):
    unreadable = shared_data / "wsi_edge_cases/openslide_python/unreadable.svs"  # opens; pixels corrupt
    tiles = tmp_path / "tiles.h5"
    with h5py.File(tiles, "w") as f:
        f.create_dataset("coords", data=np.zeros((1, 2), np.int64))
        f.create_dataset("grid", data=np.zeros((1, 2), np.int64))
        f.attrs.update(patch_size=16, patch_size_level0=16, level0_mpp=0.499, target_mpp=0.499, overlap=0,
                       scan_order="raster", slide_id="unreadable", status="ok")
    with pytest.raises(SlideError, match=r"slide unreadable: .*unreadable\.svs.*cannot be read"):
        extract_features(unreadable, tiles, tmp_path / "f.h5", num_workers=0, device="cpu", progress=False)
    assert not (tmp_path / "f.h5").exists()


# --- extractors -------------------------------------------------------------------------------


def test_trunk_has_torchvision_resnet50_names_and_shapes():
    state = ResNet50Trunk().state_dict()
    # torchvision resnet50: stem, then (blocks, width) = (3, 64), (4, 128), (6, 256) up to layer3
    expected = {"conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,)}
    in_ch = 64
    for layer, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256)], start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}."
            expected[p + "conv1.weight"] = (width, in_ch, 1, 1)
            expected[p + "conv2.weight"] = (width, width, 3, 3)
            expected[p + "conv3.weight"] = (4 * width, width, 1, 1)
            for bn, ch in (("bn1", width), ("bn2", width), ("bn3", 4 * width)):
                for t in ("weight", "bias", "running_mean", "running_var"):
                    expected[p + f"{bn}.{t}"] = (ch,)
                expected[p + f"{bn}.num_batches_tracked"] = ()
            if b == 0:
                expected[p + "downsample.0.weight"] = (4 * width, in_ch, 1, 1)
                for t in ("weight", "bias", "running_mean", "running_var"):
                    expected[p + f"downsample.1.{t}"] = (4 * width,)
                expected[p + "downsample.1.num_batches_tracked"] = ()
            in_ch = 4 * width
    for t in ("weight", "bias", "running_mean"):
        expected[f"bn1.{t}"] = (64,)
    expected["bn1.num_batches_tracked"] = ()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected


def test_random_init_is_deterministic_and_warned(caplog):
    rng_before = torch.get_rng_state()
    with caplog.at_level("WARNING"):
        a = create_extractor("resnet50_trunc", seed=0)
    assert any("randomly initialised" in r.message for r in caplog.records)
    b = create_extractor("resnet50_trunc", seed=0)
    c = create_extractor("resnet50_trunc", seed=1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layer3.5.conv3.weight"], sc["layer3.5.conv3.weight"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))
    assert a.provenance()["weights_sha256"] == "random-init"


def _trained_looking_trunk() -> dict[str, torch.Tensor]:
    """A full torchvision-style ResNet-50 state_dict: trunk with non-trivial BN stats, plus layer4/fc."""
    torch.manual_seed(123)
    net = ResNet50Trunk()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.2, 0.5)
            m.bias.data.uniform_(-0.1, 0.1)
    state = net.state_dict()
    state["layer4.0.conv1.weight"] = torch.randn(512, 1024, 1, 1)
    state["fc.weight"] = torch.randn(1000, 2048)
    state["fc.bias"] = torch.zeros(1000)
    return state


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_weights_file_is_loaded_and_hashed(fmt, slide_file, tmp_path):
    state = _trained_looking_trunk()
    path = tmp_path / f"resnet50.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        write_safetensors(path, state)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()

    saved = ResNet50Trunk().eval()
    saved.load_state_dict({k: v for k, v in state.items() if not k.startswith(("layer4", "fc"))})
    loaded = create_extractor("resnet50_trunc", weights=path)
    x = torch.rand(3, 3, 48, 48)
    with torch.no_grad():
        expected, got = saved(x), loaded.model(x)
        random_init = create_extractor("resnet50_trunc", seed=0).model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(got, random_init)
    assert loaded.weights_sha256 == sha

    tiles = tmp_path / "tiles.h5"
    write_tiles_h5(tiles, target_mpp=2.0, patch_size=32, n_tiles=3)
    extract_features(slide_file, tiles, tmp_path / "f.h5", weights=path, num_workers=0, device="cpu", progress=False)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert f.attrs["weights_sha256"] == sha and f.attrs["weights_file"] == path.name and f.attrs["seed"] == -1


def test_weights_file_of_another_network_is_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.blocks.0.weight": torch.zeros(3)}, path)
    with pytest.raises(ConfigError, match=r"other\.pth: not a ResNet-50 checkpoint"):
        create_extractor("resnet50_trunc", weights=path)
    with pytest.raises(ConfigError, match=r"weights file .*missing\.pth not found"):
        create_extractor("resnet50_trunc", weights=tmp_path / "missing.pth")


def test_unknown_extractor_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown extractor 'resnet18'.*resnet50_trunc"):
        create_extractor("resnet18")


@pytest.mark.parametrize("name", ["uni", "gigapath", "timm-vit_small_patch16_224"])
def test_timm_extractors_without_timm_say_how_to_install(name, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    with pytest.raises(ConfigError, match=r"timm, which is not installed: run `pip install 'mambapath\[encoders\]'`"):
        create_extractor(name, weights=weights)


# --- against the reference libraries, where they are installed (the GPU machine has both) ----


def test_matches_torchvision_resnet50_to_layer3(tmp_path):
    tv_models = pytest.importorskip("torchvision.models", reason="torchvision not installed")
    torch.manual_seed(5)
    reference = tv_models.resnet50(weights=None).eval()
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "resnet50_tv.pth"
    torch.save(reference.state_dict(), path)
    ours = create_extractor("resnet50_trunc", weights=path).model
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        r = reference
        h = r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x)))))))
        expected = h.mean(dim=(2, 3))
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


def test_timm_hook_matches_timm_model(tmp_path):
    timm = pytest.importorskip("timm", reason="timm not installed (the `encoders` extra)")
    torch.manual_seed(6)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    path = tmp_path / "vit_tiny.pth"
    torch.save(reference.state_dict(), path)
    ext = create_extractor("timm-vit_tiny_patch16_224", weights=path)
    assert ext.feature_dim == 192 and ext.input_size == 224 and ext.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ext.model(x), reference(x), rtol=1e-5, atol=1e-5)
    # a timm resnet50 checkpoint loads into the trunk too
    torch.save(timm.create_model("resnet50", pretrained=False).state_dict(), tmp_path / "timm_r50.pth")
    assert create_extractor("resnet50_trunc", weights=tmp_path / "timm_r50.pth").feature_dim == 1024
