"""`evoexport eval`: does EvoPrune keep what matters on a real pretrained ViT, against the
baselines a sceptical reviewer asks for?

Every method cuts the patch tokens of the same tower to the same final count and is
compared with the unpruned tower on real photos (foolbox's 20 ImageNet samples when
foolbox's data is installed, else scikit-image's):

  evoprune            the build's selection, default schedule and parameters
  evoprune, no merge  the same, dropped tokens discarded
  attention top-k     top tokens by CLS attention alone (same schedule, no merge)
  random              uniform random tokens (same schedule, no merge), mean over seeds
  random+merge, attention top-k+merge
                      the same choices with EvoPrune's merge and proportional attention:
                      what the scoring adds, merging held equal
  pooling             average pooling of the patch grid (1x2 at keep 0.5, 2x2 at keep
                      0.25) at the first prune layer, straight to the final count
  strided             every other column (and row) at the first prune layer
  evoprune, 1 point   EvoPrune at that same single point: pooling's FLOP budget

Metrics, per image then averaged:
  CLS error       1 - cos(CLS_pruned, CLS_full)
  coverage error  1 - mean over original patches i of max over kept tokens j of
                  cos(patch_full_i, kept_j)
Each is also given as the cut of random's error (1 - err / err_random), and every method's
FLOPs per image are listed beside it.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import EvoExportError
from .prune import PruneParams, PrunePoint, default_schedule, budget_for, tower_flops
from .stages import Pipeline


def eval_photos(size: int, pre: dict) -> tuple[np.ndarray, str]:
    """float32 [N,3,size,size] and where they came from."""
    import importlib.util

    from .images import load_image, preprocess, sample_photos
    spec = importlib.util.find_spec("foolbox")   # located, not imported (it would pull eagerpy)
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "data"
        files = sorted(folder.glob("imagenet_*.jpg"))
        if files:
            return np.stack([preprocess(load_image(f), size, pre) for f in files]), f"foolbox ImageNet samples ({len(files)})"
    from .calib_photos import CALIB_PHOTOS
    from .images import SAMPLE_PHOTOS
    names = list(SAMPLE_PHOTOS) + [n for n in CALIB_PHOTOS if n in ("rocket", "stereo_motorcycle")]
    return np.stack([preprocess(im, size, pre) for im in sample_photos(names)]), f"scikit-image photos ({len(names)})"


class GridReduce(nn.Module):
    """A selection graph's interface over a fixed spatial rule: average pooling or strided
    subsampling of the patch grid (the controls recent token-pruning benchmarks use)."""

    def __init__(self, grid: int, keep: float, pool: bool):
        super().__init__()
        self.grid, self.pool = grid, pool
        self.rows = 2 if keep <= 0.25 else 1     # 2x2 at keep 0.25, 1x2 at keep 0.5
        if grid % 2:
            raise EvoExportError(f"a {grid}x{grid} patch grid cannot be pooled by 2")

    def forward(self, hidden, importance, sizes=None, positions=None):
        b, _, d = hidden.shape
        g, r = self.grid, self.rows
        patches = hidden[:, 1:].reshape(b, g, g, d)
        if self.pool:
            kept = patches.reshape(b, g // r, r, g // 2, 2, d).mean(dim=(2, 4))
        else:
            kept = patches[:, ::r, ::2]
        kept = kept.reshape(b, -1, d)
        k = kept.shape[1]
        rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        slot = ((rows // r) * (g // 2) + cols // 2).reshape(-1)                 # the pooled token of each patch
        top_left = ((rows % r == 0) & (cols % 2 == 0)).reshape(-1)
        merge = (slot if self.pool else torch.where(top_left, slot, -1)).expand(b, -1)
        picks = torch.where(top_left, 0, -1).expand(b, -1)
        positions = torch.nonzero(top_left).reshape(-1).expand(b, -1)
        size = torch.full((b, k), float(2 * r if self.pool else 1))
        return torch.cat([hidden[:, :1], kept], dim=1), size, positions, merge, picks


def _errors(full: torch.Tensor, pruned: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    cls_err = 1 - torch.nn.functional.cosine_similarity(full[:, 0], pruned[:, 0], dim=-1)
    f = torch.nn.functional.normalize(full[:, 1:], dim=-1)
    p = torch.nn.functional.normalize(pruned[:, 1:], dim=-1)
    coverage = (f @ p.transpose(1, 2)).amax(dim=-1).mean(dim=-1)
    return cls_err.numpy(), (1 - coverage).numpy()


def evaluate(tower, keeps=(0.5, 0.25), seeds: int = 5, progress=None) -> dict:
    if not tower.has_cls or tower.drop_cls:
        raise EvoExportError("eval needs a tower whose features keep CLS first (e.g. --model dinov2)")
    x_np, source = eval_photos(tower.image_size, tower.spec.preprocess)
    x = torch.from_numpy(x_np)
    full = Pipeline(tower, [], PruneParams()).run(x)["features"]
    default = PruneParams()
    rows = []
    for keep in keeps:
        points = default_schedule(tower.depth, tower.num_patches, keep)
        final = budget_for(tower.num_patches, keep)
        single = [PrunePoint(points[0].after_layer, final)]
        plain = PruneParams(importance_ratio=1.0, redundancy_weight=0.0, merge=False)
        plain_merged = PruneParams(importance_ratio=1.0, redundancy_weight=0.0, merge=True)
        methods = {
            "evoprune": (points, default, None, None),
            "evoprune, no merge": (points, PruneParams(merge=False), None, None),
            "attention top-k": (points, plain, None, None),
            "attention top-k+merge": (points, plain_merged, None, None),
            "evoprune, 1 point": (single, default, None, None),
        }
        if keep in (0.5, 0.25) and tower.grid % 2 == 0:   # the grid rules reach exactly these counts
            # pooled tokens carry their size into proportional attention, as merged ones do
            methods["pooling"] = (single, plain_merged, None, GridReduce(tower.grid, keep, pool=True))
            methods["strided"] = (single, plain, None, GridReduce(tower.grid, keep, pool=False))
        results = {}
        for name, (pts, params, rescore, reduce) in methods.items():
            if progress:
                progress(f"keep {keep}: {name}")
            pipe = Pipeline(tower, pts, params)
            t0 = time.perf_counter()
            env = pipe.run(x, rescore=rescore, modules={"select_0": reduce} if reduce is not None else None)
            seconds = time.perf_counter() - t0
            results[name] = (*_errors(full, env["features"]), tower_flops(tower, pts, params), seconds)
        for name, params in (("random", plain), ("random+merge", plain_merged)):
            errs = []
            for seed in range(seeds):
                gen = torch.Generator().manual_seed(seed)
                env = Pipeline(tower, points, params).run(x, rescore=lambda imp, g=gen: torch.rand(imp.shape, generator=g))
                errs.append(_errors(full, env["features"]))
            results[name] = (np.mean([e[0] for e in errs], axis=0), np.mean([e[1] for e in errs], axis=0),
                             tower_flops(tower, points, params), float("nan"))
        base_cls, base_cov = float(results["random"][0].mean()), float(results["random"][1].mean())
        for name, (cls_err, cov_err, flops, seconds) in results.items():
            rows.append({"keep": keep, "tokens": final, "method": name, "cls_error": float(cls_err.mean()),
                         "coverage_error": float(cov_err.mean()), "cls_cut_vs_random": 1 - float(cls_err.mean()) / base_cls,
                         "coverage_cut_vs_random": 1 - float(cov_err.mean()) / base_cov,
                         "gflops_per_image": flops / 1e9, "cpu_seconds_batch": seconds})
    return {"images": source, "count": int(x.shape[0]), "model": tower.spec.vision.get("model_type"),
            "unpruned_gflops": tower_flops(tower, []) / 1e9, "seeds": seeds, "rows": rows}


def format_eval(r: dict) -> str:
    lines = [f"eval on {r['images']}, {r['count']} images; unpruned {r['unpruned_gflops']:.2f} GFLOPs/image; "
             f"random = mean of {r['seeds']} seeds",
             f"  {'keep':>5} {'method':<20} {'CLS err':>9} {'cut':>6} {'coverage err':>13} {'cut':>6} {'GFLOPs':>7}"]
    for row in r["rows"]:
        lines.append(f"  {row['keep']:>5} {row['method']:<20} {row['cls_error']:>9.4f} {100 * row['cls_cut_vs_random']:>5.0f}% "
                     f"{row['coverage_error']:>13.4f} {100 * row['coverage_cut_vs_random']:>5.0f}% {row['gflops_per_image']:>7.2f}")
    return "\n".join(lines)
