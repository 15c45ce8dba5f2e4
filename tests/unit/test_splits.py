"""Splits: patient-level stratified k-fold, leakage refused, the papers' split files imported."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mambapath import splits as S
from mambapath.cli import main
from mambapath.errors import DataError

SHARED_COHORTS = Path(__file__).resolve().parents[3] / "shared" / "data" / "cohorts"


def shared(*parts) -> Path:
    path = SHARED_COHORTS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared/data not found: {path}")
    return path


STAGING = S.TaskSpec("staging", "classification", label="stage", classes=["I", "II", "III", "IV"])
SURVIVAL = S.TaskSpec("survival", "survival", time="os_days", event="os_event")


def make_sheet(n_patients=40, slides_per_patient=1, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    stages = np.array(["I", "II", "III", "IV"])[np.arange(n_patients) % 4]
    for i in range(n_patients):
        days, event = float(rng.integers(10, 3000)), int(rng.integers(0, 2)) if i >= 5 else 1
        for s in range(slides_per_patient):
            rows.append({"slide_id": f"P{i:03d}-S{s}", "patient_id": f"P{i:03d}", "path": f"P{i:03d}-S{s}.tiff",
                         "stage": stages[i], "os_days": days, "os_event": event})
    return pd.DataFrame(rows)


def assert_k_fold(splits: pd.DataFrame, patients: set, folds: int):
    """Independent checks of the split invariants, written out over plain Python sets."""
    assert set(splits["fold"]) == set(range(folds))
    for fold in range(folds):
        part = splits[splits["fold"] == fold]
        roles = {r: set(part.loc[part["role"] == r, "patient_id"]) for r in ("train", "val", "test")}
        assert not roles["train"] & roles["val"]
        assert not roles["train"] & roles["test"]
        assert not roles["val"] & roles["test"]
        assert roles["train"] | roles["val"] | roles["test"] == patients
    tests = splits[splits["role"] == "test"]
    assert sorted(tests["patient_id"]) == sorted(patients)  # each patient tested exactly once


@pytest.mark.parametrize("task", [STAGING, SURVIVAL], ids=["staging", "survival"])
def test_folds_are_patient_level_and_do_not_leak(task):
    sheet = make_sheet(40, slides_per_patient=2)
    patients = S.patient_table(sheet, task)
    splits = S.make_splits(patients, folds=5, val_fraction=0.2, seed=3, classes=task.classes or None,
                           survival=task.type == "survival")
    assert len(patients) == 40
    assert_k_fold(splits, set(sheet["patient_id"]), 5)
    merged = splits.merge(patients, on="patient_id")
    for fold in range(5):
        test = merged[(merged.fold == fold) & (merged.role == "test")]
        train = merged[(merged.fold == fold) & (merged.role != "test")]
        # stratified: every stratum in every test fold, in proportion (10 per class / 5 folds = 2)
        if task.type == "classification":
            assert test["stratum"].value_counts().to_dict() == {"I": 2, "II": 2, "III": 2, "IV": 2}
        # the val part is round(0.2 x training patients), taken from the training patients
        assert (train.role == "val").sum() == round(0.2 * len(train))


def test_val_part_is_stratified():
    sheet = make_sheet(80)
    patients = S.patient_table(sheet, STAGING)
    splits = S.make_splits(patients, folds=4, val_fraction=0.25, seed=0, classes=STAGING.classes)
    val = splits[(splits.fold == 0) & (splits.role == "val")].merge(patients, on="patient_id")
    # 60 training patients, 15 per class: the val part takes 15 = 3.75 per class, apportioned 4/4/4/3
    assert len(val) == 15
    assert sorted(val["stratum"].value_counts().tolist()) == [3, 4, 4, 4]


def test_splits_are_seeded_and_independent_of_row_order():
    sheet = make_sheet(30)
    a = S.make_splits(S.patient_table(sheet, STAGING), 3, 0.2, seed=1, classes=STAGING.classes)
    b = S.make_splits(S.patient_table(sheet.sample(frac=1, random_state=9), STAGING), 3, 0.2, seed=1,
                      classes=STAGING.classes)
    c = S.make_splits(S.patient_table(sheet, STAGING), 3, 0.2, seed=2, classes=STAGING.classes)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_survival_stratifies_by_event():
    sheet = make_sheet(50)
    patients = S.patient_table(sheet, SURVIVAL)
    splits = S.make_splits(patients, folds=5, val_fraction=0.2, seed=0, survival=True)
    events = splits[splits.role == "test"].merge(patients, on="patient_id").groupby("fold")["event"].sum()
    total = int(patients["event"].sum())
    assert events.max() - events.min() <= 1 and events.sum() == total


def test_too_few_patients_for_folds():
    patients = S.patient_table(make_sheet(4), STAGING)
    with pytest.raises(DataError, match="4 patient.*5 folds"):
        S.make_splits(patients, folds=5, classes=STAGING.classes)


def test_class_too_rare_for_every_fold_is_an_error_unless_allowed():
    sheet = make_sheet(40)
    sheet.loc[sheet["stage"] == "IV", "stage"] = "III"
    sheet.loc[sheet.index[:3], "stage"] = "IV"  # three stage IV patients, five folds
    patients = S.patient_table(sheet, STAGING)
    with pytest.raises(DataError, match=r"'IV': 3.*allow_absent_classes"):
        S.make_splits(patients, folds=5, classes=STAGING.classes)
    splits = S.make_splits(patients, folds=5, classes=STAGING.classes, allow_absent_classes=True)
    assert_k_fold(splits, set(sheet["patient_id"]), 5)


def test_config_class_without_patients_is_an_error():
    sheet = make_sheet(40)
    sheet.loc[sheet["stage"] == "IV", "stage"] = "III"
    with pytest.raises(DataError, match=r"\['IV'\] have no patient"):
        S.make_splits(S.patient_table(sheet, STAGING), folds=5, classes=STAGING.classes)


def test_too_few_events_is_always_an_error():
    sheet = make_sheet(40)
    sheet["os_event"] = 0
    sheet.loc[sheet.index[:2], "os_event"] = 1
    with pytest.raises(DataError, match="2 observed event"):
        S.make_splits(S.patient_table(sheet, SURVIVAL), folds=5, survival=True, allow_absent_classes=True)


def test_labels_outside_the_config_classes():
    sheet = make_sheet(20)
    sheet.loc[3, "stage"] = "IIA"
    with pytest.raises(DataError, match=r"\['IIA'\].*P003-S0.*tasks.staging.classes"):
        S.patient_table(sheet, STAGING, "sheet.csv")


@pytest.mark.parametrize("value", [-5.0, np.nan])
def test_negative_or_missing_survival_times(value):
    sheet = make_sheet(20)
    sheet.loc[7, "os_days"] = value
    with pytest.raises(DataError, match="P007-S0"):
        S.patient_table(sheet, SURVIVAL, "sheet.csv")


def test_missing_targets_dropped_only_when_asked():
    sheet = make_sheet(20)
    sheet.loc[2, "stage"] = None
    with pytest.raises(DataError, match="drop_missing"):
        S.patient_table(sheet, STAGING)
    patients = S.patient_table(sheet, STAGING, drop_missing=True)
    assert "P002" not in set(patients["patient_id"]) and len(patients) == 19


def test_slides_of_a_patient_must_agree():
    sheet = make_sheet(10, slides_per_patient=2)
    sheet.loc[1, "stage"] = "IV" if sheet.loc[1, "stage"] != "IV" else "I"
    with pytest.raises(DataError, match="P000"):
        S.patient_table(sheet, STAGING)


def test_missing_label_column():
    with pytest.raises(DataError, match=r"\['stage'\]"):
        S.patient_table(make_sheet(10).drop(columns="stage"), STAGING)


def test_leakage_refused_on_write_and_on_read(tmp_path):
    leaking = pd.DataFrame({"patient_id": ["A", "A", "B", "C"], "fold": [0, 0, 0, 0],
                            "role": ["train", "test", "train", "test"]})
    with pytest.raises(DataError, match="leakage.*A"):
        S.write_splits(tmp_path / "s.csv", leaking)
    assert not (tmp_path / "s.csv").exists()
    leaking.to_csv(tmp_path / "hand.csv", index=False)
    with pytest.raises(DataError, match="leakage"):
        S.read_splits(tmp_path / "hand.csv")


def test_cli_writes_a_split_file(tmp_path):
    sheet = make_sheet(25, slides_per_patient=2)
    sheet.to_csv(tmp_path / "slides.csv", index=False)
    out = tmp_path / "splits" / "staging.csv"
    rc = main(["split", "--sheet", str(tmp_path / "slides.csv"), "--task", "staging", "--task-type",
               "classification", "--label", "stage", "--classes", "I", "II", "III", "IV", "--folds", "5",
               "--val-fraction", "0.2", "--seed", "0", "--exclude", "P000-S0", "P000-S1", "--out", str(out)])
    assert rc == 0
    written = S.read_splits(out)
    assert list(written.columns) == ["patient_id", "fold", "role"]
    assert_k_fold(written, set(sheet["patient_id"]) - {"P000"}, 5)
    assert len(written) == 24 * 5


def test_cli_error_is_one_line(tmp_path, capsys):
    make_sheet(3).to_csv(tmp_path / "slides.csv", index=False)
    rc = main(["split", "--sheet", str(tmp_path / "slides.csv"), "--task", "survival", "--task-type", "survival",
               "--time", "os_days", "--event", "os_event", "--folds", "5", "--out", str(tmp_path / "s.csv")])
    assert rc == 2
    assert "3 patient(s) for 5 folds" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


def test_cli_flags_from_the_workflow_config():
    flags = S.cli_flags("staging", {"type": "classification", "label": "stage", "classes": ["I", "II"]},
                        {"folds": 5, "val_fraction": 0.2, "seed": 0, "drop_missing": True}, ["s 1"])
    assert flags == ("--task staging --task-type classification --label stage --classes I II --folds 5 "
                     "--val-fraction 0.2 --seed 0 --drop-missing --exclude 's 1'")


# ----------------------------------------------------------------------------------------------
# The papers' split files: PROVENANCE.md ("Cohort statistics") counts their leakage per fold
# ----------------------------------------------------------------------------------------------

PROVENANCE_LEAKAGE = {
    # (format, path under ../shared/data/cohorts): (train∩val, train∩test, val∩test) per fold
    ("mambamil", "mambamil/splits/TCGA_BLCA_survival_kfold"): ([14, 6, 10, 14, 12], [0] * 5, [0] * 5),
    ("mambamil", "mambamil/splits/TCGA_UCEC_survival_kfold"): ([15, 18, 15, 10, 18], [0] * 5, [0] * 5),
    ("mambamil", "mambamil/splits/LUAD_LUSC_100"): (
        [11, 11, 8, 6, 8, 12, 7, 6, 14, 7], [9, 6, 7, 13, 13, 6, 11, 12, 8, 9], [1, 1, 3, 0, 4, 2, 3, 2, 4, 1]),
    ("mambamil", "mambamil/splits/TCGA_BRCA_survival_kfold"): ([0] * 5, [0] * 5, [0] * 5),
    ("clam", "mambamil/splits/TCGA_KIRP_survival_kfold"): ([0] * 5, [0] * 5, [0] * 5),
    ("2dmamba", "2dmamba/csv_files/classification/TCGA-BRCA-split.csv"): ([10], [12], [1]),
    ("2dmamba", "2dmamba/csv_files/classification/TCGA-NSCLC-split.csv"): ([8], [7], [1]),
    ("2dmamba", "2dmamba/csv_file"): ([8], [7], [1]),
    ("2dmamba", "2dmamba/csv_files/survival/TCGA_UCEC_survival_kfold"): ([15, 18, 15, 10, 18], [0] * 5, [0] * 5),
}


@pytest.mark.shared_data
@pytest.mark.parametrize("key", list(PROVENANCE_LEAKAGE), ids=[p for _, p in PROVENANCE_LEAKAGE])
def test_imported_leakage_equals_provenance_counts(key):
    fmt, rel = key
    table = S.leakage_table(S.import_splits(shared(rel), fmt))
    expected = PROVENANCE_LEAKAGE[key]
    assert table["train_val"].tolist() == expected[0]
    assert table["train_test"].tolist() == expected[1]
    assert table["val_test"].tolist() == expected[2]


@pytest.mark.shared_data
def test_survival_folds_without_test_evaluate_their_val_part():
    imported = S.import_splits(shared("mambamil", "splits", "TCGA_KIRC_survival_kfold"), "mambamil")
    assert imported.val_as_test == [0, 1, 2, 3, 4]
    frame = S.imported_to_frame(imported)
    assert set(frame["role"]) == {"train", "test"}
    tested = frame[frame.role == "test"]
    assert tested["patient_id"].is_unique and tested["patient_id"].nunique() == 498  # PROVENANCE: 498 patients


@pytest.mark.shared_data
@pytest.mark.parametrize("rel", ["mambamil/splits/LUAD_LUSC_100", "mambamil/splits/TCGA_BLCA_survival_kfold"])
def test_repair_keeps_leaking_patients_held_out(rel):
    imported = S.import_splits(shared(*rel.split("/")), "mambamil")
    repaired = S.repair_leakage(imported.roles)
    for fold, parts in imported.roles.items():
        fixed = repaired[fold]
        assert not (fixed["train"] & fixed["val"]) and not (fixed["train"] & fixed["test"])
        assert not (fixed["val"] & fixed["test"])
        assert fixed["test"] == parts["test"]  # the evaluated part is kept as published
        assert fixed["val"] == parts["val"] - parts["test"]
        assert fixed["train"] == parts["train"] - parts["val"] - parts["test"]
    S.check_splits(S.imported_to_frame(imported, repaired))


@pytest.mark.shared_data
def test_import_cli_refuses_to_write_leaking_splits_without_repair(tmp_path, capsys):
    src = shared("mambamil", "splits", "TCGA_UCEC_survival_kfold")
    out = tmp_path / "ucec.csv"
    assert main(["split", "--import", str(src), "--format", "mambamil", "--out", str(out)]) == 2
    assert "--repair" in capsys.readouterr().err and not out.exists()
    assert main(["split", "--import", str(src), "--format", "mambamil", "--out", str(out), "--repair",
                 "--leakage", str(tmp_path / "leak.csv")]) == 0
    leak = pd.read_csv(tmp_path / "leak.csv")
    assert leak["train_val"].tolist() == [15, 18, 15, 10, 18]
    written = S.read_splits(out)
    assert sorted(written["fold"].unique()) == [0, 1, 2, 3, 4]


@pytest.mark.shared_data
def test_id_tables_with_the_papers_format_differences():
    # BLCA: slide ids with .svs and no index column; patient ids equal those of the barcode
    blca = S.load_id_table(shared("mambamil", "dataset_csv", "BLCA_processed.csv"))
    assert blca["TCGA-2F-A9KO-01Z-00-DX1.195576CF-B739-4BD9-B15B-4A70AE287D3E"] == "TCGA-2F-A9KO"
    # LUAD_LUSC: case_id holds the slide id, so the patient comes from the barcode
    lung = S.load_id_table(shared("mambamil", "dataset_csv", "LUAD_LUSC.csv"))
    slide = "TCGA-85-A511-01Z-00-DX1.24345C5F-BDC2-4D9D-BAE5-686B4C8C66DE"
    assert lung[slide] == "TCGA-85-A511"
    with_table = S.leakage_table(S.import_splits(shared("mambamil", "splits", "LUAD_LUSC_100"), "mambamil", lung))
    assert with_table["train_test"].tolist() == PROVENANCE_LEAKAGE[("mambamil", "mambamil/splits/LUAD_LUSC_100")][1]


def test_import_needs_a_table_for_ids_that_are_not_tcga_barcodes(tmp_path):
    pd.DataFrame({"train": ["a1", "b1"], "val": ["c1", None], "test": ["d1", None]}).to_csv(
        tmp_path / "splits_0.csv")
    with pytest.raises(DataError, match="not a TCGA barcode.*--sheet"):
        S.import_splits(tmp_path, "clam")
    table = tmp_path / "ids.csv"
    pd.DataFrame({"slide_id": ["a1", "b1", "c1", "d1"], "patient_id": ["A", "B", "A", "D"]}).to_csv(table, index=False)
    leak = S.leakage_table(S.import_splits(tmp_path, "clam", S.load_id_table(table)))
    assert leak[["train_val", "train_test", "val_test"]].iloc[0].tolist() == [1, 0, 0]
