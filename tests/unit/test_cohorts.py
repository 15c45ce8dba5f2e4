"""The shipped TCGA cohort tables: how they are built, their validity, and the papers' cohorts.

References are independent of the code: literal stage strings, the GDC manifest read with the
csv module, and the papers' own cohort and split files in ../shared/data/cohorts.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pandas as pd
import pytest

from mambapath import cli
from mambapath.cohorts import (
    COHORTS,
    CohortSpec,
    build_all,
    build_cohort,
    compare_with_papers,
    load_table,
    map_stage,
    parse_slide_barcode,
    sheet_for_slides_dir,
    shipped_table_path,
    slide_table,
)
from mambapath.config import validate_sheet
from mambapath.errors import DataError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MANIFEST = SHARED / "gdc" / "gdc_manifest.tsv"
CLINICAL = SHARED / "clinical" / "TCGA-CDR-SupplementalTableS1.xlsx"
PAPERS = SHARED / "cohorts"
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def need(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"../shared/data not found: needs {', '.join(missing)}")


@pytest.mark.parametrize("text, stage", [
    ("Stage I", "I"), ("Stage IA", "I"), ("Stage IB", "I"), ("Stage II", "II"), ("Stage IIA", "II"),
    ("Stage IIC", "II"), ("Stage III", "III"), ("Stage IIIC", "III"), ("Stage IV", "IV"), ("Stage IVB", "IV"),
    ("Stage X", None), ("Stage 0", None), ("IS", None), ("I/II NOS", None), ("[Discrepancy]", None),
    ("[Not Available]", None), ("[Unknown]", None), ("[Not Applicable]", None), (float("nan"), None),
])
def test_map_stage(text, stage):
    assert map_stage(text) == stage


def test_parse_slide_barcode():
    assert parse_slide_barcode("TCGA-2F-A9KO-01Z-00-DX1.195576CF-B739-4BD9-B15B-4A70AE287D3E") == {
        "patient_id": "TCGA-2F-A9KO", "sample_type": "01", "slide_type": "DX"}
    assert parse_slide_barcode("TCGA-CR-7395-01A-01-TS1.844e558f")["slide_type"] == "TS"
    assert parse_slide_barcode("TCGA-DX-A1KX-01A-02-TSB.F1BC")["slide_type"] == "TS"  # DX centre, TS slide
    assert parse_slide_barcode("CMU-1-Small-Region") is None


def _toy_sources():
    manifest = pd.DataFrame({
        "id": [f"u{i}" for i in range(7)],
        "filename": ["TCGA-AA-0001-01Z-00-DX1.X.svs", "TCGA-AA-0001-01Z-00-DX2.Y.svs", "TCGA-AA-0001-01A-01-TS1.Z.svs",
                     "TCGA-AA-0002-01Z-00-DX1.W.svs", "TCGA-AA-0003-01Z-00-DX1.V.svs", "TCGA-AA-0004-01Z-00-DX1.U.svs",
                     "notes.txt"],
        "md5": ["0" * 32] * 7, "size": [10, 20, 30, 40, 50, 60, 1],
    })
    cdr = pd.DataFrame({
        "type": ["BLCA", "BLCA", "BLCA", "LUAD"],
        "ajcc_pathologic_tumor_stage": ["Stage IIIA", "[Discrepancy]", "Stage IV", "Stage I"],
        "histological_type": ["x", "y", "z", "w"],
        "OS": [1.0, 0.0, None, 0.0], "OS.time": [100.0, 2000.0, None, 5.0],
    }, index=pd.Index(["TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0003", "TCGA-AA-0004"], name="bcr_patient_barcode"))
    return manifest, cdr


def test_build_cohort_rows_and_labels():
    manifest, cdr = _toy_sources()
    spec = CohortSpec("toy", ("BLCA",), ("staging", "survival"), "toy")
    table = build_cohort(spec, slide_table(manifest, "diagnostic"), cdr).set_index("slide_id")
    # one row per DX slide of BLCA patients; the TS slide, the LUAD patient and the .txt are out
    assert list(table.index) == ["TCGA-AA-0001-01Z-00-DX1.X", "TCGA-AA-0001-01Z-00-DX2.Y",
                                 "TCGA-AA-0002-01Z-00-DX1.W", "TCGA-AA-0003-01Z-00-DX1.V"]
    assert table["patient_id"].tolist() == ["TCGA-AA-0001", "TCGA-AA-0001", "TCGA-AA-0002", "TCGA-AA-0003"]
    assert table["stage"].tolist()[:3] == ["III", "III", None] and table["stage"].iloc[3] == "IV"
    assert table["os_days"].tolist()[:3] == [100, 100, 2000] and pd.isna(table["os_days"].iloc[3])
    assert table["os_event"].tolist()[:3] == [1, 1, 0]
    assert table["file_id"].tolist() == ["u0", "u1", "u3", "u4"]
    assert table["path"].tolist() == [s + ".svs" for s in table.index]
    # survival-only: the patient without OS has no usable label and leaves
    surv = build_cohort(CohortSpec("t", ("BLCA",), ("survival",), "t"), slide_table(manifest), cdr)
    assert "TCGA-AA-0003" not in set(surv["patient_id"])
    # frozen slides on request
    frozen = build_cohort(spec, slide_table(manifest, "tissue"), cdr)
    assert frozen["slide_id"].tolist() == ["TCGA-AA-0001-01A-01-TS1.Z"]


def test_classification_labels_from_project():
    manifest, cdr = _toy_sources()
    cdr = cdr.assign(type=["LUAD", "LUSC", "BLCA", "LUSC"])
    table = build_cohort(COHORTS["tcga_nsclc"], slide_table(manifest), cdr)
    assert dict(zip(table["patient_id"], table["label_name"])) == {"TCGA-AA-0001": "LUAD", "TCGA-AA-0002": "LUSC",
                                                                   "TCGA-AA-0004": "LUSC"}
    assert dict(zip(table["label_name"], table["label"])) == {"LUAD": "0", "LUSC": "1"}


# --------------------------------------------------------------------------- the shipped tables


@pytest.mark.parametrize("name", list(COHORTS))
def test_shipped_table_is_a_valid_sheet(name):
    path = shipped_table_path(name)
    assert path.exists(), f"{path} missing: run `mambapath cohort build`"
    table = load_table(name)
    validate_sheet(table, path)
    assert table["slide_id"].is_unique
    assert (table["patient_id"] == table["slide_id"].str[:12]).all()
    assert table["slide_id"].str.contains(r"-\d\d[A-Z]-\d\d-DX", regex=True).all()  # diagnostic slides only
    assert table["file_id"].str.match(UUID).all() and table["md5"].str.fullmatch(r"[0-9a-f]{32}").all()
    assert (table["filename"] == table["slide_id"] + ".svs").all()
    spec = COHORTS[name]
    assert set(table["project"]) == {f"TCGA-{p}" for p in spec.projects}
    if "survival" in spec.tasks:
        surv = table[table["os_days"].notna()]
        assert len(surv) > 200 and surv["os_event"].isin([0, 1]).all()
    if "staging" in spec.tasks:
        assert set(table["stage"].dropna()) == {"I", "II", "III", "IV"}
    if "classification" in spec.tasks:
        assert table["label"].notna().all() and set(table["label"]) == {"0", "1"}


def test_shipped_tables_match_the_gdc_manifest():
    need(MANIFEST)
    with open(MANIFEST, newline="") as fh:
        manifest = {row["id"]: row for row in csv.DictReader(fh, delimiter="\t")}
    for name in COHORTS:
        for row in load_table(name).itertuples():
            ref = manifest[row.file_id]
            assert (ref["filename"], ref["md5"], int(ref["size"])) == (row.filename, row.md5, row.size), name


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    need(MANIFEST, CLINICAL)
    out = tmp_path_factory.mktemp("cohorts")
    tables = build_all(MANIFEST, CLINICAL, out)
    return out, tables


def test_rebuild_from_sources_reproduces_shipped_tables(rebuilt):
    out, tables = rebuilt
    for name in tables:
        assert (out / f"{name}.csv").read_bytes() == shipped_table_path(name).read_bytes(), name


def test_counts_per_cohort(rebuilt):
    """Counts stated in src/mambapath/data/cohorts/README.md."""
    counts = {name: (len(t), t["patient_id"].nunique()) for name, t in rebuilt[1].items()}
    assert counts == {
        "tcga_blca": (457, 386), "tcga_brca": (1133, 1062), "tcga_luad": (541, 478), "tcga_kirc": (519, 513),
        "tcga_kirp": (299, 275), "tcga_stad": (437, 411), "tcga_ucec": (565, 504),
        "tcga_brca_idc_ilc": (1017, 956), "tcga_nsclc": (1053, 956),
    }


# --------------------------------------------------------------------------- the papers' cohorts


def test_nsclc_equals_mambamil_luad_lusc():
    need(PAPERS)
    paper = pd.read_csv(PAPERS / "mambamil/dataset_csv/LUAD_LUSC.csv")
    ours = load_table("tcga_nsclc").set_index("slide_id")
    assert set(paper["slide_id"]) == set(ours.index)
    assert (ours.loc[paper["slide_id"], "label_name"].to_numpy() == paper["label"].to_numpy()).all()


@pytest.mark.parametrize("name, paper_file", [
    ("tcga_blca", "BLCA"), ("tcga_brca", "BRCA"), ("tcga_luad", "LUAD"), ("tcga_kirc", "KIRC"),
    ("tcga_kirp", "KIRP"), ("tcga_stad", "STAD"), ("tcga_ucec", "UCEC"),
])
def test_survival_labels_agree_with_mambamil(name, paper_file):
    need(PAPERS)
    paper = pd.read_csv(PAPERS / f"mambamil/dataset_csv/{paper_file}_processed.csv")
    paper["slide_id"] = paper["slide_id"].str.replace(r"\.svs$", "", regex=True)
    ours = load_table(name)
    both = ours[ours["os_days"].notna()].merge(paper, on="slide_id")
    # every paper slide is ours, but for one BRCA and one STAD patient without CDR OS.time
    assert len(both) == len(paper) - {"tcga_brca": 1, "tcga_stad": 1}.get(name, 0)
    event_differs = both[both["os_event"] != 1 - both["censorship"]]["slide_id"].tolist()
    known = ["TCGA-BR-6707-01Z-00-DX1.fade928c-b514-43d8-90dd-37b505df9992"]  # death in MambaMIL, alive in the CDR
    assert event_differs == (known if name == "tcga_stad" else [])
    months = both["os_days"] / 30.44
    assert ((months - both["survival_months"]).abs() < 0.05).mean() >= 0.99


def test_mambamil_survival_split_patients_are_in_our_cohorts():
    need(PAPERS)
    for name, folder in [("tcga_blca", "BLCA"), ("tcga_luad", "LUAD"), ("tcga_kirc", "KIRC"), ("tcga_ucec", "UCEC")]:
        patients = set(load_table(name)["patient_id"])
        for k in range(5):
            split = pd.read_csv(PAPERS / f"mambamil/splits/TCGA_{folder}_survival_kfold/splits_{k}.csv")
            ids = set(pd.concat([split["train"], split["val"]]).dropna())
            assert ids <= patients, (name, k, sorted(ids - patients)[:3])


def test_2dmamba_nsclc_split_slides_are_in_our_cohort():
    need(PAPERS)
    split = pd.read_csv(PAPERS / "2dmamba/csv_files/classification/TCGA-NSCLC-split.csv")
    ids = set(pd.concat([split["train"], split["val"], split["test"]]).dropna())
    assert ids <= set(load_table("tcga_nsclc")["slide_id"])


def test_compare_with_papers_table():
    need(PAPERS)
    table = compare_with_papers(PAPERS).set_index(["cohort", "paper"])
    row = table.loc[("tcga_nsclc", "MambaMIL LUAD_LUSC")]
    got = (row["slides_ours"], row["slides_paper"], row["slides_only_ours"], row["labels_agree"])
    assert got == (1053, 1053, 0, "1053/1053")
    row = table.loc[("tcga_brca_idc_ilc", "2DMamba TCGA-BRCA (IDC/ILC rows)")]
    label = pd.read_csv(PAPERS / "2dmamba/csv_files/classification/TCGA-BRCA-label.csv")
    assert row["slides_paper"] == label["oncotree_code"].isin(["IDC", "ILC"]).sum()


# --------------------------------------------------------------------------- slides on disk


def test_sheet_for_slides_dir_finds_the_three_layouts(tmp_path):
    table = load_table("tcga_kirp").head(4)
    rows = list(table.itertuples())
    (tmp_path / rows[0].filename).write_bytes(b"a")  # GDC file name
    (tmp_path / rows[1].file_id).mkdir()
    (tmp_path / rows[1].file_id / rows[1].filename).write_bytes(b"b")  # gdc-client layout
    (tmp_path / f"{rows[2].slide_id}.svs").write_bytes(b"c")  # what the download rule writes
    with pytest.raises(DataError, match="1 of 4 slides are not in"):
        sheet_for_slides_dir(table, tmp_path)
    sheet = sheet_for_slides_dir(table, tmp_path, allow_missing=True)
    assert sheet["path"].tolist() == [str(tmp_path / rows[0].filename),
                                      str(tmp_path / rows[1].file_id / rows[1].filename),
                                      str(tmp_path / f"{rows[2].slide_id}.svs")]


def test_cli_cohort_sheet(tmp_path):
    table = load_table("tcga_kirp")
    for row in table.itertuples():
        (tmp_path / row.filename).write_bytes(b"x")
    out = tmp_path / "sheet.csv"
    assert cli.main(["cohort", "sheet", "tcga_kirp", "--slides-dir", str(tmp_path), "--out", str(out)]) == 0
    sheet = validate_sheet(pd.read_csv(out, dtype={"slide_id": str, "patient_id": str}), out)
    assert len(sheet) == len(table) and sheet["path"].map(lambda p: Path(p).is_file()).all()


# --------------------------------------------------------------------------- the papers' splits on these cohorts


@pytest.mark.parametrize("cohort, split_path, fmt, leakage", [
    # expected train∩val / train∩test / val∩test patients per fold, as counted in ../shared/data/PROVENANCE.md
    ("tcga_blca", "mambamil/splits/TCGA_BLCA_survival_kfold", "mambamil", [[14, 6, 10, 14, 12], [0] * 5, [0] * 5]),
    ("tcga_ucec", "mambamil/splits/TCGA_UCEC_survival_kfold", "mambamil", [[15, 18, 15, 10, 18], [0] * 5, [0] * 5]),
    ("tcga_nsclc", "mambamil/splits/LUAD_LUSC_100", "mambamil",
     [[11, 11, 8, 6, 8, 12, 7, 6, 14, 7], [9, 6, 7, 13, 13, 6, 11, 12, 8, 9], [1, 1, 3, 0, 4, 2, 3, 2, 4, 1]]),
    ("tcga_nsclc", "2dmamba/csv_files/classification/TCGA-NSCLC-split.csv", "2dmamba", [[8], [7], [1]]),
])
def test_paper_splits_import_onto_our_cohorts(cohort, split_path, fmt, leakage):
    need(PAPERS)
    from mambapath.splits import import_splits, leakage_table, load_id_table

    ids = load_id_table(shipped_table_path(cohort))
    imported = import_splits(PAPERS / split_path, fmt, ids)
    assert imported.unknown_ids == []  # every id of the paper's splits is a slide or patient of our table
    patients = set(load_table(cohort)["patient_id"])
    assert all(p in patients for parts in imported.roles.values() for role in parts.values() for p in role)
    table = leakage_table(imported)
    assert [table["train_val"].tolist(), table["train_test"].tolist(), table["val_test"].tolist()] == leakage
