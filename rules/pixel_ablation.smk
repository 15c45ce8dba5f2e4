# Pixel-Mamba ablations (the paper's Tables 3-6 and 9, all on survival): Pixel-Mamba with one
# switch changed (fixed vs hierarchical token scale, scan window, magnification, Region Fusion
# alpha). Each variant is an ordinary method, config/methods/pixel_mamba-<variant>.yaml, so the
# pixels, train, evaluate_fold and evaluate_method rules run it like any other (a new
# magnification gets its own pixels jobs); the config's pixel.ablations lists the methods of each
# ablation, and one comparison table per ablation and task compares them fold by fold.
# Not part of rule all:
#     snakemake --cores 2 pixel_ablations
# Needs EVAL_DIR from rules/evaluate.smk (include this file after it).

PIXEL_ABLATIONS = config.get("pixel", {}).get("ablations", {})
PIXEL_ABLATION_TASKS = [t for t in config.get("pixel", {}).get("ablation_tasks", ["survival"]) if t in COHORT.tasks]


rule pixel_ablation_table:
    input:
        summaries=lambda wildcards: expand(
            f"{EVAL_DIR}/{wildcards.task}/{{method}}/summary.json", method=PIXEL_ABLATIONS[wildcards.ablation]
        ),
    output:
        comparisons=f"{EVAL_DIR}/{{task}}/pixel_ablation/{{ablation}}.csv",
    log:
        f"{RESULTS}/logs/evaluate/{{task}}/pixel_ablation/{{ablation}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{task}}/pixel_ablation/{{ablation}}.tsv"
    wildcard_constraints:
        ablation="|".join(PIXEL_ABLATIONS) or "no-ablation-configured",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../envs/cpu.yaml"
    shell:
        "mambapath evaluate compare --summaries {input.summaries:q} --out {output.comparisons:q} > {log} 2>&1"


rule pixel_ablations:
    input:
        expand(f"{EVAL_DIR}/{{task}}/pixel_ablation/{{ablation}}.csv", task=PIXEL_ABLATION_TASKS,
               ablation=list(PIXEL_ABLATIONS)),
