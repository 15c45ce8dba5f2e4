# Config and sheet validation, paths and input functions shared by every rule.
import functools
import os

import pandas as pd

from mambapath.config import load_cohort, tile_tag, validate_config, validate_sheet


validate_config(config, "workflow config")
COHORT = load_cohort(config)
RESULTS = f"{config['results']}/{COHORT.name}"
TILE_TAG = tile_tag(config["tiling"])
EXTRACTOR = config["features"]["extractor"]
CONFIG_FILES = [str(p) for p in workflow.configfiles]


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


def downloaded_slides_dir():
    """Where the download rule writes the slides of a gdc cohort (cohort slides_dir, else under results)."""
    return str(COHORT.slides_dir) if COHORT.slides_dir else f"{RESULTS}/slides_raw"


@functools.cache
def sheet_slide_paths():
    """slide_id -> path of a sheet cohort, read once (the DAG asks for every slide's path)."""
    sheet = pd.read_csv(COHORT.sheet, dtype={"slide_id": str, "patient_id": str, "path": str})
    return dict(zip(sheet["slide_id"], sheet["path"]))


def slide_path(wildcards):
    """Path of one slide file (synthetic slides are written by the synth rule, gdc ones by download).

    A relative sheet path is taken inside the cohort's slides_dir when it has one, so a folder
    of slides named by their GDC file names works with the shipped tcga_* tables.
    """
    if COHORT.source == "synth":
        return f"{RESULTS}/slides/{wildcards.slide}.tiff"
    if COHORT.source == "gdc":
        return f"{downloaded_slides_dir()}/{wildcards.slide}.svs"
    path = sheet_slide_paths()[wildcards.slide]
    if COHORT.slides_dir and not os.path.isabs(path):
        return str(COHORT.slides_dir / path)
    return path


def features_files():
    return expand(f"{RESULTS}/features/{TILE_TAG}/{EXTRACTOR}/{{slide}}.h5", slide=SLIDES)


def final_outputs():
    """The targets of the default run: features of every slide and the report (REPORT_OUTPUTS, rules/report.smk)."""
    return features_files() + REPORT_OUTPUTS
