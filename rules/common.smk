# Config and sheet validation, paths and input functions shared by every rule.
import pandas as pd

from mambapath.config import load_cohort, tile_tag, validate_config, validate_sheet


validate_config(config, "workflow config")
COHORT = load_cohort(config)
RESULTS = f"{config['results']}/{COHORT.name}"
TILE_TAG = tile_tag(config["tiling"])
EXTRACTOR = config["features"]["extractor"]
CONFIG_FILES = [str(p) for p in workflow.configfiles]


wildcard_constraints:
    slide=r"[A-Za-z0-9._-]+",
    task=r"[A-Za-z0-9_]+",
    method=r"[A-Za-z0-9._-]+",
    fold=r"\d+",


def cohort_sheet_path():
    """The cohort sheet: written by synth for synthetic cohorts, else given by the cohort file."""
    if COHORT.source == "synth":
        return f"{RESULTS}/cohort/slides.csv"
    return str(COHORT.sheet)


def slide_ids():
    """Slide ids known when the DAG is built (synthetic ids are a function of the config)."""
    if COHORT.source == "synth":
        from mambapath.synth import synth_slide_ids

        ids = synth_slide_ids(COHORT.name, COHORT.synth)
    else:
        sheet = validate_sheet(pd.read_csv(COHORT.sheet, dtype={"slide_id": str, "patient_id": str}), COHORT.sheet)
        ids = sheet["slide_id"].tolist()
    return [s for s in ids if s not in set(COHORT.exclude)]


SLIDES = slide_ids()


def slide_path(wildcards):
    """Path of one slide file (synthetic slides are written by the synth rule)."""
    if COHORT.source == "synth":
        return f"{RESULTS}/slides/{wildcards.slide}.tiff"
    sheet = pd.read_csv(COHORT.sheet, dtype={"slide_id": str, "patient_id": str}).set_index("slide_id")
    return sheet.loc[wildcards.slide, "path"]


def features_files():
    return expand(f"{RESULTS}/features/{TILE_TAG}/{EXTRACTOR}/{{slide}}.h5", slide=SLIDES)


def final_outputs():
    """What `rule all` asks for; grows with the pipeline's stages."""
    return features_files()
