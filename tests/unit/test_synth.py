"""The synthetic cohort: slide format, ground truth, the labelling rule and the clinical table.

The rule's numbers are recomputed here from the ground-truth PNGs with other tools (counts
with numpy, distances with a k-d tree) and the rule's constants written out, and the
survival model is checked by fitting lifelines' Cox model to simulated patients.
"""

from __future__ import annotations

import re

import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile
from PIL import Image
from scipy.spatial import cKDTree

from mambapath import synth
from mambapath.cli import main as cli_main
from mambapath.config import validate_sheet
from mambapath.errors import ConfigError

# The documented rule, written out independently of the module's constants.
RULE_BURDEN = 0.30
RULE_CONTACT = 0.5
RULE_CONTACT_UM = 40.0
TYPE_CODES = {"tumour": 1, "stroma": 2, "lymphocytes": 3, "necrosis": 4, "fat": 5}


def test_slide_ids_are_a_function_of_the_config():
    ids = synth.synth_slide_ids("demo", {"n_patients": 3, "seed": 1})
    assert ids == ["demo-P000-S1", "demo-P001-S1", "demo-P002-S1"]
    # the seed and the sizes do not change the ids; slides_per_patient does
    assert ids == synth.synth_slide_ids("demo", {"n_patients": 3, "seed": 99, "width_px": 512})
    two = synth.synth_slide_ids("demo", {"n_patients": 2, "slides_per_patient": 2})
    assert two == ["demo-P000-S1", "demo-P000-S2", "demo-P001-S1", "demo-P001-S2"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", s) for s in ids + two)


@pytest.mark.parametrize(
    "cfg, key",
    [({"n_patiens": 3}, "n_patiens"), ({"n_patients": "3"}, "n_patients"), ({"tile_px": 100}, "tile_px"),
     ({"mpp": 0}, "mpp")],
)
def test_bad_synth_settings_name_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key):
        synth.synth_settings(cfg)


def test_slides_open_as_aperio_pyramids(tiny_cohort):
    for path in tiny_cohort.slide_paths:
        slide = openslide.OpenSlide(str(path))
        assert slide.properties["openslide.vendor"] == "aperio"
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(1.0)
        assert float(slide.properties["openslide.objective-power"]) == pytest.approx(10.0)
        assert slide.dimensions == (1536, 1152)
        assert slide.level_count == 3
        assert [round(d) for d in slide.level_downsamples] == [1, 2, 4]
        slide.close()
        with tifffile.TiffFile(path) as tif:
            assert len(tif.pages) == 3  # levels as separate pages
            for page in tif.pages:
                assert page.is_tiled
                assert page.compression == tifffile.COMPRESSION.JPEG
                assert not page.subifds  # no SubIFD pyramids
                assert page.description.startswith("Aperio")


def _mean_colour_per_type(tiny_cohort, slide_id, path):
    """Mean RGB of each tissue type, read through OpenSlide at 4 um/px (level 2)."""
    types = np.asarray(Image.open(tiny_cohort.gt_types_path(slide_id)))
    slide = openslide.OpenSlide(str(path))
    rgb = np.asarray(slide.read_region((0, 0), 2, slide.level_dimensions[2]).convert("RGB")).astype(float)
    slide.close()
    h, w = min(types.shape[0], rgb.shape[0]), min(types.shape[1], rgb.shape[1])
    types, rgb = types[:h, :w], rgb[:h, :w]
    return {code: rgb[types == code].mean(0) for code in np.unique(types) if (types == code).sum() > 200}, rgb, types


def test_tissue_types_have_distinct_he_like_colours(tiny_cohort):
    colours = {}
    for slide_id, path in zip(tiny_cohort.slide_ids, tiny_cohort.slide_paths):
        for code, mean in _mean_colour_per_type(tiny_cohort, slide_id, path)[0].items():
            colours.setdefault(code, []).append(mean)
    colours = {code: np.mean(v, 0) for code, v in colours.items()}
    bg, tumour, stroma, lymph = colours[0], colours[1], colours[2], colours[3]
    assert bg.min() > 225 and bg.max() - bg.min() < 12  # white, grey glass
    for code in (1, 2, 3):
        r, g, b = colours[code]
        assert g < r and g < b, f"type {code} is not pink/purple (green must be the weakest channel)"
    # tumour and lymphocytes are nuclear (darker, bluer) and stroma is eosin pink
    assert tumour.sum() < stroma.sum() - 60
    assert lymph.sum() < stroma.sum() - 60
    assert (tumour[2] - tumour[0]) > (stroma[2] - stroma[0]) + 10
    for a, b in [(1, 2), (1, 3), (2, 3)]:
        assert np.linalg.norm(colours[a] - colours[b]) > 20, f"types {a} and {b} look alike"


def test_ground_truth_mask_is_the_tissue_of_the_types_map(tiny_cohort):
    for slide_id in tiny_cohort.slide_ids:
        mask = np.asarray(Image.open(tiny_cohort.gt_mask_path(slide_id))) > 0
        types = np.asarray(Image.open(tiny_cohort.gt_types_path(slide_id)))
        assert mask.shape == types.shape == (1152 // 4, 1536 // 4)
        agree = (mask == (types > 0)).mean()
        assert agree > 0.99
        assert 0.2 < mask.mean() < 0.8


def test_sheet_is_valid_and_complete(tiny_cohort):
    sheet = pd.read_csv(tiny_cohort.sheet_path, dtype={"slide_id": str, "patient_id": str, "label": str})
    validate_sheet(sheet, tiny_cohort.sheet_path)
    for column in ("slide_id", "patient_id", "path", "mpp", "stage", "os_days", "os_event", "label",
                   "frac_tumour", "frac_stroma", "frac_lymphocytes", "frac_necrosis", "frac_fat",
                   "lymph_tumour_contact", "arrangement", "burden"):
        assert column in sheet.columns, column
    assert set(sheet["label"]) <= {"0", "1"}
    assert set(sheet["stage"]) <= {"I", "II", "III", "IV"}
    assert set(sheet["os_event"]) <= {0, 1}
    assert (sheet["os_days"] > 0).all()
    assert sheet["slide_id"].tolist() == synth.synth_slide_ids("tiny", tiny_cohort.settings)


def _independent_measures(types: np.ndarray, mpp: float) -> dict:
    counts = {name: int((types == code).sum()) for name, code in TYPE_CODES.items()}
    tissue = sum(counts.values())
    out = {f"frac_{name}": n / tissue for name, n in counts.items()}
    lymph = np.argwhere(types == TYPE_CODES["lymphocytes"])
    tumour = np.argwhere(np.isin(types, (TYPE_CODES["tumour"], TYPE_CODES["necrosis"])))
    if len(lymph) and len(tumour):
        dist, _ = cKDTree(tumour).query(lymph)
        out["lymph_tumour_contact"] = float((dist * mpp <= RULE_CONTACT_UM).mean())
    else:
        out["lymph_tumour_contact"] = 0.0
    return out


def test_labels_follow_the_documented_rule(tiny_cohort):
    for row in tiny_cohort.sheet.itertuples():
        types = np.asarray(Image.open(tiny_cohort.gt_types_path(row.slide_id)))
        m = _independent_measures(types, 4.0)
        for key, value in m.items():
            assert getattr(row, key) == pytest.approx(value, abs=1e-3), key
        burden = m["frac_tumour"] + m["frac_necrosis"]
        expected = "1" if (burden >= RULE_BURDEN and m["lymph_tumour_contact"] < RULE_CONTACT) else "0"
        assert row.label == expected
        assert row.arrangement == ("infiltrated" if m["lymph_tumour_contact"] >= RULE_CONTACT else "excluded")


def test_rule_needs_composition_and_arrangement():
    base = {"frac_tumour": 0.40, "frac_necrosis": 0.05, "frac_lymphocytes": 0.1, "frac_stroma": 0.4, "frac_fat": 0.05}
    assert synth.apply_rule({**base, "lymph_tumour_contact": 0.0})["label"] == "1"
    assert synth.apply_rule({**base, "lymph_tumour_contact": 0.9})["label"] == "0"  # same composition
    low = {**base, "frac_tumour": 0.10}
    assert synth.apply_rule({**low, "lymph_tumour_contact": 0.0})["label"] == "0"  # same arrangement


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arrangement_is_spatial_not_compositional(seed):
    """Same composition targets; only where the lymphocytes sit differs."""
    measured = {}
    for arrangement in ("infiltrated", "excluded"):
        plan = synth.PatientPlan(tumour=0.35, necrosis=0.05, lymphocytes=0.10, fat=0.03, arrangement=arrangement)
        layout = synth.make_layout(np.random.default_rng(seed), plan, (300, 400), 8.0)
        measured[arrangement] = _independent_measures(layout, 8.0)
    inf, exc = measured["infiltrated"], measured["excluded"]
    assert inf["lymph_tumour_contact"] >= 0.5
    assert exc["lymph_tumour_contact"] < 0.1
    for key in ("frac_tumour", "frac_necrosis", "frac_lymphocytes", "frac_stroma", "frac_fat"):
        assert abs(inf[key] - exc[key]) < 0.04, key


def test_survival_model_matches_its_documented_hazard_ratios():
    """Cox regression (lifelines) on simulated patients recovers the documented log hazards."""
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(0)
    rows = []
    for p in range(2500):
        necrosis = rng.uniform(0.0, 0.12)
        measures = {"frac_tumour": rng.uniform(0.1, 0.55), "frac_necrosis": necrosis,
                    "lymph_tumour_contact": float(rng.random() < 0.5)}
        out = synth.clinical_outcome(123, p, measures)
        rows.append({"T": out["os_days"] + 0.5, "E": out["os_event"], "stage_number": "I II III IV".split().index(out["stage"]),
                     "excluded": int(out["arrangement"] == "excluded"), "necrosis": necrosis})
    frame = pd.DataFrame(rows)
    assert 0.3 < frame["E"].mean() < 0.8  # censoring present, events too
    cph = CoxPHFitter().fit(frame, duration_col="T", event_col="E")
    assert cph.params_["stage_number"] == pytest.approx(0.45, abs=0.1)
    assert cph.params_["excluded"] == pytest.approx(0.70, abs=0.12)
    assert cph.params_["necrosis"] == pytest.approx(2.0, abs=1.5)


def test_same_seed_same_cohort_any_workers(tmp_path):
    cfg = {"n_patients": 2, "seed": 5, "width_px": 512, "height_px": 384, "n_levels": 2}
    a = synth.synth_cohort(tmp_path / "a", "rep", cfg, workers=1)
    b = synth.synth_cohort(tmp_path / "b", "rep", cfg, workers=2)
    c = synth.synth_cohort(tmp_path / "c", "rep", {**cfg, "seed": 6}, workers=1)
    drop = ["path", "gt_mask", "gt_types"]
    pd.testing.assert_frame_equal(a.drop(columns=drop), b.drop(columns=drop))
    assert not np.allclose(a["frac_tumour"], c["frac_tumour"])
    for slide_id in a["slide_id"]:
        ta = np.asarray(Image.open(tmp_path / "a" / "synth" / f"{slide_id}_types.png"))
        tb = np.asarray(Image.open(tmp_path / "b" / "synth" / f"{slide_id}_types.png"))
        tc = np.asarray(Image.open(tmp_path / "c" / "synth" / f"{slide_id}_types.png"))
        np.testing.assert_array_equal(ta, tb)
        assert (ta != tc).mean() > 0.05


def test_cli_writes_the_cohort(tmp_path):
    cohort_file = tmp_path / "mini.yaml"
    cohort_file.write_text(
        "name: mini\nsource: synth\ntasks: [classification]\n"
        "synth: {n_patients: 2, seed: 3, width_px: 512, height_px: 384, n_levels: 2}\n"
    )
    assert cli_main(["synth", "--cohort-file", str(cohort_file), "--out-dir", str(tmp_path / "out")]) == 0
    sheet = pd.read_csv(tmp_path / "out" / "cohort" / "slides.csv", dtype={"label": str})
    assert sheet["slide_id"].tolist() == ["mini-P000-S1", "mini-P001-S1"]
    assert all((tmp_path / "out" / "slides" / f"{s}.tiff").exists() for s in sheet["slide_id"])


def test_cli_rejects_bad_synth_settings(tmp_path, capsys):
    cohort_file = tmp_path / "bad.yaml"
    cohort_file.write_text("name: bad\nsource: synth\ntasks: [classification]\nsynth: {n_patients: 2, widht_px: 9}\n")
    assert cli_main(["synth", "--cohort-file", str(cohort_file), "--out-dir", str(tmp_path / "out")]) == 2
    assert "widht_px" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    not_synth = tmp_path / "sheet.yaml"
    not_synth.write_text("name: real\nsource: sheet\nsheet: x.csv\ntasks: [classification]\n")
    assert cli_main(["synth", "--cohort-file", str(not_synth), "--out-dir", str(tmp_path / "out")]) == 2
    assert "not 'synth'" in capsys.readouterr().err


@pytest.mark.parametrize("bad_id", ["a b", "x;rm -rf ~", "../../etc/passwd", "dir/slide", "$(whoami)", "s`id`", "quote'd"])
def test_sheet_rejects_slide_ids_that_break_shells_or_paths(bad_id):
    frame = pd.DataFrame({"slide_id": ["ok-1", bad_id], "patient_id": ["p1", "p2"], "path": ["a.svs", "b.svs"]})
    with pytest.raises(ConfigError) as info:
        validate_sheet(frame, "slides.csv")
    message = str(info.value)
    assert "slides.csv" in message and "slide_id" in message and repr(bad_id) in message
