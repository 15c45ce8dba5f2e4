# mambapath: a table of contents. Logic lives in rules/common.smk and in the package.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "rules/common.smk"


# Ids become file names and shell words: only these characters (the sheet schema enforces it too).
wildcard_constraints:
    slide=r"[A-Za-z0-9._-]+",
    task=r"[A-Za-z0-9_]+",
    method=r"[A-Za-z0-9._@-]+",
    fold=r"\d+",


include: "rules/synth.smk"
include: "rules/download.smk"
include: "rules/segment.smk"
include: "rules/tile.smk"
include: "rules/features.smk"
include: "rules/pixel.smk"
include: "rules/splits.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/ablation.smk"
include: "rules/pixel_ablation.smk"
include: "rules/report.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
