"""The whole DAG, synth to report, through Snakemake on a tiny synthetic cohort.

Checks what a user of `make demo` relies on: every stage runs from the Snakefile, the report
holds a row per method and task, the per-fold outputs are where the README says, a second
run has nothing to do, and `snakemake --lint` is clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
METHODS = ["mean_mil", "mamba_mil"]
TASKS = ["survival", "classification"]
FOLDS = 2
# one pytest-xdist worker runs every test of this module, so the tiny DAG runs once
pytestmark = pytest.mark.xdist_group("tiny_workflow")


def _snakemake(args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(cwd),
           "--configfile", str(REPO / "config" / "config.yaml"), str(HERE / "tiny_config.yaml"),
           "--config", f"cohort_file={HERE / 'tiny_cohort.yaml'}", "results=results", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny_workflow")
    proc = _snakemake(["--cores", "2"], workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return workdir / "results" / "tiny"


def test_report_has_every_method_and_task(tiny_run):
    long = pd.read_csv(tiny_run / "report" / "tables" / "long.csv")
    assert set(long["method"]) == set(METHODS)
    assert set(long["task"]) == set(TASKS)
    main = (tiny_run / "report" / "tables" / "main.md").read_text()
    for shown in ("MeanMIL", "MambaMIL"):
        assert shown in main
    for fig in ("folds_tiny_classification.png", "km_tiny_survival.pdf"):
        assert (tiny_run / "report" / "figures" / fig).stat().st_size > 0


def test_per_fold_outputs_and_provenance(tiny_run):
    sheet = pd.read_csv(tiny_run / "cohort" / "slides.csv")
    for task in TASKS:
        splits = pd.read_csv(tiny_run / "splits" / f"{task}.csv")
        assert set(splits["patient_id"]) == set(sheet["patient_id"])
        for method in METHODS:
            for fold in range(FOLDS):
                fold_dir = tiny_run / "train" / task / method / f"fold{fold}"
                preds = pd.read_csv(fold_dir / "predictions.csv")
                test_patients = set(splits.query("fold == @fold and role == 'test'")["patient_id"])
                assert set(preds.loc[preds["role"] == "test", "patient_id"]) == test_patients
                info = json.loads((fold_dir / "train.json").read_text())
                assert info["protocol"] == "fixed_epochs" and info["epochs_run"] == 2
                metrics = json.loads((tiny_run / "eval" / task / method / f"fold{fold}" / "metrics.json").read_text())
                assert metrics["fold"] == fold
    features = sorted((tiny_run / "features").rglob("*.h5"))
    assert len(features) == len(sheet)
    with h5py.File(features[0]) as fh:
        assert fh["features"].shape[1] == 1024
        assert fh.attrs["weights_sha256"] == "random-init"
        assert fh["coords"].shape[0] == fh["features"].shape[0]


def test_second_run_has_nothing_to_do(tiny_run):
    proc = _snakemake(["-n", "--cores", "2"], tiny_run.parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_lint_is_clean(tmp_path):
    proc = _snakemake(["--lint"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
