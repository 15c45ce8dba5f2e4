"""Tasks: what a model predicts, how its targets are encoded, and the loss it is trained with.

A task comes from the workflow config's ``tasks.<name>`` section:

- ``type: classification`` (tumour staging, subtyping): ``label`` names the cohort-sheet
  column, ``classes`` the class names in order (class index = position). Cross-entropy,
  optionally weighted by inverse class frequency in the fold's training part
  (``class_weights: true``). The model outputs one logit per class.
- ``type: survival``: ``time`` and ``event`` name the sheet columns (``os_event`` 1 = death
  observed). With ``loss: nll`` survival time is cut into ``n_bins`` discrete intervals at
  quantiles of the *uncensored* times of the training part (as PORPOISE and MambaMIL do);
  the model outputs one hazard logit per interval and is trained with the negative
  log-likelihood of Pixel-Mamba's Eq. 2 (:func:`nll_survival_loss`). With ``loss: cox`` the
  model outputs one log-risk and is trained with the Cox partial likelihood
  (:func:`cox_loss`).

Eq. 2, with the hazard ``h(k) = sigmoid(logit_k)``, the survival function
``S(k) = prod_{j<=k} (1 - h(j))`` and ``S(-1) = 1``, for a patient in time bin ``t`` with
censoring status ``c`` (1 = censored, i.e. ``c = 1 - os_event``):

    L = - c * log S(t) - (1 - c) * (log S(t - 1) + log h(t))

A censored patient lived through bin ``t``; an uncensored one lived through the bins before
``t`` and died in ``t``. The loss is averaged over the slides of an optimiser step.

Predictions: class probabilities (softmax); for NLL the hazards and the risk
``-sum_k S(k)`` (higher = worse, as MambaMIL and Pixel-Mamba compute it); for Cox the log-risk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError

#: clamp for logarithms of probabilities (the value CLAM/MambaMIL use)
LOG_EPS = 1e-7


@dataclass
class Task:
    """One task of the workflow config, plus what is fitted on a fold's training part."""

    name: str
    type: str  # classification | survival
    metric: str
    label: str | None = None
    classes: list[str] = field(default_factory=list)
    class_weights: bool = False
    time: str | None = None
    event: str | None = None
    n_bins: int = 4
    loss: str = "ce"  # ce | nll | cox
    # fitted on the training part of a fold (see fit())
    bin_edges: list[float] | None = None
    weights: list[float] | None = None

    @classmethod
    def from_config(cls, config: dict, name: str) -> "Task":
        tasks = config.get("tasks", {})
        if name not in tasks:
            raise ConfigError(f"task {name!r} is not defined under `tasks` in the workflow config; "
                              f"defined: {', '.join(sorted(tasks))}")
        spec = tasks[name]
        key = f"tasks.{name}"
        if spec["type"] == "classification":
            if not spec.get("label") or not spec.get("classes"):
                raise ConfigError(f"{key}: a classification task needs `label` (sheet column) and `classes`")
            if len(set(spec["classes"])) != len(spec["classes"]):
                raise ConfigError(f"{key}.classes has duplicates: {spec['classes']}")
            return cls(name=name, type="classification", metric=spec.get("metric", "macro_f1"),
                       label=spec["label"], classes=[str(c) for c in spec["classes"]],
                       class_weights=bool(spec.get("class_weights", False)), loss="ce")
        if not spec.get("time") or not spec.get("event"):
            raise ConfigError(f"{key}: a survival task needs `time` and `event` (sheet columns)")
        return cls(name=name, type="survival", metric=spec.get("metric", "c_index"), time=spec["time"],
                   event=spec["event"], n_bins=int(spec.get("n_bins", 4)), loss=spec.get("loss", "nll"))

    @property
    def n_outputs(self) -> int:
        if self.type == "classification":
            return len(self.classes)
        return self.n_bins if self.loss == "nll" else 1

    @property
    def columns(self) -> list[str]:
        return [self.label] if self.type == "classification" else [self.time, self.event]

    # -- targets -----------------------------------------------------------------------------

    def encode(self, slides: pd.DataFrame, source: str = "cohort sheet") -> pd.DataFrame:
        """Targets for each slide: ``y`` (class index) or ``time``/``event``.

        Raises DataError, naming the slides, for labels outside ``classes``, missing labels,
        missing or negative survival times, and events other than 0/1.
        """
        missing_cols = [c for c in self.columns if c not in slides.columns]
        if missing_cols:
            raise DataError(f"{source}: task {self.name!r} needs column(s) {missing_cols}, which the sheet lacks "
                            f"(set tasks.{self.name} to the sheet's column names, or add the columns)")
        out = pd.DataFrame({"slide_id": slides["slide_id"].to_numpy()})
        if self.type == "classification":
            raw = slides[self.label]
            missing = slides.loc[raw.isna(), "slide_id"].tolist()
            if missing:
                raise DataError(f"{source}: {len(missing)} slide(s) of this split have no {self.label!r} label "
                                f"(e.g. {missing[:5]}); fill them in or leave their patients out of the split")
            labels = raw.map(_class_name)
            unknown = sorted(set(labels) - set(self.classes))
            if unknown:
                bad = slides.loc[labels.isin(unknown).to_numpy(), "slide_id"].tolist()
                raise DataError(f"{source}: column {self.label!r} has label(s) {unknown} (slides {bad[:5]}) that are not "
                                f"in tasks.{self.name}.classes {self.classes}; fix the sheet or the config's classes")
            index = {c: i for i, c in enumerate(self.classes)}
            out["y"] = labels.map(index).to_numpy(dtype=np.int64)
            return out
        time = pd.to_numeric(slides[self.time], errors="coerce")
        event = pd.to_numeric(slides[self.event], errors="coerce")
        problems = []
        for what, bad in (
            (f"missing or non-numeric {self.time!r}", time.isna()),
            (f"negative {self.time!r}", time < 0),
            (f"{self.event!r} not 0/1", ~event.isin([0, 1])),
        ):
            ids = slides.loc[bad.to_numpy(), "slide_id"].tolist()
            if ids:
                problems.append(f"{len(ids)} slide(s) with {what} (e.g. {ids[:5]})")
        if problems:
            raise DataError(f"{source}: survival task {self.name!r}: " + "; ".join(problems)
                            + "; fix the sheet or leave these patients out of the split")
        out["time"] = time.to_numpy(dtype=np.float64)
        out["event"] = event.to_numpy(dtype=np.int64)
        return out

    def fit(self, train_targets: pd.DataFrame, where: str = "training part") -> "Task":
        """Fit what depends on the training part: class weights, survival time bins.

        Raises DataError when a class is absent from the training part (the model could never
        learn it) or when a survival training part has no observed death.
        """
        if self.type == "classification":
            counts = np.bincount(train_targets["y"].to_numpy(), minlength=len(self.classes))
            absent = [c for c, n in zip(self.classes, counts) if n == 0]
            if absent:
                raise DataError(f"{where}: class(es) {absent} of task {self.name!r} have no slide in the training part; "
                                "use fewer folds, re-split stratified by this label, or drop the class from "
                                f"tasks.{self.name}.classes")
            if self.class_weights:
                self.weights = class_weights(train_targets["y"].to_numpy(), len(self.classes)).tolist()
            return self
        events = train_targets["event"].to_numpy()
        if events.sum() == 0:
            raise DataError(f"{where}: the training part of survival task {self.name!r} has no observed death "
                            f"({self.event} == 1); survival cannot be learnt from it: re-split stratified by event")
        if self.loss == "nll":
            self.bin_edges = survival_bin_edges(train_targets["time"].to_numpy(), events, self.n_bins).tolist()
        return self

    def time_bins(self, times: np.ndarray) -> np.ndarray:
        if self.bin_edges is None:
            raise RuntimeError("Task.fit() must run before time_bins()")
        return assign_time_bins(times, np.asarray(self.bin_edges))

    # -- loss and predictions ------------------------------------------------------------------

    def target_tensors(self, targets: pd.DataFrame) -> dict[str, torch.Tensor]:
        """Tensors the loss needs, for rows of ``encode()``'s output."""
        if self.type == "classification":
            return {"y": torch.as_tensor(targets["y"].to_numpy(), dtype=torch.long)}
        out = {
            "time": torch.as_tensor(targets["time"].to_numpy(), dtype=torch.float64),
            "event": torch.as_tensor(targets["event"].to_numpy(), dtype=torch.long),
        }
        if self.loss == "nll":
            out["bin"] = torch.as_tensor(self.time_bins(targets["time"].to_numpy()), dtype=torch.long)
        return out

    def loss_fn(self, logits: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss over the rows of ``logits`` (B, n_outputs)."""
        if self.type == "classification":
            weight = None if self.weights is None else torch.as_tensor(self.weights, dtype=logits.dtype,
                                                                       device=logits.device)
            return F.cross_entropy(logits, target["y"].to(logits.device), weight=weight)
        if self.loss == "nll":
            return nll_survival_loss(logits, target["bin"].to(logits.device), target["event"].to(logits.device))
        return cox_loss(logits[:, 0], target["time"].to(logits.device), target["event"].to(logits.device))

    @property
    def loss_decomposes(self) -> bool:
        """Whether the loss of a group of slides is the mean of their single-slide losses.
        Cox's is not: its risk set is the group."""
        return self.loss != "cox"

    def predict(self, logits: torch.Tensor) -> dict[str, np.ndarray]:
        """Model outputs (B, n_outputs) -> prediction columns (numpy, float64)."""
        logits = logits.detach().to(torch.float64).cpu()
        if self.type == "classification":
            prob = torch.softmax(logits, dim=1).numpy()
            out = {f"prob_{k}": prob[:, k] for k in range(prob.shape[1])}
            out["y_pred"] = prob.argmax(axis=1)
            return out
        if self.loss == "nll":
            hazards = torch.sigmoid(logits)
            survival = torch.cumprod(1 - hazards, dim=1)
            out = {"risk": (-survival.sum(dim=1)).numpy()}
            out.update({f"hazard_{k}": hazards[:, k].numpy() for k in range(hazards.shape[1])})
            return out
        return {"risk": logits[:, 0].numpy()}

    def describe(self) -> dict:
        d = {"name": self.name, "type": self.type, "loss": self.loss, "metric": self.metric,
             "n_outputs": self.n_outputs}
        if self.type == "classification":
            d.update(label=self.label, class_names=self.classes, class_weights=self.weights)
        else:
            d.update(time=self.time, event=self.event)
            if self.loss == "nll":
                d.update(n_bins=self.n_bins, bin_edges=self.bin_edges)
        return d


def _class_name(value) -> str:
    """Class names are strings; a numeric column read from CSV with gaps turns 1 into 1.0: undo that."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse class frequency, ``n / (K * n_k)`` (scikit-learn's "balanced" weights)."""
    counts = np.bincount(np.asarray(y), minlength=n_classes).astype(np.float64)
    return len(y) / (n_classes * np.maximum(counts, 1.0))


def survival_bin_edges(times: np.ndarray, events: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner edges (n_bins - 1) of the time bins: quantiles of the uncensored times.

    Bin k holds times in [edge_{k-1}, edge_k), with the first and last bins open to 0 and
    infinity, so every time, also outside the training range, falls into a bin.
    """
    times = np.asarray(times, dtype=np.float64)
    uncensored = times[np.asarray(events) == 1]
    if uncensored.size == 0:
        raise DataError("survival time bins need at least one observed death")
    probs = np.arange(1, n_bins) / n_bins
    return np.quantile(uncensored, probs)


def assign_time_bins(times: np.ndarray, inner_edges: np.ndarray) -> np.ndarray:
    """Bin index of each time: the number of inner edges at or below it."""
    return np.searchsorted(np.asarray(inner_edges), np.asarray(times, dtype=np.float64), side="right")


def nll_survival_loss(logits: torch.Tensor, bins: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
    """Discrete-time survival negative log-likelihood (Pixel-Mamba Eq. 2), mean over the batch.

    logits: (B, K) hazard logits; bins: (B,) time bin of each patient; events: (B,) 1 = death.
    """
    hazards = torch.sigmoid(logits)  # (B, K)
    survival = torch.cumprod(1 - hazards, dim=1)  # (B, K) S(k)
    survival_padded = torch.cat([torch.ones_like(survival[:, :1]), survival], dim=1)  # (B, K+1) S(k-1)
    bins = bins.long()[:, None]
    censored = (1 - events.to(logits.dtype))[:, None]  # c
    s_before = torch.gather(survival_padded, 1, bins).clamp(min=LOG_EPS)  # S(t-1)
    s_at = torch.gather(survival_padded, 1, bins + 1).clamp(min=LOG_EPS)  # S(t)
    h_at = torch.gather(hazards, 1, bins).clamp(min=LOG_EPS)  # h(t)
    loss = -censored * torch.log(s_at) - (1 - censored) * (torch.log(s_before) + torch.log(h_at))
    return loss.mean()


def cox_loss(log_risk: torch.Tensor, times: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood (Breslow ties), mean over observed deaths.

    ``-(1/n_d) sum_{i: e_i = 1} [eta_i - log sum_{j: t_j >= t_i} exp(eta_j)]``; zero (with a
    gradient path) when the group has no death.
    """
    events = events.to(torch.bool)
    if not bool(events.any()):
        return log_risk.sum() * 0.0
    times = times.to(log_risk.device)
    at_risk = times[None, :] >= times[:, None]  # (B, B) row i: the risk set of patient i
    masked = log_risk[None, :].masked_fill(~at_risk, float("-inf"))
    log_denominator = torch.logsumexp(masked, dim=1)  # (B,)
    return -(log_risk - log_denominator)[events].mean()
