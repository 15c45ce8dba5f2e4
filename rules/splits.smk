# Rules of the splits stage: per task, patient-level stratified k-fold with an inner
# validation part per fold (`mambapath split`), written before any training starts so that
# a cohort unfit for the folds (too few patients, a class or event too rare, bad labels)
# fails here with the cause. The task's columns and classes and the splits section of the
# config become the command's flags (mambapath.splits.cli_flags).

from mambapath.splits import cli_flags as split_cli_flags


rule split:
    input:
        sheet=cohort_sheet_path(),
    output:
        splits=f"{RESULTS}/splits/{{task}}.csv",
    log:
        f"{RESULTS}/logs/split/{{task}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/split/{{task}}.tsv"
    params:
        flags=lambda wildcards: split_cli_flags(
            wildcards.task, config["tasks"][wildcards.task], config["splits"], COHORT.exclude
        ),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/cpu.yaml"
    shell:
        "mambapath split --sheet {input.sheet:q} {params.flags} --out {output.splits:q} > {log} 2>&1"
