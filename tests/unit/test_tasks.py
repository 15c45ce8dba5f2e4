"""Task losses and encodings against plain float64 references written here."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from mambapath.errors import DataError
from mambapath.tasks import (
    Task,
    assign_time_bins,
    class_weights,
    cox_loss,
    nll_survival_loss,
    survival_bin_edges,
)

CONFIG = {
    "tasks": {
        "staging": {"type": "classification", "label": "stage", "classes": ["I", "II", "III", "IV"],
                    "metric": "macro_f1", "class_weights": True},
        "survival": {"type": "survival", "time": "os_days", "event": "os_event", "n_bins": 4, "loss": "nll",
                     "metric": "c_index"},
        "survival_cox": {"type": "survival", "time": "os_days", "event": "os_event", "loss": "cox",
                         "metric": "c_index"},
    }
}


def eq2_reference(logits: np.ndarray, bins: np.ndarray, events: np.ndarray) -> float:
    """Pixel-Mamba Eq. 2 term by term in float64 Python arithmetic, mean over patients.

    c is the censoring status (1 = censored = no death observed); F is the survival function,
    F(t) = prod_{k <= t} (1 - h(k)), with F(-1) = 1.
    """
    total = 0.0
    for row, t, event in zip(logits, bins, events):
        h = [1.0 / (1.0 + math.exp(-float(z))) for z in row]

        def surv(k):
            s = 1.0
            for j in range(k + 1):
                s *= 1.0 - h[j]
            return s

        c = 1 - int(event)
        total += -c * math.log(surv(int(t))) - (1 - c) * (math.log(surv(int(t) - 1)) + math.log(h[int(t)]))
    return total / len(bins)


def test_nll_equals_eq2_with_censored_and_uncensored_patients():
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=1.5, size=(16, 4))
    bins = rng.integers(0, 4, size=16)
    events = rng.integers(0, 2, size=16)
    # the edge cases: death in the first bin (F(-1) = 1), censored in the last bin
    bins[:2], events[:2] = [0, 3], [1, 0]
    assert 0 < events.sum() < 16
    expected = eq2_reference(logits, bins, events)
    got = nll_survival_loss(torch.tensor(logits, dtype=torch.float64), torch.tensor(bins), torch.tensor(events))
    assert got.item() == pytest.approx(expected, rel=1e-12)
    got32 = nll_survival_loss(torch.tensor(logits, dtype=torch.float32), torch.tensor(bins), torch.tensor(events))
    assert got32.item() == pytest.approx(expected, rel=1e-5)


def test_nll_censored_only_and_uncensored_only():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, 3))
    bins = rng.integers(0, 3, size=6)
    for events in (np.zeros(6, int), np.ones(6, int)):
        got = nll_survival_loss(torch.tensor(logits), torch.tensor(bins), torch.tensor(events)).item()
        assert got == pytest.approx(eq2_reference(logits, bins, events), rel=1e-12)


def test_nll_gradient_matches_finite_differences():
    rng = np.random.default_rng(5)
    logits = torch.tensor(rng.normal(size=(5, 4)), dtype=torch.float64, requires_grad=True)
    bins = torch.tensor([0, 1, 3, 2, 3])
    events = torch.tensor([1, 0, 1, 0, 0])
    assert torch.autograd.gradcheck(lambda z: nll_survival_loss(z, bins, events), (logits,))


def cox_reference(log_risk, times, events) -> float:
    """Negative Breslow partial log-likelihood, averaged over deaths, by explicit loops."""
    total, n_events = 0.0, 0
    for i in range(len(times)):
        if events[i] != 1:
            continue
        denominator = sum(math.exp(log_risk[j]) for j in range(len(times)) if times[j] >= times[i])
        total += log_risk[i] - math.log(denominator)
        n_events += 1
    return -total / n_events


def test_cox_loss_equals_loop_including_tied_times():
    rng = np.random.default_rng(6)
    log_risk = rng.normal(size=12)
    times = rng.choice([30.0, 90.0, 180.0, 365.0, 700.0], size=12)  # many ties
    events = rng.integers(0, 2, size=12)
    events[0] = 1
    got = cox_loss(torch.tensor(log_risk), torch.tensor(times), torch.tensor(events)).item()
    assert got == pytest.approx(cox_reference(log_risk, times, events), rel=1e-12)


def test_cox_loss_without_deaths_is_zero_with_a_gradient():
    log_risk = torch.randn(4, dtype=torch.float64, requires_grad=True)
    loss = cox_loss(log_risk, torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(log_risk.grad, torch.zeros(4, dtype=torch.float64))


def test_cox_loss_minimiser_matches_lifelines_coefficient():
    """Fitting risk = beta * x by minimising our loss gives lifelines' Cox coefficient."""
    lifelines = pytest.importorskip("lifelines")
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(7)
    x = rng.normal(size=80)
    times = rng.exponential(1.0 / np.exp(0.8 * x))  # continuous: no ties, so Breslow = Efron
    events = (rng.random(80) < 0.7).astype(int)
    t_times, t_events, t_x = torch.tensor(times), torch.tensor(events), torch.tensor(x)
    ours = minimize_scalar(lambda b: cox_loss(b * t_x, t_times, t_events).item(), bounds=(-5, 5),
                           method="bounded", options={"xatol": 1e-9}).x
    fitter = lifelines.CoxPHFitter().fit(pd.DataFrame({"x": x, "T": times, "E": events}), "T", "E")
    assert ours == pytest.approx(fitter.params_["x"], abs=1e-4)


def test_bins_from_quantiles_of_uncensored_times_match_pandas_qcut():
    rng = np.random.default_rng(8)
    times = rng.exponential(800.0, size=60)
    events = (rng.random(60) < 0.6).astype(int)
    edges = survival_bin_edges(times, events, 4)
    _, qcut_edges = pd.qcut(times[events == 1], q=4, retbins=True)
    np.testing.assert_allclose(edges, qcut_edges[1:-1], rtol=0, atol=1e-9)
    # assignment: [a, b) intervals, outer bins open, as PORPOISE's pd.cut(right=False)
    outer = np.concatenate([[-np.inf], qcut_edges[1:-1], [np.inf]])
    expected = pd.cut(times, bins=outer, right=False, labels=False)
    np.testing.assert_array_equal(assign_time_bins(times, edges), expected)
    # uncensored patients fill the bins (near) equally; censored ones do not count
    counts = np.bincount(assign_time_bins(times[events == 1], edges), minlength=4)
    assert counts.max() - counts.min() <= 1
    assert len(survival_bin_edges(times, events, 6)) == 5


def test_class_weights_equal_sklearn_balanced():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0, 0, 0, 1, 2, 2, 3, 3, 3, 3])
    np.testing.assert_allclose(class_weights(y, 4), compute_class_weight("balanced", classes=np.arange(4), y=y))


def _slides(**cols):
    n = len(next(iter(cols.values())))
    return pd.DataFrame({"slide_id": [f"S{i}" for i in range(n)], **cols})


def test_encode_classification_and_errors():
    task = Task.from_config(CONFIG, "staging")
    out = task.encode(_slides(stage=["I", "IV", "II"]))
    assert out["y"].tolist() == [0, 3, 1]
    binary = Task.from_config({"tasks": {"c": {"type": "classification", "label": "label", "classes": ["0", "1"]}}},
                              "c")
    assert binary.encode(_slides(label=[1.0, 0.0, 1.0]))["y"].tolist() == [1, 0, 1]  # CSV floats of a gappy column
    with pytest.raises(DataError, match=r"\['V'\].*S1.*tasks.staging.classes"):
        task.encode(_slides(stage=["I", "V", "II"]))
    with pytest.raises(DataError, match="no 'stage' label.*S2"):
        task.encode(_slides(stage=["I", "II", None]))
    with pytest.raises(DataError, match="lacks"):
        task.encode(_slides(label=["I"]))


def test_encode_survival_errors_name_the_slides():
    task = Task.from_config(CONFIG, "survival")
    out = task.encode(_slides(os_days=[10.0, 20.5], os_event=[1, 0]))
    assert out["time"].tolist() == [10.0, 20.5] and out["event"].tolist() == [1, 0]
    with pytest.raises(DataError, match=r"negative 'os_days' \(e\.g\. \['S1'\]\)"):
        task.encode(_slides(os_days=[10.0, -1.0], os_event=[1, 0]))
    with pytest.raises(DataError, match=r"missing or non-numeric 'os_days' \(e\.g\. \['S0'\]\)"):
        task.encode(_slides(os_days=[None, 3.0], os_event=[1, 0]))
    with pytest.raises(DataError, match=r"'os_event' not 0/1"):
        task.encode(_slides(os_days=[1.0, 3.0], os_event=[2, 0]))


def test_fit_rejects_absent_class_and_deathless_training_part():
    task = Task.from_config(CONFIG, "staging")
    with pytest.raises(DataError, match=r"\['III'\].*no slide in the training part"):
        task.fit(pd.DataFrame({"y": [0, 1, 3, 3]}))
    task.fit(pd.DataFrame({"y": [0, 1, 2, 3, 3]}))
    assert task.weights == pytest.approx([5 / 4, 5 / 4, 5 / 4, 5 / 8])
    surv = Task.from_config(CONFIG, "survival")
    with pytest.raises(DataError, match="no observed death"):
        surv.fit(pd.DataFrame({"time": [1.0, 2.0], "event": [0, 0]}))


def test_predictions_risk_is_minus_sum_of_survival_curve():
    task = Task.from_config(CONFIG, "survival")
    logits = np.array([[0.3, -1.0, 2.0, 0.1], [-2.0, -2.0, -2.0, -2.0]])
    pred = task.predict(torch.tensor(logits))
    for row, risk in zip(logits, pred["risk"]):
        h = 1 / (1 + np.exp(-row))
        assert risk == pytest.approx(-sum(np.prod(1 - h[: k + 1]) for k in range(4)), rel=1e-12)
    assert pred["risk"][0] > pred["risk"][1]  # higher hazards -> higher risk
    assert task.n_outputs == 4 and Task.from_config(CONFIG, "survival_cox").n_outputs == 1
    cls = Task.from_config(CONFIG, "staging").predict(torch.tensor([[0.0, 1.0, 3.0, -1.0]]))
    assert cls["y_pred"].tolist() == [2]
    assert sum(cls[f"prob_{k}"][0] for k in range(4)) == pytest.approx(1.0)
