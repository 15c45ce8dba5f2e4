"""``mambapath train``: train one method on one task and one fold, predict its val and test parts.

Protocol (every choice is recorded in train.json):

- one slide per forward pass; ``train.accumulation`` slides per optimiser step (gradient
  accumulation; for the Cox loss these slides are also the risk set, so it needs >= 2);
- AdamW, a cosine learning-rate schedule over all optimiser steps of ``train.epochs``;
- the training slides are shuffled each epoch by a generator seeded with (seed, epoch), and
  torch is seeded once, so a run on the CPU is deterministic: same seed, same predictions;
- ``train.protocol: fixed_epochs`` trains ``epochs`` epochs and predicts with the last
  weights; ``early_stopping`` watches the inner validation part (role ``val``, never the
  test part) by ``train.monitor`` (``val_loss`` or ``val_metric``) and stops after
  ``patience`` epochs without improvement, predicting with the best epoch's weights;
- ``train.standardize_features`` z-scores every feature dimension with the mean and standard
  deviation of all tiles of the training part (feature methods only; stored in model.pt);
- after every epoch a checkpoint (``checkpoint.pt``: weights, optimiser, schedule, RNG state,
  history, early-stopping state) is written atomically; a rerun with the same inputs and
  settings resumes from it and ends with exactly the result of an uninterrupted run. It is
  removed once the outputs are written.

Inputs are checked before any training: the task's labels against its classes, survival
times and events, every class present in the training part, feature files present and of one
dimension that fits the model.

Outputs in ``--out-dir``: ``model.pt`` (the weights predictions were made with, and how to
rebuild the model), ``predictions.csv`` (val and test slides), ``history.csv`` (per epoch),
``train.json`` (protocol and provenance).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__, metrics
from .config import CONFIG_DIR, _load_yaml, _validate, load_config, validate_config
from .errors import ConfigError, DataError
from .io import atomic_path, config_hash, write_csv, write_json

log = logging.getLogger(__name__)

METHODS_DIR = CONFIG_DIR / "methods"
#: train settings used where neither the config nor the method yaml sets them
TRAIN_DEFAULTS = {
    "epochs": 20,
    "lr": 2.0e-4,
    "weight_decay": 1.0e-2,
    "accumulation": 1,
    "protocol": "fixed_epochs",
    "monitor": "val_loss",
    "patience": 5,
    "seed": 0,
    "device": "auto",
    "threads": 1,
    "standardize_features": False,
}
#: keys of the config's train section that are Snakemake resources or demo overrides, not protocol
_NOT_PROTOCOL = ("mem_mb", "runtime_min", "gpu", "model_kwargs")


# Config ----------------------------------------------------------------------------------------


def load_method(name: str, config: dict | None = None, methods_dir: str | os.PathLike | None = None) -> dict:
    """A method yaml (config/methods/<name>.yaml), validated, with the config's
    ``train.model_kwargs.<name>`` merged over its ``kwargs``."""
    path = Path(methods_dir or METHODS_DIR) / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in Path(methods_dir or METHODS_DIR).glob("*.yaml"))
        raise ConfigError(f"method {name!r}: no file {path}; known methods: {', '.join(known)}")
    data = _load_yaml(path) or {}
    _validate(data, CONFIG_DIR / "method.schema.yaml", str(path))
    overrides = ((config or {}).get("train", {}).get("model_kwargs") or {}).get(name) or {}
    return {
        "name": name,
        "file": str(path),
        "display_name": data.get("display_name", name),
        "model": data["model"],
        "kwargs": {**(data.get("kwargs") or {}), **overrides},
        "kwargs_overridden_by_config": sorted(overrides),
        "input_kind": data.get("input_kind", "features"),
        "in_dim": data.get("in_dim"),
        "tile_order": data.get("tile_order"),
        "train": dict(data.get("train") or {}),
    }


def rule_inputs(method: str, config: dict, results: str, slide_ids: list[str], features: list[str]) -> list[str]:
    """The per-slide input files of a train job (the Snakemake rule's input): the features files
    for feature methods; for pixel methods what ``mambapath.pixel_data.train_input_files`` names
    (imported only then, so building the DAG of feature methods does not import torch)."""
    if load_method(method, config)["input_kind"] != "pixels":
        return list(features)
    from .pixel_data import train_input_files

    return train_input_files(method, config, results, slide_ids, features)


def train_settings(config: dict, method: dict) -> dict:
    """Effective train settings: defaults < config ``train`` < method yaml ``train``."""
    base = {k: v for k, v in (config.get("train") or {}).items() if k not in _NOT_PROTOCOL}
    settings = {**TRAIN_DEFAULTS, **base, **method.get("train", {})}
    if settings["protocol"] not in ("fixed_epochs", "early_stopping"):
        raise ConfigError(f"train.protocol: {settings['protocol']!r}; use fixed_epochs or early_stopping")
    if settings["monitor"] not in ("val_loss", "val_metric"):
        raise ConfigError(f"train.monitor: {settings['monitor']!r}; use val_loss or val_metric")
    return settings


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_configs(paths: list[str], override: str | None = None) -> dict:
    """One or more workflow config files merged in order (as Snakemake merges configfiles),
    then ``override`` (a JSON mapping) merged on top; the result is validated."""
    if len(paths) == 1 and not override:
        return load_config(paths[0])
    merged: dict = {}
    for p in paths:
        data = _load_yaml(Path(p))
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of config keys")
        merged = _merge(merged, data)
    source = " + ".join(paths)
    if override:
        try:
            extra = json.loads(override)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--override is not valid JSON ({exc})") from exc
        if not isinstance(extra, dict):
            raise ConfigError("--override must be a JSON mapping of config keys")
        merged = _merge(merged, extra)
        source += " + --override"
    return validate_config(merged, source)


# Validation metrics ------------------------------------------------------------------------------
# Per-epoch monitoring only (the evaluate stage computes the reported metrics), with the
# numpy metrics of mambapath.metrics: no scikit-learn or lifelines import in training jobs.


def task_metric(task, targets: pd.DataFrame, pred: dict[str, np.ndarray]) -> float:
    if task.type == "classification":
        y = targets["y"].to_numpy()
        prob = np.stack([pred[f"prob_{k}"] for k in range(len(task.classes))], axis=1)
        if task.metric == "accuracy":
            return float(np.mean(pred["y_pred"] == y))
        if task.metric == "auc":
            return metrics.auc(y, prob)
        return metrics.macro_f1(y, pred["y_pred"])
    return metrics.c_index(targets["time"].to_numpy(), targets["event"].to_numpy(), pred["risk"])


# Optimiser ---------------------------------------------------------------------------------------


class AdamW:
    """AdamW with decoupled weight decay: the update of ``torch.optim.AdamW`` (its single-tensor
    code path, the one it takes on the CPU), step for step.

    torch.optim is not used because building any of its optimisers imports ``torch._dynamo``,
    which costs several seconds per training job; the demo runs a hundred such jobs. The
    learning rate is passed to each step, which keeps the cosine schedule a plain function.
    """

    def __init__(self, params, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p in params if p.requires_grad]
        self.weight_decay = weight_decay
        self.betas = betas
        self.eps = eps
        self.steps = [0] * len(self.params)
        self.exp_avg: list = [None] * len(self.params)
        self.exp_avg_sq: list = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self, lr: float) -> None:
        import torch

        beta1, beta2 = self.betas
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if p.grad is None:
                    continue
                if self.exp_avg[i] is None:
                    self.exp_avg[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self.exp_avg_sq[i] = torch.zeros_like(p, memory_format=torch.preserve_format)
                grad, exp_avg, exp_avg_sq = p.grad, self.exp_avg[i], self.exp_avg_sq[i]
                self.steps[i] += 1
                step = self.steps[i]
                p.mul_(1 - lr * self.weight_decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = lr / (1 - beta1 ** step)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(self.eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "exp_avg": list(self.exp_avg), "exp_avg_sq": list(self.exp_avg_sq)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["steps"]) != len(self.params):
            raise ValueError("optimiser state is for another model")
        self.steps = list(state["steps"])
        dev = [p.device for p in self.params]
        self.exp_avg = [None if t is None else t.to(d) for t, d in zip(state["exp_avg"], dev)]
        self.exp_avg_sq = [None if t is None else t.to(d) for t, d in zip(state["exp_avg_sq"], dev)]


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay from ``base_lr`` at step 0 to 0 at ``total_steps``."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


# Training ----------------------------------------------------------------------------------------


def _resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is available; set train.device: cpu or auto")
    return torch.device(name)


def _select(targets: dict, idx) -> dict:
    import torch

    idx = torch.as_tensor(np.atleast_1d(idx), dtype=torch.long)
    return {k: v[idx] for k, v in targets.items()}


def _infer(model, dataset, indices, device):
    import torch

    model.eval()
    with torch.no_grad():
        outs = [model(dataset[int(i)].to(device)).float().cpu() for i in indices]
    return torch.cat(outs, dim=0) if outs else torch.zeros(0, 1)


def _fingerprint(**parts) -> str:
    return config_hash(parts)


def train_fold(*, config: dict, method: dict, sheet, features_dir, splits, task_name: str, fold: int, out_dir,
               threads: int | None = None, device: str | None = None, stop_after_epoch: int | None = None,
               progress: bool = True, exclude: list[str] | None = None) -> dict:
    """Train ``method`` on ``task_name``, fold ``fold``; write the outputs into ``out_dir``.

    ``stop_after_epoch`` ends the run after that many epochs with only the checkpoint written
    (as an interruption would); a later call resumes from it. ``exclude`` lists slides the
    cohort leaves out (they have no features). Returns the train.json content,
    or ``{"status": "stopped", ...}`` when stopped early that way.
    """
    import torch
    from tqdm import tqdm

    from .bags import fold_slides, make_dataset, read_fold, read_sheet
    from .models import create_model
    from .tasks import Task

    started = time.time()
    out_dir = Path(out_dir)
    settings = train_settings(config, method)
    threads = int(threads or settings["threads"])
    torch.set_num_threads(threads)
    dev = _resolve_device(device or settings["device"])

    # -- inputs, all checked before any training ------------------------------------------------
    task = Task.from_config(config, task_name)
    if task.loss == "cox" and settings["accumulation"] < 2:
        raise ConfigError(f"tasks.{task_name}.loss is cox, whose risk set is the slides of one optimiser step: "
                          "set train.accumulation to 2 or more (e.g. 16)")
    sheet_df = read_sheet(sheet)
    fold_rows = read_fold(splits, fold)
    slides = fold_slides(sheet_df, fold_rows, sheet, splits)
    excluded = sorted(set(exclude or []) & set(slides["slide_id"]))
    slides = slides[~slides["slide_id"].isin(excluded)].reset_index(drop=True)
    targets = task.encode(slides, source=f"{sheet} (fold {fold} of {splits})")
    targets["patient_id"] = slides["patient_id"].to_numpy()

    dataset = make_dataset(method["input_kind"], slides, features_dir=features_dir, config=config, method=method)
    keep = slides["slide_id"].isin(dataset.slide_ids).to_numpy()
    slides, targets = slides[keep].reset_index(drop=True), targets[keep].reset_index(drop=True)
    if slides["slide_id"].tolist() != list(dataset.slide_ids):
        raise RuntimeError("dataset slide order differs from the sheet order")
    roles = slides["role"].to_numpy()
    train_idx, val_idx, test_idx = (np.flatnonzero(roles == r) for r in ("train", "val", "test"))
    where = f"{splits} fold {fold}"
    if len(train_idx) == 0:
        raise DataError(f"{where}: no training slide (after dropping {len(dataset.dropped)} without tiles)")
    if settings["protocol"] == "early_stopping" and len(val_idx) == 0:
        raise DataError(f"{where}: early stopping needs an inner validation part (role val) but it is empty; "
                        "set splits.val_fraction > 0 or train.protocol: fixed_epochs")
    train_targets = targets.iloc[train_idx]
    if task.type == "survival":
        # bins and the death check are per patient, not per slide
        train_targets = train_targets.drop_duplicates("patient_id")
    task.fit(train_targets, where=where)
    target_tensors = task.target_tensors(targets)
    standardized = bool(settings["standardize_features"]) and hasattr(dataset, "fit_standardization")
    if standardized:
        dataset.fit_standardization(train_idx)
    elif settings["standardize_features"]:
        log.info("train.standardize_features applies to feature bags; method %s reads %s, left as they are",
                 method["name"], method["input_kind"])

    expected_dim = method.get("in_dim")
    if expected_dim is not None and expected_dim != dataset.input_dim:
        raise DataError(f"{features_dir}: features are {dataset.input_dim}-d but method {method['name']!r} expects "
                        f"{expected_dim}-d ({method['file']}: in_dim); re-extract with the matching extractor or "
                        "change in_dim")

    torch.manual_seed(settings["seed"])
    model = create_model(method["model"], in_dim=dataset.input_dim, n_outputs=task.n_outputs, **method["kwargs"])
    model_kind = getattr(model, "input_kind", "features")
    if model_kind != method["input_kind"]:
        raise ConfigError(f"{method['file']}: model {method['model']!r} takes {model_kind} but the method says "
                          f"input_kind: {method['input_kind']}; set input_kind: {model_kind}")
    model.to(dev)
    _probe(model, dataset, int(train_idx[0]), task.n_outputs, dev, method, features_dir)
    n_params = sum(p.numel() for p in model.parameters())

    # -- optimiser, schedule, resume ------------------------------------------------------------
    accumulation = int(settings["accumulation"])
    epochs = int(settings["epochs"])
    steps_per_epoch = math.ceil(len(train_idx) / accumulation)
    total_steps = epochs * steps_per_epoch
    optimizer = AdamW(model.parameters(), weight_decay=settings["weight_decay"])
    global_step = 0
    fingerprint = _fingerprint(
        task=task.describe(), method=method, settings=settings, fold=fold, version=__version__,
        slides=slides[["slide_id", "patient_id", "role"]].to_dict("list"), dropped=dataset.dropped,
        dataset=dataset.describe(), threads=threads, device=str(dev),
    )
    checkpoint_path = out_dir / "checkpoint.pt"
    history: list[dict] = []
    best = {"value": None, "epoch": None, "state": None}
    bad_epochs = 0
    stopped_early = False
    start_epoch = 0
    resumed_from = None
    if checkpoint_path.exists():
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if ckpt.get("fingerprint") == fingerprint:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            global_step = ckpt["global_step"]
            torch.set_rng_state(ckpt["rng_cpu"])
            if dev.type == "cuda" and ckpt.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng_cuda"], dev)
            history, best, bad_epochs = ckpt["history"], ckpt["best"], ckpt["bad_epochs"]
            stopped_early = ckpt["stopped_early"]
            start_epoch = resumed_from = ckpt["epoch"]
            log.info("resuming from %s after epoch %d", checkpoint_path, start_epoch)
        else:
            log.warning("%s was written with other inputs or settings; starting from scratch", checkpoint_path)

    log.info("train %s / %s / fold %d: %d train, %d val, %d test slides (%d dropped), %d-d %s, %s (%d params), "
             "%s, %d epochs, device %s, %d threads", task_name, method["name"], fold, len(train_idx), len(val_idx),
             len(test_idx), len(dataset.dropped), dataset.input_dim, method["input_kind"], method["model"], n_params,
             settings["protocol"], epochs, dev, threads)

    # a run that stopped early and was interrupted before writing its outputs has nothing left to train
    for epoch in range(start_epoch, start_epoch if stopped_early else epochs):
        epoch_start = time.time()
        model.train()
        order = np.random.default_rng([int(settings["seed"]), epoch]).permutation(train_idx)
        groups = [order[i:i + accumulation] for i in range(0, len(order), accumulation)]
        losses = []
        # in a log file (no terminal) the bar updates rarely: the per-epoch lines carry the news
        bar = tqdm(groups, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, disable=not progress,
                   mininterval=0.1 if sys.stderr.isatty() else 30.0)
        for group in bar:
            optimizer.zero_grad()
            if task.loss_decomposes:
                for i in group:
                    logits = model(dataset[int(i)].to(dev))  # (1, n_outputs)
                    loss = task.loss_fn(logits.float(), _select(target_tensors, i))
                    (loss / len(group)).backward()
                    losses.append(loss.item())
            else:
                logits = torch.cat([model(dataset[int(i)].to(dev)) for i in group], dim=0)  # (G, 1)
                loss = task.loss_fn(logits.float(), _select(target_tensors, group))
                loss.backward()
                losses.append(loss.item())
            lr = cosine_lr(settings["lr"], global_step, total_steps)
            optimizer.step(lr)
            global_step += 1
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", refresh=False)
        bar.close()

        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "lr": lr}
        if len(val_idx):
            val_logits = _infer(model, dataset, val_idx, dev)
            row["val_loss"] = float(task.loss_fn(val_logits, _select(target_tensors, val_idx)).item())
            row[f"val_{task.metric}"] = task_metric(task, targets.iloc[val_idx], task.predict(val_logits))
        else:
            row["val_loss"] = float("nan")
            row[f"val_{task.metric}"] = float("nan")
        row["seconds"] = round(time.time() - epoch_start, 3)
        history.append(row)

        if settings["protocol"] == "early_stopping":
            value = row["val_loss"] if settings["monitor"] == "val_loss" else -row[f"val_{task.metric}"]
            if not math.isnan(value) and (best["value"] is None or value < best["value"]):
                best = {"value": value, "epoch": epoch + 1,
                        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
                bad_epochs = 0
            else:
                bad_epochs += 1
            if bad_epochs >= int(settings["patience"]):
                stopped_early = True
        log.info("epoch %d/%d: train_loss %.4f, val_loss %.4f, val_%s %.4f, lr %.2e (%.1fs)%s", epoch + 1, epochs,
                 row["train_loss"], row["val_loss"], task.metric, row[f"val_{task.metric}"], row["lr"],
                 row["seconds"], "; early stop" if stopped_early else "")
        _save_checkpoint(checkpoint_path, {
            "fingerprint": fingerprint, "epoch": epoch + 1, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "global_step": global_step,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
            "history": history, "best": best, "bad_epochs": bad_epochs, "stopped_early": stopped_early,
        })
        if stopped_early:
            break
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < epochs:
            log.info("stopping after epoch %d as asked; rerun to resume from %s", epoch + 1, checkpoint_path)
            return {"status": "stopped", "epochs_run": epoch + 1}

    # -- predictions and outputs -------------------------------------------------------------------
    if settings["protocol"] == "early_stopping" and best["state"] is not None:
        model.load_state_dict(best["state"])
        final_epoch = best["epoch"]
    else:
        final_epoch = len(history)
    eval_idx = np.concatenate([val_idx, test_idx])
    logits = _infer(model, dataset, eval_idx, dev)
    pred = task.predict(logits)
    frame = pd.DataFrame({
        "slide_id": slides["slide_id"].to_numpy()[eval_idx],
        "patient_id": slides["patient_id"].to_numpy()[eval_idx],
        "fold": fold,
        "role": roles[eval_idx],
        "task": task_name,
        "method": method["name"],
    })
    rows = targets.iloc[eval_idx]
    if task.type == "classification":
        frame["y_true"] = rows["y"].to_numpy()
        frame["y_pred"] = pred["y_pred"]
        for k in range(len(task.classes)):
            frame[f"prob_{k}"] = pred[f"prob_{k}"]
    else:
        frame["time"] = rows["time"].to_numpy()
        frame["event"] = rows["event"].to_numpy()
        frame["risk"] = pred["risk"]
        for k in range(task.n_outputs if task.loss == "nll" else 0):
            frame[f"hazard_{k}"] = pred[f"hazard_{k}"]

    summary = {
        "status": "done",
        "task": task.describe(),
        "class_names": task.classes if task.type == "classification" else None,
        "method": {k: method[k] for k in ("name", "display_name", "model", "kwargs", "kwargs_overridden_by_config",
                                          "input_kind", "tile_order", "file")},
        "fold": fold,
        "protocol": settings["protocol"],
        "monitor": settings["monitor"] if settings["protocol"] == "early_stopping" else None,
        "settings": settings,
        "config_hash": config_hash({"task": config["tasks"][task_name], "method": method, "settings": settings}),
        "seed": settings["seed"],
        "epochs": epochs,
        "epochs_run": len(history),
        "best_epoch": best["epoch"] if settings["protocol"] == "early_stopping" else None,
        "predicted_with_epoch": final_epoch,
        "stopped_early": stopped_early,
        "resumed_from_epoch": resumed_from,
        "optimizer": {"name": "AdamW", "lr": settings["lr"], "weight_decay": settings["weight_decay"],
                      "schedule": "cosine over optimiser steps", "steps_per_epoch": steps_per_epoch,
                      "accumulation": accumulation},
        # the order the model reads tiles in (sequence models order each bag themselves)
        "tile_order": getattr(model, "tile_order", None) or dataset.describe().get("tile_order"),
        "standardized_features": standardized,
        "dataset": dataset.describe(),
        "n_slides": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx)},
        "n_patients": {r: int(slides.loc[roles == r, "patient_id"].nunique()) for r in ("train", "val", "test")},
        "n_dropped": len(dataset.dropped),
        "dropped_slides": dataset.dropped,
        "excluded_slides": excluded,
        "n_params": n_params,
        "device": str(dev),
        "threads": threads,
        "inputs": {"sheet": str(sheet), "splits": str(splits), "features_dir": str(features_dir)},
        "versions": {"mambapath": __version__, "torch": torch.__version__},
        "seconds": round(time.time() - started, 2),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "model.pt") as tmp:
        torch.save({
            "model": method["model"], "kwargs": method["kwargs"], "in_dim": dataset.input_dim,
            "n_outputs": task.n_outputs, "state_dict": model.state_dict(), "epoch": final_epoch,
            "task": task.describe(), "method": method["name"],
            "feature_mean": getattr(dataset, "feature_mean", None), "feature_std": getattr(dataset, "feature_std", None),
        }, tmp)
    write_csv(out_dir / "predictions.csv", frame)
    write_csv(out_dir / "history.csv", pd.DataFrame(history))
    write_json(out_dir / "train.json", summary)
    checkpoint_path.unlink(missing_ok=True)
    log.info("wrote %s (predicted with epoch %d)", out_dir, final_epoch)
    return summary


def _probe(model, dataset, index: int, n_outputs: int, device, method: dict, features_dir) -> None:
    """One forward pass before training, so that an input that does not fit the model fails now,
    with a message that says so, rather than inside the first epoch."""
    import torch

    model.eval()
    try:
        with torch.no_grad():
            out = model(dataset[index].to(device))
    except RuntimeError as exc:
        raise DataError(f"{features_dir}: inputs of dimension {dataset.input_dim} do not fit model "
                        f"{method['model']!r} ({method['file']}): {exc}; re-extract features or change the method's "
                        "kwargs") from exc
    if tuple(out.shape) != (1, n_outputs):
        raise ConfigError(f"model {method['model']!r} returned shape {tuple(out.shape)} for one slide, expected "
                          f"(1, {n_outputs})")


def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# CLI ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", nargs="+", default=[str(CONFIG_DIR / "config.yaml")],
                        help="workflow config yaml(s), merged in order")
    parser.add_argument("--override", default=None,
                        help="JSON mapping merged over the config files (Snakemake passes the config it runs with)")
    parser.add_argument("--sheet", required=True, help="cohort sheet (slides.csv)")
    parser.add_argument("--features-dir", help="folder with <slide_id>.h5 features files (feature models)")
    parser.add_argument("--splits", required=True, help="splits CSV of the task (patient_id, fold, role)")
    parser.add_argument("--task", required=True, help="task name under `tasks` in the config")
    parser.add_argument("--method", required=True, help="method name: config/methods/<method>.yaml")
    parser.add_argument("--methods-dir", default=str(METHODS_DIR), help="folder of method yamls")
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--out-dir", required=True, help="results/<cohort>/train/<task>/<method>/fold<k>")
    parser.add_argument("--exclude", nargs="*", default=[], help="slide ids the cohort leaves out")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: train.threads)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                        help="default: train.device of the config")
    parser.add_argument("--stop-after-epoch", type=int, default=None,
                        help="stop after this many epochs leaving only the checkpoint (a rerun resumes)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    config = load_configs(args.config, args.override)
    method = load_method(args.method, config, args.methods_dir)
    train_fold(config=config, method=method, sheet=args.sheet, features_dir=args.features_dir, splits=args.splits,
               task_name=args.task, fold=args.fold, out_dir=args.out_dir, threads=args.threads, device=args.device,
               stop_after_epoch=args.stop_after_epoch, progress=not args.no_progress, exclude=args.exclude)
    return 0
