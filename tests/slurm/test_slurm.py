"""profiles/slurm against a real single-node Slurm (started by conftest.py).

The test node has 2 CPUs and one GPU declared as a generic resource, so the runs pass
`--cores 2` (the most one job may ask for there; the profile's 8 is for real nodes) and
`--slurm-init-seconds-before-status-checks 2` (the plugin's 40 s wait before its first look
at a job is made for busy clusters); everything else comes from the profile unchanged. The
account comes from MAMBAPATH_SLURM_ACCOUNT, as on a cluster, and Slurm checks it.

Time: the retry workflow starts first and runs in the background while the local run keeps
the CPUs busy and the cluster idle; the SLURM run of the tiny workflow starts from the
local run's synthetic slides (copied), as a real cohort starts from slides on disk.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from workflow_runs import (
    HERE,
    BackgroundRun,
    LOCAL_PROFILE,
    SLURM_PROFILE,
    SNAKEMAKE,
    expected_group_jobs,
    job_counts,
    local_env,
    profile_resource,
    run_snakemake,
    slurm_profile,
    slurm_run_id,
    submissions,
    tiny_workflow_args,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(1800)]

NODE_CORES = 2
CLUSTER_ARGS = ["--cores", str(NODE_CORES), "--slurm-init-seconds-before-status-checks", "2"]
RETRY_SNAKEFILE = HERE / "retry" / "Snakefile"
SACCT_FIELDS = ["JobIDRaw", "JobName", "Partition", "Account", "State", "AllocTRES", "ReqMem", "Timelimit", "Comment"]


def sacct(cluster, run_id: str) -> dict[str, dict[str, str]]:
    """Slurm's accounting records of one run's jobs (allocations only, no steps): job id -> fields."""
    out = cluster.run("sacct", "-X", "--parsable2", "--noheader", f"--name={run_id}",
                      f"--format={','.join(SACCT_FIELDS)}").stdout
    records = [dict(zip(SACCT_FIELDS, line.split("|"))) for line in out.splitlines() if line.strip()]
    return {r["JobIDRaw"]: r for r in records}


def minutes(timelimit: str) -> int:
    """sacct's [D-]HH:MM:SS in minutes."""
    days, _, clock = timelimit.rpartition("-")
    hours, mins, secs = (int(x) for x in clock.split(":"))
    return int(days or 0) * 24 * 60 + hours * 60 + mins + math.ceil(secs / 60)


def tres(alloc: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in alloc.split(",") if "=" in item)


def rules_of_job(submission, groups: dict[str, str], counts: dict[str, int]) -> set[str]:
    """The rules one sbatch job ran, from its SLURM log's folder (rule_<rule>/... or group_<group>_...)."""
    top = submission.log.parts[submission.log.parts.index("slurm_logs") + 1]
    if top.startswith("rule_"):
        return {top.removeprefix("rule_")}
    group = next(g for g in set(groups.values()) if top.startswith(f"group_{g}_"))
    return {rule for rule, g in groups.items() if g == group and rule in counts}


# --- outputs of the two runs -----------------------------------------------------------------

def _h5_content(path: Path) -> dict:
    content = {}
    with h5py.File(path, "r") as h5:
        content["attrs"] = {k: np.asarray(v).tolist() for k, v in h5.attrs.items()}
        h5.visititems(lambda name, obj: content.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return content


def _same_h5(a: Path, b: Path) -> bool:
    ca, cb = _h5_content(a), _h5_content(b)
    if ca.keys() != cb.keys() or ca["attrs"] != cb["attrs"]:
        return False
    return all(np.array_equal(ca[k], cb[k]) for k in ca if k != "attrs")


def final_outputs(results: Path) -> list[Path]:
    """The run's tables and feature files (relative paths): what a user keeps of a run."""
    patterns = ["cohort/*.csv", "tiles/*/*.h5", "features/*/*/*.h5", "splits/*.csv",
                "train/*/*/fold*/predictions.csv", "eval/**/*.json", "eval/**/*.csv", "report/tables/*"]
    return sorted({p.relative_to(results) for pattern in patterns for p in results.glob(pattern)})


def assert_same_outputs(local: Path, slurm: Path) -> int:
    local_files, slurm_files = final_outputs(local), final_outputs(slurm)
    assert local_files == slurm_files, set(local_files) ^ set(slurm_files)
    assert any(f.suffix == ".h5" and f.parts[0] == "features" for f in local_files), local_files
    assert any(f.parts[0] == "report" for f in local_files), local_files
    different = []
    for rel in local_files:
        a, b = local / rel, slurm / rel
        if rel.suffix == ".h5":
            same = _same_h5(a, b)
        elif rel.suffix == ".json":
            same = json.loads(a.read_text()) == json.loads(b.read_text())
        else:
            same = a.read_bytes() == b.read_bytes()
        if not same:
            different.append(str(rel))
    assert not different, f"the SLURM run wrote different content: {different}"
    return len(local_files)


# --- tests -----------------------------------------------------------------------------------

@dataclass
class RetryRun:
    workdir: Path
    run: BackgroundRun


@pytest.fixture(scope="module")
def retry_run(slurm_cluster, tmp_path_factory):
    """retry/Snakefile through the profile, started in the background: its job holds more
    memory than the profile grants a tile job on attempt 1 and less than on attempt 2."""
    first_mb, second_mb = (profile_resource("tile", "mem_mb", attempt) for attempt in (1, 2))
    hold_mb = first_mb + 500
    # the job step also holds a snakemake process (~100 MB) besides the held block
    assert hold_mb + 600 < second_mb, "profiles/slurm tile mem_mb no longer leaves room for the retry test"
    workdir = tmp_path_factory.mktemp("retry")
    run = BackgroundRun(
        slurm_cluster.command([*SNAKEMAKE, "--snakefile", str(RETRY_SNAKEFILE), "--profile", str(SLURM_PROFILE),
                               *CLUSTER_ARGS, "--config", f"hold_mb={hold_mb}"], cwd=workdir),
        workdir, slurm_cluster.env(MAMBAPATH_SLURM_ACCOUNT=slurm_cluster.account))
    yield RetryRun(workdir, run)
    run.stop()


def test_tiny_workflow_through_slurm_matches_the_local_run(slurm_cluster, retry_run, tmp_path, record_property):
    # retry_run is requested to start it now: it runs while the local run below keeps the CPUs busy
    local = run_snakemake([*SNAKEMAKE, "--profile", str(LOCAL_PROFILE), *tiny_workflow_args()],
                          tmp_path / "local", local_env(), timeout_s=900).check()
    slurm_dir = tmp_path / "slurm"
    # the same synthetic slides (mtimes kept, so the synth job counts as done)
    for folder in ("slides", "synth", "cohort"):
        shutil.copytree(tmp_path / "local" / "results" / "tiny_slurm" / folder,
                        slurm_dir / "results" / "tiny_slurm" / folder)
    slurm = run_snakemake(
        slurm_cluster.command([*SNAKEMAKE, "--profile", str(SLURM_PROFILE), *tiny_workflow_args(), *CLUSTER_ARGS,
                               "--slurm-keep-successful-logs"], cwd=slurm_dir),
        slurm_dir, slurm_cluster.env(MAMBAPATH_SLURM_ACCOUNT=slurm_cluster.account), timeout_s=1500).check()

    counts = job_counts(slurm.output)
    rule_jobs = sum(n for rule, n in counts.items() if rule != "all")
    sent = submissions(slurm.output)
    print(f"tiny workflow ({rule_jobs} jobs): local run {local.seconds:.0f} s, "
          f"SLURM run {slurm.seconds:.0f} s ({len(sent)} sbatch jobs)")
    record_property("local_run_s", round(local.seconds, 1))
    record_property("slurm_run_s", round(slurm.seconds, 1))

    # grouping: segment + tile of up to 8 slides per job, extraction likewise, evaluation in one job;
    # every other rule job on its own, and nothing submitted twice
    retried = [s for s in sent if [t.job for t in sent].count(s.job) > 1]
    assert not retried, "jobs failed and were retried; the first attempt's SLURM log:\n" + (
        retried[0].log.read_text()[-4000:] if retried else "")
    assert "synth" not in counts, "the SLURM run should have started from the copied synthetic slides"
    slides = counts["segment"]
    expected = (counts["split"] + counts["train"] + expected_group_jobs(slides, "slide_prep")
                + expected_group_jobs(slides, "slide_features") + 1)
    assert len(sent) == expected < rule_jobs, [s.job for s in sent]

    # each job went through sbatch (slurmctld's batch submission RPC) and ran on the node: its
    # SLURM log (written there) has the snakemake inside the job finish every rule it holds
    ctld_log = (slurm_cluster.log_dir / "slurmctld.log").read_text()
    groups = slurm_profile()["groups"]
    for s in sent:
        assert f"_slurm_rpc_submit_batch_job: JobId={s.slurm_job_id} " in ctld_log, s
        log = s.log.read_text()
        for rule in rules_of_job(s, groups, counts):
            assert f"(Rule: {rule})" in log, (rule, s.log)
        assert re.search(r"^(\d+) of \1 steps \(100%\) done$", log, re.MULTILINE), s.log

    # Slurm's accounting has every job of this run: completed, on the given account, the
    # extraction (gpu: 1 in config.yaml) on the gpu partition with a GPU, the rest on cpu
    records = sacct(slurm_cluster, slurm_run_id(slurm.output))
    assert set(records) == {s.slurm_job_id for s in sent}
    assert {r["State"] for r in records.values()} == {"COMPLETED"}, records
    assert {r["Account"] for r in records.values()} == {slurm_cluster.account}
    by_group = {}
    for record in records.values():
        gpus = tres(record["AllocTRES"]).get("gres/gpu")
        if record["Comment"].startswith("rule_slide_features_"):
            assert (record["Partition"], gpus) == ("gpu", "1"), record
        else:
            assert (record["Partition"], gpus) == ("cpu", None), record
        for group in ("slide_prep", "slide_features", "evaluation"):
            if record["Comment"].startswith(f"rule_{group}_"):
                by_group.setdefault(group, []).append(record)
    assert sorted(by_group) == ["evaluation", "slide_features", "slide_prep"], records

    # a group job runs as many slides side by side as --cores allows and asks for the summed
    # runtime of its rounds (extraction: one GPU per job, so one slide at a time)
    prep = by_group["slide_prep"][0]
    assert int(tres(prep["AllocTRES"])["cpu"]) == NODE_CORES, prep
    per_slide = profile_resource("segment", "runtime", 1) + profile_resource("tile", "runtime", 1)
    assert minutes(prep["Timelimit"]) == math.ceil(slides / NODE_CORES) * per_slide, prep
    features = by_group["slide_features"][0]
    assert minutes(features["Timelimit"]) == slides * profile_resource("extract", "runtime", 1), features

    compared = assert_same_outputs(tmp_path / "local" / "results" / "tiny_slurm",
                                   slurm_dir / "results" / "tiny_slurm")
    record_property("files_compared", compared)


def test_job_killed_by_slurm_is_retried_with_more_memory(slurm_cluster, retry_run):
    """Slurm kills attempt 1 of retry/Snakefile's job for its memory, the profile's retries
    resubmit it with attempt 2's memory and time, and the run completes."""
    run = retry_run.run.wait(timeout_s=600).check()
    sent = submissions(run.output)
    assert len(sent) == 2 and sent[0].job == sent[1].job, sent  # one job, two attempts
    assert "Trying to restart job" in run.output
    records = sacct(slurm_cluster, slurm_run_id(run.output))
    first, second = records[sent[0].slurm_job_id], records[sent[1].slurm_job_id]
    assert (first["State"], second["State"]) == ("FAILED", "COMPLETED"), records
    # attempt 2 asked for more memory and time, as the profile's expressions say
    assert [r["ReqMem"] for r in (first, second)] == [
        f"{profile_resource('tile', 'mem_mb', attempt)}M" for attempt in (1, 2)], records
    assert [minutes(r["Timelimit"]) for r in (first, second)] == [
        profile_resource("tile", "runtime", attempt) for attempt in (1, 2)], records
    # Slurm, not the job, ended attempt 1: its step was killed for exceeding the job's memory
    assert "exceeded memory limit" in sent[0].log.read_text(), sent[0].log.read_text()[-3000:]
    assert (retry_run.workdir / "tile.done").read_text().strip() == sent[1].slurm_job_id
