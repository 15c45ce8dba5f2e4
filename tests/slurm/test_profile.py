"""profiles/slurm without a cluster: the resources it plans for a job's first attempt."""

from __future__ import annotations

from workflow_runs import (
    SLURM_PROFILE,
    SNAKEMAKE,
    job_resources,
    local_env,
    profile_resource,
    run_snakemake,
    slurm_profile,
    tiny_workflow_args,
)


def test_profile_asks_for_the_rules_resources_on_the_first_attempt(tmp_path):
    """The profile restates mem_mb and runtime of the per-slide rules (to scale them by attempt);
    on attempt 1 a dry run through it must plan exactly what the rules themselves declare."""
    plain = run_snakemake([*SNAKEMAKE, *tiny_workflow_args(), "--cores", "2", "-n"], tmp_path / "plain",
                          local_env(), timeout_s=300).check()
    profiled = run_snakemake([*SNAKEMAKE, *tiny_workflow_args(), "--profile", str(SLURM_PROFILE), "-n"],
                             tmp_path / "profiled", local_env(), timeout_s=300).check()
    declared, planned = job_resources(plain.output), job_resources(profiled.output)
    for rule in slurm_profile()["set-resources"]:
        assert rule in declared, f"the tiny workflow has no {rule} job, so the profile's values for it go unchecked"
        assert planned[rule] == declared[rule], (
            f"profiles/slurm/config.yaml set-resources {rule}: first attempt (mem_mb, runtime) {planned[rule]}, "
            f"the rule declares {declared[rule]}: update the profile to the rule's values")
        for name in ("mem_mb", "runtime"):
            tries = [profile_resource(rule, name, attempt) for attempt in (1, 2, 3)]
            assert tries[0] < tries[1] < tries[2], f"set-resources {rule}: {name} does not grow with attempt: {tries}"
