"""Tiling: a regular grid of square tiles over the tissue, at a physical scale.

``mambapath tile`` lays a grid of ``patch_size`` x ``patch_size`` tiles at ``target_mpp``
microns per pixel (or at an objective ``magnification``, 10 um/px at 1x) over the slide,
``overlap`` target pixels between neighbours, and keeps the tiles whose tissue fraction (from
the segmentation mask, area-weighted) is at least ``min_tissue``. The scale is never a
pyramid level: a tile covers ``patch_size_level0 = round(patch_size * target_mpp /
level0_mpp)`` level-0 pixels whatever the pyramid holds, and readers pick a level
themselves.

Tiles HDF5 (one file per slide)::

    coords  (N, 2) int64   level-0 x, y of each tile's top-left corner
    grid    (N, 2) int64   row, col of the tile on the grid (x = round(col * step), ...)
    attrs   patch_size, patch_size_level0, level0_mpp, target_mpp, magnification, overlap,
            scan_order, slide_id, mpp_source, status ("ok" | "no_tissue"), min_tissue,
            step_level0, level0_width, level0_height, source, mambapath_version

Rows are stored in ``scan_order`` (:func:`mambapath.order.tile_order`). The ``coords``
dataset also carries TRIDENT's attributes (``patch_size``, ``patch_size_level0``,
``level0_magnification``, ``target_magnification``, ``overlap``, ``name``), so TRIDENT
reads our files as they are.

Other tools' coordinate files convert both ways (:func:`read_coords_file`,
:func:`write_clam_coords`, :func:`write_trident_coords`; CLI ``--import-coords`` and
``--export``):

- CLAM (``create_patches_fp.py``): ``coords`` (N, 2) level-0 x, y with attributes
  ``patch_level`` and ``patch_size`` (pixels *at that pyramid level*), ``downsample``,
  ``level_dim``, ``downsampled_level_dim``, ``name``. CLAM stores no mpp, so converting
  needs the slide (or its level-0 mpp).
- TRIDENT: ``coords`` (N, 2) level-0 x, y with attributes ``patch_size`` (at the target
  magnification), ``patch_size_level0``, ``level0_magnification``,
  ``target_magnification``, ``overlap``.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError, SlideError

log = logging.getLogger(__name__)

#: a target scale finer than level 0 by more than this factor is refused (upsampled pixels)
UPSAMPLE_TOLERANCE = 1.1


@dataclass
class Tiles:
    """A slide's tiles: level-0 top-left corners, grid positions and the tiling attributes."""

    coords: np.ndarray  # (N, 2) int64, level-0 x, y
    grid: np.ndarray  # (N, 2) int64, row, col
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.coords)


@dataclass(frozen=True)
class TileGeometry:
    """Where a regular grid of tiles lies on level 0."""

    patch_size: int
    target_mpp: float
    level0_mpp: float
    overlap: int

    @property
    def patch_size_level0(self) -> int:
        return int(round(self.patch_size * self.target_mpp / self.level0_mpp))

    @property
    def step_level0(self) -> float:
        return (self.patch_size - self.overlap) * self.target_mpp / self.level0_mpp

    def grid_shape(self, width0: int, height0: int) -> tuple[int, int]:
        """Rows and columns of tiles that fit entirely inside the slide."""
        ps0, step = self.patch_size_level0, self.step_level0
        n_cols = int(math.floor((width0 - ps0) / step)) + 1 if width0 >= ps0 else 0
        n_rows = int(math.floor((height0 - ps0) / step)) + 1 if height0 >= ps0 else 0
        return n_rows, n_cols

    def origins(self, n: int) -> np.ndarray:
        return np.round(np.arange(n) * self.step_level0).astype(np.int64)


def _overlap_weights(starts: np.ndarray, size: float, n_pixels: int, pixel: float) -> np.ndarray:
    """(len(starts), n_pixels): length of [start, start+size) inside each mask pixel's span."""
    edges = np.arange(n_pixels + 1) * pixel
    lo = np.maximum(starts[:, None].astype(float), edges[None, :-1])
    hi = np.minimum(starts[:, None].astype(float) + size, edges[None, 1:])
    return np.clip(hi - lo, 0.0, None)


def tissue_fraction_grid(tissue_mask: np.ndarray, mask_downsample, geometry: TileGeometry,
                         n_rows: int, n_cols: int) -> np.ndarray:
    """(n_rows, n_cols) area share of tissue under each tile of the grid.

    The mask pixel (i, j) covers level-0 [j*dx, (j+1)*dx) x [i*dy, (i+1)*dy); each tile's
    share is the exact area-weighted mean of the mask over its footprint.
    """
    dx, dy = (float(v) for v in mask_downsample)
    ps0 = geometry.patch_size_level0
    wx = _overlap_weights(geometry.origins(n_cols), ps0, tissue_mask.shape[1], dx)  # (C, W)
    wy = _overlap_weights(geometry.origins(n_rows), ps0, tissue_mask.shape[0], dy)  # (R, H)
    covered = wy @ tissue_mask.astype(float) @ wx.T  # (R, C) tissue area
    area = wy.sum(1)[:, None] * wx.sum(1)[None, :]
    return np.divide(covered, area, out=np.zeros_like(covered), where=area > 0)


def resolve_target_mpp(target_mpp: float | None, magnification: float | None) -> float:
    from .slide import magnification_to_mpp

    if magnification:
        return magnification_to_mpp(magnification)
    if target_mpp:
        return float(target_mpp)
    raise ConfigError("tiling needs --target-mpp or --magnification (tiling.target_mpp or tiling.magnification)")


def tile_from_mask(tissue_mask: np.ndarray, mask_downsample, level0_mpp: float, width0: int, height0: int,
                   target_mpp: float, patch_size: int, overlap: int = 0, min_tissue: float = 0.5,
                   scan_order: str = "raster") -> tuple[Tiles, np.ndarray]:
    """Tiles over the tissue; also returns each kept tile's tissue fraction."""
    from .order import ORDERS, tile_order

    if scan_order not in ORDERS:
        raise ConfigError(f"tiling.scan_order: {scan_order!r} is not one of {', '.join(ORDERS)}")
    if not 0 <= overlap < patch_size:
        raise ConfigError(f"tiling.overlap ({overlap}) must be >= 0 and smaller than tiling.patch_size ({patch_size})")
    geometry = TileGeometry(patch_size=int(patch_size), target_mpp=float(target_mpp),
                            level0_mpp=float(level0_mpp), overlap=int(overlap))
    n_rows, n_cols = geometry.grid_shape(width0, height0)
    if n_rows == 0 or n_cols == 0:
        fractions = np.zeros((0, 0))
    else:
        fractions = tissue_fraction_grid(tissue_mask, mask_downsample, geometry, n_rows, n_cols)
    # a tile needs *some* tissue even when min_tissue is 0
    keep = (fractions >= min_tissue) & (fractions > 0)
    rows, cols = np.nonzero(keep)
    grid = np.stack([rows, cols], 1).astype(np.int64)
    xs, ys = geometry.origins(n_cols), geometry.origins(n_rows)
    coords = np.stack([xs[cols], ys[rows]], 1).astype(np.int64) if len(rows) else np.zeros((0, 2), np.int64)
    kept_fraction = fractions[rows, cols]
    order = tile_order(grid, scan_order)
    attrs = {
        "patch_size": int(patch_size),
        "patch_size_level0": geometry.patch_size_level0,
        "step_level0": geometry.step_level0,
        "level0_mpp": float(level0_mpp),
        "target_mpp": float(target_mpp),
        "magnification": 10.0 / float(target_mpp),
        "overlap": int(overlap),
        "min_tissue": float(min_tissue),
        "scan_order": scan_order,
        "level0_width": int(width0),
        "level0_height": int(height0),
        "grid_rows": int(n_rows),
        "grid_cols": int(n_cols),
    }
    return Tiles(coords=coords[order].reshape(-1, 2), grid=grid[order].reshape(-1, 2), attrs=attrs), kept_fraction[order]


# ---------------------------------------------------------------------------- HDF5


def write_tiles(path, tiles: Tiles) -> None:
    """Write a tiles HDF5 atomically (our layout, TRIDENT-readable ``coords``)."""
    import h5py

    from . import __version__
    from .io import atomic_path

    attrs = {"source": "mambapath", "mambapath_version": __version__, **tiles.attrs}
    required = ("patch_size", "patch_size_level0", "level0_mpp", "target_mpp", "magnification", "overlap",
                "scan_order", "slide_id", "mpp_source", "status")
    missing = [k for k in required if k not in attrs]
    if missing:
        raise DataError(f"{path}: tile attributes {missing} are missing")
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            coords = h5.create_dataset("coords", data=np.asarray(tiles.coords, np.int64).reshape(-1, 2))
            h5.create_dataset("grid", data=np.asarray(tiles.grid, np.int64).reshape(-1, 2))
            for key, value in attrs.items():
                if value is not None:
                    h5.attrs[key] = value
            coords.attrs.update({
                "patch_size": int(attrs["patch_size"]),
                "patch_size_level0": int(attrs["patch_size_level0"]),
                "level0_magnification": 10.0 / float(attrs["level0_mpp"]),
                "target_magnification": float(attrs["magnification"]),
                "overlap": int(attrs["overlap"]),
                "name": str(attrs["slide_id"]),
            })


def _attr(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.size == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_tiles(path) -> Tiles:
    """Read a tiles HDF5 written by :func:`write_tiles`."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            if "coords" not in h5 or "grid" not in h5 or "level0_mpp" not in h5.attrs:
                raise DataError(
                    f"{path}: not a mambapath tiles file (needs coords, grid and tiling attributes); "
                    "for CLAM or TRIDENT files use `mambapath tile --import-coords`"
                )
            return Tiles(
                coords=h5["coords"][:].astype(np.int64).reshape(-1, 2),
                grid=h5["grid"][:].astype(np.int64).reshape(-1, 2),
                attrs={k: _attr(v) for k, v in h5.attrs.items()},
            )
    except OSError as exc:
        raise DataError(f"{path}: cannot be read as HDF5 ({exc}); run the tile step again") from exc


def _infer_step(coords: np.ndarray, fallback: float) -> float:
    """The grid step: the most common gap between neighbouring tile positions (x and y)."""
    gaps = []
    for axis in (0, 1):
        d = np.diff(np.unique(coords[:, axis]))
        gaps.extend(d[d > 0].tolist())
    if not gaps:
        return float(fallback)
    values, counts = np.unique(np.asarray(gaps), return_counts=True)
    return float(values[np.argmax(counts)])


def _grid_from_coords(coords: np.ndarray, step: float, origin=(0.0, 0.0)) -> tuple[np.ndarray, int]:
    """Grid (row, col) of coordinates on a grid of ``step``; also how many cells collide."""
    if len(coords) == 0:
        return np.zeros((0, 2), np.int64), 0
    col = np.round((coords[:, 0] - origin[0]) / step).astype(np.int64)
    row = np.round((coords[:, 1] - origin[1]) / step).astype(np.int64)
    grid = np.stack([row, col], 1)
    collisions = len(grid) - len(np.unique(grid, axis=0))
    return grid, int(collisions)


def detect_coords_format(path) -> str:
    """'mambapath', 'trident' or 'clam' (from the attributes of the file's ``coords``)."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            if "coords" not in h5:
                raise DataError(f"{path}: has no `coords` dataset; not a CLAM, TRIDENT or mambapath coordinate file")
            root, attrs = set(h5.attrs), set(h5["coords"].attrs)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read as HDF5 ({exc})") from exc
    if {"level0_mpp", "scan_order"} <= root:
        return "mambapath"
    if {"target_magnification", "level0_magnification"} <= attrs:
        return "trident"
    if {"patch_level", "patch_size"} <= attrs:
        return "clam"
    raise DataError(
        f"{path}: `coords` has neither TRIDENT attributes (target_magnification, level0_magnification, patch_size) "
        "nor CLAM attributes (patch_level, patch_size); add them or re-create the coordinates"
    )


def read_coords_file(path, slide_path=None, level0_mpp: float | None = None, slide_id: str | None = None,
                     scan_order: str = "raster", fallback_mpp: float | None = None) -> Tiles:
    """Load a CLAM, TRIDENT or mambapath coordinate file as :class:`Tiles`.

    CLAM files store no physical scale: their level-0 mpp comes from ``level0_mpp`` or the
    slide (``slide_path``). TRIDENT files store magnifications, which give the scale at
    10 um/px at 1x; a given slide or ``level0_mpp`` takes precedence for level 0.
    """
    import h5py

    from .order import tile_order

    path = Path(path)
    fmt = detect_coords_format(path)
    if fmt == "mambapath":
        tiles = read_tiles(path)
        return tiles

    mpp_source = "given" if level0_mpp else None
    level_downsamples = None
    if slide_path is not None:
        from .slide import open_slide, resolve_mpp

        slide = open_slide(slide_path)
        try:
            level_downsamples = [float(d) for d in slide.level_downsamples]
            width0, height0 = slide.dimensions
            if not level0_mpp:
                scale = resolve_mpp(slide, slide_path, fallback_mpp)
                level0_mpp, mpp_source = scale.mpp, scale.source
        finally:
            slide.close()
    else:
        width0 = height0 = None

    with h5py.File(path, "r") as h5:
        coords = h5["coords"][:].astype(np.int64).reshape(-1, 2)
        a = {k: _attr(v) for k, v in h5["coords"].attrs.items()}
    name = slide_id or str(a.get("name") or path.stem.replace("_patches", ""))

    if fmt == "trident":
        patch_size = int(a["patch_size"])
        level0_mag = float(a["level0_magnification"])
        target_mag = float(a["target_magnification"])
        if not level0_mpp:
            level0_mpp, mpp_source = 10.0 / level0_mag, "trident-level0_magnification"
        ps0 = int(a.get("patch_size_level0") or round(patch_size * level0_mag / target_mag))
        target_mpp = level0_mpp * ps0 / patch_size
        overlap = int(a.get("overlap", 0) or 0)
        step0 = (patch_size - overlap) * ps0 / patch_size
    else:  # clam
        if not level0_mpp:
            raise SlideError(
                f"{path}: a CLAM coordinate file has no physical scale; pass the slide (--slide) "
                "or its level-0 mpp (--level0-mpp)"
            )
        level = int(a["patch_level"])
        read_size = int(a["patch_size"])  # pixels read at `patch_level`
        ds = a.get("downsample")
        if ds is None:
            if level_downsamples is None:
                raise SlideError(f"{path}: CLAM file without `downsample`; pass the slide (--slide)")
            ds = level_downsamples[level]
        ds = float(np.mean(np.atleast_1d(ds)))
        ps0 = int(round(read_size * ds))
        # tiles read at level 0 and resized (CLAM's --target_patch_size) say so here
        patch_size = int(a.get("target_patch_size") or read_size)
        target_mpp = level0_mpp * ps0 / patch_size
        step0 = _infer_step(coords, ps0) if len(coords) > 1 else float(ps0)
        step0 = min(step0, float(ps0))  # sparse tiles: no overlap to infer
        overlap = max(0, int(round((ps0 - step0) * patch_size / ps0)))

    # CLAM and TRIDENT start their grids where each tissue contour starts, so positions of
    # different contours need not share an origin; anchor at the top-left tile and round.
    origin = coords.min(0) % step0 if len(coords) else np.zeros(2)
    grid, collisions = _grid_from_coords(coords, step0, origin=tuple(origin))
    if collisions:
        log.warning("%s: %d tiles share a grid cell with another (the file's contours use different grid "
                    "origins); 2D models see the last one of each cell", path, collisions)
    order = tile_order(grid, scan_order)
    attrs = {
        "patch_size": patch_size,
        "patch_size_level0": ps0,
        "step_level0": step0,
        "level0_mpp": float(level0_mpp),
        "target_mpp": float(target_mpp),
        "magnification": 10.0 / float(target_mpp),
        "overlap": overlap,
        "scan_order": scan_order,
        "slide_id": name,
        "mpp_source": mpp_source or "unknown",
        "status": "ok" if len(coords) else "no_tissue",
        "source": fmt,
        "source_file": str(path),
        "grid_collisions": collisions,
    }
    if width0 is not None:
        attrs.update(level0_width=int(width0), level0_height=int(height0))
    return Tiles(coords=coords[order], grid=grid[order], attrs=attrs)


def write_trident_coords(path, tiles: Tiles) -> None:
    """Write tiles as a TRIDENT ``*_patches.h5`` coordinate file."""
    import h5py

    from .io import atomic_path

    a = tiles.attrs
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            ds = h5.create_dataset("coords", data=np.asarray(tiles.coords, np.int64).reshape(-1, 2))
            ds.attrs.update({
                "patch_size": int(a["patch_size"]),
                "patch_size_level0": int(a["patch_size_level0"]),
                "level0_magnification": 10.0 / float(a["level0_mpp"]),
                "target_magnification": 10.0 / float(a["target_mpp"]),
                "overlap": int(a.get("overlap", 0)),
                "name": str(a.get("slide_id", "")),
                "savetodir": str(Path(path).parent),
            })


def write_clam_coords(path, tiles: Tiles, slide_path=None) -> None:
    """Write tiles as a CLAM ``patches/<slide>.h5`` coordinate file.

    CLAM reads ``patch_size`` pixels at pyramid level ``patch_level``: the level whose
    downsample equals the tile's level-0 size over its target size is used when the slide has
    one; otherwise level 0 with ``patch_size = patch_size_level0`` (resize to the target
    size with CLAM's ``--target_patch_size``).
    """
    import h5py

    from .io import atomic_path

    a = tiles.attrs
    ps, ps0 = int(a["patch_size"]), int(a["patch_size_level0"])
    level, ds, level_dim = 0, 1.0, (a.get("level0_width", 0), a.get("level0_height", 0))
    if slide_path is not None:
        from .slide import open_slide

        slide = open_slide(slide_path)
        try:
            want = ps0 / ps
            for i, d in enumerate(slide.level_downsamples):
                if abs(float(d) - want) / want < 0.01 and abs(ps * float(d) - ps0) < 1:
                    level, ds = i, float(d)
            level_dim = slide.level_dimensions[level]
            if level == 0:
                level_dim = slide.dimensions
        finally:
            slide.close()
    patch_size = ps if level else ps0
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            dset = h5.create_dataset("coords", data=np.asarray(tiles.coords, np.int64).reshape(-1, 2))
            dset.attrs.update({
                "patch_size": int(patch_size),
                "patch_level": int(level),
                "downsample": np.array([ds, ds], float),
                "downsampled_level_dim": np.array(level_dim, np.int64),
                "level_dim": np.array(level_dim, np.int64),
                "name": str(a.get("slide_id", "")),
                "save_path": str(Path(path).parent),
                "target_patch_size": int(ps),
            })


# ---------------------------------------------------------------------------- one slide


def tile_slide(slide_path, segment_dir, out_path, slide_id: str | None = None, target_mpp: float | None = None,
               magnification: float | None = None, patch_size: int = 112, overlap: int = 0,
               min_tissue: float = 0.5, scan_order: str = "raster") -> Tiles:
    """Tile one segmented slide and write its tiles HDF5."""
    from .segment import load_segmentation
    from .slide import open_slide

    slide_path = Path(slide_path)
    slide_id = slide_id or slide_path.stem
    target = resolve_target_mpp(target_mpp, magnification)
    mask, summary = load_segmentation(segment_dir)
    # open the slide: a file that no longer opens should fail here, not at extraction
    slide = open_slide(slide_path)
    try:
        width0, height0 = slide.dimensions
    finally:
        slide.close()
    if (width0, height0) != (summary["level0_width"], summary["level0_height"]):
        raise DataError(
            f"{segment_dir}: segmentation is of a {summary['level0_width']}x{summary['level0_height']} slide but "
            f"{slide_path} is {width0}x{height0}; segment the slide again"
        )
    level0_mpp = float(summary["level0_mpp"])
    if target * UPSAMPLE_TOLERANCE < level0_mpp:
        raise SlideError(
            f"{slide_path}: tiles at {target:.3f} um/px are finer than the slide's level 0 ({level0_mpp:.3f} um/px); "
            "choose a larger tiling.target_mpp or a lower tiling.magnification"
        )
    tiles, fractions = tile_from_mask(mask, summary["mask_downsample"], level0_mpp, width0, height0, target,
                                      patch_size, overlap, min_tissue, scan_order)
    status = "ok" if len(tiles) else "no_tissue"
    tiles.attrs.update(slide_id=slide_id, mpp_source=summary["mpp_source"], status=status,
                       segment_status=summary["status"])
    if status == "no_tissue":
        log.warning("%s: no tile has %.0f%% tissue (segmentation: %s); writing an empty tile file",
                    slide_id, 100 * min_tissue, summary["status"])
    else:
        log.info("%s: %d tiles of %d px at %.3f um/px (%d px at level 0), mean tissue %.2f, order %s",
                 slide_id, len(tiles), patch_size, target, tiles.attrs["patch_size_level0"], float(fractions.mean()),
                 scan_order)
    write_tiles(out_path, tiles)
    return tiles


# ---------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .order import ORDERS
    from .segment import _optional_float

    parser.add_argument("--slide", help="slide file")
    parser.add_argument("--segment-dir", help="the slide's segmentation folder (mask.png, summary.json)")
    parser.add_argument("--out", required=True, help="output HDF5")
    parser.add_argument("--slide-id", default=None, help="slide id (default: the slide's file name without extension)")
    parser.add_argument("--target-mpp", type=_optional_float, default=None, help="tile scale in microns per pixel")
    parser.add_argument("--magnification", type=_optional_float, default=None,
                        help="tile scale as objective magnification (10 um/px at 1x); wins over --target-mpp")
    parser.add_argument("--patch-size", type=int, default=112, help="tile edge in pixels at the target scale")
    parser.add_argument("--overlap", type=int, default=0, help="overlap of neighbouring tiles in target pixels")
    parser.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a kept tile")
    parser.add_argument("--scan-order", choices=ORDERS, default="raster", help="order the tiles are stored in")
    convert = parser.add_argument_group("conversion of other tools' coordinate files")
    convert.add_argument("--import-coords", metavar="H5",
                         help="convert a CLAM or TRIDENT coordinate file (format detected) into our tiles file --out")
    convert.add_argument("--export", choices=("clam", "trident"),
                         help="convert our tiles file (--tiles) into a CLAM or TRIDENT coordinate file --out")
    convert.add_argument("--tiles", metavar="H5", help="our tiles file to --export")
    convert.add_argument("--level0-mpp", type=_optional_float, default=None,
                         help="level-0 mpp for --import-coords of a CLAM file without --slide")
    convert.add_argument("--fallback-mpp", type=_optional_float, default=None,
                         help="level-0 mpp for a slide whose metadata has none (with --import-coords --slide)")


def run(args: argparse.Namespace) -> int:
    if args.export:
        if not args.tiles:
            raise ConfigError("--export needs --tiles (our tiles HDF5 to convert)")
        tiles = read_tiles(args.tiles)
        if args.export == "trident":
            write_trident_coords(args.out, tiles)
        else:
            write_clam_coords(args.out, tiles, args.slide)
        log.info("%s -> %s (%s, %d tiles)", args.tiles, args.out, args.export, len(tiles))
        return 0
    if args.import_coords:
        tiles = read_coords_file(args.import_coords, slide_path=args.slide, level0_mpp=args.level0_mpp,
                                 slide_id=args.slide_id, scan_order=args.scan_order, fallback_mpp=args.fallback_mpp)
        write_tiles(args.out, tiles)
        log.info("%s (%s) -> %s (%d tiles)", args.import_coords, tiles.attrs["source"], args.out, len(tiles))
        return 0
    if not args.slide or not args.segment_dir:
        raise ConfigError("tiling needs --slide and --segment-dir (or --import-coords / --export to convert files)")
    tile_slide(args.slide, args.segment_dir, args.out, slide_id=args.slide_id, target_mpp=args.target_mpp,
               magnification=args.magnification, patch_size=args.patch_size, overlap=args.overlap,
               min_tissue=args.min_tissue, scan_order=args.scan_order)
    return 0
