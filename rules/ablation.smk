# Tile-order ablation: one sequence model trained and evaluated under each tile order
# (raster, snake, column, hilbert), then compared fold by fold.
#
# A model takes part when config/methods/ holds one yaml per order, named <base>-<order>.yaml
# (mambaback-raster.yaml, ..., mambaback-hilbert.yaml); each is an ordinary method, so the
# train, evaluate_fold and evaluate_method rules run it like any other. Not part of rule all:
#     snakemake --cores 2 tile_order_ablation
# Needs EVAL_DIR from rules/evaluate.smk (include this file after it).

from pathlib import Path

from mambapath.order import ORDERS


# base names that have a method yaml for every tile order
METHOD_STEMS = {p.stem for p in (Path(workflow.basedir) / "config" / "methods").glob("*.yaml")}
ABLATION_BASES = sorted(
    base
    for base in {stem.rsplit("-", 1)[0] for stem in METHOD_STEMS if "-" in stem}
    if all(f"{base}-{order}" in METHOD_STEMS for order in ORDERS)
)


rule compare_tile_orders:
    input:
        summaries=lambda wildcards: expand(
            f"{EVAL_DIR}/{wildcards.task}/{{method}}/summary.json",
            method=[f"{wildcards.base}-{order}" for order in ORDERS],
        ),
    output:
        comparisons=f"{EVAL_DIR}/{{task}}/tile_order/{{base}}.csv",
    log:
        f"{RESULTS}/logs/evaluate/{{task}}/tile_order/{{base}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{task}}/tile_order/{{base}}.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../envs/cpu.yaml"
    shell:
        "mambapath evaluate compare --summaries {input.summaries:q} --out {output.comparisons:q} > {log} 2>&1"


rule tile_order_ablation:
    input:
        expand(f"{EVAL_DIR}/{{task}}/tile_order/{{base}}.csv", task=COHORT.tasks, base=ABLATION_BASES),
