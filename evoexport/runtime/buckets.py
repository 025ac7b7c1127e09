"""Run a bucketed build (export/buckets.py): each image goes to one of its grids.

    runner = evoexport.load("graphs/qwen2.5-vl-keep0.5-buckets")
    results = runner.run_images([photo_4x3, photo_16x9, photo_4x3])   # PIL images, in order

An image goes to the grid its processor's own smart_resize gives it at the build's pixel
limits, pixel for pixel as the processor makes it; an image whose processor grid the build
does not hold goes to the grid of the nearest aspect ratio, resized to it, and its result
says how much its aspect ratio moved. A list of images of several grids is split by grid,
each grid's images run as batches of that grid, and the results come back in the order
given.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..manifest import read_buckets
from ..names import Grid
from .runner import Runner


class ImageResult(NamedTuple):
    features: np.ndarray        # [K, D_out] the kept units' features, raster order
    indices: np.ndarray         # [K] the kept units' positions in the grid (row * cols + col)
    deepstack: list             # [K, D_out] each DeepStack tap (Qwen3-VL), aligned with features
    grid: Grid                  # the grid (merge units) the image ran at
    aspect_change: float        # 0.0: the processor's own grid; else how much the aspect ratio moved


class BucketRunner:
    """A loaded bucketed build: one Runner per grid, each loaded on first use."""

    def __init__(self, build_dir: str | Path, backend: str = "onnxruntime", **options):
        self.buckets = read_buckets(build_dir)       # every file hashed once, here
        self.backend, self.options, self._runners = backend, options, {}

    def runner(self, i: int) -> Runner:
        if i not in self._runners:
            self._runners[i] = Runner(self.buckets.paths[i], backend=self.backend, verify=False, **self.options)
        return self._runners[i]

    def choose(self, height: int, width: int) -> tuple[int, float]:
        """(grid index, aspect change) for an image of height x width pixels."""
        return self.choose_in(self.buckets, height, width)

    @staticmethod
    def choose_in(buckets, height: int, width: int) -> tuple[int, float]:
        from ..models.qwen_processor import choose_bucket
        p = buckets.processor
        return choose_bucket(height, width, buckets.sizes, p["unit_px"], p["min_pixels"], p["max_pixels"])

    def pixels(self, image) -> tuple[int, float, np.ndarray]:
        """(grid index, aspect change, float32 [3, H, W]) of a PIL image, preprocessed for its grid."""
        from ..inputs.images import preprocess
        i, change = self.choose(image.height, image.width)
        manifest = self.buckets.manifests[i]
        return i, change, preprocess(image, manifest.image_size, manifest.preprocess)

    def run_images(self, images: list, batch: int = 8) -> list[ImageResult]:
        """Every image through its grid; images of one grid share batches of at most `batch`."""
        chosen = [self.pixels(im) for im in images]
        results: list = [None] * len(images)
        for i in sorted({c[0] for c in chosen}):
            members = [n for n, c in enumerate(chosen) if c[0] == i]
            for start in range(0, len(members), batch):
                part = members[start:start + batch]
                out = self.runner(i)(np.stack([chosen[n][2] for n in part]))
                for row, n in enumerate(part):
                    results[n] = ImageResult(np.asarray(out.features[row]), np.asarray(out.indices[row]),
                                             [np.asarray(t[row]) for t in out.deepstack],
                                             self.buckets.grids[i], chosen[n][1])
        return results

    def close(self) -> None:
        for runner in self._runners.values():
            runner.close()
        self._runners.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
