"""Seconds per slide of tissue segmentation, and Dice against the synthetic ground truth.

Segments synthetic slides (written here at the demo's size unless ``--cohort-dir`` points
at an existing synthetic cohort such as results/demo) and, where ../shared/data exists, the
real slides there; prints one row per slide and a summary line::

    .venv/bin/python benchmarks/bench_segment.py                       # 6 demo-sized slides + real ones
    .venv/bin/python benchmarks/bench_segment.py --cohort-dir results/demo

Each slide is segmented ``--repeats`` times (outputs written, as in the pipeline); the
table gives the median. "read s" is the part spent reading the low-resolution image.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tabulate import tabulate

from mambapath.segment import SegmentParams, read_at_mpp, segment_slide
from mambapath.slide import open_slide, resolve_mpp
from mambapath.synth import SYNTH_DEFAULTS, synth_cohort

REPO = Path(__file__).resolve().parents[1]
SHARED_WSI = REPO.parent / "shared" / "data" / "wsi"
#: real slides and the fallback mpp the ones without metadata need
REAL_SLIDES = {
    "CMU-1-Small-Region.svs": None,
    "tcga-cr-7395-01a-01-ts1.svs": 0.25,
    "test_dicom.dcm": None,
    "test3-DAPI-2-387.ndpi": None,
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def bench_slide(path: Path, out: Path, params: SegmentParams, repeats: int, fallback=None, gt_mask=None) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        summary = segment_slide(path, out, path.stem, params, fallback_mpp=fallback)
        times.append(time.perf_counter() - start)
    slide = open_slide(path)
    scale = resolve_mpp(slide, path, fallback)
    start = time.perf_counter()
    read_at_mpp(slide, scale.mpp, params.seg_mpp, path)
    read_s = time.perf_counter() - start
    row = {
        "slide": path.name,
        "level-0 px": f"{summary['level0_width']}x{summary['level0_height']}",
        "mpp": round(summary["level0_mpp"], 3),
        "level": summary["level_used"],
        "mask px": f"{summary['mask_width']}x{summary['mask_height']}",
        "seconds": statistics.median(times),
        "read s": read_s,
        "tissue %": 100 * summary["tissue_fraction"],
        "status": summary["status"],
        "Dice": None,
    }
    if gt_mask is not None:
        mask = np.asarray(Image.open(out / "mask.png")) > 0
        gt = np.asarray(Image.open(gt_mask)).astype(np.float32) / 255.0
        gt = cv2.resize(gt, mask.shape[::-1], interpolation=cv2.INTER_AREA) >= 0.5
        row["Dice"] = dice(mask, gt)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort-dir", type=Path, help="an existing synthetic cohort (results/<cohort>)")
    parser.add_argument("--n-slides", type=int, default=6, help="synthetic slides to write when no --cohort-dir")
    parser.add_argument("--width-px", type=int, default=SYNTH_DEFAULTS["width_px"])
    parser.add_argument("--height-px", type=int, default=SYNTH_DEFAULTS["height_px"])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seg-mpp", type=float, default=SegmentParams().seg_mpp)
    parser.add_argument("--no-real", action="store_true", help="skip the real slides in ../shared/data/wsi")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # no per-slide log lines between the table's rows
    params = SegmentParams(seg_mpp=args.seg_mpp)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.cohort_dir:
            sheet = pd.read_csv(args.cohort_dir / "cohort" / "slides.csv", dtype={"slide_id": str})
            cohort_dir = args.cohort_dir
        else:
            cohort_dir = tmp / "synth"
            print(f"writing {args.n_slides} synthetic slides of {args.width_px}x{args.height_px} px ...", file=sys.stderr)
            sheet = synth_cohort(cohort_dir, "bench", {"n_patients": args.n_slides, "seed": args.seed,
                                                       "width_px": args.width_px, "height_px": args.height_px})
        rows = []
        for slide_id, path in zip(sheet["slide_id"], sheet["path"]):
            rows.append(bench_slide(Path(path), tmp / "seg" / slide_id, params, args.repeats,
                                    gt_mask=cohort_dir / "synth" / f"{slide_id}_mask.png"))
        if not args.no_real and SHARED_WSI.is_dir():
            for name, fallback in REAL_SLIDES.items():
                if (SHARED_WSI / name).exists():
                    rows.append(bench_slide(SHARED_WSI / name, tmp / "seg" / name, params, args.repeats, fallback))
    table = pd.DataFrame(rows)
    shown = table.assign(Dice=[f"{d:.3f}" if d == d and d is not None else "-" for d in table["Dice"]])
    print(tabulate(shown, headers="keys", tablefmt="github", showindex=False, floatfmt=".3f"))
    synthetic = table[table["Dice"].notna()]
    print(
        f"\nseg_mpp {args.seg_mpp}: {table['seconds'].mean():.3f} s per slide on average "
        f"({len(table)} slides, median of {args.repeats} runs each, {cv2.getNumThreads()} OpenCV threads)"
        + (f"; Dice vs ground truth on {len(synthetic)} synthetic slides: mean {synthetic['Dice'].mean():.3f}, "
           f"min {synthetic['Dice'].min():.3f}" if len(synthetic) else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
