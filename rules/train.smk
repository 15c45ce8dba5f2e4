# Rules of the train stage: one job per task x method x fold, each trains one model on the
# fold's training part and predicts its inner validation and test parts. Feature methods read
# the features files of all slides; pixel methods (input_kind: pixels) the slide images that
# mambapath.pixel_data.train_input_files names (mambapath.train.rule_inputs picks, and imports
# the pixel module only for pixel methods). A GPU is requested only when config train.gpu > 0.

import json

from mambapath.train import rule_inputs as train_rule_inputs

TRAIN = config["train"]
TRAIN_GPU = TRAIN.get("gpu", 0)


rule train:
    input:
        features=lambda wildcards: train_rule_inputs(wildcards.method, config, RESULTS, SLIDES, features_files()),
        sheet=cohort_sheet_path(),
        splits=f"{RESULTS}/splits/{{task}}.csv",
        method=f"{workflow.basedir}/config/methods/{{method}}.yaml",
    output:
        model=f"{RESULTS}/train/{{task}}/{{method}}/fold{{fold}}/model.pt",
        predictions=f"{RESULTS}/train/{{task}}/{{method}}/fold{{fold}}/predictions.csv",
        history=f"{RESULTS}/train/{{task}}/{{method}}/fold{{fold}}/history.csv",
        summary=f"{RESULTS}/train/{{task}}/{{method}}/fold{{fold}}/train.json",
    log:
        f"{RESULTS}/logs/train/{{task}}/{{method}}/fold{{fold}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{task}}/{{method}}/fold{{fold}}.tsv"
    params:
        configs=CONFIG_FILES,
        # the config sections a train job reads, so that `--config` overrides reach it too
        override=lambda wildcards: json.dumps({"tasks": {wildcards.task: config["tasks"][wildcards.task]},
                                               "train": TRAIN}),
        features_dir=lambda wildcards: f"{RESULTS}/features/{TILE_TAG}/{EXTRACTOR}",
        methods_dir=lambda wildcards, input: os.path.dirname(input.method),
        out_dir=lambda wildcards, output: os.path.dirname(output.model),
        device=TRAIN.get("device", "auto"),
        exclude=COHORT.exclude,
    threads: TRAIN.get("threads", 1)
    resources:
        mem_mb=TRAIN.get("mem_mb", 2000),
        runtime=TRAIN.get("runtime_min", 30),
        gpu=TRAIN_GPU,
    conda:
        "../envs/gpu.yaml" if TRAIN_GPU else "../envs/cpu.yaml"
    shell:
        "mambapath train --config {params.configs:q} --override {params.override:q}"
        " --sheet {input.sheet:q} --features-dir {params.features_dir:q} --splits {input.splits:q}"
        " --task {wildcards.task} --method {wildcards.method} --methods-dir {params.methods_dir:q}"
        " --fold {wildcards.fold} --out-dir {params.out_dir:q} --threads {threads} --device {params.device}"
        " --exclude {params.exclude:q}"
        " > {log} 2>&1"
