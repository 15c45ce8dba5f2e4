"""Metrics against independent references: lifelines, scikit-learn, scipy and hand counts."""

import numpy as np
import pytest
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test as lifelines_logrank
from lifelines.utils import concordance_index
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from mambapath import metrics as M


def survival_sample(rng, n, tie_times=True, tie_risk=True):
    time = rng.exponential(500, n)
    if tie_times:
        time = np.round(time / 100) * 100  # many tied exit times, deaths and censorings among them
    event = rng.integers(0, 2, n)
    risk = -np.log(time + 1) + rng.normal(0, 1, n)
    if tie_risk:
        risk = np.round(risk, 1)
    return time, event, risk


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_c_index_equals_lifelines(seed, ties):
    rng = np.random.default_rng(seed)
    time, event, risk = survival_sample(rng, 80, tie_times=ties, tie_risk=ties)
    expected = concordance_index(time, -risk, event)
    assert M.c_index(time, event, risk) == pytest.approx(expected, abs=1e-12)


def test_c_index_chunked_rows_equal_unchunked():
    rng = np.random.default_rng(11)
    time, event, risk = survival_sample(rng, 300)
    assert M.concordance_counts(time, event, risk, chunk=7) == M.concordance_counts(time, event, risk)


def test_c_index_hand_counted_pairs():
    # deaths at 1 and 3; the pair (3 death, 3 censored) is comparable, (5, 5) censored pairs are not
    time = np.array([1.0, 3.0, 3.0, 5.0])
    event = np.array([1, 1, 0, 0])
    risk = np.array([4.0, 2.0, 2.0, 3.0])
    # comparable: (0,1) (0,2) (0,3) concordant; (1,2) tie; (1,3) discordant -> (3 + 0.5) / 5
    assert M.c_index(time, event, risk) == pytest.approx(3.5 / 5)


def test_c_index_without_comparable_pairs_is_nan():
    assert np.isnan(M.c_index([1.0, 2.0], [0, 0], [0.3, 0.1]))


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, k = 60, 4
    y_true = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y_true] += 1.0
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y_pred = prob.argmax(1)
    y_pred[y_pred == 3] = 2  # a class never predicted: sklearn counts it with F1 0
    got = M.classification_metrics(y_true, prob, y_pred)
    assert got["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-12)
    assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert got["auc"] == pytest.approx(roc_auc_score(y_true, prob, multi_class="ovr", average="macro"), abs=1e-12)


def test_macro_f1_with_a_class_absent_from_truth_and_predictions():
    y_true = np.array([0, 0, 1, 2, 2, 2])
    y_pred = np.array([0, 1, 1, 2, 0, 2])
    assert M.macro_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro"))


@pytest.mark.parametrize("seed", range(4))
def test_binary_metrics_equal_sklearn_with_tied_scores(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, 50)
    p1 = np.round(np.clip(0.5 + 0.3 * (y_true - 0.5) + rng.normal(0, 0.25, 50), 0, 1), 1)  # ties
    prob = np.stack([1 - p1, p1], axis=1)
    y_pred = (p1 > 0.5).astype(int)
    got = M.classification_metrics(y_true, prob, y_pred)
    assert got["auc"] == pytest.approx(roc_auc_score(y_true, p1), abs=1e-12)
    assert got["f1"] == pytest.approx(f1_score(y_true, y_pred), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-12)


def test_average_ranks_equal_scipy():
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 0.5, 1.0])
    np.testing.assert_allclose(M.average_ranks(values), stats.rankdata(values))


def test_auc_undefined_with_one_class():
    assert np.isnan(M.auc([1, 1, 1], np.array([[0.2, 0.8]] * 3)))


@pytest.mark.parametrize("seed", range(3))
def test_kaplan_meier_equals_lifelines(seed):
    rng = np.random.default_rng(seed)
    time, event, _ = survival_sample(rng, 70)
    km = M.kaplan_meier(time, event)
    reference = KaplanMeierFitter().fit(time, event).survival_function_
    expected = reference["KM_estimate"].reindex(km["time"], method="ffill").to_numpy()
    np.testing.assert_allclose(km["survival"], expected, atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_logrank_equals_lifelines(seed):
    rng = np.random.default_rng(seed)
    time, event, risk = survival_sample(rng, 90)
    group = np.where(risk > np.median(risk), "high", "low")
    statistic, p = M.logrank_test(time, event, group)
    high, low = group == "high", group == "low"
    reference = lifelines_logrank(time[high], time[low], event[high], event[low])
    assert statistic == pytest.approx(reference.test_statistic, rel=1e-10)
    assert p == pytest.approx(reference.p_value, rel=1e-10)


def test_median_risk_groups_split_each_fold_at_its_own_median():
    risk = np.array([1.0, 2.0, 3.0, 4.0, 100.0, 200.0, 300.0, 400.0])
    fold = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    groups = M.median_risk_groups(risk, fold)
    assert groups.tolist() == ["low", "low", "high", "high", "low", "low", "high", "high"]


def test_bootstrap_interval_is_seeded_and_contains_the_estimate():
    rng = np.random.default_rng(0)
    values = rng.normal(2.0, 1.0, 400)

    def mean_of(indices):
        return {"mean": float(values[indices[0]].mean())}

    a = M.bootstrap_ci(mean_of, [len(values)], 2000, seed=5)
    b = M.bootstrap_ci(mean_of, [len(values)], 2000, seed=5)
    c = M.bootstrap_ci(mean_of, [len(values)], 2000, seed=6)
    assert a == b
    assert a != c
    low, high, valid = a["mean"]
    assert valid == 2000
    assert low < values.mean() < high
    # the normal-theory interval of a mean: the percentile bootstrap agrees to a few percent
    half_width = 1.959964 * values.std(ddof=1) / np.sqrt(len(values))
    assert low == pytest.approx(values.mean() - half_width, abs=0.1 * half_width)
    assert high == pytest.approx(values.mean() + half_width, abs=0.1 * half_width)


def test_bootstrap_leaves_out_undefined_resamples():
    y = np.array([0] * 3 + [1] * 3)
    score = np.linspace(0, 1, 6)

    def auc_of(indices):
        return {"auc": M.binary_auc(y[indices[0]] == 1, score[indices[0]])}

    low, high, valid = M.bootstrap_ci(auc_of, [6], 200, seed=1)["auc"]
    assert 150 < valid < 200  # a resample of six drawn from one class (about 3%) has no AUC
    assert low <= 1.0 and high == 1.0


def test_paired_tests_against_formulas():
    a = np.array([0.61, 0.65, 0.58, 0.70, 0.66])
    b = np.array([0.55, 0.60, 0.57, 0.61, 0.60])
    out = M.paired_tests(a, b)
    d = a - b
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    assert out["t_stat"] == pytest.approx(t)
    assert out["t_p"] == pytest.approx(2 * stats.t.sf(abs(t), df=len(d) - 1))
    # every difference positive: the exact two-sided signed-rank p is 2 / 2^5
    assert out["wilcoxon_p"] == pytest.approx(2 / 32)
    assert out["mean_diff"] == pytest.approx(d.mean())


def test_paired_tests_of_identical_values():
    out = M.paired_tests([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert out["t_p"] == 1.0 and out["wilcoxon_p"] == 1.0
