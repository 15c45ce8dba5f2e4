"""Metrics, survival statistics and resampling, written out in numpy.

Each function states the convention it follows, and the tests hold it against an
independent reference: the C-index against lifelines' ``concordance_index`` (Harrell's, with
lifelines' handling of ties), macro-F1 / AUC / accuracy against scikit-learn, the Kaplan-Meier
estimate and the log-rank test against lifelines.

Conventions: class labels are integer indices ``0..K-1``; ``risk`` is higher for a worse
prognosis (earlier death); ``event`` is 1 for an observed death, 0 for censoring.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

#: metric name -> True when larger is better (every metric here)
HIGHER_IS_BETTER = {"macro_f1": True, "f1": True, "accuracy": True, "auc": True, "c_index": True}
CLASSIFICATION_METRICS = ("macro_f1", "f1", "accuracy", "auc")
SURVIVAL_METRICS = ("c_index",)


# ----------------------------------------------------------------------------------------------
# Survival
# ----------------------------------------------------------------------------------------------


def concordance_counts(time, event, risk, chunk: int = 2048) -> tuple[float, float, int]:
    """(concordant, tied, comparable) pairs for Harrell's C-index.

    A pair (i, j) is comparable when i died (event 1) and j left the study later (t_j > t_i),
    or j was censored at the very time i died (t_j == t_i, event_j 0); two deaths at the same
    time are not comparable. It is concordant when risk_i > risk_j and counts one half when the
    risks tie. This is lifelines' convention, with its score = -risk.
    """
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    risk = np.asarray(risk, dtype=np.float64)
    concordant = tied = 0.0
    comparable = 0
    died = np.flatnonzero(event)
    # rows are deaths, columns every patient: (n_died, n) per chunk, so memory stays bounded
    for start in range(0, len(died), chunk):
        i = died[start : start + chunk]
        t_i, r_i = time[i, None], risk[i, None]
        later = (time[None, :] > t_i) | ((time[None, :] == t_i) & ~event[None, :])
        comparable += int(later.sum())
        concordant += float((later & (r_i > risk[None, :])).sum())
        tied += float((later & (r_i == risk[None, :])).sum())
    return concordant, tied, comparable


def c_index(time, event, risk) -> float:
    """Harrell's concordance index of a risk score (NaN when no pair is comparable)."""
    concordant, tied, comparable = concordance_counts(time, event, risk)
    if comparable == 0:
        return float("nan")
    return (concordant + 0.5 * tied) / comparable


def kaplan_meier(time, event) -> dict[str, np.ndarray]:
    """Kaplan-Meier survival estimate at each distinct exit time.

    Returns ``time`` (distinct exit times, ascending, with 0 prepended), ``survival``,
    ``at_risk``, ``events`` and ``censored`` at those times (the 0 row has survival 1).
    """
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    distinct = np.unique(time)
    at_risk = np.array([(time >= t).sum() for t in distinct])
    deaths = np.array([(event & (time == t)).sum() for t in distinct])
    censored = np.array([(~event & (time == t)).sum() for t in distinct])
    survival = np.cumprod(1.0 - deaths / at_risk)
    if distinct.size == 0 or distinct[0] > 0:
        distinct = np.concatenate([[0.0], distinct])
        survival = np.concatenate([[1.0], survival])
        at_risk = np.concatenate([[len(time)], at_risk])
        deaths = np.concatenate([[0], deaths])
        censored = np.concatenate([[0], censored])
    return {"time": distinct, "survival": survival, "at_risk": at_risk, "events": deaths, "censored": censored}


def median_survival(km: dict[str, np.ndarray]) -> float:
    """First time the Kaplan-Meier curve reaches 0.5 or below (inf when it never does)."""
    below = np.flatnonzero(km["survival"] <= 0.5)
    return float(km["time"][below[0]]) if below.size else float("inf")


def logrank_test(time, event, group) -> tuple[float, float]:
    """Two-group log-rank test: (chi-square statistic with 1 degree of freedom, p-value).

    At each distinct death time the observed deaths of the first group are compared with
    their expectation under equal hazards; the variance is the hypergeometric one.
    """
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    group = np.asarray(group)
    labels = np.unique(group)
    if labels.size != 2:
        raise ValueError(f"log-rank test needs exactly two groups, got {labels.tolist()}")
    first = group == labels[0]
    observed_minus_expected = 0.0
    variance = 0.0
    for t in np.unique(time[event]):
        at_risk = time >= t
        n = at_risk.sum()
        n1 = (at_risk & first).sum()
        d = (event & (time == t)).sum()
        d1 = (event & (time == t) & first).sum()
        observed_minus_expected += d1 - d * n1 / n
        if n > 1:
            variance += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    if variance <= 0:
        return float("nan"), float("nan")
    statistic = observed_minus_expected**2 / variance
    # survival function of chi-square with 1 degree of freedom: P(Z^2 > x) = erfc(sqrt(x / 2))
    return float(statistic), math.erfc(math.sqrt(statistic / 2))


def median_risk_groups(risk, fold=None) -> np.ndarray:
    """'high' where risk is above the median of its fold, else 'low'.

    Each fold's model has its own risk scale, so the median is taken per fold before the
    test patients of all folds are pooled (Pixel-Mamba's Figure 4 splits at the median risk).
    """
    risk = np.asarray(risk, dtype=np.float64)
    fold = np.zeros(len(risk), dtype=int) if fold is None else np.asarray(fold)
    groups = np.empty(len(risk), dtype=object)
    for k in np.unique(fold):
        in_fold = fold == k
        groups[in_fold] = np.where(risk[in_fold] > np.median(risk[in_fold]), "high", "low")
    return groups


# ----------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred)) if y_true.size else float("nan")


def f1_per_class(y_true, y_pred, labels: Sequence[int]) -> np.ndarray:
    """F1 of each label (0 where precision and recall are both undefined or zero)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    scores = []
    for k in labels:
        tp = np.sum((y_pred == k) & (y_true == k))
        fp = np.sum((y_pred == k) & (y_true != k))
        fn = np.sum((y_pred != k) & (y_true == k))
        denominator = 2 * tp + fp + fn
        scores.append(2 * tp / denominator if denominator else 0.0)
    return np.asarray(scores, dtype=np.float64)


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean F1 over the labels present in y_true or y_pred (scikit-learn's default)."""
    labels = np.union1d(np.asarray(y_true), np.asarray(y_pred))
    return float(f1_per_class(y_true, y_pred, labels).mean()) if labels.size else float("nan")


def binary_f1(y_true, y_pred, positive: int = 1) -> float:
    return float(f1_per_class(y_true, y_pred, [positive])[0])


def binary_auc(is_positive, score) -> float:
    """Area under the ROC curve as the Mann-Whitney probability P(score+ > score-), ties 1/2."""
    is_positive = np.asarray(is_positive).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(is_positive.sum()), int((~is_positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(score)  # tied scores share their mean rank: a tie counts 1/2
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_ranks(values) -> np.ndarray:
    """1-based ranks; tied values get the mean of the ranks they span."""
    _, inverse, counts = np.unique(np.asarray(values), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse]


def auc(y_true, prob) -> float:
    """AUC of class probabilities ``prob`` (n, K): of column 1 for K = 2, else one-vs-rest macro.

    For K > 2 the per-class AUCs are averaged over the classes present in y_true (a class
    without positives has no AUC); NaN when fewer than two classes are present.
    """
    y_true = np.asarray(y_true)
    prob = np.asarray(prob, dtype=np.float64)
    if prob.ndim != 2 or prob.shape[1] < 2:
        raise ValueError("auc needs class probabilities of shape (n, K) with K >= 2")
    if prob.shape[1] == 2:
        return binary_auc(y_true == 1, prob[:, 1])
    present = [k for k in range(prob.shape[1]) if np.any(y_true == k)]
    if len(present) < 2:
        return float("nan")
    return float(np.mean([binary_auc(y_true == k, prob[:, k]) for k in present]))


def classification_metrics(y_true, prob, y_pred=None) -> dict[str, float]:
    """macro-F1, F1 (of class 1 for two classes, else macro), accuracy and AUC."""
    prob = np.asarray(prob, dtype=np.float64)
    y_pred = prob.argmax(axis=1) if y_pred is None else np.asarray(y_pred)
    n_classes = prob.shape[1]
    return {
        "macro_f1": macro_f1(y_true, y_pred),
        "f1": binary_f1(y_true, y_pred, 1) if n_classes == 2 else macro_f1(y_true, y_pred),
        "accuracy": accuracy(y_true, y_pred),
        "auc": auc(y_true, prob),
    }


def survival_metrics(time, event, risk) -> dict[str, float]:
    return {"c_index": c_index(time, event, risk)}


# ----------------------------------------------------------------------------------------------
# Resampling and comparisons
# ----------------------------------------------------------------------------------------------


def bootstrap_ci(
    statistic: Callable[[np.ndarray], dict[str, float]],
    groups: Sequence[int],
    n_resamples: int,
    seed: int | Sequence[int] = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float, int]]:
    """Percentile bootstrap interval of every value that ``statistic`` returns.

    ``groups`` gives the sizes of independent groups (folds); each resample draws, within
    every group, as many items as it has with replacement, and calls ``statistic`` with the
    list of index arrays (one per group). Resamples where a value is undefined (NaN, e.g. a
    resample with one class) are left out of that value's interval; the count of valid
    resamples is returned with it. Same seed, same intervals.
    """
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        indices = [rng.integers(0, n, size=n) for n in groups]
        for name, value in statistic(indices).items():
            draws.setdefault(name, []).append(value)
    alpha = (1 - level) / 2
    intervals = {}
    for name, values in draws.items():
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size < max(10, n_resamples // 2):
            intervals[name] = (float("nan"), float("nan"), int(values.size))
        else:
            low, high = np.quantile(values, [alpha, 1 - alpha])
            intervals[name] = (float(low), float(high), int(values.size))
    return intervals


def paired_tests(a, b) -> dict[str, float]:
    """Paired t-test and Wilcoxon signed-rank test of fold-wise values a vs b (two-sided).

    With identical values (no difference at all) both p-values are 1; with fewer than two
    pairs they are NaN.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    diff = a - b
    out = {"n_folds": int(diff.size), "mean_diff": float(diff.mean()) if diff.size else float("nan")}
    if diff.size < 2:
        nan = float("nan")
        return {**out, "t_stat": nan, "t_p": nan, "wilcoxon_stat": nan, "wilcoxon_p": nan}
    if np.all(diff == 0):
        return {**out, "t_stat": 0.0, "t_p": 1.0, "wilcoxon_stat": 0.0, "wilcoxon_p": 1.0}
    from scipy import stats  # imported here: scipy.stats takes seconds to import
    sd = diff.std(ddof=1)
    if sd == 0:
        # a constant non-zero difference: the t statistic is infinite
        t_stat, t_p = float(np.sign(diff.mean()) * np.inf), 0.0
    else:
        t = stats.ttest_rel(a, b)
        t_stat, t_p = float(t.statistic), float(t.pvalue)
    w = stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
    return {**out, "t_stat": t_stat, "t_p": t_p, "wilcoxon_stat": float(w.statistic), "wilcoxon_p": float(w.pvalue)}
