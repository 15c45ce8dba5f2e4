"""The papers' TCGA cohorts: tables built offline from a GDC manifest and the TCGA-CDR.

A cohort table has one row per slide (diagnostic FFPE slides by default) with the slide's
GDC file (``file_id``, ``filename``, ``md5``, ``size``) and its labels:

- ``stage``: AJCC pathologic stage from CDR ``ajcc_pathologic_tumor_stage`` mapped to I-IV
  (substages such as IIA go to II; ``Stage X``, ``Stage 0``, ``IS``, ``I/II NOS`` and the
  bracketed CDR codes such as ``[Discrepancy]`` or ``[Not Available]`` stay empty);
- ``os_days``, ``os_event``: overall survival from CDR ``OS.time`` and ``OS`` (1 = death);
- ``label`` / ``label_name``: the class of the classification cohorts ("0"/"1" so that the
  workflow's ``classification`` task applies; the name says which is which).

The patient id is the first 12 characters of the slide barcode (``TCGA-XX-XXXX``); the slide
id is the GDC file name without ``.svs``, the id the papers' tables use. The manifest has no
project column, so a slide's project comes from its patient's CDR ``type``: slides of patients
missing from the CDR cannot be placed and are left out.

The tables ship in the package (``mambapath/data/cohorts``) and are rebuilt with
``mambapath cohort build``. ``mambapath cohort sheet`` turns one into a sheet whose ``path``
column points at slides already on disk, ``cohort list`` gives counts and storage, and
``cohort compare`` sets the counts beside the papers' cohort files.
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pandas as pd

from .config import REPO_ROOT
from .errors import ConfigError, DataError
from .io import write_csv, write_text

log = logging.getLogger(__name__)

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_MANIFEST = SHARED_DATA / "gdc" / "gdc_manifest.tsv"
DEFAULT_CLINICAL = SHARED_DATA / "clinical" / "TCGA-CDR-SupplementalTableS1.xlsx"
DEFAULT_PAPERS = SHARED_DATA / "cohorts"

#: slide type code in a TCGA slide barcode -> kind. DX = diagnostic FFPE slide (GDC
#: experimental_strategy "Diagnostic Slide"); TS/BS = top/bottom frozen-section slides and MS
#: (GDC "Tissue Slide").
SLIDE_KINDS = {"diagnostic": ("DX",), "tissue": ("TS", "BS", "MS"), "all": ("DX", "TS", "BS", "MS")}

# TCGA-XX-XXXX-SSV-PP-TTN.<uuid>: sample (SS) + vial (V), portion (PP), slide type (TT) + order (N)
_BARCODE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-(\d{2})([A-Z])-(\d{2})-([A-Z]{2})([A-Z0-9]+)\.")

_STAGE = re.compile(r"^Stage (IV|I{1,3})[ABC]?$")

TABLE_COLUMNS = [
    "slide_id", "patient_id", "path", "file_id", "filename", "md5", "size", "project", "sample_type",
    "stage", "os_days", "os_event", "label", "label_name",
]


@dataclass(frozen=True)
class CohortSpec:
    """What one of the papers' cohorts is made of and which labels it needs."""

    name: str
    projects: tuple[str, ...]
    tasks: tuple[str, ...]
    description: str
    #: classification: CDR column holding the class ("type" for the project) -> {value: (label, name)}
    label_column: str | None = None
    classes: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: the papers' cohort files this one is compared with (paths under the papers' folder)
    papers: tuple[tuple[str, str], ...] = ()


COHORTS: dict[str, CohortSpec] = {
    spec.name: spec
    for spec in [
        CohortSpec("tcga_blca", ("BLCA",), ("staging", "survival"), "TCGA-BLCA staging (I-IV) and overall survival",
                   papers=(("MambaMIL BLCA (survival)", "mambamil/dataset_csv/BLCA_processed.csv"),)),
        CohortSpec("tcga_brca", ("BRCA",), ("staging", "survival"), "TCGA-BRCA staging (I-IV) and overall survival",
                   papers=(("MambaMIL BRCA (survival)", "mambamil/dataset_csv/BRCA_processed.csv"),)),
        CohortSpec("tcga_luad", ("LUAD",), ("staging", "survival"), "TCGA-LUAD staging (I-IV) and overall survival",
                   papers=(("MambaMIL/2DMamba LUAD (survival)", "mambamil/dataset_csv/LUAD_processed.csv"),)),
        CohortSpec("tcga_kirc", ("KIRC",), ("survival",), "TCGA-KIRC overall survival",
                   papers=(("MambaMIL/2DMamba KIRC (survival)", "mambamil/dataset_csv/KIRC_processed.csv"),)),
        CohortSpec("tcga_kirp", ("KIRP",), ("survival",), "TCGA-KIRP overall survival",
                   papers=(("MambaMIL/2DMamba KIRP (survival)", "mambamil/dataset_csv/KIRP_processed.csv"),)),
        CohortSpec("tcga_stad", ("STAD",), ("survival",), "TCGA-STAD overall survival",
                   papers=(("MambaMIL/2DMamba STAD (survival)", "mambamil/dataset_csv/STAD_processed.csv"),)),
        CohortSpec("tcga_ucec", ("UCEC",), ("survival",), "TCGA-UCEC overall survival",
                   papers=(("MambaMIL/2DMamba UCEC (survival)", "mambamil/dataset_csv/UCEC_processed.csv"),)),
        CohortSpec("tcga_brca_idc_ilc", ("BRCA",), ("classification",),
                   "TCGA-BRCA invasive ductal (0) vs invasive lobular (1) carcinoma",
                   label_column="histological_type",
                   classes={"Infiltrating Ductal Carcinoma": ("0", "IDC"),
                            "Infiltrating Lobular Carcinoma": ("1", "ILC")},
                   papers=(("2DMamba TCGA-BRCA (IDC/ILC rows)",
                            "2dmamba/csv_files/classification/TCGA-BRCA-label.csv"),)),
        CohortSpec("tcga_nsclc", ("LUAD", "LUSC"), ("classification",),
                   "TCGA NSCLC: lung adenocarcinoma (0) vs lung squamous cell carcinoma (1)",
                   label_column="type", classes={"LUAD": ("0", "LUAD"), "LUSC": ("1", "LUSC")},
                   papers=(("MambaMIL LUAD_LUSC", "mambamil/dataset_csv/LUAD_LUSC.csv"),
                           ("2DMamba TCGA-NSCLC", "2dmamba/csv_files/classification/TCGA-NSCLC-label.csv.zip"),
                           ("slideflow lung_adeno_squam", "slideflow/lung_adeno_squam/lung_labels.csv"))),
    ]
}


# --------------------------------------------------------------------------- sources


def parse_slide_barcode(slide_id: str) -> dict | None:
    """Split a TCGA slide id into patient, sample type code and slide kind code; None if not TCGA."""
    m = _BARCODE.match(slide_id + ("" if "." in slide_id else "."))
    if m is None:
        return None
    return {"patient_id": m.group(1), "sample_type": m.group(2), "slide_type": m.group(5)}


def read_gdc_manifest(path: str | Path) -> pd.DataFrame:
    """A gdc-client download manifest (tab-separated: id, filename, md5, size[, state])."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: GDC manifest not found; pass --manifest (a gdc-client manifest .tsv)")
    frame = pd.read_csv(path, sep="\t", dtype={"id": str, "filename": str, "md5": str})
    missing = [c for c in ("id", "filename", "md5", "size") if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: not a GDC manifest, missing column(s) {missing}; "
                        "expected the tab-separated gdc-client format id, filename, md5, size")
    return frame


def read_cdr(path: str | Path) -> pd.DataFrame:
    """The TCGA-CDR clinical table (sheet 'TCGA-CDR'), indexed by patient barcode."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: TCGA-CDR table not found; pass --clinical "
                        "(TCGA-CDR-SupplementalTableS1.xlsx from Liu et al., Cell 2018)")
    cdr = pd.read_excel(path, sheet_name="TCGA-CDR")
    need = ["bcr_patient_barcode", "type", "ajcc_pathologic_tumor_stage", "histological_type", "OS", "OS.time"]
    missing = [c for c in need if c not in cdr.columns]
    if missing:
        raise DataError(f"{path}: sheet TCGA-CDR lacks column(s) {missing}; is this the TCGA-CDR supplement?")
    return cdr.set_index("bcr_patient_barcode")[need[1:]]


def map_stage(value) -> str | None:
    """AJCC pathologic stage text -> I, II, III or IV (None where it is not a stage I-IV)."""
    if not isinstance(value, str):
        return None
    m = _STAGE.match(value.strip())
    return m.group(1) if m else None


# --------------------------------------------------------------------------- building


def slide_table(manifest: pd.DataFrame, kind: str = "diagnostic") -> pd.DataFrame:
    """Manifest rows that are TCGA slides of one kind, with slide and patient ids."""
    if kind not in SLIDE_KINDS:
        raise ConfigError(f"slide kind {kind!r} is not one of {sorted(SLIDE_KINDS)}")
    svs = manifest[manifest["filename"].str.endswith(".svs")].copy()
    svs["slide_id"] = svs["filename"].str[: -len(".svs")]
    parsed = svs["slide_id"].map(parse_slide_barcode)
    svs = svs[parsed.notna()].copy()
    parsed = pd.DataFrame(parsed.dropna().tolist(), index=svs.index)
    svs = svs.join(parsed)
    svs = svs[svs["slide_type"].isin(SLIDE_KINDS[kind])]
    return svs.rename(columns={"id": "file_id"})


def build_cohort(spec: CohortSpec, slides: pd.DataFrame, cdr: pd.DataFrame) -> pd.DataFrame:
    """One row per slide of the cohort's projects that has a label for at least one of its tasks."""
    table = slides.copy()
    table["project"] = table["patient_id"].map(cdr["type"])
    table = table[table["project"].isin(spec.projects)].copy()
    clin = cdr.loc[table["patient_id"]]
    table["stage"] = [map_stage(v) for v in clin["ajcc_pathologic_tumor_stage"]]
    os_ok = clin["OS"].notna().to_numpy() & clin["OS.time"].notna().to_numpy()
    table["os_days"] = clin["OS.time"].to_numpy()
    table["os_event"] = clin["OS"].to_numpy()
    table.loc[~os_ok, ["os_days", "os_event"]] = None
    table["os_days"] = table["os_days"].round().astype("Int64")
    table["os_event"] = table["os_event"].astype("Int64")
    table["label"] = None
    table["label_name"] = None
    if spec.label_column is not None:
        values = clin[spec.label_column].to_numpy()
        table["label"] = [spec.classes.get(v, (None, None))[0] for v in values]
        table["label_name"] = [spec.classes.get(v, (None, None))[1] for v in values]

    usable = pd.Series(False, index=table.index)
    if "staging" in spec.tasks:
        usable |= table["stage"].notna()
    if "survival" in spec.tasks:
        usable |= table["os_days"].notna()
    if "classification" in spec.tasks:
        usable |= table["label"].notna()
    table = table[usable].copy()
    table["path"] = table["filename"]
    table["project"] = "TCGA-" + table["project"]
    return table[TABLE_COLUMNS].sort_values("slide_id").reset_index(drop=True)


def build_all(manifest_path, clinical_path, out_dir, names=None, kind="diagnostic") -> dict[str, pd.DataFrame]:
    """Build and write the cohort tables; returns them by name."""
    names = list(names or COHORTS)
    unknown = [n for n in names if n not in COHORTS]
    if unknown:
        raise ConfigError(f"unknown cohort(s) {unknown}; known: {', '.join(COHORTS)}")
    slides = slide_table(read_gdc_manifest(manifest_path), kind)
    cdr = read_cdr(clinical_path)
    no_clinical = (~slides["patient_id"].isin(cdr.index)).sum()
    if no_clinical:
        log.warning("%d %s slides belong to patients missing from the TCGA-CDR (no project, no labels): left out",
                    no_clinical, kind)
    tables = {}
    for name in names:
        table = build_cohort(COHORTS[name], slides, cdr)
        if table.empty:
            raise DataError(f"cohort {name}: no {kind} slides with labels in {manifest_path} + {clinical_path}")
        write_csv(Path(out_dir) / f"{name}.csv", table)
        log.info("%s: %d slides, %d patients", name, len(table), table["patient_id"].nunique())
        tables[name] = table
    return tables


# --------------------------------------------------------------------------- shipped tables


def shipped_table_path(name: str) -> Path:
    """Path of a cohort table shipped in the package."""
    if name not in COHORTS:
        raise ConfigError(f"unknown cohort {name!r}; shipped cohorts: {', '.join(COHORTS)}")
    return Path(str(resources.files("mambapath") / "data" / "cohorts" / f"{name}.csv"))


def load_table(name_or_path: str | Path) -> pd.DataFrame:
    """A cohort table by shipped name (tcga_blca) or by path."""
    path = shipped_table_path(str(name_or_path)) if str(name_or_path) in COHORTS else Path(name_or_path)
    if not path.exists():
        raise DataError(f"{path}: cohort table not found; rebuild it with `mambapath cohort build`")
    return pd.read_csv(path, dtype={"slide_id": str, "patient_id": str, "label": str, "file_id": str, "md5": str,
                                    "sample_type": str})


def cohort_counts(table: pd.DataFrame, spec: CohortSpec) -> dict:
    """Slides, patients and storage of one cohort table, overall and per task."""
    counts = {
        "slides": len(table),
        "patients": int(table["patient_id"].nunique()),
        "size_gb": float(table["size"].sum() / 1e9),
    }
    if "staging" in spec.tasks:
        staged = table[table["stage"].notna()]
        counts["staging_slides"] = len(staged)
        counts["staging_patients"] = int(staged["patient_id"].nunique())
        per_patient = staged.groupby("patient_id")["stage"].first().value_counts()
        counts["stage_patients"] = {s: int(per_patient.get(s, 0)) for s in ("I", "II", "III", "IV")}
    if "survival" in spec.tasks:
        surv = table[table["os_days"].notna()]
        counts["survival_slides"] = len(surv)
        counts["survival_patients"] = int(surv["patient_id"].nunique())
        counts["deaths"] = int(surv.groupby("patient_id")["os_event"].first().sum())
    if "classification" in spec.tasks:
        lab = table[table["label"].notna()]
        per_class = lab.groupby("label_name")["patient_id"].agg(["size", "nunique"])
        counts["classes"] = {k: {"slides": int(r["size"]), "patients": int(r["nunique"])}
                             for k, r in per_class.iterrows()}
    return counts


# --------------------------------------------------------------------------- slides on disk


def locate_slides(table: pd.DataFrame, slides_dir: str | Path) -> pd.Series:
    """Where each slide of a table is under ``slides_dir`` (None where it is not found).

    Looks for the GDC file name (``<dir>/<filename>``), the gdc-client layout
    (``<dir>/<file_id>/<filename>``) and the slide id (``<dir>/<slide_id>.svs``).
    """
    root = Path(slides_dir).expanduser()
    found = []
    for row in table.itertuples(index=False):
        candidates = [root / row.filename, root / str(row.file_id) / row.filename, root / f"{row.slide_id}.svs"]
        found.append(next((str(p.resolve()) for p in candidates if p.is_file()), None))
    return pd.Series(found, index=table.index, dtype=object)


def sheet_for_slides_dir(table: pd.DataFrame, slides_dir: str | Path, allow_missing: bool = False) -> pd.DataFrame:
    """The table with ``path`` pointing at slides already on disk."""
    paths = locate_slides(table, slides_dir)
    missing = paths.isna()
    if missing.any():
        first = ", ".join(table.loc[missing, "filename"].head(3))
        msg = (f"{int(missing.sum())} of {len(table)} slides are not in {slides_dir} (e.g. {first}); looked for "
               "<dir>/<filename>, <dir>/<file_id>/<filename> and <dir>/<slide_id>.svs")
        if not allow_missing:
            raise DataError(msg + "; download them (`mambapath download`) or pass --allow-missing to leave them out")
        log.warning("%s: left out", msg)
    sheet = table[~missing].copy()
    sheet["path"] = paths[~missing]
    return sheet


# --------------------------------------------------------------------------- the papers' cohorts


def read_paper_cohort(path: Path) -> pd.DataFrame:
    """A paper's cohort file -> slide_id (no .svs), patient_id (and label where it has one)."""
    if path.suffix == ".zip":
        # Read the member in memory: its stored name walks up a directory, so never extract it.
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if not n.endswith("/")]
            frame = pd.read_csv(io.BytesIO(zf.read(members[0])))
    else:
        frame = pd.read_csv(path)
    slide_col = "slide" if "slide" in frame.columns else "slide_id"
    slides = frame[slide_col].astype(str).str.replace(r"\.svs$", "", regex=True)
    out = pd.DataFrame({"slide_id": slides, "patient_id": slides.str[:12]})
    if "oncotree_code" in frame.columns:
        out["label"] = frame["oncotree_code"].astype(str).to_numpy()
    elif "label" in frame.columns:
        out["label"] = frame["label"].astype(str).to_numpy()
    elif "subtype" in frame.columns:
        out["label"] = frame["subtype"].map(_PAPER_SUBTYPES).to_numpy()
    if "censorship" in frame.columns:
        # censorship = 1 - event in the CLAM-style tables these papers share
        out["os_event"] = (1 - frame["censorship"]).round().astype("Int64").to_numpy()
    return out


_PAPER_SUBTYPES = {"adenocarcinoma": "LUAD", "squamous": "LUSC"}


def compare_with_papers(papers_dir: str | Path, names=None) -> pd.DataFrame:
    """Our shipped cohort counts beside each paper cohort file that covers the same task."""
    papers_dir = Path(papers_dir)
    rows = []
    for name in names or COHORTS:
        spec = COHORTS[name]
        ours = load_table(name)
        if spec.label_column is None:
            ours_task = ours[ours["os_days"].notna()]
        else:
            ours_task = ours[ours["label"].notna()]
        for title, rel in spec.papers:
            path = papers_dir / rel
            if not path.exists():
                log.warning("%s: not found, comparison with %s skipped", path, title)
                continue
            paper = read_paper_cohort(path)
            if name == "tcga_brca_idc_ilc":
                paper = paper[paper["label"].isin(["IDC", "ILC"])]
            ours_ids, paper_ids = set(ours_task["slide_id"]), set(paper["slide_id"])
            both = ours_task.merge(paper, on="slide_id", suffixes=("", "_paper"))
            if spec.label_column is None:
                agree = int((both["os_event"] == both["os_event_paper"]).sum())
            else:
                agree = int((both["label_name"] == both["label_paper"]).sum())
            ours_pat, paper_pat = set(ours_task["patient_id"]), set(paper["patient_id"])
            rows.append({
                "cohort": name, "paper": title,
                "slides_ours": len(ours_ids), "slides_paper": len(paper_ids),
                "patients_ours": len(ours_pat), "patients_paper": len(paper_pat),
                "slides_both": len(ours_ids & paper_ids),
                "slides_only_ours": len(ours_ids - paper_ids),
                "slides_only_paper": len(paper_ids - ours_ids),
                "patients_only_ours": len(ours_pat - paper_pat),
                "patients_only_paper": len(paper_pat - ours_pat),
                # overall-survival event (survival) or class (classification) equal on shared slides
                "labels_agree": f"{agree}/{len(both)}",
            })
    if not rows:
        raise DataError(f"{papers_dir}: none of the papers' cohort files were found; pass --papers-dir")
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("build", help="build the cohort tables from a GDC manifest and the TCGA-CDR")
    p.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="gdc-client manifest of TCGA slides (.tsv)")
    p.add_argument("--clinical", default=str(DEFAULT_CLINICAL), help="TCGA-CDR-SupplementalTableS1.xlsx")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "data" / "cohorts"))
    p.add_argument("--names", nargs="*", choices=list(COHORTS), help="cohorts to build (default: all)")
    p.add_argument("--kind", default="diagnostic", choices=list(SLIDE_KINDS),
                   help="diagnostic = FFPE DX slides (default); tissue = frozen TS/BS/MS slides")

    p = sub.add_parser("list", help="shipped cohorts: slides, patients, per-task counts, storage")
    p.add_argument("--out", help="also write the counts as Markdown to this file")

    p = sub.add_parser("sheet", help="write a cohort sheet whose path column points at slides on disk")
    p.add_argument("name", choices=list(COHORTS))
    p.add_argument("--slides-dir", required=True,
                   help="folder holding the slides (GDC names, gdc-client layout or <slide_id>.svs)")
    p.add_argument("--out", required=True, help="cohort sheet CSV to write")
    p.add_argument("--allow-missing", action="store_true", help="leave out slides that are not on disk")

    p = sub.add_parser("compare", help="counts of the shipped cohorts beside the papers' cohort files")
    p.add_argument("--papers-dir", default=str(DEFAULT_PAPERS))
    p.add_argument("--out", help="also write the table as Markdown to this file")


def _counts_markdown() -> str:
    rows = []
    for name, spec in COHORTS.items():
        c = cohort_counts(load_table(name), spec)
        per_task = []
        if "staging_slides" in c:
            st = c["stage_patients"]
            per_task.append(f"staging {c['staging_slides']} slides / {c['staging_patients']} patients "
                            f"(I {st['I']}, II {st['II']}, III {st['III']}, IV {st['IV']})")
        if "survival_slides" in c:
            per_task.append(f"survival {c['survival_slides']} slides / {c['survival_patients']} patients "
                            f"({c['deaths']} deaths)")
        if "classes" in c:
            per_task.append(", ".join(f"{k} {v['slides']} slides / {v['patients']} patients"
                                      for k, v in c["classes"].items()))
        rows.append({"cohort": name, "slides": c["slides"], "patients": c["patients"],
                     "size (GB)": round(c["size_gb"], 1), "per task": "; ".join(per_task)})
    return pd.DataFrame(rows).to_markdown(index=False) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        tables = build_all(args.manifest, args.clinical, args.out_dir, args.names, args.kind)
        for name, table in tables.items():
            out = Path(args.out_dir) / f"{name}.csv"
            print(f"{name}: {len(table)} slides, {table['patient_id'].nunique()} patients -> {out}")
        return 0
    if args.action == "list":
        text = _counts_markdown()
        if args.out:
            write_text(args.out, text)
        print(text, end="")
        return 0
    if args.action == "sheet":
        sheet = sheet_for_slides_dir(load_table(args.name), args.slides_dir, args.allow_missing)
        write_csv(args.out, sheet)
        print(f"{args.out}: {len(sheet)} slides of {args.name} found under {args.slides_dir}")
        return 0
    if args.action == "compare":
        text = compare_with_papers(args.papers_dir).to_markdown(index=False) + "\n"
        if args.out:
            write_text(args.out, text)
        print(text, end="")
        return 0
    raise ConfigError(f"unknown action {args.action!r}")
