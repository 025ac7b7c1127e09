"""The photos `evoexport eval` scores on, and the statistics a sceptical reviewer asks for.

Photos (all real, all shipped inside wheels the set-up installs; no download):
  imagenet      foolbox 3.3.4's 20 ImageNet validation samples (224 px and up)
  cifar         foolbox's 20 CIFAR-10 and 20 CIFAR-100 samples (32 px, upsampled: smooth,
                few distinct regions)
  scikit-image  seven colour photos shipped inside scikit-image
Every method is scored on every photo; results are given over all of them and per source,
because which method wins can depend on the kind of image.

Statistics: per metric, EvoPrune against the strongest baseline (lowest mean error): the
mean per-image difference with a 95% paired bootstrap interval, and the share of photos
on which EvoPrune's error is lower.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "retina", "immunohistochemistry", "hubble_deep_field")


def eval_photos(size: int, pre: dict) -> tuple[np.ndarray, list[str], str]:
    """float32 [N,3,size,size], the source of each photo, and a description of the set."""
    from ..inputs.image_files import load_image
    from ..inputs.images import preprocess, sample_photos

    pixels, sources, parts = [], [], []
    spec = importlib.util.find_spec("foolbox")   # located, not imported (it would pull eagerpy)
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "data"
        for source, patterns, label in (("imagenet", ["imagenet_*.jpg"], "foolbox ImageNet samples"),
                                        ("cifar", ["cifar10_*.png", "cifar100_*.png"], "foolbox CIFAR-10/100 samples")):
            files = [f for p in patterns for f in sorted(folder.glob(p))]
            pixels += [preprocess(load_image(f), size, pre) for f in files]
            sources += [source] * len(files)
            if files:
                parts.append(f"{label} ({len(files)})")
    photos = sample_photos(SKIMAGE_PHOTOS)
    pixels += [preprocess(im, size, pre) for im in photos]
    sources += ["scikit-image"] * len(photos)
    parts.append(f"scikit-image photos ({len(photos)})")
    return np.stack(pixels), sources, f"{len(pixels)} photos: " + ", ".join(parts)


def paired_comparison(ours: np.ndarray, theirs: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of ours - theirs per photo (negative: ours has lower error), its 95% paired
    bootstrap interval (scipy.stats.bootstrap, percentile method, resampling photos), and
    the share of photos where ours is lower."""
    from scipy.stats import bootstrap

    diff = np.asarray(ours, np.float64) - np.asarray(theirs, np.float64)
    if np.ptp(diff) == 0:   # every photo the same difference: the interval is that point
        low = high = float(diff[0])
    else:
        ci = bootstrap((diff,), np.mean, n_resamples=resamples, confidence_level=0.95, method="percentile",
                       rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return {"mean_difference": float(diff.mean()), "ci95": [low, high],
            "ours_lower_share": float((diff < 0).mean()), "photos": int(len(diff))}
