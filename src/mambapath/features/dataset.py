"""Reading the tiles of a tiles HDF5 from their slide, for a DataLoader.

Tiles are read at the pyramid level best suited to the tiles' target mpp (the coarsest level
still at least as fine), over the tile's level-0 footprint (``patch_size_level0``), and then
resized to the network's input edge: an area (box) average when shrinking, so a 2x reduction is
the mean of each 2x2 block rounded half up, and bilinear when enlarging. Pixels outside the
scanned area (alpha 0) become white glass. Each DataLoader worker opens its own OpenSlide handle:
OpenSlide handles must not cross a fork, and one handle per process keeps its tile cache
local to the worker that uses it.

A failed read does not raise inside the worker (PyTorch would wrap it in a multi-line
traceback); the sample carries the message and the main process raises one clean
:class:`~mambapath.errors.SlideError`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError, MambapathError, SlideError
from ..slide import best_level_for_mpp, open_slide

#: how read tiles are resized to the network input (recorded in the features' config hash)
RESAMPLING = "pil-box-shrink-bilinear-enlarge"
#: attributes a tiles HDF5 must carry for extraction
REQUIRED_TILE_ATTRS = ("patch_size", "patch_size_level0", "level0_mpp", "target_mpp")


@dataclass
class TilesFile:
    """The content of a tiles HDF5: level-0 coords (N, 2) x, y; grid (N, 2) row, col; attrs."""

    path: Path
    coords: np.ndarray
    grid: np.ndarray
    attrs: dict

    @property
    def slide_id(self) -> str:
        return str(self.attrs.get("slide_id") or self.path.stem)

    def __len__(self) -> int:
        return len(self.coords)


def read_tiles_file(path: str | os.PathLike) -> TilesFile:
    """Load and check a tiles HDF5 (see the tiles contract in the README)."""
    path = Path(path)
    fix = "re-run `mambapath tile` for this slide"
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("coords", "grid") if k not in f]
            if missing:
                raise DataError(f"{path}: tiles file has no dataset(s) {missing}; {fix}")
            coords = np.asarray(f["coords"][...], dtype=np.int64).reshape(-1, 2)
            grid = np.asarray(f["grid"][...], dtype=np.int64).reshape(-1, 2)
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 tiles file ({exc}); {fix}") from exc
    missing_attrs = [k for k in REQUIRED_TILE_ATTRS if k not in attrs]
    if missing_attrs:
        raise DataError(f"{path}: tiles file lacks attribute(s) {missing_attrs}; {fix}")
    if len(coords) != len(grid):
        raise DataError(f"{path}: coords has {len(coords)} rows but grid has {len(grid)}; {fix}")
    return TilesFile(path=path, coords=coords, grid=grid, attrs=attrs)


@dataclass(frozen=True)
class TileReadPlan:
    """How every tile of one slide is read: pyramid level, size there, and network input size."""

    level: int
    level_mpp: float
    #: edge of the tile's footprint in pixels of `level`
    read_size: int
    #: edge of the tile handed to the network
    input_size: int


def plan_tile_reads(slide, tiles: TilesFile, input_size: int | None = None) -> TileReadPlan:
    """Choose the pyramid level for the tiles' target mpp and the size read there."""
    level0_mpp = float(tiles.attrs["level0_mpp"])
    target_mpp = float(tiles.attrs["target_mpp"])
    level = best_level_for_mpp(slide, level0_mpp, target_mpp)
    downsample = float(slide.level_downsamples[level])
    read_size = max(1, int(round(float(tiles.attrs["patch_size_level0"]) / downsample)))
    return TileReadPlan(
        level=level,
        level_mpp=level0_mpp * downsample,
        read_size=read_size,
        input_size=int(input_size or tiles.attrs["patch_size"]),
    )


def read_tile(slide, x: int, y: int, plan: TileReadPlan, path="") -> np.ndarray:
    """One tile as (input_size, input_size, 3) uint8 RGB.

    This is the hot loop of extraction: the RGBA -> RGB conversion and the resize stay inside
    PIL's C code (an integer shrink is ``Image.reduce``, a box average), which at a 512 px read
    costs a fraction of NumPy masking plus a bilinear resize, leaving the JPEG decoding inside
    ``read_region`` as the large cost. PIL also keeps no thread pool, so it is safe in forked
    DataLoader workers (OpenCV's pool can hang a worker forked from a process that used it).
    """
    size = (plan.read_size, plan.read_size)
    try:
        region = slide.read_region((int(x), int(y)), plan.level, size)
    except Exception as exc:  # noqa: BLE001 - OpenSlide raises several types for corrupt data
        raise SlideError(
            f"{path}: slide opens but its pixels cannot be read at level {plan.level} ({exc}); "
            "the file is corrupt: re-download it or drop it from the cohort sheet"
        ) from exc
    image = region.convert("RGB")
    alpha = region.getchannel("A")
    if alpha.getextrema()[0] < 255:  # the tile reaches outside the scanned area
        rgb = np.array(image)
        rgb[np.asarray(alpha) == 0] = 255
        image = Image.fromarray(rgb)
    n, read = plan.input_size, plan.read_size
    if read != n:
        if read % n == 0:
            image = image.reduce(read // n)
        else:
            image = image.resize((n, n), Image.Resampling.BOX if read > n else Image.Resampling.BILINEAR)
    return np.array(image)  # (input_size, input_size, 3)


class TileDataset(Dataset):
    """Tiles of one slide as (index, (H, W, 3) uint8 tensor, error message or "")."""

    def __init__(self, slide_path: str | os.PathLike, coords: np.ndarray, plan: TileReadPlan):
        self.slide_path = str(slide_path)
        self.coords = np.asarray(coords, dtype=np.int64)
        self.plan = plan
        self._slide = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getstate__(self):
        # An open OpenSlide handle cannot be pickled to a worker; each worker opens its own.
        state = self.__dict__.copy()
        state["_slide"] = None
        state["_pid"] = None
        return state

    def _handle(self):
        if self._slide is None or self._pid != os.getpid():
            self._slide = open_slide(self.slide_path)
            self._pid = os.getpid()
        return self._slide

    def __getitem__(self, index: int):
        x, y = (int(v) for v in self.coords[index])
        try:
            rgb = read_tile(self._handle(), x, y, self.plan, path=self.slide_path)
        except MambapathError as exc:
            empty = torch.zeros((self.plan.input_size, self.plan.input_size, 3), dtype=torch.uint8)
            return index, empty, f"tile {index} at level-0 x={x}, y={y}: {exc}"
        return index, torch.from_numpy(rgb), ""


def collate_tiles(samples):
    """(indices (B,), pixels (B, H, W, 3) uint8, first error message or "")."""
    indices = torch.tensor([s[0] for s in samples], dtype=torch.int64)
    pixels = torch.stack([s[1] for s in samples])
    error = next((s[2] for s in samples if s[2]), "")
    return indices, pixels, error


def _plain(value):
    """HDF5 attribute -> plain Python value (numpy scalars and bytes become int/float/str)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
