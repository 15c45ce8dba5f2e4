"""Running snakemake for the SLURM tests, and reading what a run printed.

Shared by test_profile.py and test_slurm.py (imported as a sibling module: pytest puts this
folder on sys.path for the test modules in it).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SNAKEFILE = REPO / "Snakefile"
LOCAL_PROFILE = REPO / "profiles" / "local"
SLURM_PROFILE = REPO / "profiles" / "slurm"
#: the tiny workflow: tests/workflow's settings on 6 synthetic patients, one task, one method, two folds
TINY_CONFIGS = [REPO / "config" / "config.yaml", REPO / "tests" / "workflow" / "tiny_config.yaml", HERE / "config.yaml"]
TINY_COHORT = HERE / "cohort.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def tiny_workflow_args() -> list[str]:
    """The pipeline on the tiny cohort, results under the working directory's results/."""
    return ["--snakefile", str(SNAKEFILE), "--configfile", *map(str, TINY_CONFIGS),
            "--config", f"cohort_file={TINY_COHORT}", "results=results"]


def local_env() -> dict[str, str]:
    """The environment the rules' `mambapath` command is found in."""
    env = dict(os.environ)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '')}"
    return env


@dataclass
class Run:
    command: list[str]
    returncode: int
    output: str  # stdout and stderr together
    seconds: float

    def check(self) -> "Run":
        assert self.returncode == 0, f"{' '.join(self.command)} failed ({self.returncode}):\n{self.output[-6000:]}"
        return self


class BackgroundRun:
    """A snakemake run started now and collected later (its output goes to a file)."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str]):
        cwd.mkdir(parents=True, exist_ok=True)
        self.command = command
        self.output_file = cwd / "snakemake.out"
        self._start = time.monotonic()
        with open(self.output_file, "w") as out:
            self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait(self, timeout_s: float) -> Run:
        try:
            returncode = self.process.wait(timeout=max(1.0, timeout_s - (time.monotonic() - self._start)))
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{' '.join(self.command)} ran longer than {timeout_s:.0f} s:\n"
                        f"{self.output_file.read_text(errors='replace')[-6000:]}")
        return Run(self.command, returncode, self.output_file.read_text(errors="replace"),
                   time.monotonic() - self._start)

    def stop(self) -> None:
        """End the run by its pid (snakemake cancels its SLURM jobs on SIGTERM)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_snakemake(command: list[str], cwd: Path, env: dict[str, str], timeout_s: float) -> Run:
    return BackgroundRun(command, cwd, env).wait(timeout_s)


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table snakemake prints before running: rule -> number of jobs."""
    block = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.MULTILINE)}
    counts.pop("total", None)
    return counts


def job_resources(output: str) -> dict[str, set[tuple[int, int]]]:
    """Per rule, the (mem_mb, runtime) pairs of its jobs as printed before each job runs."""
    found: dict[str, set[tuple[int, int]]] = {}
    rule = None
    for line in output.splitlines():
        if match := re.match(r"^\s*rule (\w+):$", line):
            rule = match.group(1)
        elif rule and (match := re.match(r"^\s*resources: (.*)$", line)):
            values = dict(item.split("=", 1) for item in match.group(1).split(", ") if "=" in item)
            if "mem_mb" in values and "runtime" in values:
                found.setdefault(rule, set()).add((int(values["mem_mb"]), int(values["runtime"])))
            rule = None
    return found


@dataclass(frozen=True)
class Submission:
    job: str  # snakemake's job id (a number, or a uuid for a group job)
    slurm_job_id: str
    log: Path


def submissions(output: str) -> list[Submission]:
    """Every `sbatch` the executor plugin reported, in order."""
    return [Submission(m.group(1), m.group(2), Path(m.group(3))) for m in re.finditer(
        r"Job (\S+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.", output)]


def slurm_run_id(output: str) -> str:
    """The run id the plugin names every job of one run by (sbatch --job-name)."""
    match = re.search(r"SLURM run ID: (\S+)", output)
    assert match, "the SLURM executor did not report its run id"
    return match.group(1)


def slurm_profile() -> dict:
    return yaml.safe_load((SLURM_PROFILE / "config.yaml").read_text())


def profile_resource(rule: str, name: str, attempt: int) -> int:
    """A set-resources expression of the SLURM profile, evaluated for one attempt."""
    expression = slurm_profile()["set-resources"][rule][name]
    return int(eval(str(expression), {"__builtins__": {}}, {"attempt": attempt}))


def expected_group_jobs(slide_count: int, group: str) -> int:
    """How many SLURM jobs the profile's group-components make of one group's per-slide pieces."""
    return math.ceil(slide_count / int(slurm_profile()["group-components"][group]))
