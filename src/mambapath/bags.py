"""What training reads: the cohort sheet, a fold of the splits file, and one input per slide.

``make_dataset(input_kind, slides, ...)`` picks the dataset by the model's ``input_kind``:

- ``"features"``: :class:`FeatureBagDataset`, one :class:`~mambapath.models.Bag` per slide from
  ``<features_dir>/<slide_id>.h5`` (datasets ``features`` (N, D), ``coords``, ``grid``).
  Slides whose file has no tile (N = 0, tiling status "no_tissue") are dropped and recorded
  in ``dataset.dropped``; a missing file, or files of different feature dimensions, are an
  error before any training starts.
- ``"pixels"``: provided by the module ``mambapath.pixel_data``, looked up only when a pixel
  model is trained. It must define::

      make_pixel_dataset(slides: pandas.DataFrame, config: dict, method: dict) -> dataset

  where ``slides`` has the cohort-sheet columns (``slide_id``, ``patient_id``, ``path``,
  ``mpp``, ...) of the slides of one fold, ``config`` is the workflow config and ``method``
  the method yaml (its ``kwargs`` hold the model's settings).

Every dataset, whatever its kind, offers the same small interface to train.py:

- ``len(ds)`` and ``ds[i]``: the model input of slide ``ds.slide_ids[i]`` (a Bag with batch
  size 1, or for pixels a ``SlideImage``: the image (1, 3, H, W) in [0, 1] with an optional
  tissue mask, and a ``.to(device)`` method), on the CPU;
- ``ds.slide_ids``: the slides kept, in the order of ``slides``;
- ``ds.dropped``: ``{slide_id: reason}`` for slides left out (recorded in train.json);
- ``ds.input_dim``: passed to the model builder as ``in_dim`` (feature dimension, or channels);
- ``ds.describe()``: a JSON-able dict of what was read (for train.json).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .errors import ConfigError, DataError
from .models.bag import Bag

log = logging.getLogger(__name__)

SPLIT_ROLES = ("train", "val", "test")
#: feature bags are held in memory when all of them together are smaller than this
PRELOAD_MAX_BYTES = 4 << 30


def read_sheet(path: str | os.PathLike) -> pd.DataFrame:
    """The cohort sheet, validated (ids as strings)."""
    from .config import validate_sheet

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: cohort sheet not found (run the synth/cohort stage, or set the cohort's sheet)")
    sheet = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str})
    return validate_sheet(sheet, path)


def read_fold(path: str | os.PathLike, fold: int) -> pd.DataFrame:
    """Rows ``patient_id, role`` of one fold of a splits CSV (``patient_id, fold, role``).

    Raises DataError for missing columns, unknown roles, an absent fold, and a patient in two
    roles of the fold (leakage).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: splits file not found (run `mambapath split` for this task first)")
    splits = pd.read_csv(path, dtype={"patient_id": str})
    missing = [c for c in ("patient_id", "fold", "role") if c not in splits.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; a splits file has patient_id, fold, role")
    bad_roles = sorted(set(splits["role"]) - set(SPLIT_ROLES))
    if bad_roles:
        raise DataError(f"{path}: unknown role(s) {bad_roles}; roles are {', '.join(SPLIT_ROLES)}")
    rows = splits[splits["fold"] == fold][["patient_id", "role"]]
    if rows.empty:
        folds = sorted(splits["fold"].unique().tolist())
        raise DataError(f"{path}: no rows for fold {fold}; the file has folds {folds}")
    roles_per_patient = rows.groupby("patient_id")["role"].nunique()
    leaked = roles_per_patient[roles_per_patient > 1].index.tolist()
    if leaked:
        raise DataError(f"{path}: fold {fold}: patient(s) {leaked[:5]} sit in more than one role (leakage); "
                        "re-split with `mambapath split`")
    return rows.drop_duplicates().reset_index(drop=True)


def fold_slides(sheet: pd.DataFrame, fold_rows: pd.DataFrame, sheet_path="cohort sheet",
                splits_path="splits file") -> pd.DataFrame:
    """The sheet's slides of the fold's patients, with a ``role`` column, in sheet order."""
    known = set(sheet["patient_id"])
    unknown = sorted(set(fold_rows["patient_id"]) - known)
    if unknown:
        raise DataError(f"{splits_path}: patient(s) {unknown[:5]} ({len(unknown)} in all) are not in {sheet_path}; "
                        "the splits were made for another sheet: re-run `mambapath split`")
    role = dict(zip(fold_rows["patient_id"], fold_rows["role"]))
    slides = sheet[sheet["patient_id"].isin(role)].copy()
    slides["role"] = slides["patient_id"].map(role)
    return slides.reset_index(drop=True)


# Feature bags --------------------------------------------------------------------------------


def features_path(features_dir: str | os.PathLike, slide_id: str) -> Path:
    return Path(features_dir) / f"{slide_id}.h5"


def read_features_header(path: Path) -> dict:
    """Number of tiles, feature dimension and attributes of a features file, without reading it."""
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            if "features" not in fh:
                raise DataError(f"{path}: no `features` dataset; not a mambapath features file (re-run extract)")
            shape = fh["features"].shape
            attrs = {k: _plain(v) for k, v in fh.attrs.items()}
    except OSError as exc:
        raise DataError(f"{path}: cannot be read as HDF5 ({exc}); delete it and re-run the extract rule") from exc
    if len(shape) != 2:
        raise DataError(f"{path}: `features` has shape {shape}, expected (N, D); re-run extract")
    return {"n_tiles": int(shape[0]), "dim": int(shape[1]), "attrs": attrs}


def _plain(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def read_feature_bag(path: Path, tile_order: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``features`` (N, D) float32, ``coords`` (N, 2), ``grid`` (N, 2), in ``tile_order`` if given."""
    import h5py

    with h5py.File(path, "r") as fh:
        features = np.asarray(fh["features"][:], dtype=np.float32)
        n = features.shape[0]
        coords = np.asarray(fh["coords"][:], dtype=np.int64) if "coords" in fh else np.zeros((n, 2), np.int64)
        if "grid" in fh:
            grid = np.asarray(fh["grid"][:], dtype=np.int64)
        else:
            grid = np.stack([np.zeros(n, np.int64), np.arange(n, dtype=np.int64)], axis=1)
    if tile_order is not None:
        from .order import tile_order as order_fn

        perm = order_fn(grid, tile_order)
        features, coords, grid = features[perm], coords[perm], grid[perm]
    return features, coords, grid


class FeatureBagDataset(torch.utils.data.Dataset):
    """One Bag (batch size 1) per slide, read from ``<features_dir>/<slide_id>.h5``."""

    input_kind = "features"

    def __init__(self, slide_ids: list[str], features_dir: str | os.PathLike, tile_order: str | None = None,
                 preload: bool | None = None):
        self.features_dir = Path(features_dir)
        self.tile_order = tile_order
        self.dropped: dict[str, str] = {}
        self.slide_ids: list[str] = []
        self.n_tiles: dict[str, int] = {}
        dims: dict[int, str] = {}
        scan_orders = set()
        missing = []
        for slide_id in slide_ids:
            path = features_path(self.features_dir, slide_id)
            if not path.exists():
                missing.append(str(path))
                continue
            header = read_features_header(path)
            if header["n_tiles"] == 0:
                status = header["attrs"].get("status", "no tiles")
                self.dropped[slide_id] = f"0 tiles ({status})"
                log.warning("slide %s: features file %s has no tile (%s); dropped", slide_id, path, status)
                continue
            dims.setdefault(header["dim"], str(path))
            scan_orders.add(header["attrs"].get("scan_order"))
            self.slide_ids.append(slide_id)
            self.n_tiles[slide_id] = header["n_tiles"]
        if missing:
            raise DataError(f"{len(missing)} features file(s) missing, e.g. {missing[:3]}; run the extract stage "
                            "for these slides (or check --features-dir)")
        if len(dims) > 1:
            listing = ", ".join(f"{d}-d in {p}" for d, p in sorted(dims.items()))
            raise DataError(f"features files of different dimensions ({listing}); all slides of a cohort must use "
                            "one extractor: re-extract the odd ones")
        self.input_dim = next(iter(dims)) if dims else 0
        self.stored_scan_order = sorted(s for s in scan_orders if s is not None)
        total_bytes = 4 * self.input_dim * sum(self.n_tiles.values())
        self.preload = total_bytes <= PRELOAD_MAX_BYTES if preload is None else preload
        self._cache: dict[int, Bag] = {}
        self.feature_mean: np.ndarray | None = None
        self.feature_std: np.ndarray | None = None

    def fit_standardization(self, indices) -> None:
        """Per-dimension mean and standard deviation over all tiles of the slides at ``indices``
        (the training part); from then on every bag is returned standardised with them."""
        total = np.zeros(self.input_dim, np.float64)
        total_sq = np.zeros(self.input_dim, np.float64)
        n = 0
        for i in indices:
            features = self._read(int(i))[0].astype(np.float64)
            total += features.sum(axis=0)
            total_sq += np.square(features).sum(axis=0)
            n += features.shape[0]
        mean = total / n
        std = np.sqrt(np.maximum(total_sq / n - np.square(mean), 0.0))
        self.feature_mean = mean.astype(np.float32)
        # constant dimensions stay constant (0) instead of dividing by zero
        self.feature_std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        self._cache.clear()

    def _read(self, i: int):
        return read_feature_bag(features_path(self.features_dir, self.slide_ids[i]), self.tile_order)

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, i: int) -> Bag:
        if i in self._cache:
            return self._cache[i]
        features, coords, grid = self._read(i)
        if self.feature_mean is not None:
            features = (features - self.feature_mean) / self.feature_std
        bag = Bag.single(torch.from_numpy(features), torch.from_numpy(coords), torch.from_numpy(grid))
        if self.preload:
            self._cache[i] = bag
        return bag

    def describe(self) -> dict:
        return {
            "input_kind": self.input_kind,
            "features_dir": str(self.features_dir),
            "input_dim": self.input_dim,
            "tile_order": self.tile_order or "stored",
            "stored_scan_order": self.stored_scan_order,
            "n_tiles_total": int(sum(self.n_tiles.values())),
            "standardized": self.feature_mean is not None,
        }


def make_dataset(input_kind: str, slides: pd.DataFrame, *, features_dir=None, config: dict | None = None,
                 method: dict | None = None):
    """The dataset for a model that takes ``input_kind`` inputs (see the module docstring)."""
    method = method or {}
    if input_kind == "features":
        if features_dir is None:
            raise ConfigError("feature models need --features-dir (the folder of <slide_id>.h5 features files)")
        return FeatureBagDataset(slides["slide_id"].tolist(), features_dir, tile_order=method.get("tile_order"))
    if input_kind == "pixels":
        if importlib.util.find_spec("mambapath.pixel_data") is None:
            raise ConfigError(f"method {method.get('name', '?')!r} takes pixels, but no pixel dataset is available "
                              "(module mambapath.pixel_data with make_pixel_dataset() is not installed)")
        module = importlib.import_module("mambapath.pixel_data")
        return module.make_pixel_dataset(slides, config or {}, method)
    raise ConfigError(f"unknown input_kind {input_kind!r}; models take 'features' or 'pixels'")
