# Rules of the tile stage: a regular grid of tiles at a physical scale over each slide's
# tissue (`mambapath tile`), written as coords + grid HDF5 under tiles/<tile_tag>/. A slide
# without tissue gets an empty tile file (status no_tissue), not a failed job.

import os

TILING = config["tiling"]


rule tile:
    input:
        slide=slide_path,
        mask=f"{RESULTS}/segment/{{slide}}/mask.png",
        summary=f"{RESULTS}/segment/{{slide}}/summary.json",
    output:
        tiles=f"{RESULTS}/tiles/{TILE_TAG}/{{slide}}.h5",
    log:
        f"{RESULTS}/logs/tile/{TILE_TAG}/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/tile/{TILE_TAG}/{{slide}}.tsv"
    params:
        segment_dir=lambda wildcards, input: os.path.dirname(input.summary),
        target_mpp=TILING.get("target_mpp") or "none",
        magnification=TILING.get("magnification") or "none",
        patch_size=TILING["patch_size"],
        overlap=TILING.get("overlap", 0),
        min_tissue=TILING.get("min_tissue", 0.5),
        scan_order=TILING.get("scan_order", "raster"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/cpu.yaml"
    shell:
        "mambapath tile --slide {input.slide:q} --segment-dir {params.segment_dir:q} --out {output.tiles:q}"
        " --slide-id {wildcards.slide:q} --target-mpp {params.target_mpp} --magnification {params.magnification}"
        " --patch-size {params.patch_size} --overlap {params.overlap} --min-tissue {params.min_tissue}"
        " --scan-order {params.scan_order} > {log} 2>&1"
