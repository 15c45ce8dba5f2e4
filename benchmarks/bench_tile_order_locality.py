"""How far apart in the sequence do grid neighbours end up, for each tile order, on real slides?

    python benchmarks/bench_tile_order_locality.py
    python benchmarks/bench_tile_order_locality.py --tile-um 256 128 64 32 --slides path/a.svs path/b.svs

Each brightfield slide of ../shared/data/wsi is segmented with the project's own code
(mambapath.segment.segment_tissue on the slide read at ``--seg-mpp``) and tiled with
mambapath.tiling.tile_from_mask at several tile sizes (tiles of ``--tile-um`` microns, 0.5 um/px
or the slide's level 0 if coarser, at least half tissue), which gives real tissue shapes, holes
and ragged borders. For every grid and every order the script takes all pairs of 4-neighbour
tiles and reports the distance between the pair's positions in the sequence: the mean (what the
question asks), the median, the 90th percentile and the share of pairs at most 8 positions apart
(within the reach of a short convolution). A slide whose metadata has no mpp is read at
``--fallback-mpp`` (said in the output). The fluorescence slide of the data folder
(test3-DAPI-2-387.ndpi) is left out by default: saturation-based tissue detection is meant
for brightfield stains.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wsi"
BRIGHTFIELD = ("CMU-1-Small-Region.svs", "tcga-cr-7395-01a-01-ts1.svs", "test_dicom.dcm")
WINDOW = 8


def slide_grids(path: Path, tile_ums, seg_mpp: float, fallback_mpp: float):
    """Yield (tile_um, grid (N, 2), mpp source) for one slide at each tile size."""
    from mambapath.segment import SegmentParams, read_at_mpp, segment_tissue
    from mambapath.slide import open_slide, resolve_mpp
    from mambapath.tiling import tile_from_mask

    slide = open_slide(path)
    try:
        scale = resolve_mpp(slide, path, fallback_mpp)
        rgb, _, downsample = read_at_mpp(slide, scale.mpp, seg_mpp, path)
        width0, height0 = slide.dimensions
    finally:
        slide.close()
    mask_mpp = scale.mpp * (downsample[0] + downsample[1]) / 2
    tissue = segment_tissue(rgb, mask_mpp, SegmentParams(seg_mpp=seg_mpp)).tissue_mask
    target_mpp = max(0.5, scale.mpp)
    for tile_um in tile_ums:
        patch_size = int(round(tile_um / target_mpp))
        tiles, _ = tile_from_mask(tissue, downsample, scale.mpp, width0, height0, target_mpp, patch_size)
        yield tile_um, tiles.grid, scale.source


def summarise(distances: np.ndarray) -> dict:
    return {
        "mean": float(distances.mean()),
        "median": float(np.median(distances)),
        "p90": float(np.percentile(distances, 90)),
        f"within_{WINDOW}": float((distances <= WINDOW).mean()),
    }


def main() -> int:
    from tabulate import tabulate

    from mambapath.order import ORDERS, neighbour_distances

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", nargs="+", type=Path, default=[DATA / name for name in BRIGHTFIELD])
    parser.add_argument("--tile-um", type=float, nargs="+", default=[128.0, 64.0, 32.0])
    parser.add_argument("--seg-mpp", type=float, default=4.0)
    parser.add_argument("--fallback-mpp", type=float, default=0.5)
    args = parser.parse_args()
    missing = [str(p) for p in args.slides if not p.exists()]
    if missing:
        print(f"slides not found: {', '.join(missing)} (../shared/data/wsi holds the real slides)", file=sys.stderr)
        return 2

    rows, pooled = [], {order: [] for order in ORDERS}
    for path in args.slides:
        for tile_um, grid, mpp_source in slide_grids(path, args.tile_um, args.seg_mpp, args.fallback_mpp):
            if len(grid) < 2:
                continue
            span = grid.max(0) - grid.min(0) + 1
            for order in ORDERS:
                distances = neighbour_distances(grid, order)
                if distances.size == 0:
                    continue
                pooled[order].append(distances)
                stats = summarise(distances)
                rows.append([path.name + ("" if mpp_source == "slide-mpp" else f" (mpp: {mpp_source})"),
                             f"{tile_um:g}", len(grid), f"{span[0]} x {span[1]}", len(distances), order,
                             f"{stats['mean']:.1f}", f"{stats['median']:.0f}", f"{stats['p90']:.0f}",
                             f"{100 * stats[f'within_{WINDOW}']:.0f}%"])
    headers = ["slide", "tile um", "tiles", "grid rows x cols", "neighbour pairs", "order", "mean", "median", "p90",
               f"<= {WINDOW} apart"]
    print("Sequence distance between 4-neighbour tiles (1 = side by side in the sequence)\n")
    print(tabulate(rows, headers=headers, tablefmt="github"))
    summary = []
    for order in ORDERS:
        if pooled[order]:
            stats = summarise(np.concatenate(pooled[order]))
            summary.append([order, f"{stats['mean']:.1f}", f"{stats['median']:.0f}", f"{stats['p90']:.0f}",
                            f"{100 * stats[f'within_{WINDOW}']:.0f}%"])
    print("\nAll grids pooled (every neighbour pair of every grid above)\n")
    print(tabulate(summary, headers=["order", "mean", "median", "p90", f"<= {WINDOW} apart"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
