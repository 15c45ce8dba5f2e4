"""Do spatial models beat bag-of-tiles models on the synthetic cohort's spatial label, and why (not)?

    python benchmarks/analyse_spatial_labels.py --results-dir results/demo --config config/config.yaml \\
        --out benchmarks/results/spatial_labels_demo.md
    python benchmarks/analyse_spatial_labels.py ... --eval-dir ../other-run/results/demo   # eval/ and train/ elsewhere
    python benchmarks/analyse_spatial_labels.py ... --ablation-methods                   # skip section 6 (faster)

The ``classification`` label of the synthetic cohort (mambapath.synth) is "1" iff the tumour
burden is at least 0.30 and the lymphocyte-tumour contact (the fraction of lymphocyte area
within 40 um of tumour or necrosis) is below 0.5. The script finds out, with numbers, which of
the labelling rule, the features, the models and the sample size explains how sequence/spatial
models compare with bag-of-tiles models on it:

1. **Methods**: every method's classification AUC, staging macro-F1 and survival C-index
   (mean +/- std over folds) from ``<eval>/eval/<task>/<method>/summary.json``, else its
   ``folds.csv``, else whatever ``fold<k>/metrics.json`` exist (marked as partial).
2. **Rule**: logistic-regression probes on the slide's true measures (the cohort sheet),
   trained on each fold's ``train`` patients and scored (AUC) on its ``test`` patients of
   ``<results>/splits/classification.csv``: composition only, composition + contact, the
   rule's two inputs, and, as references, a bag-of-tiles summary of the ground truth and
   the mean-pooled tile features; the same probes of the arrangement alone, and whether any
   composition measure gives the arrangement away.
3. **Tile locality**: on the ground-truth types map, the contact measured inside each tile
   alone (tumour outside the tile does not count); its lymphocyte-weighted mean over a
   slide's tiles is something a permutation-invariant pooling of tile-level quantities
   can compute. Reported: its correlation with the true contact, the share of contact
   lymphocyte pixels whose tumour neighbour lies inside the same tile, and how often the
   rule applied with it reproduces the label.
4. **Features**: per-tile probes of the extracted features (grouped 5-fold
   cross-validation by patient): balanced accuracy of the tile's dominant tissue type, and
   ridge R^2 / Spearman for its lymphocyte, tumour+necrosis and in-tile contact-lymphocyte
   fractions; the same probes on the tile's mean RGB, read with OpenSlide at the tiling
   level, as a trivial reference.
5. **Sample size**: patients and positives per fold and role.
6. **Model**: a few methods (``--ablation-methods``) retrained on every fold as the workflow
   trains them: with the config's seed (must reproduce the eval AUCs), with other train seeds
   (run-to-run noise), on copies whose feature rows are permuted among each slide's tile
   positions (the arrangement across tiles destroyed, composition and tile content kept), and
   without their sequence layers (n_layers 0).

A findings section then states, by the criteria written next to each verdict, which of
rule / features / model / sample size explains the result. The script uses one CPU thread;
under a minute for sections 1-5 and a few seconds per retraining (5 folds) in section 6.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # One core at most: other jobs share the machine (set before numpy/scipy load their BLAS;
    # only when run as a script, so that importing the module changes nothing).
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

log = logging.getLogger("analyse_spatial_labels")

BAG_OF_TILES = ("mean_mil", "max_mil", "abmil", "transmil", "ilra_mil")
#: bag-of-tiles models whose output does not depend on tile order (TransMIL's PPEG reads the order;
#: ILRA-MIL is not checked here)
PERMUTATION_INVARIANT = ("mean_mil", "max_mil", "abmil")
SEQUENCE_SPATIAL = ("mamba_mil", "bimamba_mil", "srmamba_mil", "mamba2d_mil", "mambaback", "pixel_mamba")
TASK_METRICS = (("classification", "auc"), ("staging", "macro_f1"), ("survival", "c_index"))
N_FOLDS_GROUPED = 5
#: retrained in section 6 by default: a permutation-invariant control and the 2D sequence model
ABLATION_METHODS = ("abmil", "mamba2d_mil")
#: verdict thresholds of the findings section (stated in the output next to each verdict)
MATTERS_AUC = 0.10
TILE_LOCAL_SHARE = 0.80


# ------------------------------------------------------------------------ small helpers


def fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    if mean is None or not np.isfinite(mean):
        return "n/a"
    if std is None or not np.isfinite(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub pipe table of the frame's cells, written as they are (they are formatted already)."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def mean_std(values) -> tuple[float, float]:
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(values) == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


# ------------------------------------------------------------------ 1. trained methods


@dataclass
class MethodScore:
    values: list[float]
    complete: bool  # every fold present (summary.json or folds.csv), not a partial run


def method_scores(eval_root: Path, task: str, method: str, metric: str, n_folds: int) -> MethodScore | None:
    """Per-fold values of one method's metric: summary.json, else folds.csv, else fold metrics."""
    base = eval_root / "eval" / task / method
    summary = base / "summary.json"
    if summary.exists():
        data = json.loads(summary.read_text())
        if metric in data.get("metrics", {}):
            values = [float(v) for v in data["metrics"][metric]["values"]]
            return MethodScore(values, len(values) == n_folds)
    folds_csv = base / "folds.csv"
    if folds_csv.exists():
        frame = pd.read_csv(folds_csv)
        if metric in frame:
            return MethodScore(frame[metric].astype(float).tolist(), len(frame) == n_folds)
    values = []
    for fold in range(n_folds):
        path = base / f"fold{fold}" / "metrics.json"
        if path.exists():
            fold_metrics = json.loads(path.read_text()).get("metrics", {})
            if metric in fold_metrics:
                values.append(float(fold_metrics[metric]))
    # fold metrics alone mean the evaluate stage has not aggregated the method yet
    return MethodScore(values, False) if values else None


def training_diagnostics(eval_root: Path, task: str, method: str) -> dict:
    """Parameter count and last-epoch training loss (mean over folds) of the trained folds."""
    folds = sorted((eval_root / "train" / task / method).glob("fold*"))
    n_params, last_loss = None, []
    for fold_dir in folds:
        if n_params is None and (fold_dir / "train.json").exists():
            n_params = json.loads((fold_dir / "train.json").read_text()).get("n_params")
        if (fold_dir / "history.csv").exists():
            history = pd.read_csv(fold_dir / "history.csv")
            if len(history) and "train_loss" in history:
                last_loss.append(float(history["train_loss"].iloc[-1]))
    return {"params": f"{n_params:,}" if n_params else "n/a",
            "last train loss": fmt(float(np.mean(last_loss))) if last_loss else "n/a"}


def methods_table(eval_root: Path, methods: list[str], n_folds: int) -> tuple[pd.DataFrame, dict]:
    """Rows of section 1 and, per method with every classification fold, its fold AUCs."""
    rows, auc_values = [], {}
    for method in methods:
        group = ("bag-of-tiles" if method in BAG_OF_TILES
                 else "sequence/spatial" if method in SEQUENCE_SPATIAL else "other")
        row = {"group": group, "method": method}
        for task, metric in TASK_METRICS:
            score = method_scores(eval_root, task, method, metric, n_folds)
            if score is None:
                row[f"{task} {metric}"] = "missing"
                continue
            cell = fmt(*mean_std(score.values))
            row[f"{task} {metric}"] = cell if score.complete else f"{cell} ({len(score.values)}/{n_folds} folds)"
            if task == "classification" and score.complete:
                auc_values[method] = score.values
        row.update(training_diagnostics(eval_root, "classification", method))
        rows.append(row)
    order = {"bag-of-tiles": 0, "sequence/spatial": 1, "other": 2}
    frame = pd.DataFrame(rows).sort_values("group", key=lambda s: s.map(order), kind="stable")
    return frame, auc_values


# --------------------------------------------------------------------- 2. slide probes


def fold_aucs(table: pd.DataFrame, columns: list[str], splits: pd.DataFrame, target: str = "y") -> list[float]:
    """Per fold: logistic regression fitted on the fold's train patients, AUC on its test patients.

    ``table``: one row per patient (index patient_id) with ``columns`` and the 0/1 ``target``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    aucs = []
    for fold in sorted(splits["fold"].unique()):
        part = splits[splits["fold"] == fold]
        train = table.loc[part.loc[part["role"] == "train", "patient_id"]]
        test = table.loc[part.loc[part["role"] == "test", "patient_id"]]
        if train[target].nunique() < 2 or test[target].nunique() < 2:
            aucs.append(float("nan"))  # AUC undefined on one class
            continue
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        probe.fit(train[columns].to_numpy(float), train[target].to_numpy())
        aucs.append(float(roc_auc_score(test[target], probe.predict_proba(test[columns].to_numpy(float))[:, 1])))
    return aucs


# ----------------------------------------------------------------- 3. tile-local contact


def tile_contact_mask(types_tile: np.ndarray, gt_mpp: float, contact_um: float) -> np.ndarray:
    """Lymphocyte pixels of a tile within ``contact_um`` of a tumour/necrosis pixel of the same tile.

    ``types_tile``: (h, w) type codes (mambapath.synth). Pixels outside the tile do not count,
    which is all that a model reading this tile alone could see.
    """
    from scipy import ndimage

    from mambapath.synth import LYMPHOCYTES, NECROSIS, TUMOUR

    lymph = types_tile == LYMPHOCYTES
    tumour_like = np.isin(types_tile, (TUMOUR, NECROSIS))
    if not lymph.any() or not tumour_like.any():
        return np.zeros_like(lymph)
    # Euclidean distance (px) from every pixel to the nearest tumour/necrosis pixel of the tile
    dist_um = ndimage.distance_transform_edt(~tumour_like) * gt_mpp
    return lymph & (dist_um <= contact_um)


def tile_boxes_gt(coords: np.ndarray, patch_size_level0: float, level0_mpp: float, gt_mpp: float,
                  shape: tuple[int, int]) -> np.ndarray:
    """Tile rectangles (N, 4: y0, y1, x0, x1) in ground-truth-map pixels, clipped to the map."""
    scale = level0_mpp / gt_mpp
    x0 = np.rint(coords[:, 0] * scale).astype(int)
    y0 = np.rint(coords[:, 1] * scale).astype(int)
    x1 = np.rint((coords[:, 0] + patch_size_level0) * scale).astype(int)
    y1 = np.rint((coords[:, 1] + patch_size_level0) * scale).astype(int)
    h, w = shape
    return np.stack([np.clip(y0, 0, h), np.clip(y1, 0, h), np.clip(x0, 0, w), np.clip(x1, 0, w)], axis=1)


def slide_tile_measures(types_map: np.ndarray, boxes: np.ndarray, gt_mpp: float, contact_um: float):
    """Per-tile ground truth and the slide's tile-local contact summary.

    Returns (tiles: DataFrame, one row per tile; slide: dict). Counts are in map pixels.
    """
    from scipy import ndimage

    from mambapath.synth import LYMPHOCYTES, NECROSIS, TISSUE_TYPES, TUMOUR

    lymph = types_map == LYMPHOCYTES
    tumour_like = np.isin(types_map, (TUMOUR, NECROSIS))
    if tumour_like.any():
        slide_contact = lymph & (ndimage.distance_transform_edt(~tumour_like) * gt_mpp <= contact_um)
    else:
        slide_contact = np.zeros_like(lymph)
    covered = np.zeros_like(lymph)
    within_contact = np.zeros_like(lymph)
    rows = []
    for y0, y1, x0, x1 in boxes:
        crop = types_map[y0:y1, x0:x1]
        mask = tile_contact_mask(crop, gt_mpp, contact_um)
        covered[y0:y1, x0:x1] = True
        within_contact[y0:y1, x0:x1] |= mask
        counts = np.bincount(crop.ravel(), minlength=len(TISSUE_TYPES))
        area = max(crop.size, 1)
        rows.append({
            "dominant_type": TISSUE_TYPES[int(np.argmax(counts))],
            "frac_lymphocytes": counts[LYMPHOCYTES] / area,
            "frac_tumour_necrosis": (counts[TUMOUR] + counts[NECROSIS]) / area,
            "frac_contact_lymph": mask.sum() / area,
            "n_lymph": int(counts[LYMPHOCYTES]),
            "n_tumour_like": int(counts[TUMOUR] + counts[NECROSIS]),
            "n_contact": int(mask.sum()),
        })
    tiles = pd.DataFrame(rows)
    n_lymph, n_contact = tiles["n_lymph"].sum(), tiles["n_contact"].sum()
    with_lymph = tiles[tiles["n_lymph"] > 0]
    contact_covered = slide_contact & covered
    slide = {
        # what sum-pooling of per-tile counts gives: lymphocyte-weighted mean of per-tile contact
        "tile_contact_pooled": n_contact / n_lymph if n_lymph else 0.0,
        # unweighted mean of per-tile contact over tiles that hold lymphocytes
        "tile_contact_mean": float((with_lymph["n_contact"] / with_lymph["n_lymph"]).mean()) if len(with_lymph) else 0.0,
        "n_tiles": len(tiles),
        "tiles_with_contact": int((tiles["n_contact"] > 0).sum()),
        "tiles_with_both": int(((tiles["n_lymph"] > 0) & (tiles["n_tumour_like"] > 0)).sum()),
        "lymph_px": int(lymph.sum()),
        "lymph_px_in_tiles": int((lymph & covered).sum()),
        "contact_px_in_tiles": int(contact_covered.sum()),
        "contact_px_same_tile": int((contact_covered & within_contact).sum()),
    }
    return tiles, slide


# ------------------------------------------------------------------- 4. feature probes


def tile_mean_rgb(slide_path: Path, coords: np.ndarray, patch_size_level0: float, level0_mpp: float,
                  target_mpp: float) -> tuple[np.ndarray, int]:
    """(N, 3) mean RGB of each tile read at the pyramid level the tiling scale uses, and that level."""
    from mambapath.slide import best_level_for_mpp, open_slide, read_region_checked

    slide = open_slide(slide_path)
    try:
        level = best_level_for_mpp(slide, level0_mpp, target_mpp)
        size = max(1, int(round(patch_size_level0 / slide.level_downsamples[level])))
        rgb = np.stack([
            read_region_checked(slide, (x, y), level, (size, size), slide_path)[..., :3].reshape(-1, 3).mean(0)
            for x, y in coords
        ])
    finally:
        slide.close()
    return rgb.astype(np.float32), level


def grouped_probes(x: np.ndarray, tiles: pd.DataFrame, groups: np.ndarray) -> dict:
    """Out-of-fold tile probes (GroupKFold by patient): dominant type and ridge regressions."""
    from scipy.stats import spearmanr
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.metrics import balanced_accuracy_score, r2_score, roc_auc_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cv = GroupKFold(n_splits=N_FOLDS_GROUPED)
    out = {}
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on the 1024-d features; the score says enough
        predicted = cross_val_predict(classifier, x, tiles["dominant_type"].to_numpy(), groups=groups, cv=cv)
    out["dominant_type balanced acc"] = balanced_accuracy_score(tiles["dominant_type"], predicted)
    # does the tile hold lymphocytes touching tumour of the same tile: the cue the label's contact half needs
    has_contact = (tiles["n_contact"] > 0).to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)), x,
                                   has_contact, groups=groups, cv=cv, method="predict_proba")[:, 1]
    out["has in-tile contact AUC"] = roc_auc_score(has_contact, scores)
    # one multi-target ridge: the three fractions share each fold's decomposition of x
    targets = ["frac_lymphocytes", "frac_tumour_necrosis", "frac_contact_lymph"]
    regressor = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 15), alpha_per_target=True))
    y = tiles[targets].to_numpy(float)  # (N, 3)
    predicted = cross_val_predict(regressor, x, y, groups=groups, cv=cv)
    for k, target in enumerate(targets):
        out[f"{target} R2"] = r2_score(y[:, k], predicted[:, k])
        out[f"{target} Spearman"] = spearmanr(y[:, k], predicted[:, k]).statistic
    return out


# -------------------------------------------------------------- 6. retraining ablations


def shuffled_feature_dir(source: Path, target: Path, seed: int) -> None:
    """Copy every features file, permuting the feature rows among the slide's tile positions.

    ``coords`` and ``grid`` stay as they are, so each tile position now holds another tile's
    features: composition is kept, the arrangement across tiles is destroyed (within a tile
    nothing changes). A permutation-invariant model sees the same bag.
    """
    import shutil

    import h5py

    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.h5")):
        shutil.copy(path, target / path.name)
        with h5py.File(target / path.name, "r+") as fh:
            features = fh["features"][:]  # (N, D)
            rng = np.random.default_rng([seed, _slide_seed(path.stem)])
            fh["features"][:] = features[rng.permutation(len(features))]


def _slide_seed(text: str) -> int:
    """A stable per-slide seed component (Python's hash() is salted per process)."""
    import zlib

    return zlib.crc32(text.encode())


def fold_test_aucs(config: dict, method_name: str, inputs: Inputs, features_dir: Path, out_root: Path,
                   n_folds: int) -> list[float]:
    """Train a method on every classification fold exactly as the workflow does; test AUC per fold."""
    from sklearn.metrics import roc_auc_score

    from mambapath.train import load_method, train_fold

    method = load_method(method_name, config)
    aucs = []
    for fold in range(n_folds):
        out_dir = out_root / method_name / f"fold{fold}"
        train_fold(config=config, method=method, sheet=inputs.results_dir / "cohort" / "slides.csv",
                   features_dir=features_dir, splits=inputs.results_dir / "splits" / "classification.csv",
                   task_name="classification", fold=fold, out_dir=out_dir, device="cpu", progress=False)
        predictions = pd.read_csv(out_dir / "predictions.csv")
        test = predictions[predictions["role"] == "test"]
        # one slide per patient here; with several the evaluate stage averages them per patient first
        per_patient = test.groupby("patient_id")[["y_true", "prob_1"]].mean()
        aucs.append(float(roc_auc_score(per_patient["y_true"].astype(int), per_patient["prob_1"]))
                    if per_patient["y_true"].nunique() == 2 else float("nan"))
    return aucs


@dataclass
class Variant:
    kind: str  # "as stored" | "train seed" | "shuffled" | "no sequence layers"
    label: str
    config: dict
    features_dir: Path


def retrain_variants(inputs: Inputs, methods: list[str], train_seeds: int, shuffle_seeds: int,
                     n_folds: int) -> pd.DataFrame:
    """Per method and variant: test AUC per fold of a full retraining (one row per run)."""
    import copy
    import tempfile

    from tqdm import tqdm

    from mambapath.errors import ConfigError
    from mambapath.train import load_method

    base_seed = int(inputs.config["train"].get("seed", 0))
    rows = []
    train_log = logging.getLogger("mambapath.train")
    level = train_log.level
    train_log.setLevel(logging.WARNING)  # one line per epoch and fold would drown the tables
    try:
        with tempfile.TemporaryDirectory(prefix="spatial_ablation_") as tmp:
            tmp = Path(tmp)
            shuffled_dirs = []
            for seed in range(shuffle_seeds):
                shuffled_feature_dir(inputs.feature_dir, tmp / f"features_shuffled{seed}", seed)
                shuffled_dirs.append((seed, tmp / f"features_shuffled{seed}"))
            runs = []
            for name in methods:
                method = load_method(name, inputs.config)
                if method["input_kind"] != "features":
                    raise ConfigError(f"--ablation-methods: {name} reads pixels, not tile features; "
                                      "list feature methods")
                runs.append((name, Variant("as stored", f"train seed {base_seed}", inputs.config,
                                           inputs.feature_dir)))
                for extra in range(1, train_seeds):
                    config = copy.deepcopy(inputs.config)
                    config["train"]["seed"] = base_seed + extra
                    runs.append((name, Variant("train seed", f"train seed {base_seed + extra}", config,
                                               inputs.feature_dir)))
                for seed, features_dir in shuffled_dirs:
                    runs.append((name, Variant("shuffled", f"permutation {seed}", inputs.config, features_dir)))
                if name not in BAG_OF_TILES and "n_layers" in method["kwargs"]:
                    config = copy.deepcopy(inputs.config)
                    overrides = config["train"].setdefault("model_kwargs", {})
                    overrides[name] = {**(overrides.get(name) or {}), "n_layers": 0}
                    runs.append((name, Variant("no sequence layers", "n_layers 0", config, inputs.feature_dir)))
            for i, (name, variant) in enumerate(tqdm(runs, desc="retraining", file=sys.stderr)):
                aucs = fold_test_aucs(variant.config, name, inputs, variant.features_dir, tmp / "train" / str(i),
                                      n_folds)
                rows.append({"method": name, "kind": variant.kind, "label": variant.label, "aucs": aucs,
                             "mean": float(np.nanmean(aucs))})
    finally:
        train_log.setLevel(level)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------- inputs and sections


@dataclass
class Inputs:
    results_dir: Path
    eval_root: Path
    config: dict
    sheet: pd.DataFrame
    splits: pd.DataFrame
    tile_dir: Path
    feature_dir: Path


def load_inputs(results_dir: Path, eval_root: Path, config_path: Path) -> Inputs:
    from mambapath.config import load_config, tile_tag
    from mambapath.errors import DataError

    config = load_config(config_path)
    sheet_path = results_dir / "cohort" / "slides.csv"
    splits_path = results_dir / "splits" / "classification.csv"
    for path, fix in ((sheet_path, "run `mambapath synth` (or the demo workflow) first"),
                      (splits_path, "run `mambapath split` for the classification task first")):
        if not path.exists():
            raise DataError(f"{path}: not found; {fix} or point --results-dir at a cohort's results folder")
    sheet = pd.read_csv(sheet_path, dtype={"label": str})
    needed = {"burden", "lymph_tumour_contact", "frac_tumour", "frac_necrosis"}
    if not needed <= set(sheet.columns):
        raise DataError(f"{sheet_path}: lacks {sorted(needed - set(sheet.columns))}; this analysis needs a "
                        "synthetic cohort sheet written by `mambapath synth`")
    tag = tile_tag(config["tiling"])
    return Inputs(
        results_dir=results_dir, eval_root=eval_root, config=config, sheet=sheet,
        splits=pd.read_csv(splits_path), tile_dir=results_dir / "tiles" / tag,
        feature_dir=results_dir / "features" / tag / config["features"]["extractor"],
    )


def read_slide_data(inputs: Inputs, slide_id: str) -> dict:
    import h5py
    from PIL import Image

    from mambapath.errors import DataError

    tile_path = inputs.tile_dir / f"{slide_id}.h5"
    feature_path = inputs.feature_dir / f"{slide_id}.h5"
    types_path = inputs.results_dir / "synth" / f"{slide_id}_types.png"
    for path in (tile_path, feature_path, types_path):
        if not path.exists():
            raise DataError(f"{path}: not found for slide {slide_id}; run the demo workflow up to the "
                            "`extract` stage (or check --results-dir and the tiling keys of --config)")
    with h5py.File(tile_path, "r") as fh:
        coords = fh["coords"][:]
        attrs = {k: fh.attrs[k] for k in ("patch_size_level0", "level0_mpp", "target_mpp")}
    with h5py.File(feature_path, "r") as fh:
        features = fh["features"][:].astype(np.float32)
        if not np.array_equal(fh["coords"][:], coords):
            raise DataError(f"{feature_path}: its coords differ from {tile_path}; re-run `mambapath extract` "
                            "for this slide so both describe the same tiles")
    types_map = np.asarray(Image.open(types_path))
    return {"coords": coords, "features": features, "types_map": types_map, **attrs}


@dataclass
class TileData:
    """Everything per tile and per slide that sections 2-4 share."""

    tiles: pd.DataFrame  # one row per tile: ground-truth fractions, counts, patient_id
    slides: pd.DataFrame  # one row per slide: tile-local summary + the cohort sheet's columns
    feature_blocks: list[np.ndarray]  # per slide (N, D)
    rgb_blocks: list[np.ndarray]  # per slide (N, 3)
    rgb_levels: set[int]


def collect_tiles(inputs: Inputs) -> TileData:
    """Read every slide's tiles, features and ground truth; measure each tile."""
    from tqdm import tqdm

    from mambapath.synth import CONTACT_UM, GT_MPP

    tile_frames, slide_rows, feature_blocks, rgb_blocks, rgb_levels = [], [], [], [], set()
    for row in tqdm(inputs.sheet.itertuples(index=False), total=len(inputs.sheet), desc="slides", file=sys.stderr):
        data = read_slide_data(inputs, row.slide_id)
        if len(data["coords"]) == 0:
            log.info("%s: no tiles (recorded no_tissue skip); left out of the tile analyses", row.slide_id)
            continue
        patch_size_level0, level0_mpp = float(data["patch_size_level0"]), float(data["level0_mpp"])
        boxes = tile_boxes_gt(data["coords"], patch_size_level0, level0_mpp, GT_MPP, data["types_map"].shape)
        tiles, slide = slide_tile_measures(data["types_map"], boxes, GT_MPP, CONTACT_UM)
        tiles["patient_id"] = row.patient_id
        tile_frames.append(tiles)
        slide_rows.append({"slide_id": row.slide_id, "patient_id": row.patient_id, **slide})
        feature_blocks.append(data["features"])
        slide_path = inputs.results_dir / "slides" / f"{row.slide_id}.tiff"
        rgb, level = tile_mean_rgb(slide_path, data["coords"], patch_size_level0, level0_mpp,
                                   float(data["target_mpp"]))
        rgb_blocks.append(rgb)
        rgb_levels.add(level)
    # an inner merge keeps the left order, so row i of `slides` is feature_blocks[i]
    slides = pd.DataFrame(slide_rows).merge(inputs.sheet, on=["slide_id", "patient_id"])
    return TileData(pd.concat(tile_frames, ignore_index=True), slides, feature_blocks, rgb_blocks, rgb_levels)


def section_methods(inputs: Inputs, methods: list[str], n_folds: int, facts: dict) -> str:
    table, auc_values = methods_table(inputs.eval_root, methods, n_folds)
    group_auc = {}
    for group, members in (("bag-of-tiles", BAG_OF_TILES), ("sequence/spatial", SEQUENCE_SPATIAL)):
        found = {m: float(np.mean(auc_values[m])) for m in members if m in auc_values}
        if found:
            best = max(found, key=found.get)
            group_auc[group] = {"mean": float(np.mean(list(found.values()))), "best": best,
                                "best_auc": found[best], "n": len(found)}
    facts.update(group_auc=group_auc, auc_values=auc_values,
                 partial_methods=[m for m in methods if m not in auc_values])
    train_cfg = inputs.config["train"]
    return (
        "## 1. Trained methods (mean ± std over folds)\n\n"
        f"Eval outputs read from `{inputs.eval_root}/eval` (summary.json, else folds.csv; a cell marked "
        f"\"(k/{n_folds} folds)\" comes from the fold metrics of an unfinished run and is left out of the "
        "findings). `params` and `last train loss` (mean over folds of the last epoch's training loss; "
        f"ln 2 = {np.log(2):.3f} is a constant guess) are those of the classification runs. Training: "
        f"{train_cfg['epochs']} epochs, lr {train_cfg['lr']}, protocol {train_cfg['protocol']}; demo-sized "
        "model kwargs from the config's `train.model_kwargs`.\n\n" + markdown_table(table))


def patient_table(data: TileData) -> tuple[pd.DataFrame, list[str], list[str], list[str]]:
    """One row per patient (measures averaged over a patient's slides, as the rule does) with the
    label, the arrangement and the mean-pooled features and RGB; and the column groups."""
    from mambapath.synth import CONTACT_THRESHOLD, TISSUE_TYPES

    composition = [f"frac_{t}" for t in TISSUE_TYPES[1:]]
    slides = data.slides
    patients = slides.groupby("patient_id").agg(
        {**{c: "mean" for c in composition + ["burden", "lymph_tumour_contact", "tile_contact_pooled"]},
         "label": "first"})
    patients["y"] = (patients["label"] == "1").astype(int)
    # the rule's own split of the arrangement (contact >= 0.5: "infiltrated")
    patients["infiltrated"] = (patients["lymph_tumour_contact"] >= CONTACT_THRESHOLD).astype(int)
    # mean over a slide's tiles (what mean pooling sees), then over the patient's slides
    feature_cols = [f"feat{i}" for i in range(data.feature_blocks[0].shape[1])]
    rgb_cols = ["red", "green", "blue"]
    for columns, blocks in ((feature_cols, data.feature_blocks), (rgb_cols, data.rgb_blocks)):
        per_slide = pd.DataFrame(np.stack([b.mean(0) for b in blocks]), columns=columns)
        per_slide["patient_id"] = slides["patient_id"].to_numpy()
        patients = patients.join(per_slide.groupby("patient_id").mean())
    return patients, composition, feature_cols, rgb_cols


def _probe_rows(patients, splits, probes, target: str, facts: dict, first_column: str) -> list[dict]:
    rows = []
    for key, name, columns in probes:
        aucs = fold_aucs(patients, columns, splits, target=target)
        facts["probe_auc"][key] = float(np.nanmean(aucs))
        rows.append({first_column: name, "AUC": fmt(*mean_std(aucs)),
                     **{f"fold{k}": fmt(a, digits=2) for k, a in enumerate(aucs)}})
    return rows


def section_probes(patients: pd.DataFrame, splits: pd.DataFrame, composition, feature_cols, rgb_cols,
                   facts: dict) -> str:
    from scipy.stats import mannwhitneyu
    from sklearn.metrics import roc_auc_score

    from mambapath.synth import CONTACT_THRESHOLD

    facts["probe_auc"] = {}
    label_rows = _probe_rows(patients, splits, [
        ("a", "(a) true composition (frac_*)", composition),
        ("burden", "(a') burden only", ["burden"]),
        ("b", "(b) composition + lymph_tumour_contact", composition + ["lymph_tumour_contact"]),
        ("c", "(c) the rule's inputs: burden, contact", ["burden", "lymph_tumour_contact"]),
        ("d", "(d) burden + tile-local contact (bag-of-tiles summary of section 3)", ["burden", "tile_contact_pooled"]),
        ("e", "(e) mean-pooled tile features (1024-d)", feature_cols),
        ("f", "(f) mean-pooled tile mean RGB (3-d)", rgb_cols),
    ], "y", facts, "probe (logistic regression)")
    # the arrangement on its own: can a slide summary tell it?
    arrangement_rows = _probe_rows(patients, splits, [
        ("arr_composition", "true composition (frac_*)", composition),
        ("arr_features", "mean-pooled tile features (1024-d)", feature_cols),
        ("arr_rgb", "mean-pooled tile mean RGB (3-d)", rgb_cols),
    ], "infiltrated", facts, "probe of the arrangement (infiltrated vs excluded)")
    # is the arrangement hidden from composition, as the generator intends? one measure at a time
    infiltrated = patients["infiltrated"].to_numpy().astype(bool)
    leak_rows, facts["leak_p"] = [], {}
    for column in composition + ["burden"]:
        values = patients[column].to_numpy(float)
        p_value = float(mannwhitneyu(values[infiltrated], values[~infiltrated]).pvalue)
        facts["leak_p"][column] = p_value
        leak_rows.append({"measure": column,
                          "mean (infiltrated)": fmt(values[infiltrated].mean()),
                          "mean (excluded)": fmt(values[~infiltrated].mean()),
                          "AUC infiltrated vs excluded": fmt(roc_auc_score(infiltrated, values)),
                          "Mann-Whitney p": f"{p_value:.3g}"})
    facts["leak"] = {r["measure"]: r for r in leak_rows}
    return (
        "## 2. Oracle probes on the same folds\n\n"
        "Logistic regression (standardised inputs, L2, C = 1) fitted on each fold's `train` patients "
        "and scored on its `test` patients of the classification split; inputs (a)-(c) are the true "
        "measures of the cohort sheet, (d) uses the tile-local contact of section 3, (e) and (f) the "
        "mean over the slide's tiles of the extracted features and of the tiles' mean RGB (section 4).\n\n"
        + markdown_table(pd.DataFrame(label_rows)) + "\n\n"
        "The same probes with the arrangement alone as the target (contact >= "
        f"{CONTACT_THRESHOLD}: infiltrated; {int(infiltrated.sum())} / {len(patients)} patients); "
        "composition should not tell it (the cohort is built so), pooled features might:\n\n"
        + markdown_table(pd.DataFrame(arrangement_rows)) + "\n\n"
        "Each true composition measure against the arrangement, whole cohort (AUC 0.5 = no information; "
        "below 0.5 = lower on infiltrated slides):\n\n" + markdown_table(pd.DataFrame(leak_rows)))


def section_tile_locality(inputs: Inputs, data: TileData, facts: dict) -> str:
    from scipy.stats import pearsonr, spearmanr

    from mambapath.synth import BURDEN_THRESHOLD, CONTACT_THRESHOLD, CONTACT_UM, GT_MPP

    slides = data.slides
    true_c, pooled_c, mean_c = (slides[c].to_numpy(float) for c in
                                ("lymph_tumour_contact", "tile_contact_pooled", "tile_contact_mean"))
    same_tile = slides["contact_px_same_tile"].sum() / max(slides["contact_px_in_tiles"].sum(), 1)
    coverage = slides["lymph_px_in_tiles"].sum() / max(slides["lymph_px"].sum(), 1)
    rule_with_tiles = np.where((slides["burden"] >= BURDEN_THRESHOLD) & (pooled_c < CONTACT_THRESHOLD), "1", "0")
    agreement = float((rule_with_tiles == slides["label"].to_numpy()).mean())
    infiltrated = true_c >= CONTACT_THRESHOLD  # the rule's own split of the arrangement
    rows = []
    for name, estimate in (("lymphocyte-weighted mean (sum of tile counts)", pooled_c),
                           ("unweighted mean over tiles with lymphocytes", mean_c)):
        rows.append({"bag-of-tiles estimate of contact": name,
                     "Pearson r": fmt(pearsonr(estimate, true_c).statistic),
                     "Spearman rho": fmt(spearmanr(estimate, true_c).statistic),
                     "mean (infiltrated)": fmt(estimate[infiltrated].mean()),
                     "mean (excluded)": fmt(estimate[~infiltrated].mean()),
                     "true contact (infiltrated / excluded)":
                         f"{true_c[infiltrated].mean():.3f} / {true_c[~infiltrated].mean():.3f}"})
    nan = float("nan")
    facts.update(same_tile=float(same_tile), agreement=agreement,
                 pearson=float(pearsonr(pooled_c, true_c).statistic),
                 true_gap=(float(true_c[~infiltrated].max()) if (~infiltrated).any() else nan,
                           float(true_c[infiltrated].min()) if infiltrated.any() else nan),
                 contact_tiles=(_range(slides.loc[infiltrated, "tiles_with_contact"]),
                                _range(slides.loc[~infiltrated, "tiles_with_contact"])))
    lowest_infiltrated = float(pooled_c[infiltrated].min()) if infiltrated.any() else nan
    highest_excluded = float(pooled_c[~infiltrated].max()) if (~infiltrated).any() else nan
    return (
        "## 3. Is the arrangement visible within one tile?\n\n"
        f"Ground-truth types map at {GT_MPP:g} um/px; tiles of {_tile_um(inputs):g} um; "
        f"contact distance {CONTACT_UM:g} um; {len(data.tiles)} tiles on {len(slides)} slides.\n\n"
        + markdown_table(pd.DataFrame(rows)) + "\n\n"
        f"- Contact lymphocyte pixels (on the whole map) that lie in a tile and whose tumour/necrosis "
        f"neighbour lies in the same tile: **{same_tile:.3f}** "
        f"({int(slides['contact_px_same_tile'].sum())} / {int(slides['contact_px_in_tiles'].sum())}).\n"
        f"- Lymphocyte pixels covered by tiles: {coverage:.3f}.\n"
        f"- Tiles with in-tile contact (at least one lymphocyte pixel within {CONTACT_UM:g} um of tumour/necrosis "
        f"of the same tile) per slide: infiltrated slides {facts['contact_tiles'][0]}, excluded slides "
        f"{facts['contact_tiles'][1]} (of {_range(slides['n_tiles'])} tiles); tiles holding both lymphocytes "
        f"and tumour/necrosis at any distance: infiltrated {_range(slides.loc[infiltrated, 'tiles_with_both'])}, "
        f"excluded {_range(slides.loc[~infiltrated, 'tiles_with_both'])}.\n"
        f"- Lowest tile-local estimate on an infiltrated slide: {lowest_infiltrated:.3f}; highest on an "
        f"excluded slide: {highest_excluded:.3f}.\n"
        f"- The rule applied with the true burden and the tile-local estimate (threshold "
        f"{CONTACT_THRESHOLD}) reproduces the label on {agreement:.3f} of slides "
        f"({int(round(agreement * len(slides)))} / {len(slides)}).")


def section_features(data: TileData, facts: dict) -> str:
    from mambapath.synth import CONTACT_UM

    tiles = data.tiles
    groups = tiles["patient_id"].to_numpy()
    feature_probe = grouped_probes(np.concatenate(data.feature_blocks), tiles, groups)
    rgb_probe = grouped_probes(np.concatenate(data.rgb_blocks), tiles, groups)
    counts = tiles["dominant_type"].value_counts()
    n_types = tiles["dominant_type"].nunique()
    facts.update(feature_probe=feature_probe, rgb_probe=rgb_probe, n_types=n_types)
    rows = [{"probe target": k, "features (1024-d)": fmt(feature_probe[k]), "tile mean RGB (3-d)": fmt(rgb_probe[k])}
            for k in feature_probe]
    return (
        "## 4. Do the features see tissue types?\n\n"
        f"Tile-level probes, {N_FOLDS_GROUPED}-fold GroupKFold by patient (no patient in both parts), "
        "standardised inputs; dominant type by multinomial logistic regression (balanced accuracy, chance = "
        f"1/{n_types} = {1 / n_types:.3f}), fractions of the tile's area by ridge regression (alpha by "
        "RidgeCV inside each fold), scored out of fold. Reference: the tile's mean RGB read with OpenSlide at "
        f"pyramid level {sorted(data.rgb_levels)} of the slide (the level the tiling scale uses). "
        f"`frac_contact_lymph` = lymphocyte pixels within {CONTACT_UM:g} um of tumour/necrosis of the same tile, "
        "over tile area; `has in-tile contact` = at least one such pixel (logistic regression, AUC).\n\n"
        f"Dominant types: {', '.join(f'{k} {v}' for k, v in counts.items())}.\n\n"
        + markdown_table(pd.DataFrame(rows)))


def section_sample_size(patients: pd.DataFrame, splits: pd.DataFrame, facts: dict) -> str:
    label_of = patients["y"]
    rows = []
    for fold in sorted(splits["fold"].unique()):
        part = splits[splits["fold"] == fold]
        row = {"fold": fold}
        for role in ("train", "val", "test"):
            ids = part.loc[part["role"] == role, "patient_id"]
            row[f"{role} patients"] = len(ids)
            row[f"{role} positives"] = int(label_of.loc[ids].sum())
        rows.append(row)
    sample = pd.DataFrame(rows)
    facts["train_patients"] = int(sample["train patients"].median())
    facts["train_positives"] = int(sample["train positives"].median())
    facts["test_pairs"] = [int(r["test positives"] * (r["test patients"] - r["test positives"])) for r in rows]
    return ("## 5. Sample size (classification split)\n\n" + markdown_table(sample) + "\n\n"
            f"Positives in the cohort: {int(label_of.sum())} / {len(label_of)} patients. A test fold with "
            f"p positives and n negatives has p*n pairs, so its AUC moves in steps of 1/(p*n): "
            f"{', '.join(str(p) for p in facts['test_pairs'])} pairs per fold.")


def section_ablation(inputs: Inputs, methods: list[str], train_seeds: int, shuffle_seeds: int, n_folds: int,
                     facts: dict) -> str:
    runs = retrain_variants(inputs, methods, train_seeds, shuffle_seeds, n_folds)
    rows, facts["ablation"] = [], {}
    for name, part in runs.groupby("method", sort=False):
        by_kind = {kind: group for kind, group in part.groupby("kind")}
        stored = by_kind["as stored"].iloc[0]
        seeds = pd.concat([by_kind["as stored"], by_kind.get("train seed", part.iloc[:0])])
        evaluated = facts["auc_values"].get(name)
        reproduces = bool(evaluated is not None and len(evaluated) == len(stored["aucs"])
                          and np.allclose(evaluated, stored["aucs"], atol=1e-6))
        # a permutation-invariant model sees the same bags when shuffled: those runs are noise too
        noise_runs = seeds["mean"].tolist()
        if name in PERMUTATION_INVARIANT and "shuffled" in by_kind:
            noise_runs += by_kind["shuffled"]["mean"].tolist()
        entry = {"run_means": noise_runs, "reproduces": reproduces, "stored": float(stored["mean"])}
        row = {"group": "bag-of-tiles" if name in BAG_OF_TILES else "sequence/spatial", "method": name,
               "eval AUC": fmt(*mean_std(evaluated)) if evaluated else "n/a",
               "retrained (same as eval?)": f"{fmt(*mean_std(stored['aucs']))} ({'yes' if reproduces else 'no'})",
               "other train seeds": " / ".join(fmt(m) for m in seeds["mean"].iloc[1:]) or "-"}
        row["mean over runs (spread)"] = f"{np.mean(noise_runs):.3f} ({np.ptp(noise_runs):.3f})"
        for kind, column in (("shuffled", "arrangement shuffled"), ("no sequence layers", "no sequence layers")):
            if kind in by_kind:
                entry[kind] = by_kind[kind]["mean"].tolist()
                row[column] = " / ".join(fmt(m) for m in by_kind[kind]["mean"])
            else:
                row[column] = "-"
        facts["ablation"][name] = entry
        rows.append(row)
    return (
        "## 6. What do the trained models use? Retraining ablations\n\n"
        "Each method is retrained on every classification fold exactly as the workflow trains it "
        "(mambapath.train.train_fold: same config, split and epochs); cells are the mean test AUC over folds "
        "of one run (several runs separated by /). *retrained*: the config's train seed on the stored "
        "features, which must give the eval AUCs again; *other train seeds*: the same with train.seed + 1, "
        "+ 2, ... (run-to-run noise); *arrangement shuffled*: the config's seed on copies whose feature rows "
        "are permuted among each slide's tile positions (coords and grid kept: composition and tile content "
        "stay, the arrangement across tiles is gone; a permutation-invariant model sees the same bag, so its "
        "change is noise); *no sequence layers*: the same model with n_layers 0 (embedding, norm, attention "
        "pooling and classifier only: a bag-of-tiles model). *mean over runs*: the train seeds, plus the "
        "shuffled runs of a permutation-invariant model, which see the same bags.\n\n"
        + markdown_table(pd.DataFrame(rows)))


def analyse(inputs: Inputs, ablation_methods: list[str], train_seeds: int, shuffle_seeds: int,
            command: str = "") -> tuple[str, dict]:
    """Sections 1-6 and the findings as one Markdown text, and the numbers behind the findings."""
    from mambapath.errors import DataError
    from mambapath.synth import GT_MPP

    sheet = inputs.sheet
    if "gt_mpp" in sheet and not np.allclose(sheet["gt_mpp"].astype(float), GT_MPP):
        raise DataError(f"{inputs.results_dir}/cohort/slides.csv: gt_mpp differs from mambapath.synth.GT_MPP "
                        f"({GT_MPP}); regenerate the cohort with this version of `mambapath synth`")
    n_folds = int(inputs.config["splits"]["folds"])
    facts: dict = {}
    sections = [section_methods(inputs, list(inputs.config["methods"]), n_folds, facts)]
    data = collect_tiles(inputs)
    patients, composition, feature_cols, rgb_cols = patient_table(data)
    splits = inputs.splits[inputs.splits["patient_id"].isin(patients.index)]
    sections.append(section_probes(patients, splits, composition, feature_cols, rgb_cols, facts))
    sections.append(section_tile_locality(inputs, data, facts))
    sections.append(section_features(data, facts))
    sections.append(section_sample_size(patients, splits, facts))
    if ablation_methods:
        sections.append(section_ablation(inputs, ablation_methods, train_seeds, shuffle_seeds, n_folds, facts))
    sections.append("## Findings\n\n" + findings(facts, n_folds))
    header = ("# Synthetic cohort: do spatial models beat bag-of-tiles models on the spatial label?\n\n"
              f"Results: `{inputs.results_dir}`; config: tiles `{inputs.tile_dir.name}`, features "
              f"`{inputs.config['features']['extractor']}` "
              f"(weights: {inputs.config['features']['weights'] or 'random init'}); "
              f"{len(patients)} patients, {n_folds} folds." + (f"\n\nCommand: `{command}`" if command else ""))
    return "\n\n".join([header, *sections]) + "\n", facts


def _well(r2: float) -> str:
    return "well" if r2 >= 0.5 else "only partly"


def _range(values: pd.Series) -> str:
    """'median (min-max)' of integer counts; 'none' for an empty group."""
    if len(values) == 0:
        return "none"
    return f"median {values.median():g} (range {values.min():g}-{values.max():g})"


def _tile_um(inputs: Inputs) -> float:
    from mambapath.config import tiling_mpp

    return tiling_mpp(inputs.config["tiling"]) * float(inputs.config["tiling"]["patch_size"])


def findings(facts: dict, n_folds: int) -> str:
    """The verdicts, each with the numbers and the criterion it rests on."""
    lines = []
    g, aucs, p = facts["group_auc"], facts["auc_values"], facts["probe_auc"]
    partial = facts["partial_methods"]
    if partial:
        lines.append(f"- **Coverage.** Left out of the comparison (classification eval not complete over "
                     f"{n_folds} folds): {', '.join(partial)}.")
    if "bag-of-tiles" in g and "sequence/spatial" in g:
        bag, seq = g["bag-of-tiles"], g["sequence/spatial"]
        spread = float(np.mean([np.std(v, ddof=1) for v in aucs.values()]))
        margin = seq["best_auc"] - bag["best_auc"]
        bag_folds = np.mean([aucs[m] for m in BAG_OF_TILES if m in aucs], axis=0)
        seq_folds = np.mean([aucs[m] for m in SEQUENCE_SPATIAL if m in aucs], axis=0)
        wins = int((seq_folds > bag_folds).sum())
        verdict = ("beat" if margin > spread else "lose to" if margin < -spread
                   else "neither beat nor lose to")
        facts["verdict"] = verdict
        facts["group_gap"] = seq["mean"] - bag["mean"]
        lines.append(
            f"- **Result.** Classification AUC: best bag-of-tiles {bag['best']} {bag['best_auc']:.3f} (group "
            f"mean {bag['mean']:.3f}, {bag['n']} methods) vs best sequence/spatial {seq['best']} "
            f"{seq['best_auc']:.3f} (group mean {seq['mean']:.3f}, {seq['n']} methods); mean fold std of a "
            f"method {spread:.3f}. The spatial group's mean beats the bag group's mean in {wins}/{len(seq_folds)} "
            f"folds. Criterion (best vs best, margin beyond one fold std): spatial models {verdict} "
            "bag-of-tiles models.")
    else:
        lines.append("- **Result.** Complete eval outputs of both groups are not present; the comparison is "
                     "left out.")
    gain = p["c"] - p["a"]
    lines.append(
        f"- **Rule: does the label need the arrangement?** Probe AUC with composition alone {p['a']:.3f}, burden "
        f"alone {p['burden']:.3f}, the rule's two inputs {p['c']:.3f} (gain over composition {gain:+.3f}; "
        f"criterion: a gain > {MATTERS_AUC:.2f} means the label needs it): {'yes' if gain > MATTERS_AUC else 'no'}. "
        f"The true contact falls in two separated clusters (excluded at most {facts['true_gap'][0]:.3f}, "
        f"infiltrated at least {facts['true_gap'][1]:.3f}): the arrangement half of the rule is a binary "
        "slide-level property with a wide margin.")
    leaks = [(m, r) for m, r in facts["leak"].items() if facts["leak_p"][m] < 0.05]
    lines.append(
        "- **Rule: is the arrangement hidden from composition?** Criterion: no composition measure differs "
        "between infiltrated and excluded patients at Mann-Whitney p < 0.05. "
        + ("Yes: none does." if not leaks else
           "No: " + "; ".join(f"{m} {r['mean (infiltrated)']} vs {r['mean (excluded)']} (AUC "
                              f"{r['AUC infiltrated vs excluded']}, p {r['Mann-Whitney p']})" for m, r in leaks)
           + f". A model that only counts tissue types recovers part of the arrangement this way (composition "
           f"probe on the arrangement: AUC {p['arr_composition']:.3f}).")
    )
    tile_local = facts["same_tile"] >= TILE_LOCAL_SHARE
    lines.append(
        f"- **Rule: is the arrangement tile-local?** {facts['same_tile']:.3f} of contact lymphocyte pixels have "
        f"their tumour neighbour in the same tile; the lymphocyte-weighted bag-of-tiles estimate correlates with "
        f"the true contact at r = {facts['pearson']:.3f} and, with the true burden, reproduces "
        f"{facts['agreement']:.3f} of labels (probe (d) AUC {p['d']:.3f}). Tiles with in-tile contact per "
        f"slide: infiltrated {facts['contact_tiles'][0]}, excluded {facts['contact_tiles'][1]}. Criterion "
        f"(share >= {TILE_LOCAL_SHARE:.2f}): {'tile-local' if tile_local else 'not tile-local'}"
        + (". A permutation-invariant model whose tile embedding detects lymphocytes next to tumour can learn "
           "the label; order across tiles carries nothing the bag lacks, so the rule gives sequence/spatial "
           "models no advantage at this tile size." if tile_local else ": part of the label needs context across tiles."))
    f, r = facts["feature_probe"], facts["rgb_probe"]
    lines.append(
        f"- **Features.** Tile probes (features vs mean RGB): dominant-type balanced accuracy "
        f"{f['dominant_type balanced acc']:.3f} vs {r['dominant_type balanced acc']:.3f} (chance "
        f"{1 / facts['n_types']:.3f}); R^2 of the lymphocyte fraction {f['frac_lymphocytes R2']:.3f} vs "
        f"{r['frac_lymphocytes R2']:.3f}, tumour+necrosis {f['frac_tumour_necrosis R2']:.3f} vs "
        f"{r['frac_tumour_necrosis R2']:.3f}, in-tile contact lymphocytes {f['frac_contact_lymph R2']:.3f} vs "
        f"{r['frac_contact_lymph R2']:.3f}; tiles with in-tile contact detected at AUC "
        f"{f['has in-tile contact AUC']:.3f} vs {r['has in-tile contact AUC']:.3f}. Criterion R^2 >= 0.5: the "
        f"features encode composition {_well(min(f['frac_lymphocytes R2'], f['frac_tumour_necrosis R2']))} and the "
        f"amount of tile-local contact {_well(f['frac_contact_lymph R2'])}. "
        f"Slide level: a linear probe on mean-pooled features reaches AUC {p['e']:.3f} on the label (mean RGB "
        f"{p['f']:.3f}; the rule's true inputs {p['c']:.3f}) and {p['arr_features']:.3f} on the arrangement alone "
        f"(true composition {p['arr_composition']:.3f}, mean RGB {p['arr_rgb']:.3f}).")
    if "bag-of-tiles" in g and "sequence/spatial" in g:
        best_trained = max(g["bag-of-tiles"]["best_auc"], g["sequence/spatial"]["best_auc"])
        unused = p["e"] - best_trained > MATTERS_AUC
        lines.append(
            f"- **Model.** Best trained method {best_trained:.3f} vs a linear probe on mean-pooled features "
            f"{p['e']:.3f} (criterion: the probe ahead by > {MATTERS_AUC:.2f} means training leaves signal of "
            f"the features unused): {'yes, training leaves signal unused' if unused else 'no'}.")
    pairs = [x for x in facts["test_pairs"] if x]
    steps = f"{1 / max(pairs):.3f}-{1 / min(pairs):.3f}" if pairs else "n/a"
    if facts.get("ablation"):
        ablation = facts["ablation"]
        parts = []
        for name, v in ablation.items():
            seed_mean = float(np.mean(v["run_means"]))
            # run-to-run noise of this method: the spread of its runs' means; a change must exceed
            # it and MATTERS_AUC to count. Variants run with the config's seed, so they are compared
            # with the run of that seed on the stored features (paired).
            spread = float(np.ptp(v["run_means"])) if len(v["run_means"]) > 1 else 0.0
            bar = max(MATTERS_AUC, spread)
            text = (f"{name}: {v['stored']:.3f} with the config's seed, {seed_mean:.3f} over "
                    f"{len(v['run_means'])} runs (spread {spread:.3f})")
            v.update(seed_mean=seed_mean, spread=spread)
            if "shuffled" in v and name in PERMUTATION_INVARIANT:
                v["uses_arrangement"] = False  # it cannot: its shuffled runs are among the noise runs
            elif "shuffled" in v:
                shuffled = float(np.mean(v["shuffled"]))
                v["uses_arrangement"] = v["stored"] - shuffled > bar
                verdict = "uses" if v["uses_arrangement"] else "does not need"
                text += f", arrangement shuffled {shuffled:.3f} ({verdict} the arrangement across tiles)"
            if "no sequence layers" in v:
                flat = float(np.mean(v["no sequence layers"]))
                v["needs_layers"] = v["stored"] - flat > bar
                verdict = "needs" if v["needs_layers"] else "does not need"
                text += f", without its sequence layers {flat:.3f} ({verdict} them)"
            parts.append(text)
        lines.append(
            "- **Model: what do the trained models use?** " + "; ".join(parts)
            + ". Runs: the train seeds, plus the shuffled copies for a permutation-invariant model (it sees the "
            "same bags). Criterion: a variant (same seed as the config) below the config-seed run by more than "
            f"max({MATTERS_AUC:.2f}, the spread of the method's runs) counts. "
            "Retraining with the config's seed "
            + ("reproduces" if all(v["reproduces"] for v in ablation.values()) else "does NOT reproduce")
            + " the eval AUCs fold by fold.")
    pairs = [x for x in facts["test_pairs"] if x]
    steps = f"{1 / max(pairs):.3f}-{1 / min(pairs):.3f}" if pairs else "n/a"
    if facts.get("shuffle"):
        shuffle = facts["shuffle"]
        controls = [abs(v["shuffled"] - v["stored"]) for m, v in shuffle.items() if m in BAG_OF_TILES]
        noise = max(controls) if controls else 0.0
        bar = max(MATTERS_AUC, noise)
        parts = []
        for name, v in shuffle.items():
            if name in BAG_OF_TILES:
                continue
            drop = v["stored"] - v["shuffled"]
            parts.append(f"{name} {v['stored']:.3f} -> {v['shuffled']:.3f} "
                         f"({'uses' if drop > bar else 'does not need'} the arrangement)")
        lines.append(
            "- **Model: where does a sequence/spatial model's score come from?** Retrained with the features "
            "shuffled among tile positions: " + "; ".join(parts)
            + (f". Training noise, from the permutation-invariant control(s): {noise:.3f}. " if controls else ". ")
            + f"Criterion: a drop larger than max({MATTERS_AUC:.2f}, that noise) means the model uses the "
            "arrangement across tiles. Reruns on the stored features "
            + ("reproduce" if all(v["reproduces"] for v in shuffle.values()) else "do NOT all reproduce")
            + " the eval AUCs fold by fold.")
    lines.append(
        f"- **Sample size.** About {facts['train_patients']} training patients with {facts['train_positives']} "
        f"positives per fold; test folds hold {', '.join(str(x) for x in facts['test_pairs'])} "
        f"positive-negative pairs, so one misordered pair moves a fold's AUC by {steps}.")
    lines.append("\n" + conclusion(facts, tile_local, bool(leaks), steps))
    return "\n".join(lines)


def conclusion(facts: dict, tile_local: bool, leaks: bool, steps: str) -> str:
    """One paragraph that puts the verdicts together (every clause follows from a verdict above)."""
    p, f = facts["probe_auc"], facts["feature_probe"]
    text = ["**Conclusion.**"]
    if "verdict" in facts:
        text.append(f"In the eval tables (one train seed) sequence/spatial models {facts['verdict']} bag-of-tiles "
                    f"models (group means differ by {facts['group_gap']:+.3f}).")
    text.append(f"Rule: the label needs the arrangement (the rule's inputs {p['c']:.3f} vs composition "
                f"{p['a']:.3f}), " + (
                    f"but the arrangement is tile-local ({facts['same_tile']:.3f} of contacts lie within one tile), "
                    "so a bag of tiles holds all of it and order across tiles cannot be what separates the groups"
                    if tile_local else "and part of it spans tiles, which a bag of tiles does not hold")
                + ("; composition also leaks it (lymphocyte fraction)." if leaks else "."))
    ablation = facts.get("ablation") or {}
    spatial = {m: v for m, v in ablation.items() if m not in BAG_OF_TILES and "uses_arrangement" in v}
    if spatial:
        users = [m for m, v in spatial.items() if v["uses_arrangement"]]
        text.append("Model: retrained with the arrangement shuffled, "
                    + (f"{', '.join(users)} lose(s) AUC, so they use it" if users else
                       f"{', '.join(spatial)} keep{'s its' if len(spatial) == 1 else ' their'} AUC: "
                       "the score does not come from spatial order")
                    + ".")
        layered = {m: v for m, v in spatial.items() if "needs_layers" in v}
        if layered:
            needs = [m for m, v in layered.items() if v["needs_layers"]]
            text.append((f"Removing the sequence layers costs {', '.join(needs)} more than the seed noise, so the "
                         "layers help as extra capacity over the whole bag, not as spatial context."
                         if needs and not users else
                         "Removing the sequence layers does not cost more than the seed noise."
                         if not needs else "Removing the sequence layers costs more than the seed noise."))
        bag_runs = [v["seed_mean"] for m, v in ablation.items() if m in BAG_OF_TILES]
        seq_runs = [v["seed_mean"] for m, v in ablation.items() if m not in BAG_OF_TILES]
        if bag_runs and seq_runs:
            text.append(f"Averaged over runs, the retrained sequence/spatial models lead the retrained "
                        f"bag-of-tiles models by {np.mean(seq_runs) - np.mean(bag_runs):+.3f}.")
        spreads = {m: v["spread"] for m, v in ablation.items()}
        means = ", ".join(f"{m} {v['seed_mean']:.3f}" for m, v in ablation.items())
        text.append(f"Noise: across runs one method's mean AUC moves by up to {max(spreads.values()):.3f} "
                    f"(means over runs: {means})" + (f", against a group gap of {facts['group_gap']:+.3f}"
                                                  if "group_gap" in facts else "") + ".")
    text.append(f"Sample size: about {facts['train_patients']} training patients ({facts['train_positives']} "
                f"positive) per fold and one ordering flip moves a test fold's AUC by {steps}.")
    best = max([v["best_auc"] for v in facts["group_auc"].values()], default=float("nan"))
    text.append(f"Features: they encode composition (lymphocyte R^2 {f['frac_lymphocytes R2']:.3f}) and a "
                f"linear probe on their mean reaches {p['e']:.3f}"
                + (f", below the best trained model ({best:.3f}), so they are not what holds the models back"
                   if np.isfinite(best) and best >= p["e"] else "")
                + f"; in-tile contact is only partly readable from them (R^2 {f['frac_contact_lymph R2']:.3f}).")
    return " ".join(text)


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results-dir", type=Path, default=Path("results/demo"),
                        help="a synthetic cohort's results folder (cohort/, synth/, slides/, tiles/, features/, splits/)")
    parser.add_argument("--eval-dir", type=Path, default=None,
                        help="results folder whose eval/ holds the trained methods' outputs (default: --results-dir)")
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"), help="workflow config yaml")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    parser.add_argument("--ablation-methods", nargs="*", default=list(ABLATION_METHODS),
                        help="feature methods retrained in section 6 (give none to skip it)")
    parser.add_argument("--train-seeds", type=int, default=3,
                        help="section 6: train seeds per method (the config's, then +1, +2, ...)")
    parser.add_argument("--shuffle-seeds", type=int, default=2,
                        help="section 6: shuffled copies of the features (one retraining each)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from mambapath.errors import MambapathError
    from mambapath.io import write_text

    try:
        inputs = load_inputs(args.results_dir, args.eval_dir or args.results_dir, args.config)
        command = "python benchmarks/analyse_spatial_labels.py " + " ".join(argv if argv is not None else sys.argv[1:])
        report, _ = analyse(inputs, args.ablation_methods, args.train_seeds, args.shuffle_seeds, command)
    except MambapathError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report)
    if args.out:
        write_text(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
