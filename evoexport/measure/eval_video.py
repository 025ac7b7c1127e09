"""`evoexport eval-video`: what temporal pruning keeps on real video, against what users do
today, at equal encoder FLOPs per clip, on a pretrained tower whose features keep CLS first
(DINOv2). The reference is the unpruned tower on every sampled frame.

  temporal         the build's rule (prune/temporal.py): groups of G frames, anchors at
                   --keep, later frames at the temporal keep against their anchor
  per_frame        EvoPrune on each frame alone, its keep chosen for the same FLOPs
  per_frame_keep   EvoPrune on each frame alone at the anchors' keep (the speed target's
                   comparator: "no worse than per-frame keep 0.5")
  frame_subsample  fewer frames, unpruned; a frame not encoded is answered by the nearest
                   encoded one (what users do today)
  static_patch     EVS-style: a group's first frame whole; each later frame keeps, before
                   the encoder, the patches that changed most in pixels since the previous
                   frame (a fixed count); a dropped patch is answered by the previous frame's
  random           uniform random tokens at per_frame's schedule, no merge

For every sampled frame: a dense feature map (each patch answered by the token it ended in,
dropped tokens by their merge owner, as `evoexport eval` does for images) and a CLS.
  dense_error = 1 - mean over patches of cos(dense, dense_ref);  cls_error = 1 - cos(CLS, CLS_ref)
Each is averaged per window (a group of G consecutive sampled frames) and reported as the
mean over windows with a 95% paired bootstrap interval; `versus_temporal` gives the
bootstrap interval of each method's error minus temporal's on the same windows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import EvoExportError
from .. import names
from ..pipeline.stages import Pipeline
from ..pipeline.temporal import TemporalPipeline, chain_flops
from ..prune.cost import layer_flops, tower_flops
from ..prune.schedule import default_schedule
from ..prune.selection import PruneParams
from ..prune.temporal import TemporalParams
from .eval import dense_features
from .timing import cpu_info

METHODS = ("unpruned", "temporal", "per_frame", "per_frame_keep", "frame_subsample", "static_patch", "random")


@dataclass(frozen=True)
class VideoEvalOptions:
    frames: int = 32                 # sampled evenly from each clip; a multiple of the group
    keep: float = 0.5                # the anchors' (and per_frame_keep's) keep
    temporal: TemporalParams = TemporalParams(8, 0.1)   # chosen on the choosing clips (docs/evoprune.md)
    resamples: int = 2000            # bootstrap resamples of the windows
    seed: int = 0


def _errors(dense, cls, ref_dense, ref_cls) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: 1 - mean patch cosine, 1 - CLS cosine."""
    cos = torch.nn.functional.cosine_similarity
    return (1 - cos(dense, ref_dense, dim=-1).mean(-1)).numpy(), (1 - cos(cls, ref_cls, dim=-1)).numpy()


def _per_frame(tower, x, points, params, rescore=None):
    pipe = Pipeline(tower, points, params)
    env = pipe.run(x, rescore=rescore)
    return dense_features(env, pipe), env[names.FEATURES][:, 0]


def _temporal(tower, x, points, params, temporal: TemporalParams):
    g = temporal.group
    env = TemporalPipeline(tower, points, params, temporal).run(x.reshape(-1, g, *x.shape[1:]))
    features, owners = env[names.FEATURES], env[names.OWNERS]                 # [W, T, D], [W, G, N]
    w, d = features.shape[0], features.shape[-1]
    dense = torch.gather(features, 1, owners.reshape(w, -1, 1).expand(w, owners.shape[1] * owners.shape[2], d))
    starts = torch.nonzero(env[names.INDICES][0] < 0).flatten()              # each frame's CLS
    return dense.reshape(-1, owners.shape[2], d), features[:, starts].reshape(-1, d)


def _frame_subsample(ref_dense, ref_cls, encoded: int):
    """`encoded` of the frames, evenly spaced; every frame answered by the nearest encoded one."""
    n = ref_dense.shape[0]
    chosen = np.unique(np.linspace(0, n - 1, encoded).round().astype(int))
    nearest = chosen[np.abs(np.arange(n)[:, None] - chosen[None, :]).argmin(axis=1)]
    return ref_dense[nearest], ref_cls[nearest]


@torch.inference_mode()
def _static_patch(tower, x, group: int, kept: int):
    """EVS-style: per group, the first frame whole; each later frame its `kept` patches that
    changed most (mean absolute pixel change per patch since the previous frame) through
    the whole encoder; a dropped patch takes the previous frame's answer."""
    g, p = tower.grid.side, tower.image_size // tower.grid.side
    patches = x.reshape(x.shape[0], 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(x.shape[0], g * g, -1)
    anchors = x[::group]
    full = tower.project(tower.run_layers(tower.embed(anchors), 0, tower.depth, None, None, False, False))
    dense, cls = [], []
    for i in range(x.shape[0]):
        if i % group == 0:
            dense.append(full[i // group, 1:])
            cls.append(full[i // group, 0])
            continue
        change = (patches[i] - patches[i - 1]).abs().mean(-1)
        keep = torch.sort(torch.topk(change, kept).indices).values
        hidden = tower.embed(x[i:i + 1])
        hidden = torch.cat([hidden[:, :1], hidden[:, 1 + keep]], dim=1)
        out = tower.project(tower.run_layers(hidden, 0, tower.depth, None, None, False, False))[0]
        answer = dense[-1].clone()
        answer[keep] = out[1:]
        dense.append(answer)
        cls.append(out[0])
    return torch.stack(dense), torch.stack(cls)


def _static_patch_flops(tower, kept: int) -> int:
    """FLOPs of a later frame through the whole encoder on `kept` patches + CLS."""
    d, m = tower.hidden_size, tower.mlp_size
    embed = 2 * tower.num_patches * 3 * (tower.image_size // tower.grid.side) ** 2 * d
    return embed + tower.depth * layer_flops(kept + 1, d, m, None, tower.mlp_matrices) + tower.projector_flops(kept)


def matched_settings(tower, o: VideoEvalOptions, params: PruneParams) -> dict:
    """Every method's setting at the temporal rule's FLOPs per frame (ratio of unpruned)."""
    points = default_schedule(tower.depth, tower.num_patches, o.keep)
    full, pruned = chain_flops(tower, TemporalPipeline(tower, points, params, o.temporal))
    target, n = pruned / full, tower.num_patches
    keeps = np.arange(0.02, 1.0, 0.005)
    ratios = [tower_flops(tower, default_schedule(tower.depth, n, k), params) / full for k in keeps]
    keep = float(keeps[int(np.argmin(np.abs(np.array(ratios) - target)))])
    g = o.temporal.group
    # static_patch: the group's first frame whole, the others `kept` patches
    per_later = (target * g * full - full) / (g - 1)
    kept = max(1, min(n, min(range(1, n + 1), key=lambda k: abs(_static_patch_flops(tower, k) - per_later))))
    encoded = max(1, round(target * o.frames))
    return {"target_ratio": target, "points": points, "per_frame_keep": keep, "static_patch_kept": kept,
            "subsample_frames": encoded,
            "ratios": {"unpruned": 1.0, "temporal": target,
                       "per_frame": tower_flops(tower, default_schedule(tower.depth, n, keep), params) / full,
                       "per_frame_keep": tower_flops(tower, points, params) / full,
                       "frame_subsample": encoded / o.frames,
                       "static_patch": (full + (g - 1) * _static_patch_flops(tower, kept)) / (g * full),
                       "random": tower_flops(tower, default_schedule(tower.depth, n, keep), PruneParams(merge=False))
                       / full}}


def clip_errors(tower, x: torch.Tensor, o: VideoEvalOptions, settings: dict, params: PruneParams) -> dict:
    """Per method, per frame (dense_error, cls_error) on one clip's sampled frames x [F, 3, H, W]."""
    ref = Pipeline(tower, [], params).run(x)[names.FEATURES]
    ref_dense, ref_cls = ref[:, 1:], ref[:, 0]
    n, gen = tower.num_patches, torch.Generator().manual_seed(o.seed)
    plain = PruneParams(importance_ratio=1.0, redundancy_weight=0.0, merge=False)
    answers = {
        "unpruned": (ref_dense, ref_cls),
        "temporal": _temporal(tower, x, settings["points"], params, o.temporal),
        "per_frame": _per_frame(tower, x, default_schedule(tower.depth, n, settings["per_frame_keep"]), params),
        "per_frame_keep": _per_frame(tower, x, settings["points"], params),
        "frame_subsample": _frame_subsample(ref_dense, ref_cls, settings["subsample_frames"]),
        "static_patch": _static_patch(tower, x, o.temporal.group, settings["static_patch_kept"]),
        "random": _per_frame(tower, x, default_schedule(tower.depth, n, settings["per_frame_keep"]), plain,
                             rescore=lambda imp: torch.rand(imp.shape, generator=gen)),
    }
    return {m: _errors(*answers[m], ref_dense, ref_cls) for m in METHODS}


def bootstrap(values: np.ndarray, resamples: int, rng) -> dict:
    """Mean over windows and its 95% percentile bootstrap interval."""
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    means = values[idx].mean(axis=1)
    return {"mean": float(values.mean()), "ci": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}


def evaluate_video(tower, clips: list[Path], options: VideoEvalOptions = VideoEvalOptions(), progress=None) -> dict:
    """The JSON `eval-video --json` writes: per clip and over all clips, every method's
    flops_ratio, dense_error and cls_error (windows: groups of G sampled frames)."""
    from ..inputs.video import video_pixels

    if not tower.has_cls or tower.drop_cls:
        raise EvoExportError("eval-video needs a tower whose features keep CLS first (the dinov2 model, for one)")
    o, params = options, PruneParams()
    if o.frames % o.temporal.group:
        raise EvoExportError(f"--frames {o.frames} must be a multiple of the group {o.temporal.group}")
    settings = matched_settings(tower, o, params)
    per_clip, windows = {}, {m: {"dense": [], "cls": []} for m in METHODS}
    for path in clips:
        if progress:
            progress(f"{Path(path).name}: {o.frames} frames, {len(METHODS)} methods")
        x = torch.from_numpy(video_pixels(path, o.frames, tower.image_size, tower.spec.preprocess)[0])
        errors = clip_errors(tower, x, o, settings, params)
        per_clip[Path(path).name] = _summary(errors, settings, o)
        for m, (dense, cls) in errors.items():
            windows[m]["dense"].append(dense.reshape(-1, o.temporal.group).mean(1))
            windows[m]["cls"].append(cls.reshape(-1, o.temporal.group).mean(1))
    merged = {m: (np.concatenate(v["dense"]), np.concatenate(v["cls"])) for m, v in windows.items()}
    # the CPU too: its kernels change the rounding, so a rerun elsewhere can differ a little
    return {"options": {**asdict(o), "temporal": o.temporal.to_dict()}, "settings": _public(settings),
            "clips": per_clip, "all_clips": _windowed(merged, settings, o), "machine": cpu_info()}


def _public(settings: dict) -> dict:
    return {k: ([[p.after_layer, p.tokens] for p in v] if k == "points" else v) for k, v in settings.items()}


def _summary(errors: dict, settings: dict, o: VideoEvalOptions) -> dict:
    g = o.temporal.group
    return _windowed({m: (d.reshape(-1, g).mean(1), c.reshape(-1, g).mean(1)) for m, (d, c) in errors.items()},
                     settings, o)


def _windowed(per_window: dict, settings: dict, o: VideoEvalOptions) -> dict:
    rng = np.random.default_rng(o.seed)
    out = {"windows": int(len(per_window["temporal"][0])), "methods": {}}
    for m, (dense, cls) in per_window.items():
        out["methods"][m] = {"flops_ratio": settings["ratios"][m],
                             "dense_error": bootstrap(dense, o.resamples, rng),
                             "cls_error": bootstrap(cls, o.resamples, rng),
                             "versus_temporal": {k: bootstrap(v - per_window["temporal"][i], o.resamples, rng)
                                                 for i, (k, v) in enumerate((("dense", dense), ("cls", cls)))}}
    return out


def format_video_eval(result: dict) -> str:
    lines = []
    for name, block in [*result["clips"].items(), ("all clips", result["all_clips"])]:
        lines += [f"{name} ({block['windows']} windows of {result['options']['temporal']['group']} frames)",
                  f"  {'method':<16} {'FLOPs':>6}  {'dense error [95% CI]':<28} {'CLS error [95% CI]':<28}"]
        for m, r in block["methods"].items():
            d, c = r["dense_error"], r["cls_error"]
            lines.append(f"  {m:<16} {r['flops_ratio']:>6.3f}  {_ci(d):<28} {_ci(c):<28}")
    return "\n".join(lines)


def _ci(r: dict) -> str:
    return f"{r['mean']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}]"
