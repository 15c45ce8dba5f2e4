"""`snakemake -n --config cohort=tcga_*`: the whole DAG, from download to report, for every TCGA cohort."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TCGA_COHORTS = sorted(p.stem for p in (REPO / "config" / "cohorts").glob("tcga_*.yaml"))
#: the stages a TCGA run goes through, in order (a rule name equals the stage or starts with it)
STAGES = ["download", "segment", "tile", "extract", "split", "train", "evaluate", "report"]


def dry_run(*args: str) -> str:
    pytest.importorskip("snakemake", reason="snakemake is not importable")
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> number of jobs."""
    block = output.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.MULTILINE)
            if m.group(1) != "total"}


def test_every_paper_cohort_has_a_config():
    assert TCGA_COHORTS == ["tcga_blca", "tcga_brca", "tcga_brca_idc_ilc", "tcga_kirc", "tcga_kirp", "tcga_luad",
                            "tcga_nsclc", "tcga_stad", "tcga_ucec"]


def trimmed_cohort_file(cohort: str, keep: int, folder: Path) -> tuple[Path, list[str]]:
    """The cohort's own yaml with all but its first ``keep`` slides excluded (a DAG of a few seconds)."""
    config = yaml.safe_load((REPO / "config" / "cohorts" / f"{cohort}.yaml").read_text())
    config["sheet"] = str(REPO / config["sheet"])
    slides = pd.read_csv(config["sheet"])["slide_id"].tolist()
    config["exclude"] = slides[keep:]
    path = folder / f"{cohort}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, slides[:keep]


@pytest.mark.slow
@pytest.mark.parametrize("cohort", TCGA_COHORTS)
def test_dry_run_shows_the_whole_dag(cohort, tmp_path):
    cohort_file, kept = trimmed_cohort_file(cohort, 12, tmp_path)
    counts = job_counts(dry_run("--config", f"cohort={cohort}", f"cohort_file={cohort_file}",
                                f"results={tmp_path}/results"))
    for stage in STAGES:
        assert any(rule == stage or rule.startswith(stage) for rule in counts), (stage, sorted(counts))
    assert counts["download"] == len(kept)  # one download per slide


@pytest.mark.slow
def test_full_dry_run_tcga_blca(tmp_path):
    counts = job_counts(dry_run("--config", "cohort=tcga_blca", f"results={tmp_path}/results"))
    for stage in STAGES:
        assert any(rule == stage or rule.startswith(stage) for rule in counts), (stage, sorted(counts))
    sheet = pd.read_csv(REPO / "src" / "mambapath" / "data" / "cohorts" / "tcga_blca.csv")
    assert counts["download"] == len(sheet) == 457  # one download per slide of the shipped table


@pytest.mark.slow
def test_slides_already_on_disk_are_not_downloaded(tmp_path):
    """`source: sheet` + slides_dir: GDC-named files in a folder replace the download rule."""
    slides_dir = tmp_path / "slides"
    slides_dir.mkdir()
    cohort_file, kept = trimmed_cohort_file("tcga_kirp", 8, tmp_path)
    config = yaml.safe_load(cohort_file.read_text())
    config.update(source="sheet", slides_dir=str(slides_dir))
    cohort_file.write_text(yaml.safe_dump(config))
    for slide_id in kept:
        (slides_dir / f"{slide_id}.svs").touch()  # the GDC file name
    counts = job_counts(dry_run("--config", "cohort=tcga_kirp", f"cohort_file={cohort_file}",
                                f"results={tmp_path}/results"))
    assert "download" not in counts
    assert counts["segment"] == len(kept)  # a missing slide file would have stopped the dry run
