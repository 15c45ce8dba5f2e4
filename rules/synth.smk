# Rules of the synth stage: the demo's synthetic cohort (`mambapath synth`). One job writes
# every slide, its ground truth and the cohort sheet; slide ids are a function of the
# cohort file (mambapath.synth.synth_slide_ids), so the DAG is known before the job runs.

import os

if COHORT.source == "synth":

    rule synth:
        input:
            cohort=str(COHORT.file),
        output:
            slides=expand(f"{RESULTS}/slides/{{slide}}.tiff", slide=SLIDES),
            masks=expand(f"{RESULTS}/synth/{{slide}}_mask.png", slide=SLIDES),
            sheet=f"{RESULTS}/cohort/slides.csv",
        log:
            f"{RESULTS}/logs/synth.log",
        benchmark:
            f"{RESULTS}/benchmarks/synth.tsv"
        params:
            # results/<cohort>: the folder above cohort/slides.csv
            out_dir=lambda wildcards, output: os.path.dirname(os.path.dirname(output.sheet)),
        threads: 2
        resources:
            mem_mb=3000,
            runtime=30,
        conda:
            "../envs/cpu.yaml"
        shell:
            "mambapath synth --cohort-file {input.cohort:q} --out-dir {params.out_dir:q} --workers {threads}"
            " > {log} 2>&1"
