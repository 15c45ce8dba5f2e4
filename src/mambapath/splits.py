"""Patient-level cross-validation splits: make them, check them, import the papers' splits.

A split file (``results/<cohort>/splits/<task>.csv``) has one row per patient per fold:
``patient_id, fold, role`` with role ``train``, ``val`` or ``test``. Folds are patient-level
k-fold (each patient is in the test part of exactly one fold), stratified by the class label
(classification, staging) or by the event status (survival); each fold's ``val`` part is a
stratified draw from its training patients. A patient in two roles of one fold is leakage:
it is refused on write and on read.

The papers' split files (CLAM's ``splits_<k>.csv`` layout, used by MambaMIL and 2DMamba) can be
imported. They list slide or case ids per role and do leak (the same patient in two roles of
one fold); :func:`leakage_table` counts it in patients, and :func:`repair_leakage` moves each
leaking patient to the most held-out role it occupies (test, else val), so that no training
patient is ever evaluated on.
"""

from __future__ import annotations

import argparse
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import DataError
from .io import write_csv

log = logging.getLogger(__name__)

ROLES = ("train", "val", "test")
SPLIT_COLUMNS = ("patient_id", "fold", "role")
#: held-out rank of a role: a leaking patient is kept in its highest-ranked role
_HELD_OUT_RANK = {"train": 0, "val": 1, "test": 2}
#: a TCGA barcode: the patient is its first 12 characters (TCGA-XX-XXXX)
TCGA_BARCODE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.IGNORECASE)
_SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".h5", ".pt")


# ----------------------------------------------------------------------------------------------
# Task description and the per-patient table the splits are stratified on
# ----------------------------------------------------------------------------------------------


@dataclass
class TaskSpec:
    """What a task needs from the cohort sheet (one entry of the config's ``tasks``)."""

    name: str
    type: str  # classification | survival
    label: str | None = None
    classes: list[str] = field(default_factory=list)
    time: str | None = None
    event: str | None = None

    @classmethod
    def from_config(cls, name: str, spec: Mapping) -> "TaskSpec":
        return cls(
            name=name,
            type=spec["type"],
            label=spec.get("label"),
            classes=[str(c) for c in spec.get("classes", [])],
            time=spec.get("time"),
            event=spec.get("event"),
        )

    def check(self) -> None:
        where = f"tasks.{self.name}"
        if self.type == "classification":
            if not self.label:
                raise DataError(f"{where}: a classification task needs `label` (the sheet column with the class)")
            if len(self.classes) < 2:
                raise DataError(f"{where}: a classification task needs `classes` (at least two class names)")
        elif self.type == "survival":
            if not self.time or not self.event:
                raise DataError(
                    f"{where}: a survival task needs `time` and `event` (sheet columns, e.g. os_days, os_event)"
                )
        else:
            raise DataError(f"{where}: unknown task type {self.type!r}; use classification or survival")


def patient_table(
    sheet: pd.DataFrame,
    task: TaskSpec,
    sheet_path: str | Path = "cohort sheet",
    exclude: Iterable[str] = (),
    drop_missing: bool = False,
) -> pd.DataFrame:
    """One row per patient with the task's target and the stratum the folds are balanced on.

    Returns columns ``patient_id, stratum`` plus ``label`` (classification) or ``time, event``
    (survival). Every slide of a patient must agree on the target. Missing targets are an error
    unless ``drop_missing`` (then the patients are left out of this task and logged).
    """
    task.check()
    if "patient_id" not in sheet.columns or "slide_id" not in sheet.columns:
        raise DataError(f"{sheet_path}: needs columns slide_id and patient_id")
    needed = [task.label] if task.type == "classification" else [task.time, task.event]
    missing_cols = [c for c in needed if c not in sheet.columns]
    if missing_cols:
        raise DataError(
            f"{sheet_path}: task {task.name!r} needs column(s) {missing_cols}, which the sheet lacks; "
            f"add them or remove {task.name!r} from the cohort's tasks"
        )
    frame = sheet.copy()
    frame["slide_id"] = frame["slide_id"].astype(str)
    frame["patient_id"] = frame["patient_id"].astype(str)
    excluded = set(exclude)
    if excluded:
        frame = frame[~frame["slide_id"].isin(excluded)]

    if task.type == "classification":
        frame["_target"] = frame[task.label].map(_class_name)
        missing = frame["_target"].isna()
        _missing_targets(frame, missing, task, sheet_path, drop_missing, f"column {task.label!r} is empty")
        frame = frame[~missing]
        unknown = sorted(set(frame["_target"]) - set(task.classes))
        if unknown:
            examples = frame.loc[frame["_target"].isin(unknown), "slide_id"].head(5).tolist()
            raise DataError(
                f"{sheet_path}: task {task.name!r}: label(s) {unknown} in column {task.label!r} (e.g. slides "
                f"{examples}) are not among the config's classes {task.classes}; fix the sheet or "
                f"tasks.{task.name}.classes"
            )
        targets = frame.groupby("patient_id")["_target"].agg(lambda s: sorted(set(s)))
        _conflicts(targets, task, sheet_path, "labels")
        table = pd.DataFrame({"patient_id": targets.index, "label": [v[0] for v in targets]})
        table["stratum"] = table["label"]
    else:
        time = pd.to_numeric(frame[task.time], errors="coerce")
        event = pd.to_numeric(frame[task.event], errors="coerce")
        bad_text = frame[task.time].notna() & time.isna() | frame[task.event].notna() & event.isna()
        if bad_text.any():
            examples = frame.loc[bad_text, "slide_id"].head(5).tolist()
            raise DataError(
                f"{sheet_path}: task {task.name!r}: non-numeric {task.time!r}/{task.event!r} for slides {examples}; "
                "survival times must be numbers of days and events 0 or 1"
            )
        missing = time.isna() | event.isna()
        _missing_targets(frame, missing, task, sheet_path, drop_missing, f"{task.time!r} or {task.event!r} is empty")
        keep = ~missing
        frame, time, event = frame[keep], time[keep], event[keep]
        negative = time < 0
        if negative.any():
            examples = frame.loc[negative, "slide_id"].head(5).tolist()
            raise DataError(
                f"{sheet_path}: task {task.name!r}: negative survival times in {task.time!r} for slides {examples}; "
                "times are days from diagnosis and must be >= 0"
            )
        bad_event = ~event.isin([0, 1])
        if bad_event.any():
            examples = frame.loc[bad_event, "slide_id"].head(5).tolist()
            raise DataError(
                f"{sheet_path}: task {task.name!r}: {task.event!r} must be 0 (censored) or 1 (death) "
                f"(slides {examples})"
            )
        frame = frame.assign(_time=time.astype(float), _event=event.astype(int))
        per_patient = frame.groupby("patient_id").agg(
            n_time=("_time", "nunique"),
            n_event=("_event", "nunique"),
            time=("_time", "first"),
            event=("_event", "first"),
        )
        conflicting = per_patient.index[(per_patient["n_time"] > 1) | (per_patient["n_event"] > 1)].tolist()
        if conflicting:
            raise DataError(
                f"{sheet_path}: task {task.name!r}: the slides of patient(s) {conflicting[:5]} disagree on "
                f"{task.time!r}/{task.event!r}; survival is per patient, make them equal"
            )
        table = per_patient[["time", "event"]].reset_index()
        table["stratum"] = table["event"].map({0: "censored", 1: "event"})
    if table.empty:
        raise DataError(f"{sheet_path}: task {task.name!r}: no patient has a usable target")
    return table.sort_values("patient_id").reset_index(drop=True)


def _class_name(value) -> str | None:
    """Class names are strings; a float column read from CSV turns 1 into 1.0, undo that."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def _missing_targets(frame, missing, task, sheet_path, drop_missing, what) -> None:
    if not missing.any():
        return
    slides = frame.loc[missing, "slide_id"].tolist()
    if not drop_missing:
        raise DataError(
            f"{sheet_path}: task {task.name!r}: {what} for {len(slides)} slide(s), e.g. {slides[:5]}; fill them in, "
            "or set splits.drop_missing: true to leave those patients out of this task"
        )
    log.warning("task %s: %d slide(s) without a target left out (splits.drop_missing): %s",
                task.name, len(slides), slides[:10])


def _conflicts(targets: pd.Series, task: TaskSpec, sheet_path, what: str) -> None:
    bad = targets[targets.map(len) > 1]
    if len(bad):
        examples = {p: v for p, v in list(bad.items())[:5]}
        raise DataError(
            f"{sheet_path}: task {task.name!r}: the slides of a patient disagree on the {what}: {examples}; "
            "the target is per patient, make them equal"
        )


# ----------------------------------------------------------------------------------------------
# Making splits
# ----------------------------------------------------------------------------------------------


def make_splits(
    patients: pd.DataFrame,
    folds: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
    task_name: str = "task",
    classes: Sequence[str] | None = None,
    allow_absent_classes: bool = False,
    survival: bool = False,
) -> pd.DataFrame:
    """Stratified patient-level k-fold with an inner validation part per fold.

    ``patients`` has columns ``patient_id`` and ``stratum`` (see :func:`patient_table`);
    for survival the strata are ``event`` and ``censored``.
    Each patient is in the test part of exactly one fold; within each fold, a stratified
    ``val_fraction`` of the training patients forms the val part. The result depends only on
    the set of patients and the seed, not on the sheet's row order.
    """
    from sklearn.model_selection import StratifiedKFold

    if folds < 2:
        raise DataError(f"task {task_name!r}: splits.folds must be at least 2 (got {folds})")
    if not 0 <= val_fraction < 1:
        raise DataError(f"task {task_name!r}: splits.val_fraction must be in [0, 1) (got {val_fraction})")
    patients = patients.drop_duplicates("patient_id").sort_values("patient_id").reset_index(drop=True)
    n = len(patients)
    if n < folds:
        raise DataError(
            f"task {task_name!r}: {n} patient(s) for {folds} folds; every fold needs at least one test patient: "
            f"lower splits.folds to at most {n} or add patients"
        )
    counts = patients["stratum"].value_counts()
    if survival:
        n_events = int(counts.get("event", 0))
        if n_events < folds:
            # a test fold without a death has no comparable pair: its C-index is undefined
            raise DataError(
                f"task {task_name!r}: {n_events} observed event(s) for {folds} folds; every test fold needs at "
                "least one death for a C-index: lower splits.folds or add patients"
            )
    else:
        expected = list(classes) if classes else sorted(map(str, counts.index))
        absent = [c for c in expected if c not in counts.index]
        thin = {c: int(counts[c]) for c in expected if c in counts.index and counts[c] < folds}
        if thin or absent:
            problem = []
            if absent:
                problem.append(f"class(es) {absent} have no patient")
            if thin:
                problem.append(
                    f"patients per class {thin} are fewer than folds={folds}, so some test folds would lack them"
                )
            message = (
                f"task {task_name!r}: {'; '.join(problem)}; lower splits.folds, merge classes, "
                "or set splits.allow_absent_classes: true to accept folds without them"
            )
            if not allow_absent_classes:
                raise DataError(message)
            log.warning("%s (accepted: splits.allow_absent_classes)", message)

    strata = patients["stratum"].astype(str).to_numpy()
    outer = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    rows = []
    # StratifiedKFold warns when a stratum is smaller than n_splits; that case was handled above
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fold_indices = list(outer.split(np.zeros(n), strata))
    for fold, (train_idx, test_idx) in enumerate(fold_indices):
        rng = np.random.default_rng([seed, fold])
        val_mask = stratified_draw(strata[train_idx], val_fraction, rng)
        role = np.empty(n, dtype=object)
        role[test_idx] = "test"
        role[train_idx] = np.where(val_mask, "val", "train")
        rows.append(pd.DataFrame({"patient_id": patients["patient_id"].to_numpy(), "fold": fold, "role": role}))
    splits = pd.concat(rows, ignore_index=True)
    return sort_splits(splits)


def stratified_draw(strata: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of ``round(fraction * n)`` items drawn so that each stratum keeps its share.

    Shares are apportioned by the largest-remainder rule, so the total is exact; within a
    stratum the items are drawn at random from ``rng``.
    """
    n = len(strata)
    mask = np.zeros(n, dtype=bool)
    if fraction <= 0 or n < 2:
        return mask
    n_draw = min(n - 1, max(1, int(round(fraction * n))))
    names, counts = np.unique(strata, return_counts=True)
    quota = counts * n_draw / n
    take = np.floor(quota).astype(int)
    # largest remainders first; ties broken by stratum name so the draw is reproducible
    order = sorted(range(len(names)), key=lambda i: (-(quota[i] - take[i]), str(names[i])))
    for i in order[: n_draw - int(take.sum())]:
        take[i] += 1
    for name, k in zip(names, take):
        if k:
            idx = np.flatnonzero(strata == name)
            mask[rng.choice(idx, size=min(k, len(idx)), replace=False)] = True
    return mask


def sort_splits(splits: pd.DataFrame) -> pd.DataFrame:
    rank = splits["role"].map({r: i for i, r in enumerate(ROLES)})
    return (
        splits.assign(_rank=rank)
        .sort_values(["fold", "_rank", "patient_id"])
        .drop(columns="_rank")
        .reset_index(drop=True)[list(SPLIT_COLUMNS)]
    )


# ----------------------------------------------------------------------------------------------
# Checking, writing and reading split files
# ----------------------------------------------------------------------------------------------


def check_splits(splits: pd.DataFrame, path: str | Path = "splits") -> pd.DataFrame:
    """Refuse a split table that is malformed or leaks (a patient in two roles of one fold)."""
    missing = [c for c in SPLIT_COLUMNS if c not in splits.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; a split file has columns patient_id, fold, role")
    if splits.empty:
        raise DataError(f"{path}: no rows; write the splits again with `mambapath split`")
    if splits["patient_id"].isna().any():
        raise DataError(f"{path}: empty patient_id in {int(splits['patient_id'].isna().sum())} row(s)")
    bad_roles = sorted(set(splits["role"]) - set(ROLES))
    if bad_roles:
        raise DataError(f"{path}: unknown role(s) {bad_roles}; roles are train, val, test")
    fold = pd.to_numeric(splits["fold"], errors="coerce")
    if fold.isna().any() or (fold < 0).any() or (fold != fold.round()).any():
        raise DataError(f"{path}: fold must be a non-negative integer in every row")
    twice = splits[splits.duplicated(["patient_id", "fold"], keep=False)]
    if len(twice):
        examples = (
            twice.groupby(["fold", "patient_id"])["role"].agg(lambda s: "/".join(sorted(s))).head(5).to_dict()
        )
        described = ", ".join(f"{p} ({r}) in fold {f}" for (f, p), r in examples.items())
        raise DataError(
            f"{path}: leakage: {twice[['fold', 'patient_id']].drop_duplicates().shape[0]} patient(s) in two roles "
            f"of one fold, e.g. {described}; a patient must have one role per fold (repair imported splits with "
            "`mambapath split --import ... --repair`)"
        )
    for k, part in splits.groupby("fold"):
        roles = set(part["role"])
        if "train" not in roles or "test" not in roles:
            raise DataError(f"{path}: fold {k} has roles {sorted(roles)}; every fold needs train and test patients")
    return splits


def write_splits(path: str | Path, splits: pd.DataFrame) -> None:
    splits = sort_splits(check_splits(splits, path).astype({"patient_id": str, "fold": int}))
    write_csv(path, splits)


def read_splits(path: str | Path) -> pd.DataFrame:
    """Read and check a split file (``patient_id, fold, role``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: split file not found; write it with `mambapath split`")
    splits = pd.read_csv(path, dtype={"patient_id": str, "role": str})
    check_splits(splits, path)
    return splits.astype({"fold": int})


def split_summary(splits: pd.DataFrame, patients: pd.DataFrame | None = None) -> pd.DataFrame:
    """Patients per fold and role (and per stratum when the patient table is given)."""
    frame = splits
    if patients is not None:
        frame = splits.merge(patients[["patient_id", "stratum"]], on="patient_id", how="left")
        return frame.pivot_table(index=["fold", "role"], columns="stratum", values="patient_id", aggfunc="count",
                                 fill_value=0)
    return frame.pivot_table(index="fold", columns="role", values="patient_id", aggfunc="count", fill_value=0)


# ----------------------------------------------------------------------------------------------
# Importing the papers' split files (CLAM layout)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportFormat:
    """Where one code base keeps its split files and how it names them."""

    name: str
    description: str
    #: file name patterns searched in a directory (the first group, if any, is the fold)
    patterns: tuple[str, ...]


IMPORT_FORMATS: dict[str, ImportFormat] = {
    "clam": ImportFormat(
        "clam",
        "CLAM create_splits: splits_<k>.csv with columns train, val, test (slide or case ids), "
        "beside splits_<k>_bool.csv and splits_<k>_descriptor.csv (ignored)",
        (r"^splits_(\d+)\.csv$",),
    ),
    "mambamil": ImportFormat(
        "mambamil",
        "MambaMIL splits/<name>/splits_<k>.csv (CLAM layout): survival folds name cases and leave test empty "
        "(val is the evaluated part); LUAD_LUSC_100 names slides",
        (r"^splits_(\d+)\.csv$",),
    ),
    "2dmamba": ImportFormat(
        "2dmamba",
        "2DMamba dataset/csv_files: survival/<name>_kfold/splits_<k>.csv (CLAM layout) or one "
        "classification split <cohort>-split.csv (train, val, test slide ids; one fold)",
        (r"^splits_(\d+)\.csv$", r"^.*-split\.csv$"),
    ),
}


def find_split_files(path: str | Path, fmt: str) -> list[tuple[int, Path]]:
    """The split files of one import as (fold, path) pairs, folds in order."""
    if fmt not in IMPORT_FORMATS:
        raise DataError(f"unknown split format {fmt!r}; use one of {', '.join(IMPORT_FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found; give a split file or a folder of splits_<k>.csv files")
    spec = IMPORT_FORMATS[fmt]
    if path.is_file():
        match = re.match(r"^splits_(\d+)\.csv$", path.name)
        return [(int(match.group(1)) if match else 0, path)]
    for pattern in spec.patterns:
        regex = re.compile(pattern)
        found = []
        for p in sorted(path.iterdir()):
            m = regex.match(p.name)
            if m and p.is_file():
                found.append((int(m.group(1)) if m.groups() else None, p))
        if found:
            if any(k is None for k, _ in found):
                if len(found) > 1:
                    names = [p.name for _, p in found]
                    raise DataError(f"{path}: several single-split files {names}; import one of them by its path")
                return [(0, found[0][1])]
            return sorted(found)
    raise DataError(
        f"{path}: no split files for format {fmt!r} ({spec.description}); "
        "give the file itself or the folder that holds them"
    )


def read_clam_split(path: str | Path) -> dict[str, list[str]]:
    """Ids per role from one CLAM-layout split file; an empty column gives an empty list."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from exc
    frame = frame.loc[:, [c for c in frame.columns if not str(c).startswith("Unnamed")]]
    missing = [r for r in ROLES if r not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: column(s) {missing} missing; a CLAM-layout split has columns train, val, test "
            f"(found {list(frame.columns)})"
        )
    return {role: [normalise_slide_id(v) for v in frame[role].dropna() if str(v).strip()] for role in ROLES}


def normalise_slide_id(value: str) -> str:
    """Strip whitespace and a file suffix (MambaMIL's BLCA and UCEC slide ids carry ``.svs``)."""
    text = str(value).strip()
    for suffix in _SLIDE_SUFFIXES:
        if text.lower().endswith(suffix):
            return text[: -len(suffix)]
    return text


def tcga_patient(identifier: str) -> str | None:
    match = TCGA_BARCODE.match(identifier)
    return match.group(1).upper() if match else None


def load_id_table(path: str | Path) -> dict[str, str]:
    """slide id (and patient id) -> patient id, from a cohort sheet or a papers' dataset CSV.

    Accepts ``slide_id`` with ``patient_id`` (a cohort sheet) or ``case_id`` (CLAM, MambaMIL,
    2DMamba tables, zipped or not). Where a table's case_id is the slide id itself (MambaMIL
    LUAD_LUSC.csv), the patient is read from the TCGA barcode instead.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str)
    except (FileNotFoundError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the id table ({exc})") from exc
    patient_col = "patient_id" if "patient_id" in frame.columns else "case_id" if "case_id" in frame.columns else None
    if "slide_id" not in frame.columns or patient_col is None:
        raise DataError(f"{path}: an id table needs slide_id and patient_id (or case_id) columns")
    mapping: dict[str, str] = {}
    for slide, patient in zip(frame["slide_id"], frame[patient_col]):
        if pd.isna(slide) or pd.isna(patient):
            continue
        slide = normalise_slide_id(slide)
        patient = normalise_slide_id(patient)
        if patient == slide:
            # a "case id" that is the slide id names no patient: read it from the barcode
            patient = tcga_patient(slide) or patient
        mapping[slide] = patient
        mapping.setdefault(patient, patient)
    return mapping


@dataclass
class ImportedSplits:
    """Patients per role per fold, as read (``roles``) and where the ids came from."""

    source: Path
    format: str
    files: list[tuple[int, Path]]
    roles: dict[int, dict[str, set[str]]]
    n_ids: dict[int, dict[str, int]]
    unknown_ids: list[str] = field(default_factory=list)
    #: folds whose test column is empty: their val part is the evaluated one
    val_as_test: list[int] = field(default_factory=list)


def import_splits(path: str | Path, fmt: str, id_table: Mapping[str, str] | None = None) -> ImportedSplits:
    """Read a paper's split files and resolve every id to a patient.

    A patient is the cohort sheet's ``patient_id`` of a slide when ``id_table`` is given, else
    the TCGA barcode's first 12 characters. Ids that are neither are an error.
    """
    files = find_split_files(path, fmt)
    roles: dict[int, dict[str, set[str]]] = {}
    n_ids: dict[int, dict[str, int]] = {}
    unknown: set[str] = set()
    val_as_test = []
    for fold, file in files:
        ids = read_clam_split(file)
        resolved = {}
        for role, values in ids.items():
            patients = set()
            for v in values:
                patient = id_table.get(v) if id_table else None
                if patient is None:
                    if id_table:
                        unknown.add(v)
                    patient = tcga_patient(v)
                if patient is None:
                    raise DataError(
                        f"{file}: id {v!r} ({role}) is not a TCGA barcode"
                        + (" and not in the id table" if id_table else "")
                        + "; pass --sheet with a table of slide_id and patient_id"
                    )
                patients.add(patient)
            resolved[role] = patients
        if not ids["test"] and ids["val"]:
            val_as_test.append(fold)
        roles[fold] = resolved
        n_ids[fold] = {role: len(v) for role, v in ids.items()}
    if unknown:
        log.warning("%d id(s) are not in the id table; their patient was read from the TCGA barcode: %s",
                    len(unknown), sorted(unknown)[:5])
    return ImportedSplits(Path(path), fmt, files, roles, n_ids, sorted(unknown), val_as_test)


def leakage_table(imported: ImportedSplits) -> pd.DataFrame:
    """Per fold: ids and patients per role, and patients shared by two roles."""
    rows = []
    for fold, parts in imported.roles.items():
        tr, va, te = parts["train"], parts["val"], parts["test"]
        rows.append(
            {
                "fold": fold,
                "file": imported.files[[k for k, _ in imported.files].index(fold)][1].name,
                "ids_train": imported.n_ids[fold]["train"],
                "ids_val": imported.n_ids[fold]["val"],
                "ids_test": imported.n_ids[fold]["test"],
                "patients_train": len(tr),
                "patients_val": len(va),
                "patients_test": len(te),
                "train_val": len(tr & va),
                "train_test": len(tr & te),
                "val_test": len(va & te),
                "leaking_patients": len((tr & va) | (tr & te) | (va & te)),
                "val_is_evaluated": fold in imported.val_as_test,
            }
        )
    return pd.DataFrame(rows)


def repair_leakage(roles: Mapping[int, Mapping[str, set[str]]]) -> dict[int, dict[str, set[str]]]:
    """Keep each leaking patient only in its most held-out role (test, else val).

    Taking the patient out of training, rather than out of evaluation, keeps the evaluated
    parts as published and guarantees no evaluated patient was trained on.
    """
    repaired = {}
    for fold, parts in roles.items():
        best: dict[str, str] = {}
        for role in ROLES:
            for patient in parts.get(role, ()):
                if patient not in best or _HELD_OUT_RANK[role] > _HELD_OUT_RANK[best[patient]]:
                    best[patient] = role
        repaired[fold] = {role: {p for p, r in best.items() if r == role} for role in ROLES}
    return repaired


def imported_to_frame(imported: ImportedSplits, roles=None, keep_patients: set[str] | None = None) -> pd.DataFrame:
    """Our split table from imported roles; a fold whose test is empty evaluates its val part.

    MambaMIL and 2DMamba survival folds leave ``test`` empty and report on ``val``: that part
    becomes our ``test`` and the fold has no inner val part.
    """
    roles = imported.roles if roles is None else roles
    rows = []
    for fold, parts in roles.items():
        for role, patients in parts.items():
            ours = "test" if (fold in imported.val_as_test and role == "val") else role
            for p in patients:
                if keep_patients is None or p in keep_patients:
                    rows.append((p, fold, ours))
    return sort_splits(pd.DataFrame(rows, columns=list(SPLIT_COLUMNS)))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sheet", help="cohort sheet CSV (slide_id, patient_id, label columns); with --import: an "
                        "id table (cohort sheet or the paper's dataset CSV) mapping slide ids to patients")
    parser.add_argument("--out", help="split CSV to write (patient_id, fold, role)")
    make = parser.add_argument_group("make splits from a cohort sheet")
    make.add_argument("--config", help="workflow config yaml: task and splits settings (flags below override it)")
    make.add_argument("--task", help="task name (a key of the config's tasks)")
    make.add_argument("--task-type", choices=["classification", "survival"])
    make.add_argument("--label", help="sheet column with the class (classification)")
    make.add_argument("--classes", nargs="+", help="class names, in class-index order (classification)")
    make.add_argument("--time", help="sheet column with the survival time in days (survival)")
    make.add_argument("--event", help="sheet column with the event, 1 = death (survival)")
    make.add_argument("--folds", type=int)
    make.add_argument("--val-fraction", type=float)
    make.add_argument("--seed", type=int)
    make.add_argument("--exclude", nargs="*", default=[], help="slide ids to leave out")
    make.add_argument("--drop-missing", action="store_true", default=None,
                      help="leave out patients without a target instead of failing")
    make.add_argument("--allow-absent-classes", action="store_true", default=None,
                      help="accept classes with fewer patients than folds (some test folds lack them)")
    imp = parser.add_argument_group("import a paper's split files")
    imp.add_argument("--import", dest="import_path", help="a split file or a folder of splits_<k>.csv")
    imp.add_argument("--format", choices=sorted(IMPORT_FORMATS), help="whose split files they are")
    imp.add_argument("--leakage", help="CSV to write the leakage per fold to")
    imp.add_argument("--repair", action="store_true",
                     help="keep each leaking patient only in its most held-out role (test, else val)")


def cli_flags(task_name: str, task_config: Mapping, splits_config: Mapping, exclude: Sequence[str] = ()) -> str:
    """The `mambapath split` flags for one task of a workflow config (shell-quoted; for the rule)."""
    import shlex

    flags = ["--task", task_name, "--task-type", task_config["type"]]
    if task_config["type"] == "classification":
        flags += ["--label", task_config["label"], "--classes", *map(str, task_config["classes"])]
    else:
        flags += ["--time", task_config["time"], "--event", task_config["event"]]
    for key in ("folds", "val_fraction", "seed"):
        if key in splits_config:
            flags += [f"--{key.replace('_', '-')}", str(splits_config[key])]
    if splits_config.get("drop_missing"):
        flags.append("--drop-missing")
    if splits_config.get("allow_absent_classes"):
        flags.append("--allow-absent-classes")
    if exclude:
        flags += ["--exclude", *exclude]
    return " ".join(shlex.quote(str(f)) for f in flags)


def _settings(args: argparse.Namespace) -> tuple[TaskSpec, dict]:
    config_tasks, config_splits = {}, {}
    if args.config:
        from .config import load_config

        config = load_config(args.config)
        config_tasks, config_splits = config.get("tasks", {}), config.get("splits", {})
    if not args.task:
        raise DataError("mambapath split: --task is required to make splits (or use --import)")
    spec = dict(config_tasks.get(args.task, {}))
    for key, value in (("type", args.task_type), ("label", args.label), ("classes", args.classes),
                       ("time", args.time), ("event", args.event)):
        if value is not None:
            spec[key] = value
    if "type" not in spec:
        raise DataError(f"task {args.task!r}: give --task-type or a --config whose tasks define it")
    settings = {
        "folds": 5, "val_fraction": 0.2, "seed": 0, "drop_missing": False, "allow_absent_classes": False,
        **config_splits,
    }
    for key in settings:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    return TaskSpec.from_config(args.task, spec), settings


def run(args: argparse.Namespace) -> int:
    if args.import_path:
        return _run_import(args)
    if not args.sheet or not args.out:
        raise DataError("mambapath split: give --sheet and --out (or --import to read a paper's splits)")
    task, settings = _settings(args)
    sheet_path = Path(args.sheet)
    if not sheet_path.exists():
        raise DataError(f"{sheet_path}: cohort sheet not found")
    sheet = pd.read_csv(sheet_path, dtype={"slide_id": str, "patient_id": str})
    patients = patient_table(sheet, task, sheet_path, exclude=args.exclude, drop_missing=settings["drop_missing"])
    splits = make_splits(
        patients,
        folds=settings["folds"],
        val_fraction=settings["val_fraction"],
        seed=settings["seed"],
        task_name=task.name,
        classes=task.classes if task.type == "classification" else None,
        allow_absent_classes=settings["allow_absent_classes"],
        survival=task.type == "survival",
    )
    write_splits(args.out, splits)
    log.info("task %s: %d patients, %d folds (seed %d) -> %s", task.name, len(patients), settings["folds"],
             settings["seed"], args.out)
    log.info("patients per fold, role and stratum:\n%s", split_summary(splits, patients).to_string())
    return 0


def _run_import(args: argparse.Namespace) -> int:
    if not args.format:
        raise DataError(f"--import {args.import_path}: give --format ({', '.join(sorted(IMPORT_FORMATS))})")
    id_table = load_id_table(args.sheet) if args.sheet else None
    imported = import_splits(args.import_path, args.format, id_table)
    table = leakage_table(imported)
    if args.leakage:
        write_csv(args.leakage, table)
    print(table.to_markdown(index=False))
    if imported.val_as_test:
        print(f"folds {imported.val_as_test}: test column empty, so val is the evaluated part (our test)")
    leaking = int(table["leaking_patients"].sum())
    if args.out:
        roles = imported.roles
        if leaking:
            if not args.repair:
                raise DataError(
                    f"{args.import_path}: {leaking} leaking patient-fold pair(s) (table above); pass --repair to keep "
                    "each leaking patient only in its most held-out role, or drop --out to only report"
                )
            roles = repair_leakage(roles)
            print(f"repaired: each of {leaking} leaking patient-fold pair(s) kept in its most held-out role")
        keep = set(id_table.values()) if id_table else None
        splits = imported_to_frame(imported, roles, keep)
        if keep is not None:
            outside = set().union(*(set().union(*parts.values()) for parts in roles.values())) - keep
            if outside:
                log.warning("%d patient(s) of the split files are not in %s and are left out: %s",
                            len(outside), args.sheet, sorted(outside)[:5])
        write_splits(args.out, splits)
        print(f"wrote {args.out}: {splits['patient_id'].nunique()} patients, {splits['fold'].nunique()} fold(s)")
    return 0
