"""Workflow config, cohort files and cohort sheets: loading and validation.

The Snakefile validates with the same functions before any job runs, so a wrong key or
type fails at once with a message that names the key (``tiling.patch_size: 'big' is not of
type 'integer'``) instead of deep inside a job.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

#: repository root (config/, rules/ ...) when running from a checkout
REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "config"


def _load_yaml(path: Path) -> Any:
    try:
        with open(path) as fh:
            return yaml.safe_load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc


def _validate(instance: Any, schema_path: Path, what: str) -> None:
    import jsonschema

    schema = _load_yaml(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors[:10]:
            key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
            lines.append(f"  {key}: {err.message}")
        raise ConfigError(f"{what} does not match {schema_path.name}:\n" + "\n".join(lines))


def validate_config(config: dict, source: str = "config") -> dict:
    """Validate a workflow config dict against config/config.schema.yaml."""
    _validate(config, CONFIG_DIR / "config.schema.yaml", source)
    tiling = config.get("tiling", {})
    if not tiling.get("target_mpp") and not tiling.get("magnification"):
        raise ConfigError(f"{source}: tiling needs target_mpp or magnification")
    if tiling.get("overlap", 0) >= tiling["patch_size"]:
        raise ConfigError(f"{source}: tiling.overlap must be smaller than tiling.patch_size")
    return config


def load_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    config = _load_yaml(path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return validate_config(config, str(path))


@dataclass
class Cohort:
    name: str
    source: str
    tasks: list[str]
    sheet: Path | None = None
    slides_dir: Path | None = None
    mpp: float | None = None
    exclude: list[str] = field(default_factory=list)
    synth: dict = field(default_factory=dict)
    gdc: dict = field(default_factory=dict)
    file: Path | None = None


def cohort_file(config: dict) -> Path:
    if config.get("cohort_file"):
        return Path(config["cohort_file"])
    return CONFIG_DIR / "cohorts" / f"{config['cohort']}.yaml"


def load_cohort(config: dict) -> Cohort:
    path = cohort_file(config)
    if not path.exists():
        known = sorted(p.stem for p in (CONFIG_DIR / "cohorts").glob("*.yaml"))
        raise ConfigError(
            f"cohort '{config['cohort']}': no cohort file {path}; known cohorts: {', '.join(known)} "
            "(or set cohort_file to your own yaml)"
        )
    data = _load_yaml(path)
    _validate(data, CONFIG_DIR / "cohort.schema.yaml", str(path))
    unknown = [t for t in data["tasks"] if t not in config.get("tasks", {})]
    if unknown:
        raise ConfigError(f"{path}: tasks {unknown} are not defined under `tasks` in the workflow config")

    def _resolve(p):
        if p is None:
            return None
        p = Path(os.path.expandvars(os.path.expanduser(p)))
        return p if p.is_absolute() else (REPO_ROOT / p)

    return Cohort(
        name=data["name"],
        source=data["source"],
        tasks=list(data["tasks"]),
        sheet=_resolve(data.get("sheet")),
        slides_dir=_resolve(data.get("slides_dir")),
        mpp=data.get("mpp"),
        exclude=list(data.get("exclude", [])),
        synth=dict(data.get("synth") or {}),
        gdc=dict(data.get("gdc") or {}),
        file=path,
    )


def validate_sheet(frame, path: str | os.PathLike = "cohort sheet"):
    """Validate a cohort sheet (pandas DataFrame), row by row, naming the row and column."""
    import jsonschema

    schema = _load_yaml(CONFIG_DIR / "sheet.schema.yaml")
    missing = [c for c in ("slide_id", "patient_id", "path") if c not in frame.columns]
    if missing:
        raise ConfigError(f"{path}: missing column(s) {missing}; a cohort sheet needs slide_id, patient_id, path")
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for i, row in enumerate(frame.to_dict("records")):
        clean = {k: _none_if_nan(v) for k, v in row.items()}
        for err in validator.iter_errors(clean):
            col = ".".join(str(p) for p in err.absolute_path) or "(row)"
            problems.append(f"  row {i + 2} (slide {row.get('slide_id')!r}), column {col}: {err.message}")
    dup = frame["slide_id"][frame["slide_id"].duplicated()].tolist()
    if dup:
        problems.append(f"  duplicate slide_id(s): {dup[:5]}")
    if problems:
        raise ConfigError(f"{path}: cohort sheet is not valid:\n" + "\n".join(problems[:20]))
    return frame


def _none_if_nan(v):
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def tiling_mpp(tiling: dict) -> float:
    """The tiles' scale in microns per pixel (magnification wins when both are set)."""
    from .slide import magnification_to_mpp

    if tiling.get("magnification"):
        return magnification_to_mpp(tiling["magnification"])
    return float(tiling["target_mpp"])


def tile_tag(tiling: dict) -> str:
    """Output folder name that states the tiling parameters, e.g. ``2.00mpp_112px_0px_overlap``."""
    return f"{tiling_mpp(tiling):.2f}mpp_{tiling['patch_size']}px_{tiling.get('overlap', 0)}px_overlap"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(CONFIG_DIR / "config.yaml"), help="workflow config yaml")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    cohort = load_cohort(config)
    if cohort.sheet is not None and cohort.sheet.exists():
        import pandas as pd

        validate_sheet(pd.read_csv(cohort.sheet, dtype={"slide_id": str, "patient_id": str}), cohort.sheet)
    print(f"{args.config}: valid; cohort {cohort.name} ({cohort.source}), tasks {', '.join(cohort.tasks)}")
    return 0
