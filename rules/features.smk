# Rules of the features stage: one features HDF5 per slide from its tiles file and the slide.
# A GPU is requested only when config features.gpu > 0 (CPU jobs by default).

import json

FEATURES = config["features"]
FEATURES_GPU = FEATURES.get("gpu", 0)


rule extract:
    input:
        tiles=f"{RESULTS}/tiles/{TILE_TAG}/{{slide}}.h5",
        slide=slide_path,
        weights=FEATURES.get("weights") or [],
    output:
        features=f"{RESULTS}/features/{TILE_TAG}/{EXTRACTOR}/{{slide}}.h5",
    log:
        f"{RESULTS}/logs/extract/{TILE_TAG}/{EXTRACTOR}/{{slide}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/extract/{TILE_TAG}/{EXTRACTOR}/{{slide}}.tsv"
    params:
        extractor=EXTRACTOR,
        weights=FEATURES.get("weights") or "",
        model_kwargs=json.dumps(FEATURES.get("model_kwargs") or {}),
        seed=FEATURES.get("seed", 0),
        batch_size=FEATURES.get("batch_size", 64),
        num_workers=FEATURES.get("num_workers", 2),
        device=FEATURES.get("device", "auto"),
        precision=FEATURES.get("precision", "auto"),
    threads: FEATURES.get("num_workers", 2) + 1
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=FEATURES_GPU,
    conda:
        "../envs/gpu.yaml" if FEATURES_GPU else "../envs/cpu.yaml"
    shell:
        "mambapath extract --in {input.tiles:q} --slide {input.slide:q} --out {output.features:q}"
        " --extractor {params.extractor:q} --weights={params.weights:q} --model-kwargs {params.model_kwargs:q}"
        " --seed {params.seed} --batch-size {params.batch_size} --num-workers {params.num_workers}"
        " --device {params.device} --precision {params.precision} --threads {threads}"
        " > {log} 2>&1"
