"""Evaluation: metrics per fold, summaries across folds, paired comparisons between methods.

Three steps, one sub-command each (the Snakemake rules call them in this order):

``mambapath evaluate fold``
    one predictions.csv (one method, task and fold) -> metrics.json: the test part's metrics
    (macro-F1, F1, accuracy and AUC for classification; C-index for survival) with seeded
    bootstrap intervals, and the val part's metrics where it has one.
``mambapath evaluate method``
    the folds of one method and task -> summary.json (mean +/- std over folds, a bootstrap
    interval of the mean, the log-rank test of a median split of predicted risk), folds.csv
    (one row per fold) and oof.csv (the pooled test predictions, per patient).
``mambapath evaluate compare``
    the summaries of every method of a task -> comparisons.csv: each method against the best
    one, fold by fold (paired t-test and Wilcoxon signed-rank test).

Predictions are per slide; by default they are averaged per patient (probabilities, risk)
before scoring, since splits, labels and survival are per patient.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from . import metrics as M
from .errors import DataError
from .io import read_json, write_csv, write_json

log = logging.getLogger(__name__)

BASE_COLUMNS = ("slide_id", "patient_id", "fold", "role", "task", "method")
SURVIVAL_COLUMNS = ("time", "event", "risk")
CLASSIFICATION_COLUMNS = ("y_true", "y_pred")
DEFAULT_PRIMARY = {"classification": "macro_f1", "survival": "c_index"}
_PROB = re.compile(r"^prob_(\d+)$")


# ----------------------------------------------------------------------------------------------
# Predictions
# ----------------------------------------------------------------------------------------------


def prob_columns(frame: pd.DataFrame) -> list[str]:
    cols = sorted((int(m.group(1)), c) for c in frame.columns if (m := _PROB.match(str(c))))
    return [c for _, c in cols]


def infer_task_type(frame: pd.DataFrame, path) -> str:
    if "risk" in frame.columns:
        return "survival"
    if prob_columns(frame):
        return "classification"
    raise DataError(f"{path}: neither a risk column (survival) nor prob_0.. columns (classification)")


def read_predictions(path: str | Path, task_type: str | None = None) -> tuple[pd.DataFrame, str]:
    """Read and check a predictions.csv; returns the frame and the task type."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: predictions not found; run `mambapath train` for this fold first")
    frame = pd.read_csv(path, dtype={"slide_id": str, "patient_id": str, "role": str, "task": str, "method": str})
    missing = [c for c in BASE_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; predictions need {', '.join(BASE_COLUMNS)} and outputs")
    found = infer_task_type(frame, path)
    if task_type and task_type != found:
        raise DataError(f"{path}: columns are those of a {found} task, but the task is configured as {task_type}")
    task_type = found
    needed = list(SURVIVAL_COLUMNS) if task_type == "survival" else list(CLASSIFICATION_COLUMNS)
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing {task_type} column(s) {missing}")
    if frame.empty:
        raise DataError(f"{path}: no predictions")
    bad_roles = sorted(set(frame["role"]) - {"val", "test"})
    if bad_roles:
        raise DataError(f"{path}: role(s) {bad_roles}; predictions are for val or test slides only")
    if frame["fold"].nunique() != 1:
        raise DataError(f"{path}: folds {sorted(frame['fold'].unique())}; one predictions file holds one fold")
    values = needed + prob_columns(frame)
    nan = frame[values].isna().any()
    if nan.any():
        raise DataError(f"{path}: empty values in {nan[nan].index.tolist()}; the model's outputs must be finite")
    if not np.isfinite(frame[values].to_numpy(dtype=np.float64)).all():
        raise DataError(f"{path}: infinite values among {values}; the model's outputs must be finite")
    both = frame.groupby("patient_id")["role"].nunique()
    if (both > 1).any():
        raise DataError(f"{path}: patient(s) {both[both > 1].index.tolist()[:5]} are in both val and test: leakage")
    if task_type == "classification":
        probs = prob_columns(frame)
        k = len(probs)
        if k < 2:
            raise DataError(f"{path}: {k} probability column(s); a classifier writes prob_0..prob_(K-1), K >= 2")
        if [int(_PROB.match(c).group(1)) for c in probs] != list(range(k)):
            raise DataError(f"{path}: probability columns {probs} are not prob_0..prob_{k - 1}")
        sums = frame[probs].sum(axis=1)
        if not np.allclose(sums, 1.0, atol=1e-3):
            raise DataError(f"{path}: prob_* do not sum to 1 in {(~np.isclose(sums, 1.0, atol=1e-3)).sum()} row(s); "
                            "write softmax probabilities")
        for col in CLASSIFICATION_COLUMNS:
            labels = frame[col].to_numpy()
            if not (np.equal(np.mod(labels, 1), 0).all() and labels.min() >= 0 and labels.max() < k):
                raise DataError(f"{path}: {col} must hold class indices 0..{k - 1}")
        frame = frame.astype({"y_true": int, "y_pred": int})
    else:
        if (frame["time"] < 0).any():
            raise DataError(f"{path}: negative survival times; times are days and must be >= 0")
        if not frame["event"].isin([0, 1]).all():
            raise DataError(f"{path}: event must be 0 (censored) or 1 (death)")
        frame = frame.astype({"event": int})
    return frame.astype({"fold": int}), task_type


def patient_level(frame: pd.DataFrame, task_type: str) -> pd.DataFrame:
    """One row per patient: mean probabilities (argmax as prediction) or mean risk.

    The patient's label or survival must agree across its slides.
    """
    keys = ["patient_id", "fold", "role"]
    if task_type == "classification":
        probs = prob_columns(frame)
        truth = frame.groupby(keys)["y_true"].nunique()
        if (truth > 1).any():
            raise DataError(f"patients {truth[truth > 1].index.get_level_values(0).tolist()[:5]} have slides with "
                            "different y_true; labels are per patient")
        out = frame.groupby(keys, sort=True).agg(
            n_slides=("slide_id", "count"), y_true=("y_true", "first"), **{c: (c, "mean") for c in probs}
        )
        out["y_pred"] = out[probs].to_numpy().argmax(axis=1)
        return out.reset_index()[keys + ["n_slides", "y_true", "y_pred"] + probs]
    truth = frame.groupby(keys).agg(n_time=("time", "nunique"), n_event=("event", "nunique"))
    bad = truth[(truth["n_time"] > 1) | (truth["n_event"] > 1)]
    if len(bad):
        raise DataError(f"patients {bad.index.get_level_values(0).tolist()[:5]} have slides with different "
                        "time/event; survival is per patient")
    out = frame.groupby(keys, sort=True).agg(
        n_slides=("slide_id", "count"), time=("time", "first"), event=("event", "first"), risk=("risk", "mean")
    )
    return out.reset_index()


def slide_level(frame: pd.DataFrame, task_type: str) -> pd.DataFrame:
    cols = ["patient_id", "fold", "role"]
    if task_type == "classification":
        cols += ["y_true", "y_pred"] + prob_columns(frame)
    else:
        cols += list(SURVIVAL_COLUMNS)
    return frame.assign(n_slides=1)[cols[:3] + ["n_slides"] + cols[3:]].reset_index(drop=True)


def scored_rows(frame: pd.DataFrame, task_type: str, level: str) -> pd.DataFrame:
    if level == "patient":
        return patient_level(frame, task_type)
    if level == "slide":
        return slide_level(frame, task_type)
    raise DataError(f"report.level must be patient or slide (got {level!r})")


def compute_metrics(rows: pd.DataFrame, task_type: str) -> dict[str, float]:
    if task_type == "classification":
        probs = prob_columns(rows)
        return M.classification_metrics(rows["y_true"].to_numpy(), rows[probs].to_numpy(), rows["y_pred"].to_numpy())
    return M.survival_metrics(rows["time"].to_numpy(), rows["event"].to_numpy(), rows["risk"].to_numpy())


def metric_arrays(rows: pd.DataFrame, task_type: str) -> tuple[np.ndarray, ...]:
    """The columns the metrics read, as arrays (resampling indexes these, not the frame)."""
    if task_type == "classification":
        return rows["y_true"].to_numpy(), rows[prob_columns(rows)].to_numpy(), rows["y_pred"].to_numpy()
    return rows["time"].to_numpy(), rows["event"].to_numpy(), rows["risk"].to_numpy()


def metrics_of_arrays(arrays: tuple[np.ndarray, ...], task_type: str, index: np.ndarray | None = None) -> dict:
    if index is not None:
        arrays = tuple(a[index] for a in arrays)
    if task_type == "classification":
        return M.classification_metrics(*arrays)
    return M.survival_metrics(*arrays)


# ----------------------------------------------------------------------------------------------
# Step 1: one fold
# ----------------------------------------------------------------------------------------------


def evaluate_fold(
    predictions: str | Path,
    task_type: str | None = None,
    primary_metric: str | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci_level: float = 0.95,
    level: str = "patient",
    class_names: Sequence[str] | None = None,
    splits: str | Path | None = None,
) -> dict:
    """Metrics of one fold's test part (and val part), with bootstrap intervals for the test part.

    With ``splits`` (the task's split file), every predicted patient must hold the same role
    in that fold there; split patients without predictions are counted and logged.
    """
    predictions = Path(predictions)
    frame, task_type = read_predictions(predictions, task_type)
    fold = int(frame["fold"].iloc[0])
    unpredicted = check_against_splits(frame, splits, predictions) if splits else None
    train_info = _train_info(predictions)
    if task_type == "classification":
        class_names = list(class_names or train_info.get("class_names") or [])
        k = len(prob_columns(frame))
        if not class_names:
            raise DataError(f"{predictions}: no class names: train.json beside it lacks class_names; pass --classes")
        if len(class_names) != k:
            raise DataError(f"{predictions}: {k} probability columns but {len(class_names)} class names {class_names}")
    primary_metric = primary_metric or DEFAULT_PRIMARY[task_type]
    names = M.CLASSIFICATION_METRICS if task_type == "classification" else M.SURVIVAL_METRICS
    if primary_metric not in names:
        raise DataError(f"metric {primary_metric!r} does not apply to a {task_type} task; use one of {list(names)}")

    result = {
        "task": str(frame["task"].iloc[0]),
        "method": str(frame["method"].iloc[0]),
        "fold": fold,
        "task_type": task_type,
        "primary_metric": primary_metric,
        "level": level,
        "predictions": str(predictions),
        "bootstrap": {"resamples": n_bootstrap, "seed": [seed, fold], "level": ci_level},
    }
    if class_names:
        result["class_names"] = class_names
    if unpredicted is not None:
        result["splits"] = {"file": str(splits), "unpredicted_patients": unpredicted}
    for key in ("protocol", "epochs", "best_epoch", "model", "seed"):
        if key in train_info:
            result.setdefault("training", {})[key] = train_info[key]
    for role in ("test", "val"):
        part = frame[frame["role"] == role]
        if part.empty:
            if role == "test":
                raise DataError(f"{predictions}: no test rows; a fold is evaluated on its test part")
            continue
        rows = scored_rows(part, task_type, level)
        entry = {"n": int(len(rows)), "n_slides": int(len(part)), "metrics": compute_metrics(rows, task_type)}
        if task_type == "survival":
            entry["n_events"] = int(rows["event"].sum())
        else:
            entry["class_counts"] = {str(name): int((rows["y_true"] == i).sum()) for i, name in enumerate(class_names)}
        if role == "test" and n_bootstrap > 0:
            arrays = metric_arrays(rows, task_type)
            ci = M.bootstrap_ci(lambda idx: metrics_of_arrays(arrays, task_type, idx[0]), [len(rows)], n_bootstrap,
                                seed=[seed, fold], level=ci_level)
            entry["ci"] = {name: {"low": lo, "high": hi, "valid_resamples": v} for name, (lo, hi, v) in ci.items()}
        result[role] = entry
    result["metrics"] = result["test"]["metrics"]
    result["value"] = result["metrics"][primary_metric]
    return result


def check_against_splits(frame: pd.DataFrame, splits_path: str | Path, predictions: Path) -> dict[str, list[str]]:
    """Refuse predictions whose patients have another role in the split file (leakage).

    Returns, per role, the split's patients that have no prediction (a slide without tissue
    has no features, so its patient can be missing; that is recorded, not an error).
    """
    from .splits import read_splits

    fold = int(frame["fold"].iloc[0])
    splits = read_splits(splits_path)
    in_fold = splits[splits["fold"] == fold].set_index("patient_id")["role"]
    if in_fold.empty:
        raise DataError(f"{predictions}: fold {fold} is not in {splits_path}; the predictions and splits disagree")
    predicted = frame.groupby("patient_id")["role"].first()
    role_there = in_fold.reindex(predicted.index)
    wrong = predicted[role_there != predicted]
    if len(wrong):
        described = ", ".join(f"{p} ({r} here, {role_there[p] if isinstance(role_there[p], str) else 'absent'} "
                              f"in the splits)" for p, r in list(wrong.items())[:5])
        raise DataError(
            f"{predictions}: {len(wrong)} patient(s) predicted in a role their split does not give them in fold "
            f"{fold}: {described}; retrain this fold from {splits_path}"
        )
    unpredicted = {}
    for role in ("val", "test"):
        missing = sorted(set(in_fold[in_fold == role].index) - set(predicted.index))
        unpredicted[role] = missing
        if missing:
            log.warning("%s: %d %s patient(s) of fold %d have no prediction (no tissue?): %s",
                        predictions, len(missing), role, fold, missing[:5])
    return unpredicted


def _train_info(predictions: Path) -> dict:
    path = predictions.with_name("train.json")
    if not path.exists():
        log.warning("%s: no train.json beside the predictions; training settings are not recorded", predictions)
        return {}
    try:
        return read_json(path)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); rerun the training of this fold") from exc


# ----------------------------------------------------------------------------------------------
# Step 2: one method across folds
# ----------------------------------------------------------------------------------------------


def summarise_method(
    metrics_files: Sequence[str | Path],
    predictions_files: Sequence[str | Path],
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci_level: float = 0.95,
) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """(summary, per-fold table, pooled per-patient test predictions) of one method and task."""
    fold_results = [read_json(p) for p in metrics_files]
    if not fold_results:
        raise DataError("no metrics.json given; evaluate the folds first")
    first = fold_results[0]
    task_type, level, primary = first["task_type"], first["level"], first["primary_metric"]
    for path, r in zip(metrics_files, fold_results):
        for key in ("task", "method", "task_type", "level", "primary_metric"):
            if r[key] != first[key]:
                raise DataError(f"{path}: {key} {r[key]!r} differs from {first[key]!r} in {metrics_files[0]}")
    folds = [r["fold"] for r in fold_results]
    if len(set(folds)) != len(folds):
        raise DataError(f"the same fold appears twice among {list(map(str, metrics_files))}")

    per_fold = pd.DataFrame(
        [{"fold": r["fold"], "n_test": r["test"]["n"], **r["metrics"]} for r in fold_results]
    ).sort_values("fold").reset_index(drop=True)
    names = list(M.CLASSIFICATION_METRICS if task_type == "classification" else M.SURVIVAL_METRICS)

    # the test patients of every fold, at the level the folds were scored at
    parts = []
    for path in predictions_files:
        frame, _ = read_predictions(path, task_type)
        parts.append(scored_rows(frame[frame["role"] == "test"], task_type, level))
    pooled = pd.concat(parts, ignore_index=True)
    if sorted(set(pooled["fold"])) != sorted(folds):
        raise DataError(f"predictions cover folds {sorted(set(pooled['fold']))} but metrics cover {sorted(folds)}")
    twice = pooled["patient_id"].duplicated()
    if twice.any() and level == "patient":
        log.warning("%d patient(s) are in the test part of more than one fold (imported splits?): %s",
                    int(twice.sum()), pooled.loc[twice, "patient_id"].tolist()[:5])
    by_fold = [metric_arrays(pooled[pooled["fold"] == k], task_type) for k in sorted(folds)]

    def mean_over_folds(indices):
        values = [metrics_of_arrays(arrays, task_type, idx) for arrays, idx in zip(by_fold, indices)]
        return {name: float(np.mean([v[name] for v in values])) for name in names}

    ci = (
        M.bootstrap_ci(mean_over_folds, [len(a[0]) for a in by_fold], n_bootstrap, seed=seed, level=ci_level)
        if n_bootstrap > 0
        else {}
    )
    summary_metrics = {}
    for name in names:
        values = per_fold[name].to_numpy(dtype=np.float64)
        finite = values[np.isfinite(values)]
        entry = {
            "mean": float(finite.mean()) if finite.size else float("nan"),
            # sample standard deviation over folds (ddof=1)
            "std": float(finite.std(ddof=1)) if finite.size > 1 else float("nan"),
            "values": [float(v) for v in values],
            "n_folds": int(finite.size),
        }
        if name in ci:
            entry.update(ci_low=ci[name][0], ci_high=ci[name][1], ci_valid_resamples=ci[name][2])
        summary_metrics[name] = entry

    summary = {
        "task": first["task"],
        "method": first["method"],
        "task_type": task_type,
        "primary_metric": primary,
        "level": level,
        "folds": sorted(folds),
        "n_test": int(len(pooled)),
        "std_ddof": 1,
        "bootstrap": {"resamples": n_bootstrap, "seed": seed, "level": ci_level,
                      "scheme": "patients resampled within each fold; the statistic is the mean over folds"},
        "metrics": summary_metrics,
        "value": summary_metrics[primary]["mean"],
    }
    if "class_names" in first:
        summary["class_names"] = first["class_names"]
    if "training" in first:
        summary["training"] = first["training"]

    oof = pooled.copy()
    if task_type == "survival":
        oof["risk_group"] = M.median_risk_groups(oof["risk"].to_numpy(), oof["fold"].to_numpy())
        summary["km"] = km_summary(oof)
    return summary, per_fold, oof


def km_summary(oof: pd.DataFrame) -> dict:
    """Log-rank test and median survival of the high- and low-risk groups."""
    groups = oof["risk_group"].to_numpy()
    entry = {"split": "median predicted risk within each fold, test patients pooled"}
    for g in ("high", "low"):
        part = oof[groups == g]
        km = M.kaplan_meier(part["time"], part["event"]) if len(part) else None
        entry[g] = {
            "n": int(len(part)),
            "events": int(part["event"].sum()),
            "median_survival": M.median_survival(km) if km else float("nan"),
        }
    if entry["high"]["n"] and entry["low"]["n"]:
        statistic, p = M.logrank_test(oof["time"], oof["event"], groups)
    else:
        statistic, p = float("nan"), float("nan")
    entry.update(logrank_statistic=statistic, logrank_p=p)
    return entry


# ----------------------------------------------------------------------------------------------
# Step 3: methods of one task, compared fold by fold
# ----------------------------------------------------------------------------------------------


def compare_methods(summaries: Sequence[dict]) -> pd.DataFrame:
    """Each method against the best one (highest mean) of each metric, paired over folds."""
    if not summaries:
        raise DataError("no summaries to compare")
    tasks = {s["task"] for s in summaries}
    if len(tasks) != 1:
        raise DataError(f"summaries of several tasks {sorted(tasks)}: compare one task at a time")
    rows = []
    for name in summaries[0]["metrics"]:
        means = {s["method"]: s["metrics"][name]["mean"] for s in summaries}
        finite = {m: v for m, v in means.items() if np.isfinite(v)}
        if not finite:
            continue
        best = max(finite, key=lambda m: (finite[m], m))
        best_values = dict(zip(_folds_of(summaries, best), _summary(summaries, best)["metrics"][name]["values"]))
        for s in summaries:
            values = dict(zip(s["folds"], s["metrics"][name]["values"]))
            shared = [k for k in sorted(values) if k in best_values
                      and np.isfinite(values[k]) and np.isfinite(best_values[k])]
            tests = M.paired_tests([best_values[k] for k in shared], [values[k] for k in shared])
            rows.append({
                "task": s["task"],
                "metric": name,
                "primary": name == s["primary_metric"],
                "best_method": best,
                "method": s["method"],
                "best_mean": finite[best],
                "mean": means[s["method"]],
                **tests,
            })
    return pd.DataFrame(rows)


def _summary(summaries, method):
    return next(s for s in summaries if s["method"] == method)


def _folds_of(summaries, method):
    return _summary(summaries, method)["folds"]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    steps = parser.add_subparsers(dest="step", metavar="STEP", required=True)

    fold = steps.add_parser("fold", help="metrics of one fold's predictions -> metrics.json")
    fold.add_argument("--predictions", required=True, help="predictions.csv of one method, task and fold")
    fold.add_argument("--out", required=True, help="metrics.json to write")
    fold.add_argument("--task-type", choices=["classification", "survival"], help="checked against the columns")
    fold.add_argument("--primary-metric", help="the task's headline metric (config tasks.<task>.metric)")
    fold.add_argument("--classes", nargs="+", help="class names, when there is no train.json beside the predictions")
    fold.add_argument("--splits", help="the task's split file: every predicted patient must have its role there")
    _resampling(fold)
    fold.add_argument("--level", choices=["patient", "slide"], default="patient",
                      help="score per patient (slide outputs averaged) or per slide")

    method = steps.add_parser("method", help="one method's folds -> summary.json, folds.csv, oof.csv")
    method.add_argument("--metrics", nargs="+", required=True, help="metrics.json of every fold")
    method.add_argument("--predictions", nargs="+", required=True, help="predictions.csv of every fold")
    method.add_argument("--out-dir", required=True)
    _resampling(method)

    compare = steps.add_parser("compare", help="the methods of one task -> comparisons.csv")
    compare.add_argument("--summaries", nargs="+", required=True, help="summary.json of every method")
    compare.add_argument("--out", required=True)


def _resampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (0 = none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ci-level", type=float, default=0.95)


def run(args: argparse.Namespace) -> int:
    if args.step == "fold":
        result = evaluate_fold(args.predictions, args.task_type, args.primary_metric, args.bootstrap, args.seed,
                               args.ci_level, args.level, args.classes, args.splits)
        write_json(args.out, result)
        log.info("%s %s fold %d: %s = %.4f (n = %d)", result["task"], result["method"], result["fold"],
                 result["primary_metric"], result["value"], result["test"]["n"])
    elif args.step == "method":
        if len(args.metrics) != len(args.predictions):
            raise DataError(f"{len(args.metrics)} metrics files but {len(args.predictions)} predictions files")
        summary, per_fold, oof = summarise_method(args.metrics, args.predictions, args.bootstrap, args.seed,
                                                  args.ci_level)
        out = Path(args.out_dir)
        write_csv(out / "folds.csv", per_fold)
        write_csv(out / "oof.csv", oof)
        write_json(out / "summary.json", summary)
        m = summary["metrics"][summary["primary_metric"]]
        log.info("%s %s: %s = %.4f +/- %.4f over %d folds", summary["task"], summary["method"],
                 summary["primary_metric"], m["mean"], m["std"], m["n_folds"])
    else:
        table = compare_methods([read_json(p) for p in args.summaries])
        write_csv(args.out, table)
        log.info("compared %d method(s) -> %s", len(args.summaries), args.out)
    return 0
