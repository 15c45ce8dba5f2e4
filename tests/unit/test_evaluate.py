"""Evaluation on fake predictions, checked against scikit-learn, lifelines and scipy directly."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from mambapath import evaluate as E
from mambapath.cli import main
from mambapath.errors import DataError
from mambapath.io import read_json

CLASSES = ["I", "II", "III", "IV"]


def write_fake_run(root: Path, methods=None, n_patients=40, folds=3, slides_per_patient=1, seed=0,
                   tasks=("staging", "survival"), splits=None, truth=None) -> dict:
    """predictions.csv and train.json as training writes them, for every task, method and fold.

    Each method's outputs carry signal of a given strength (0 = none). The folds are
    ``splits[task]`` (split files' rows) where given, else patient-level folds made here with
    three val patients each. Returns the patients' truth for the checks.
    """
    methods = methods or {"mean_mil": 0.3, "abmil": 2.5}
    rng = np.random.default_rng(seed)
    patients = np.array([f"P{i:03d}" for i in range(n_patients)])
    stage = np.arange(n_patients) % 4
    time = np.round(rng.exponential(900, n_patients), 0) + 1
    event = (rng.random(n_patients) < 0.6).astype(int)
    if truth is not None:
        stage, time, event = truth["stage"], truth["time"], truth["event"]
    fold_of = rng.permutation(np.arange(n_patients) % folds)
    index = {p: i for i, p in enumerate(patients)}
    for task in tasks:
        for method, signal in methods.items():
            for k in range(folds):
                rows = []
                if splits is not None:
                    part = splits[task][(splits[task]["fold"] == k) & (splits[task]["role"] != "train")]
                    members = [(index[p], r) for p, r in zip(part["patient_id"], part["role"])]
                else:
                    val_pool = np.flatnonzero(fold_of == (k + 1) % folds)[:3]
                    members = [(i, "test") for i in np.flatnonzero(fold_of == k)] + [(i, "val") for i in val_pool]
                for i, role in members:
                    for s in range(slides_per_patient):
                        row = {"slide_id": f"{patients[i]}-S{s}", "patient_id": patients[i], "fold": k, "role": role,
                               "task": task, "method": method}
                        if task == "staging":
                            logits = rng.normal(size=4)
                            logits[stage[i]] += signal
                            prob = np.exp(logits) / np.exp(logits).sum()
                            row.update(y_true=stage[i], y_pred=int(prob.argmax()),
                                       **{f"prob_{j}": prob[j] for j in range(4)})
                        else:
                            row.update(time=time[i], event=event[i],
                                       risk=-signal * np.log(time[i]) + rng.normal(),
                                       **{f"hazard_{j}": 0.25 for j in range(4)})
                        rows.append(row)
                out = root / "train" / task / method / f"fold{k}"
                out.mkdir(parents=True, exist_ok=True)
                pd.DataFrame(rows).to_csv(out / "predictions.csv", index=False)
                info = {"protocol": "fixed_epochs", "class_names": CLASSES if task == "staging" else None}
                (out / "train.json").write_text(json.dumps(info))
    return {"patients": patients, "stage": stage, "time": time, "event": event, "fold": fold_of}


def evaluate_all(root: Path, methods, folds=3, bootstrap=50, tasks=("staging", "survival")):
    """The three evaluate steps through the command line, as the rules call them."""
    for task in tasks:
        for method in methods:
            metrics = []
            for k in range(folds):
                pred = root / "train" / task / method / f"fold{k}" / "predictions.csv"
                out = root / "eval" / task / method / f"fold{k}" / "metrics.json"
                assert main(["evaluate", "fold", "--predictions", str(pred), "--out", str(out),
                             "--bootstrap", str(bootstrap)]) == 0
                metrics.append(str(out))
            preds = [str(root / "train" / task / method / f"fold{k}" / "predictions.csv") for k in range(folds)]
            assert main(["evaluate", "method", "--metrics", *metrics, "--predictions", *preds,
                         "--out-dir", str(root / "eval" / task / method), "--bootstrap", str(bootstrap)]) == 0
        summaries = [str(root / "eval" / task / m / "summary.json") for m in methods]
        assert main(["evaluate", "compare", "--summaries", *summaries,
                     "--out", str(root / "eval" / task / "comparisons.csv")]) == 0


def patient_means(frame: pd.DataFrame, columns) -> pd.DataFrame:
    return frame.groupby("patient_id")[columns].mean().sort_index()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    truth = write_fake_run(root, slides_per_patient=2)
    evaluate_all(root, ["mean_mil", "abmil"])
    return root, truth


def test_fold_metrics_equal_sklearn_on_patient_means(run):
    root, _ = run
    pred = pd.read_csv(root / "train/staging/abmil/fold1/predictions.csv")
    result = read_json(root / "eval/staging/abmil/fold1/metrics.json")
    test = pred[pred.role == "test"]
    probs = patient_means(test, [f"prob_{j}" for j in range(4)])
    y_true = test.groupby("patient_id")["y_true"].first().sort_index().to_numpy()
    y_pred = probs.to_numpy().argmax(1)
    assert result["test"]["n"] == len(probs) and result["test"]["n_slides"] == len(test)
    m = result["metrics"]
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    assert m["auc"] == pytest.approx(roc_auc_score(y_true, probs.to_numpy(), multi_class="ovr"), abs=1e-12)
    assert result["value"] == m["macro_f1"] and result["class_names"] == CLASSES
    assert result["training"]["protocol"] == "fixed_epochs"
    lo, hi = result["test"]["ci"]["macro_f1"]["low"], result["test"]["ci"]["macro_f1"]["high"]
    assert lo <= m["macro_f1"] <= hi
    assert "val" in result and result["val"]["n"] == 3


def test_fold_c_index_equals_lifelines(run):
    root, _ = run
    for k in range(3):
        pred = pd.read_csv(root / f"train/survival/mean_mil/fold{k}/predictions.csv")
        test = pred[pred.role == "test"]
        per_patient = test.groupby("patient_id").agg(time=("time", "first"), event=("event", "first"),
                                                     risk=("risk", "mean"))
        expected = concordance_index(per_patient["time"], -per_patient["risk"], per_patient["event"])
        got = read_json(root / f"eval/survival/mean_mil/fold{k}/metrics.json")["metrics"]["c_index"]
        assert got == pytest.approx(expected, abs=1e-12)


def test_slide_level_scoring_uses_every_slide(tmp_path):
    write_fake_run(tmp_path, methods={"abmil": 1.0}, slides_per_patient=2, tasks=("survival",))
    pred_path = tmp_path / "train/survival/abmil/fold0/predictions.csv"
    result = E.evaluate_fold(pred_path, level="slide", n_bootstrap=0)
    test = pd.read_csv(pred_path).query("role == 'test'")
    assert result["test"]["n"] == len(test)
    assert result["value"] == pytest.approx(concordance_index(test["time"], -test["risk"], test["event"]))


def test_summary_mean_std_and_logrank(run):
    root, truth = run
    summary = read_json(root / "eval/survival/abmil/summary.json")
    values = [concordance_index(*_patient_survival(root, "abmil", k)) for k in range(3)]
    c = summary["metrics"]["c_index"]
    assert c["values"] == pytest.approx(values, abs=1e-12)
    assert c["mean"] == pytest.approx(np.mean(values)) and c["std"] == pytest.approx(np.std(values, ddof=1))
    assert c["ci_low"] <= c["mean"] <= c["ci_high"]
    # log-rank of the median split per fold, recomputed here with numpy and lifelines
    oof = pd.read_csv(root / "eval/survival/abmil/oof.csv")
    high = np.zeros(len(oof), dtype=bool)
    for k in range(3):
        in_fold = oof["fold"].to_numpy() == k
        high[in_fold] = oof["risk"].to_numpy()[in_fold] > np.median(oof["risk"].to_numpy()[in_fold])
    assert (oof["risk_group"] == "high").to_numpy().tolist() == high.tolist()
    ref = logrank_test(oof.time[high], oof.time[~high], oof.event[high], oof.event[~high])
    assert summary["km"]["logrank_p"] == pytest.approx(ref.p_value, rel=1e-10)
    assert summary["km"]["high"]["n"] + summary["km"]["low"]["n"] == len(truth["patients"])
    assert sorted(oof["patient_id"]) == sorted(truth["patients"])  # every patient tested once


def _patient_survival(root, method, k):
    pred = pd.read_csv(root / f"train/survival/{method}/fold{k}/predictions.csv").query("role == 'test'")
    g = pred.groupby("patient_id").agg(time=("time", "first"), event=("event", "first"), risk=("risk", "mean"))
    return g["time"], -g["risk"], g["event"]


def test_summary_bootstrap_is_seeded(run):
    root, _ = run
    files = [root / f"eval/staging/mean_mil/fold{k}/metrics.json" for k in range(3)]
    preds = [root / f"train/staging/mean_mil/fold{k}/predictions.csv" for k in range(3)]
    a, _, _ = E.summarise_method(files, preds, n_bootstrap=40, seed=3)
    b, _, _ = E.summarise_method(files, preds, n_bootstrap=40, seed=3)
    c, _, _ = E.summarise_method(files, preds, n_bootstrap=40, seed=4)
    assert a["metrics"]["auc"]["ci_low"] == b["metrics"]["auc"]["ci_low"]
    assert a["metrics"]["auc"]["ci_low"] != c["metrics"]["auc"]["ci_low"]


def test_comparisons_against_the_best_method(run):
    root, _ = run
    table = pd.read_csv(root / "eval/survival/comparisons.csv")
    row = table[(table.metric == "c_index") & (table.method == "mean_mil")].iloc[0]
    best = [concordance_index(*_patient_survival(root, "abmil", k)) for k in range(3)]
    other = [concordance_index(*_patient_survival(root, "mean_mil", k)) for k in range(3)]
    assert row["best_method"] == "abmil"  # the method with signal 2.5 beats the one with 0.3
    assert row["mean_diff"] == pytest.approx(np.mean(best) - np.mean(other))
    assert row["t_p"] == pytest.approx(stats.ttest_rel(best, other).pvalue)
    assert bool(row["primary"])


def _write(frame, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.drop(columns="patient_id"), "missing column"),
    (lambda f: f.assign(prob_0=f.prob_0 + 0.5), "do not sum to 1"),
    (lambda f: f.assign(y_true=7), "class indices"),
    (lambda f: f.assign(role="train"), "val or test"),
    (lambda f: f.assign(prob_1=np.nan), "empty values"),
    (lambda f: f.assign(role="val"), "no test rows"),
])
def test_bad_classification_predictions(tmp_path, damage, message):
    write_fake_run(tmp_path, methods={"abmil": 1.0}, tasks=("staging",))
    good = pd.read_csv(tmp_path / "train/staging/abmil/fold0/predictions.csv")
    path = _write(damage(good), tmp_path / "bad" / "predictions.csv")
    with pytest.raises(DataError, match=message):
        E.evaluate_fold(path, n_bootstrap=0, class_names=CLASSES)


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.assign(time=-1.0), "negative survival times"),
    (lambda f: f.assign(event=2), "0 \\(censored\\) or 1"),
    (lambda f: f.assign(role=np.where(np.arange(len(f)) == 0, "val", f.role), patient_id=f.patient_id.iloc[-1]),
     "both val and test"),
])
def test_bad_survival_predictions(tmp_path, damage, message):
    write_fake_run(tmp_path, methods={"abmil": 1.0}, tasks=("survival",))
    good = pd.read_csv(tmp_path / "train/survival/abmil/fold0/predictions.csv")
    path = _write(damage(good), tmp_path / "bad" / "predictions.csv")
    with pytest.raises(DataError, match=message):
        E.evaluate_fold(path, n_bootstrap=0)


def test_task_type_must_match_the_columns(tmp_path):
    write_fake_run(tmp_path, methods={"abmil": 1.0}, tasks=("survival",))
    with pytest.raises(DataError, match="survival task.*classification"):
        E.evaluate_fold(tmp_path / "train/survival/abmil/fold0/predictions.csv", task_type="classification")


def test_class_names_must_fit_the_probabilities(tmp_path):
    write_fake_run(tmp_path, methods={"abmil": 1.0}, tasks=("staging",))
    with pytest.raises(DataError, match="4 probability columns but 2 class names"):
        E.evaluate_fold(tmp_path / "train/staging/abmil/fold0/predictions.csv", class_names=["a", "b"], n_bootstrap=0)


def test_predictions_checked_against_the_split_file(tmp_path):
    truth = write_fake_run(tmp_path, methods={"abmil": 1.0}, tasks=("staging",))
    pred_path = tmp_path / "train/staging/abmil/fold0/predictions.csv"
    pred = pd.read_csv(pred_path)
    rows = [(p, k, "test" if f == k else "train") for k in range(3) for p, f in zip(truth["patients"], truth["fold"])]
    splits = pd.DataFrame(rows, columns=["patient_id", "fold", "role"])
    val = set(pred.loc[pred.role == "val", "patient_id"])
    splits.loc[(splits.fold == 0) & splits.patient_id.isin(val), "role"] = "val"
    splits.to_csv(tmp_path / "splits.csv", index=False)
    result = E.evaluate_fold(pred_path, n_bootstrap=0, splits=tmp_path / "splits.csv")
    assert result["splits"]["unpredicted_patients"] == {"val": [], "test": []}
    # a test patient with no prediction is recorded; one trained on (train in the split) is refused
    first_test = pred.loc[pred.role == "test", "patient_id"].iloc[0]
    _write(pred[pred.patient_id != first_test], tmp_path / "fewer" / "predictions.csv")
    fewer = E.evaluate_fold(tmp_path / "fewer" / "predictions.csv", n_bootstrap=0, class_names=CLASSES,
                            splits=tmp_path / "splits.csv")
    assert fewer["splits"]["unpredicted_patients"]["test"] == [first_test]
    splits.loc[(splits.fold == 0) & (splits.patient_id == first_test), "role"] = "train"
    splits.to_csv(tmp_path / "leaky.csv", index=False)
    with pytest.raises(DataError, match=f"{first_test} \\(test here, train in the splits\\)"):
        E.evaluate_fold(pred_path, n_bootstrap=0, splits=tmp_path / "leaky.csv")


def test_cli_error_leaves_no_metrics(tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "fold", "--predictions", str(tmp_path / "none.csv"), "--out", str(out)]) == 2
    assert "predictions not found" in capsys.readouterr().err and not out.exists()
