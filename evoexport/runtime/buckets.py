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

from .. import names
from ..manifest import read_buckets
from ..names import Grid
from .runner import Runner


class ImageResult(NamedTuple):
    features: np.ndarray        # [K, D_out] the kept units' features, raster order
    indices: np.ndarray         # [K] the kept units' positions in the grid (row * cols + col)
    deepstack: list             # [K, D_out] each DeepStack tap (Qwen3-VL), aligned with features
    grid: Grid                  # the grid (merge units) the image ran at
    aspect_change: float        # how much the aspect ratio moved (0.0 at the processor's own grid)
    exact: bool                 # at the processor's own grid and size: the model's own features


class BucketRunner:
    """A loaded bucketed build: one Runner per grid, each loaded on first use."""

    def __init__(self, build_dir: str | Path, backend: str = "onnxruntime", **options):
        self.buckets = read_buckets(build_dir)       # every file hashed once, here
        self.backend, self.options, self._runners = backend, options, {}

    def runner(self, i: int) -> Runner:
        if i not in self._runners:
            self._runners[i] = Runner(self.buckets.paths[i], backend=self.backend, verify=False, **self.options)
        return self._runners[i]

    def choose(self, height: int, width: int) -> tuple[int, float, bool]:
        """(grid index, aspect change, exact) for an image of height x width pixels."""
        return self.choose_in(self.buckets, height, width)

    @staticmethod
    def choose_in(buckets, height: int, width: int) -> tuple[int, float, bool]:
        from ..models.qwen_processor import choose_bucket
        p = buckets.processor
        return choose_bucket(height, width, buckets.sizes, p["unit_px"], p["min_pixels"], p["max_pixels"])

    def pixels(self, image) -> tuple[int, float, bool, np.ndarray]:
        """(grid index, aspect change, exact, float32 [3, H, W]) of a PIL image, preprocessed for its grid."""
        from ..inputs.images import preprocess
        i, change, exact = self.choose(image.height, image.width)
        manifest = self.buckets.manifests[i]
        return i, change, exact, preprocess(image, manifest.image_size, manifest.preprocess)

    def run_images(self, images: list, batch: int = 8) -> list[ImageResult]:
        """Every PIL image through its grid; images of one grid share batches of at most `batch`."""
        return self._run([self.pixels(im) for im in images], batch)

    def run_arrays(self, arrays: list, batch: int = 8) -> list[ImageResult]:
        """Pixel values already preprocessed at some size (float32 [3, H, W] each: what a
        processor made): each runs at its own size where the build holds it, else at the
        grid chosen for an image of that size, resized to it (bicubic; the result says how
        much the aspect ratio moved)."""
        chosen = []
        for x in arrays:
            height, width = x.shape[-2:]
            i, change, _ = self.choose(height, width)
            exact = self.buckets.sizes[i] == (height, width)
            chosen.append((i, change, exact, np.asarray(x if exact else _resized(x, self.buckets.sizes[i]), np.float32)))
        return self._run(chosen, batch)

    def _run(self, chosen: list, batch: int) -> list[ImageResult]:
        results: list = [None] * len(chosen)
        for i in sorted({c[0] for c in chosen}):
            members = [n for n, c in enumerate(chosen) if c[0] == i]
            for start in range(0, len(members), batch):
                part = members[start:start + batch]
                runner = self.runner(i)
                out = runner.arrays(np.stack([chosen[n][3] for n in part]))    # host arrays, any backend
                for row, n in enumerate(part):
                    results[n] = ImageResult(out[names.FEATURES][row], out[names.INDICES][row],
                                             [out[t][row] for t in runner.manifest.deepstack],
                                             self.buckets.grids[i], *chosen[n][1:3])
        return results

    def tokens_for(self, height: int, width: int) -> int:
        """K of the grid an image of height x width runs at."""
        return self.buckets.manifests[self.choose(height, width)[0]].tokens_per_image

    def close(self) -> None:
        for runner in self._runners.values():
            runner.close()
        self._runners.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _resized(x, size: tuple[int, int]) -> np.ndarray:
    """Normalized pixels [3, H, W] resized to (height, width): bicubic with antialiasing, as
    the processor's resize would be, on values already normalized (an affine map per channel,
    which a resize whose weights sum to one commutes with)."""
    import torch
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))[None]
    return torch.nn.functional.interpolate(t, size=size, mode="bicubic", antialias=True, align_corners=False)[0].numpy()
