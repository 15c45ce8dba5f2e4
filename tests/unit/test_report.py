"""The report: tables, figures and the published comparison; and the rules split -> evaluate -> report."""

import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from mambapath import report as R
from mambapath import splits as S
from mambapath.cli import main

REPO = Path(__file__).resolve().parents[2]
SHARED_PUBLISHED = REPO.parent / "shared" / "published"

# the fake training outputs of test_evaluate.py (loaded by path: test folders are not packages)
_spec = importlib.util.spec_from_file_location("_evaluate_tests", Path(__file__).with_name("test_evaluate.py"))
_evaluate_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_evaluate_tests)
write_fake_run, evaluate_all = _evaluate_tests.write_fake_run, _evaluate_tests.evaluate_all

METHODS = ["mean_mil", "abmil"]
TASKS = {"staging": "classification", "survival": "survival"}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    write_fake_run(root, methods={"mean_mil": 0.3, "abmil": 2.5})
    evaluate_all(root, METHODS, bootstrap=30)
    return root


@pytest.fixture(scope="module")
def demo_report(evaluated):
    out = evaluated / "report_demo"
    assert main(["report", "--eval", f"demo={evaluated / 'eval'}", "--out-dir", str(out), "--tasks", *TASKS,
                 "--methods", *METHODS, "--extractor", "resnet50_trunc"]) == 0
    return out


def test_every_expected_output_is_written(demo_report):
    expected = R.expected_outputs(demo_report, ["demo"], TASKS, METHODS)
    files = [Path(p) for paths in expected.values() for p in paths]
    assert len(files) == len(set(files))
    for path in files:
        assert path.exists() and path.stat().st_size > 0, path
    written = {p for p in demo_report.rglob("*") if p.is_file()}
    assert written == set(files)  # nothing unlisted (no temporary files left behind either)
    for png in expected["figures_png"]:
        with Image.open(png) as image:
            assert image.size[0] > 200 and image.size[1] > 200
    for pdf in expected["figures_pdf"]:
        assert Path(pdf).read_bytes()[:5] == b"%PDF-"


def test_main_table_holds_mean_and_std_over_folds(evaluated, demo_report):
    table = pd.read_csv(demo_report / "tables" / "main.csv")
    assert table["Method"].tolist() == ["MeanMIL", "ABMIL"]
    for task, metric in (("staging", "macro_f1"), ("survival", "c_index")):
        column = f"{task} ({R.METRIC_LABELS[metric]}) | demo"
        for method, cell in zip(METHODS, table[column]):
            values = pd.read_csv(evaluated / "eval" / task / method / "folds.csv")[metric].to_numpy()
            mean, std = (float(x) for x in re.findall(r"[0-9.]+", cell))
            assert mean == pytest.approx(values.mean(), abs=5e-5)
            assert std == pytest.approx(values.std(ddof=1), abs=5e-5)
    markdown = (demo_report / "tables" / "main.md").read_text()
    abmil_row = next(line for line in markdown.splitlines() if line.startswith("| ABMIL"))
    assert abmil_row.count("**") == 4  # the strong method is best in both columns
    latex = (demo_report / "tables" / "main.tex").read_text()
    assert r"\textbf{" in latex and r"$\pm$" in latex and "±" not in latex
    assert r"\multicolumn{1}{c}{staging (macro-F1)}" in latex


def test_task_table_has_every_metric(demo_report):
    table = pd.read_csv(demo_report / "tables" / "staging.csv")
    assert [c.split(" (")[1].split(")")[0] for c in table.columns[2:]] == ["macro-F1", "F1", "accuracy", "AUC"]


def test_demo_page_says_nothing_published_matches_and_lists_candidates(demo_report):
    page = (demo_report / "index.md").read_text()
    assert "No published number matches cohort(s) demo" in page
    assert "| staging  | macro_f1 | abmil    | ABMIL          | BLCA, BRCA, LUAD" in page
    assert "![Kaplan-Meier survival](figures/km_demo_survival.png)" in page
    assert pd.read_csv(demo_report / "tables" / "published.csv").empty
    html = (demo_report / "index.html").read_text()
    assert html.count("<table") >= 5 and "figures/folds_demo_staging.png" in html


def _published_rows(method, task, cohort):
    """Rows of the project's copy of Pixel-Mamba Table 2, read with the csv module."""
    with open(R.PUBLISHED_DIR / "pixel_mamba_table2.csv") as fh:
        lines = [line for line in fh if not line.startswith("#")]
    return [r for r in csv.DictReader(lines) if (r["method"], r["task"], r["cohort"]) == (method, task, cohort)]


def test_tcga_cohort_is_set_beside_the_published_numbers(evaluated, tmp_path):
    cohort = R.load_cohort_results("tcga_blca", evaluated / "eval", list(TASKS), METHODS)
    R.build_report([cohort], tmp_path, extractor="resnet50_trunc")
    published = pd.read_csv(tmp_path / "tables" / "published.csv")
    rows = published[(published.method == "abmil") & (published.task == "staging")]
    expected = _published_rows("ABMIL", "staging", "BLCA")
    assert len(rows) == len(expected) == 3  # ResNet-50, GigaPath and CONCH features
    assert sorted(rows["published_mean"]) == sorted(float(r["mean"]) for r in expected)
    same = rows[rows.same_features]
    assert same["published_backbone"].tolist() == ["ResNet-50"]
    summary = pd.read_csv(evaluated / "eval" / "staging" / "abmil" / "folds.csv")["macro_f1"]
    assert same["reproduced_mean"].iloc[0] == pytest.approx(summary.mean())
    assert same["difference"].iloc[0] == pytest.approx(summary.mean() - 0.4100)
    assert "Reproduced beside published" in (tmp_path / "index.md").read_text()


def test_variants_are_set_beside_their_base_method():
    long = pd.DataFrame({
        "cohort": ["tcga_kirc", "tcga_kirc"], "task": ["survival", "survival"], "metric": ["c_index", "c_index"],
        "method": ["srmamba_mil", "abmil"], "paper_method": ["MambaMIL (SRMamba)", "ABMIL"],
        "mean": [0.70, 0.65], "std": [0.02, 0.03],
    })
    matched = R.match_published(long, R.load_published(), "uni")
    assert matched["method"].tolist() == ["srmamba_mil"]  # 2DMamba publishes MambaMIL on KIRC, no ABMIL
    assert matched["published_mean"].tolist() == [0.710] and matched["same_features"].tolist() == [True]
    assert R.paper_base_name("Pixel-Mamba (2.5x)") == "Pixel-Mamba"


@pytest.mark.parametrize("name, key", [("tcga_blca", "BLCA"), ("TCGA-NSCLC", "NSCLC"), ("BRCA", "BRCA"),
                                       ("demo", "DEMO")])
def test_canonical_cohort(name, key):
    assert R.canonical_cohort(name) == key


def test_published_copies_keep_the_shared_rows():
    if not SHARED_PUBLISHED.exists():
        pytest.skip(f"../shared/published not found: {SHARED_PUBLISHED}")
    for source in sorted(SHARED_PUBLISHED.glob("*.csv")):
        ours = (R.PUBLISHED_DIR / source.name).read_text().splitlines()
        theirs = source.read_text().splitlines()
        assert ours[1:] == theirs[1:], source.name  # the source line is rewritten, the rows are not
    assert (R.PUBLISHED_DIR / "README.md").exists()


def test_paper_names_cover_the_configured_methods():
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert all(m in R.PAPER_METHOD_NAMES for m in config["methods"])
    published = R.load_published()
    assert {"MeanMIL", "MaxMIL", "ABMIL", "TransMIL", "ILRA-MIL", "MambaMIL", "2DMambaMIL", "Pixel-Mamba"} <= set(
        published["method"])


# ----------------------------------------------------------------------------------------------
# The rules: split -> (fake training outputs) -> evaluate -> report, through Snakemake
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rules_split_evaluate_report(tmp_path):
    snakemake = shutil.which("snakemake", path=str(Path(sys.executable).parent))
    if snakemake is None:
        pytest.skip("snakemake is not installed beside this Python")
    n = 40
    rng = np.random.default_rng(0)
    sheet = pd.DataFrame({
        "slide_id": [f"P{i:03d}-S0" for i in range(n)], "patient_id": [f"P{i:03d}" for i in range(n)],
        "path": [f"P{i:03d}-S0.tiff" for i in range(n)], "stage": np.array(["I", "II", "III", "IV"])[np.arange(n) % 4],
        "os_days": rng.integers(30, 3000, n), "os_event": (np.arange(n) % 3 != 0).astype(int),
    })
    sheet.to_csv(tmp_path / "slides.csv", index=False)
    (tmp_path / "cohort.yaml").write_text(yaml.safe_dump(
        {"name": "tiny", "source": "sheet", "sheet": str(tmp_path / "slides.csv"), "tasks": list(TASKS)}))
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(cohort="tiny", cohort_file=str(tmp_path / "cohort.yaml"), results="results", methods=METHODS)
    config["splits"].update(folds=2, val_fraction=0.2, seed=0)
    config["report"].update(bootstrap=20)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    # training is not part of this test: its outputs are written beforehand, as train would,
    # on the folds the split rule will write (the same function, settings and seed)
    folds = {}
    specs = {"staging": S.TaskSpec("staging", "classification", label="stage", classes=["I", "II", "III", "IV"]),
             "survival": S.TaskSpec("survival", "survival", time="os_days", event="os_event")}
    for task, spec in specs.items():
        patients = S.patient_table(sheet, spec)
        folds[task] = S.make_splits(patients, folds=2, val_fraction=0.2, seed=0, classes=spec.classes or None,
                                    survival=spec.type == "survival")
    truth = {"stage": np.arange(n) % 4, "time": sheet["os_days"].to_numpy(), "event": sheet["os_event"].to_numpy()}
    write_fake_run(tmp_path / "results" / "tiny", methods={"mean_mil": 0.3, "abmil": 2.5}, n_patients=n, folds=2,
                   splits=folds, truth=truth)
    rules = REPO / "rules"
    (tmp_path / "Snakefile").write_text(
        f'configfile: "{tmp_path / "config.yaml"}"\n'
        + "".join(f'include: "{rules / name}.smk"\n' for name in ("common", "splits", "evaluate", "report"))
        + "\nrule all:\n    input:\n        REPORT_OUTPUTS,\n"
        + '        expand(f"{RESULTS}/splits/{{task}}.csv", task=COHORT.tasks),\n    default_target: True\n'
    )
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [snakemake, "-s", str(tmp_path / "Snakefile"), "--directory", str(tmp_path), "--cores", "2", "--quiet"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = tmp_path / "results" / "tiny"
    for task in TASKS:
        splits = pd.read_csv(results / "splits" / f"{task}.csv")
        assert splits.groupby("fold")["patient_id"].apply(lambda s: s.is_unique).all()
        assert sorted(splits.loc[splits.role == "test", "patient_id"]) == sorted(sheet["patient_id"])
    for path in R.expected_outputs(results / "report", ["tiny"], TASKS, METHODS).values():
        assert all(Path(tmp_path / p).exists() or Path(p).exists() for p in path)
    assert (results / "logs" / "report" / "report.log").exists()
    assert (results / "benchmarks" / "evaluate" / "survival" / "abmil" / "fold1.tsv").exists()
    summary = yaml.safe_load((results / "eval" / "survival" / "abmil" / "summary.json").read_text())
    assert summary["folds"] == [0, 1] and summary["bootstrap"]["resamples"] == 20
    html = subprocess.run(command[:-1] + ["--report", str(tmp_path / "report.html")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert html.returncode == 0, html.stderr[-3000:]
    assert (tmp_path / "report.html").stat().st_size > 10_000
