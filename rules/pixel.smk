# Rules of the pixel stage: the slide images that pixel models (Pixel-Mamba) train on, one job
# per slide and magnification (`mambapath pixels`): the slide read whole at the method's
# magnification (from mpp, not a pyramid level) and the segment stage's tissue mask resampled to
# it, under results/<cohort>/pixels/<magnification>x/. A slide without tissue is written with
# status no_tissue, and training leaves it out (as it leaves out slides without tiles).
#
# The train rule asks for these files for every pixel method, at the magnification of the
# method's kwargs (mambapath.pixel_data.train_input_files, through mambapath.train.rule_inputs).

from mambapath.segment import fallback_mpp_arg

PIXEL = config.get("pixel", {})


wildcard_constraints:
    magnification=r"[0-9]+(\.[0-9]+)?",


rule pixels:
    input:
        slide=slide_path,
        segment=f"{RESULTS}/segment/{{slide}}/summary.json",
    output:
        image=f"{RESULTS}/pixels/{{magnification}}x/{{slide}}.png",
        tissue=f"{RESULTS}/pixels/{{magnification}}x/{{slide}}.tissue.png",
        summary=f"{RESULTS}/pixels/{{magnification}}x/{{slide}}.json",
    log:
        f"{RESULTS}/logs/pixels/{{magnification}}x/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pixels/{{magnification}}x/{{slide}}.tsv"
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
        segment_dir=lambda wildcards, input: os.path.dirname(input.segment),
        # for slides whose metadata has no mpp: the sheet's `mpp` column, else the cohort's mpp
        fallback_mpp=lambda wildcards: fallback_mpp_arg(COHORT, wildcards.slide),
    threads: 1
    resources:
        mem_mb=PIXEL.get("mem_mb", 4000),
        runtime=PIXEL.get("runtime_min", 30),
    conda:
        "../envs/cpu.yaml"
    shell:
        "mambapath pixels --slide {input.slide:q} --slide-id {wildcards.slide:q}"
        " --magnification {wildcards.magnification} --segment-dir {params.segment_dir:q}"
        " --out-dir {params.out_dir:q} --fallback-mpp {params.fallback_mpp} > {log} 2>&1"
