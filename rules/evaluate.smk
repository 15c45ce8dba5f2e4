# Rules of the evaluate stage: metrics per fold (`mambapath evaluate fold`), then per method
# across folds (`evaluate method`: mean +/- std, bootstrap intervals, Kaplan-Meier log-rank),
# then the methods of a task compared fold by fold (`evaluate compare`).

REPORT = config["report"]
FOLDS = list(range(config["splits"]["folds"]))
TRAIN_DIR = f"{RESULTS}/train/{{task}}/{{method}}/fold{{fold}}"
EVAL_DIR = f"{RESULTS}/eval"


rule evaluate_fold:
    input:
        predictions=f"{TRAIN_DIR}/predictions.csv",
        train_info=f"{TRAIN_DIR}/train.json",
        splits=f"{RESULTS}/splits/{{task}}.csv",
    output:
        metrics=f"{EVAL_DIR}/{{task}}/{{method}}/fold{{fold}}/metrics.json",
    log:
        f"{RESULTS}/logs/evaluate/{{task}}/{{method}}/fold{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{task}}/{{method}}/fold{{fold}}.tsv"
    params:
        task_type=lambda wildcards: config["tasks"][wildcards.task]["type"],
        metric=lambda wildcards: config["tasks"][wildcards.task].get("metric", ""),
        bootstrap=REPORT["bootstrap"],
        seed=REPORT.get("seed", 0),
        ci_level=REPORT.get("ci_level", 0.95),
        level=REPORT.get("level", "patient"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/cpu.yaml"
    shell:
        "mambapath evaluate fold --predictions {input.predictions:q} --splits {input.splits:q}"
        " --task-type {params.task_type} --primary-metric={params.metric:q} --level {params.level}"
        " --bootstrap {params.bootstrap} --seed {params.seed} --ci-level {params.ci_level}"
        " --out {output.metrics:q} > {log} 2>&1"


rule evaluate_method:
    input:
        metrics=expand(f"{EVAL_DIR}/{{task}}/{{method}}/fold{{fold}}/metrics.json", fold=FOLDS, allow_missing=True),
        predictions=expand(f"{TRAIN_DIR}/predictions.csv", fold=FOLDS, allow_missing=True),
    output:
        summary=f"{EVAL_DIR}/{{task}}/{{method}}/summary.json",
        folds=f"{EVAL_DIR}/{{task}}/{{method}}/folds.csv",
        oof=f"{EVAL_DIR}/{{task}}/{{method}}/oof.csv",
    log:
        f"{RESULTS}/logs/evaluate/{{task}}/{{method}}/summary.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{task}}/{{method}}/summary.tsv"
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
        bootstrap=REPORT["bootstrap"],
        seed=REPORT.get("seed", 0),
        ci_level=REPORT.get("ci_level", 0.95),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=15,
    conda:
        "../envs/cpu.yaml"
    shell:
        "mambapath evaluate method --metrics {input.metrics:q} --predictions {input.predictions:q}"
        " --bootstrap {params.bootstrap} --seed {params.seed} --ci-level {params.ci_level}"
        " --out-dir {params.out_dir:q} > {log} 2>&1"


rule compare_methods:
    input:
        summaries=expand(f"{EVAL_DIR}/{{task}}/{{method}}/summary.json", method=config["methods"], allow_missing=True),
    output:
        comparisons=f"{EVAL_DIR}/{{task}}/comparisons.csv",
    log:
        f"{RESULTS}/logs/evaluate/{{task}}/comparisons.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{task}}/comparisons.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../envs/cpu.yaml"
    shell:
        "mambapath evaluate compare --summaries {input.summaries:q} --out {output.comparisons:q} > {log} 2>&1"
