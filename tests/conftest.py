"""Fixtures shared by every test module.

- ``shared_data``: the real slides and tables in ``../shared/data`` (next to the repository);
  tests that use it are skipped, with the reason, where the folder is absent.
- ``tiny_cohort``: a small synthetic cohort written once per test session by
  :func:`mambapath.synth.synth_cohort` (4 patients, 1536 x 1152 px slides at 1 um/px, three
  pyramid levels), with its cohort sheet and ground-truth masks. Treat it as read-only.
- ``tiny_slide``: the first slide of ``tiny_cohort`` (path to the TIFF).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

#: the ``synth:`` settings of the tiny cohort (see mambapath.synth.SYNTH_DEFAULTS)
TINY_SYNTH = {
    "n_patients": 4,
    "seed": 11,
    "width_px": 1536,
    "height_px": 1152,
    "mpp": 1.0,
    "n_levels": 3,
}


def shared_data_path() -> Path:
    """``../shared/data`` or a skip with the reason (for helpers outside fixtures)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data not found ({SHARED_DATA}): the real slides and tables live there")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_data_path()


@dataclass(frozen=True)
class TinyCohort:
    out_dir: Path  # like results/<cohort>: slides/, synth/, cohort/
    name: str
    settings: dict
    sheet_path: Path
    sheet: pd.DataFrame

    @property
    def slide_ids(self) -> list[str]:
        return self.sheet["slide_id"].tolist()

    @property
    def slide_paths(self) -> list[Path]:
        return [Path(p) for p in self.sheet["path"]]

    def gt_mask_path(self, slide_id: str) -> Path:
        return self.out_dir / "synth" / f"{slide_id}_mask.png"

    def gt_types_path(self, slide_id: str) -> Path:
        return self.out_dir / "synth" / f"{slide_id}_types.png"


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> TinyCohort:
    from mambapath.synth import synth_cohort

    out_dir = tmp_path_factory.mktemp("tiny_cohort")
    sheet = synth_cohort(out_dir, "tiny", TINY_SYNTH, workers=1)
    sheet_path = out_dir / "cohort" / "slides.csv"
    return TinyCohort(out_dir=out_dir, name="tiny", settings=dict(TINY_SYNTH), sheet_path=sheet_path, sheet=sheet)


@pytest.fixture(scope="session")
def tiny_slide(tiny_cohort) -> Path:
    return tiny_cohort.slide_paths[0]
