# Rules of the segment stage: tissue mask, QuPath GeoJSON, QC overlay and summary per slide
# (`mambapath segment`). A slide without tissue is a recorded skip (status no_tissue), not a
# failure; a slide that cannot be read fails its own job only (run with --keep-going).

import os

from mambapath.segment import fallback_mpp_arg

SEGMENT = config["segment"]


rule segment:
    input:
        slide=slide_path,
    output:
        mask=f"{RESULTS}/segment/{{slide}}/mask.png",
        contours=f"{RESULTS}/segment/{{slide}}/contours.geojson",
        overlay=f"{RESULTS}/segment/{{slide}}/overlay.png",
        summary=f"{RESULTS}/segment/{{slide}}/summary.json",
    log:
        f"{RESULTS}/logs/segment/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/segment/{{slide}}.tsv"
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
        # for slides whose metadata has no mpp: the sheet's `mpp` column, else the cohort's mpp
        fallback_mpp=lambda wildcards: fallback_mpp_arg(COHORT, wildcards.slide),
        method=SEGMENT.get("method", "otsu"),
        seg_mpp=SEGMENT["seg_mpp"],
        min_saturation=SEGMENT["min_saturation"],
        min_area_um2=SEGMENT["min_area_um2"],
        min_hole_um2=SEGMENT["min_hole_um2"],
        close_um=SEGMENT.get("close_um", 32.0),
        pen="--remove-pen" if SEGMENT.get("remove_pen", True) else "--no-remove-pen",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/cpu.yaml"
    shell:
        "mambapath segment --slide {input.slide:q} --slide-id {wildcards.slide:q} --out-dir {params.out_dir:q}"
        " --fallback-mpp {params.fallback_mpp} --method {params.method} --seg-mpp {params.seg_mpp}"
        " --min-saturation {params.min_saturation} --min-area-um2 {params.min_area_um2}"
        " --min-hole-um2 {params.min_hole_um2} --close-um {params.close_um} {params.pen}"
        " > {log} 2>&1"
