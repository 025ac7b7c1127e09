"""`evoexport build`: tower -> EvoPrune schedule -> stage graphs -> manifest -> validation.

The build is written to a temporary directory beside the target and renamed into place
only when it is complete (and validated): a failed or interrupted build never leaves a
half-written directory at the target nor clobbers a previous good build there.
"""
from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import EvoExportError, OptionError
from ..inputs.images import describe_recipe
from ..manifest import MANIFEST, PRECISIONS, SCHEMA_VERSION, TORCH_DTYPES, Manifest, Precision
from ..models import default_params, get_preset, load_tower
from ..models.loader import spec_for
from .. import names
from ..files import atomic_dir
from ..names import plain_size
from ..names import GraphKind
from ..progress import Progress, check_interrupted
from ..prune.cost import tower_flops
from ..prune.selection import PruneParams
from ..prune.schedule import PrunePoint, budget_for, default_schedule, format_schedule, parse_schedule
from ..prune.temporal import TemporalParams, later_schedule

DEFAULT_ROOT = Path("graphs")


@dataclass
class BuildResult:
    path: Path
    manifest: Manifest
    report: dict | None
    tower: object = None    # the loaded tower, for callers that go on to use it (bench)
    buckets: object = None  # a bucketed build's index (manifest.Buckets); `manifest` is its first grid's




def default_out(model: str, keep: float, precision: str = "fp32", temporal=None, video: bool = False) -> Path:
    clips = f"-temporal{temporal.group}x{temporal.keep:g}" if temporal is not None else ("-video" if video else "")
    return DEFAULT_ROOT / (f"{model}-keep{keep:g}{clips}" + ("" if precision == "fp32" else f"-{precision}"))


def make_pipeline(tower, points: list[PrunePoint], params: PruneParams, temporal=None, square_mask: bool = False):
    """The chain a build exports: an image chain, or a temporal one (clips in groups)."""
    from ..pipeline.stages import Pipeline
    if temporal is None:
        return Pipeline(tower, points, params, square_mask=square_mask)
    from ..pipeline.temporal import TemporalPipeline
    if not params.merge:
        raise OptionError("temporal", "needs merging (each patch's answer follows the merges); drop --no-merge")
    if tower.taps:
        raise OptionError("temporal", "is not supported with DeepStack taps (qwen3-vl) yet: they are not carried "
                                      "through a temporal chain; build without --temporal")
    return TemporalPipeline(tower, points, params, temporal, square_mask=square_mask)



def plan_schedule(depth: int, num_patches: int, keep: float | None, schedule: str | None,
                  layers: tuple | None = None) -> tuple[float, list[PrunePoint]]:
    """Resolve keep / schedule into (keep, prune points); they must agree when both are given."""
    if schedule is not None:
        points = parse_schedule(schedule, depth, num_patches)
        implied = points[-1].tokens / num_patches
        if keep is not None and budget_for(num_patches, keep) != points[-1].tokens:
            raise OptionError("keep", f"{keep} keeps {budget_for(num_patches, keep)} tokens but the schedule ends at "
                                      f"{points[-1].tokens}; give one or make them agree")
        return (keep if keep is not None else round(implied, 6)), points
    keep = 0.5 if keep is None else keep
    return keep, default_schedule(depth, num_patches, keep, layers)


def versions() -> dict:
    import onnx
    import onnxruntime
    import onnxscript
    import torch
    import transformers
    return {"evoexport": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__}


@dataclass(frozen=True)
class BuildOptions:
    """What a build makes; `evoexport build` fills it from its flags."""
    model: str = "llava"
    keep: float | None = None           # final fraction of patch tokens kept; None: 0.5, or what `schedule` ends at
    schedule: str | None = None         # "LAYER:KEEP,...": explicit prune points
    params: PruneParams | None = None   # None: the model's defaults
    checkpoint: str | Path | None = None
    seed: int = 0                       # random weights' seed (no checkpoint)
    out: str | Path | None = None       # None: graphs/MODEL-keepKEEP[-PRECISION]
    validate: bool = True
    precision: str = "fp32"
    # int8: a folder of calibration images, or float32 pixel values [N,3,H,W]; None: calib/
    calib: object = None
    target: str | None = None           # "tensorrt": the graphs must also pass the static TensorRT check
    opset: int = 20                     # 23: attention as ONNX's Attention op (fused in TensorRT >= 10.14)
    image_size: int | None = None       # resizable towers (dinov2, qwen2.5-vl)
    # pad images to a square with the mean colour before the resize (LLaVA-1.5's original
    # `image_aspect_ratio: pad`); None: as the model's processor does
    pad_to_square: bool | None = None
    round_budgets: int | None = None    # sequence lengths a multiple of it (8..64: GPU tiles)
    # clips: "G:KEEP" or TemporalParams, frames in groups of G pruned against the first (prune/temporal.py)
    temporal: object = None
    # Qwen2.5-VL video: the input is its temporal patch of 2 frames, [B, 6, S, S]
    video: bool = False
    # Qwen: aspect-ratio buckets, "auto" or "ROWSxCOLS,..." in merge units (export/buckets.py)
    grids: object = None

    def check(self) -> None:
        """Everything that needs no weights, before the (slow) weights are touched."""
        from .onnx import OPSETS
        if self.precision not in PRECISIONS:
            raise OptionError("precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.opset not in OPSETS:
            raise OptionError("opset", f"{self.opset} is not one of {', '.join(map(str, OPSETS))}")
        if self.calib is not None and self.precision != "int8":
            raise OptionError("calib", "is only used by int8 builds")
        if self.round_budgets is not None and self.round_budgets not in (8, 16, 32, 64):
            raise OptionError("round_budgets", f"must be 8, 16, 32 or 64, got {self.round_budgets}")
        if self.target not in (None, "tensorrt"):
            raise OptionError("target", f"must be tensorrt or None, got {self.target!r}")
        if self.temporal is not None and self.precision == "int8":
            raise OptionError("temporal", "int8 temporal builds are not supported yet; build fp32, fp16 or bf16")
        if self.video and self.precision == "int8":
            raise OptionError("video", "cannot be combined with int8 yet")
        if self.temporal is not None and self.round_budgets is not None:
            raise OptionError("temporal", "cannot be combined with --round-budgets yet")
        if self.precision == "int8" and self.calib is not None and not hasattr(self.calib, "shape"):
            from .quantize import calibration_files
            calibration_files(Path(self.calib).expanduser())


@dataclass
class _Plan:
    """What the options resolve to before any weight is loaded."""
    spec: object           # models.base.TowerSpec
    keep: float
    points: list
    target: Path
    temporal: object = None  # TemporalParams, or None for an image build


def build(model: str = "llava", keep: float | None = None, *, progress: Progress | None = None,
          on_commit=None, **options) -> BuildResult:
    """Build a pruned tower: build("llava", 0.5, checkpoint=..., precision="fp16"); the keyword
    options are BuildOptions' fields. on_commit: called the moment the new build is in place
    (files.atomic_dir)."""
    return run(BuildOptions(model=model, keep=keep, **options), progress, on_commit)


def run(options: BuildOptions, progress: Progress | None = None, on_commit=None) -> BuildResult:
    """The build's steps: check the options, plan the schedule, then in a temporary directory
    that replaces the target only when complete: load, export, quantize, write the manifest,
    check the target runtime, validate."""
    from .onnx import nest_selects
    progress = progress or Progress()
    options.check()
    if options.grids is not None:   # aspect-ratio buckets: this, once per grid, into one folder
        from .buckets import build_buckets
        target = Path(options.out or f"{default_out(options.model, options.keep or 0.5, options.precision)}-buckets")
        index = build_buckets(options, target, run, progress, on_commit)
        return BuildResult(target, index.manifests[0], None, buckets=index)
    plan = _plan(options)
    with atomic_dir(plan.target, on_commit) as tmp:
        tower, pipeline = _load(options, plan, progress)
        entries = _export(options, tower, pipeline, tmp, progress)
        # the image chain's graphs (a temporal build's anchor chain) nest as `stages`
        anchor = getattr(pipeline, "anchor_graph_count", len(entries))
        stages = nest_selects(entries[:anchor])
        calibration = _quantize(options, plan, pipeline, stages, tmp, progress)
        manifest = _manifest(options, plan, tower, pipeline, stages, calibration)
        if plan.temporal is not None:
            _add_temporal(manifest, plan.temporal, pipeline, entries[anchor:])
        manifest.write(tmp)
        if options.target == "tensorrt":
            _check_tensorrt(tmp, plan.target, progress)
        report = _validate(options, tmp, plan.target, pipeline, progress) if options.validate else None
        check_interrupted()   # the commit point: an interrupt swallowed on the way still counts
    progress(f"wrote {plan.target}")
    return BuildResult(plan.target, manifest, report, tower)


def _plan(options: BuildOptions) -> _Plan:
    spec = spec_for(options.model, options.checkpoint, options.image_size, options.pad_to_square, options.video)
    tokens = spec.token_grid.tokens
    keep, points = plan_schedule(spec.depth, tokens, options.keep, options.schedule, spec.prune_layers)
    temporal = options.temporal
    if temporal is not None and not isinstance(temporal, TemporalParams):
        temporal = TemporalParams.parse(temporal)
    if temporal is not None:
        later_schedule(points, tokens, temporal.keep)    # refuses an unpruned anchor before any weight
    target = Path(options.out) if options.out else default_out(options.model, keep, options.precision, temporal,
                                                               options.video)
    if target.exists() and not (target / MANIFEST).is_file():
        raise OptionError("out", f"{target} exists and is not an evoexport build; refusing to replace it")
    return _Plan(spec, keep, points, target, temporal)


def _load(options: BuildOptions, plan: _Plan, progress: Progress):
    """The tower with its weights, and the pruned pipeline over it (budgets rounded if asked)."""
    o = options
    progress(f"loading {o.model} ({'checkpoint ' + str(o.checkpoint) if o.checkpoint else 'random weights, seed %d' % o.seed})")
    tower = load_tower(o.model, o.checkpoint, seed=o.seed, image_size=o.image_size, pad_to_square=o.pad_to_square,
                       video=o.video)
    if o.round_budgets and plan.points:
        from ..prune.schedule import round_budgets as rounded
        plan.points = rounded(plan.points, o.round_budgets, tower.patches_per_token, int(tower.has_cls),
                              tower.num_patches)
    progress(describe_recipe(plan.spec.preprocess))
    params = o.params or default_params(o.model)
    # Attention's mask spells out its query axis at opset 23
    pipeline = make_pipeline(tower, plan.points, params, plan.temporal, square_mask=o.opset >= 23)
    from ..pipeline.temporal import chain_flops
    full, pruned = chain_flops(tower, pipeline)
    later = (f"; later frames of {plan.temporal.group} {format_schedule(pipeline.later_points)}"
             if plan.temporal else "")
    progress(f"schedule {format_schedule(plan.points)} (after_layer:tokens of {tower.num_patches}){later}; "
             f"ideal FLOP speedup {full / pruned:.2f}x")
    return tower, pipeline


def _export(options: BuildOptions, tower, pipeline, tmp: Path, progress: Progress) -> list[dict]:
    """One ONNX per graph; fp16/bf16 stages carry weights and math in that dtype, selections stay fp32."""
    from .onnx import export_graphs
    stage_source = None
    if Precision(options.precision).is_half:
        import torch
        half = tower.reduced_precision_copy(getattr(torch, TORCH_DTYPES[options.precision]))
        stage_source = make_pipeline(half, pipeline.points, pipeline.params, getattr(pipeline, "temporal", None),
                                     square_mask=pipeline.square_mask)
    return export_graphs(pipeline, tmp, progress, stage_source=stage_source, opset=options.opset)


def _quantize(options: BuildOptions, plan: _Plan, pipeline, stages: list[dict], tmp: Path,
              progress: Progress) -> dict | None:
    """int8: QDQ encoder stages calibrated on the options' images (the manifest records which)."""
    if options.precision != "int8":
        return None
    from .quantize import calibration_pixels, quantize_build
    calib = options.calib
    pixels = calibration_pixels(calib, pipeline.tower.image_size, plan.spec.preprocess, progress)
    quantize_build(pipeline, stages, tmp, pixels, progress)
    return {"images": int(len(pixels)),
            "source": "pixel values" if hasattr(calib, "shape") else str(calib or "calib/ (default)")}


def _manifest(options: BuildOptions, plan: _Plan, tower, pipeline, stages: list[dict],
              calibration: dict | None) -> Manifest:
    spec, points, params = plan.spec, plan.points, pipeline.params
    flops_full, flops_pruned = tower_flops(tower, []), tower_flops(tower, points, params)
    return Manifest({
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": options.model,
        "family": get_preset(options.model).family,
        "keep": plan.keep,
        "schedule": [{"after_layer": p.after_layer, "tokens": p.tokens} for p in points],
        "budget_multiple": options.round_budgets,
        "prune_params": params.to_dict(),
        **tower.weights_info,
        "tower": {"vision": spec.vision, "projector": spec.projector, "feature_layer": spec.feature_layer,
                  "select_strategy": spec.select_strategy, "depth": tower.depth, "image_size": plain_size(*tower.image_hw),
                  "grid": plain_size(*tower.grid), "num_patches": tower.num_patches, "has_cls": tower.has_cls,
                  "unit": spec.unit, "hidden_size": tower.hidden_size, "out_features": tower.out_features,
                  **({"frames": spec.frames} if spec.frames > 1 else {})},
        "preprocess": spec.preprocess,
        "inputs": [stages[0]["inputs"][0]],
        "precision": options.precision,
        "calibration": calibration,
        # batch range engines are built for (TensorRT optimization profile); every graph
        # takes any batch, the only dynamic axis
        "batch_profile": {"min": 1, "opt": 1, "max": 32},
        # features, then per prune point the decisions: indices_i, merge_i, picks_i, then
        # any DeepStack taps (Qwen3-VL), each aligned with the features
        "outputs": [stages[-1]["outputs"][0]] + [o for s in stages if s["select"] for o in s["select"]["outputs"][2:5]]
                   + [o for s in stages for g in (s, s["select"] or {}) for o in g.get("outputs", [])
                      if names.is_deepstack(o["name"])],
        "stages": stages,
        "flops": {"unpruned": flops_full, "pruned": flops_pruned, "ideal_speedup": flops_full / flops_pruned},
        "versions": versions(),
    })


def _add_temporal(manifest: Manifest, temporal, pipeline, graphs: list[dict]) -> None:
    """A temporal build's block, its outputs (the assemble graph's, then every point's
    decisions) and its FLOPs per frame."""
    data = manifest.data
    data["temporal"] = {**temporal.to_dict(),
                        "schedule": [{"after_layer": p.after_layer, "tokens": p.tokens} for p in pipeline.later_points],
                        "graphs": graphs}
    decisions = [o for g in manifest.graphs if GraphKind(g["kind"]).decides for o in g["outputs"][2:5]]
    data["outputs"] = graphs[-1]["outputs"] + decisions + [o for o in graphs[0]["outputs"] if o["name"] == names.MATCH]
    from ..pipeline.temporal import chain_flops
    full, pruned = chain_flops(pipeline.tower, pipeline)
    data["flops"] = {"unpruned": full, "pruned": pruned, "ideal_speedup": full / pruned, "per": "frame"}


def _check_tensorrt(tmp: Path, target: Path, progress: Progress) -> None:
    from ..tensorrt.check import check_build, format_check
    progress("checking the graphs against TensorRT's ONNX operator table")
    checked = check_build(tmp)
    if not checked["ok"]:
        print(format_check(checked), file=sys.stderr)
        raise EvoExportError(f"the TensorRT check failed; nothing written to {target} (see above)")


def _validate(options: BuildOptions, tmp: Path, target: Path, pipeline, progress: Progress) -> dict:
    from ..validate.text import print_report
    from ..validate.report import validate as run_validation
    progress("validating against PyTorch on sample photos")
    # ONNX Runtime's CPU provider has no bf16 kernels: such builds are checked on OpenVINO
    report = run_validation(tmp, backend="openvino" if options.precision == "bf16" else "onnxruntime",
                            pipeline=pipeline)
    print_report(report, file=sys.stderr)
    if not report["passed"]:
        raise EvoExportError(f"validation failed; nothing written to {target} (see the table above)")
    return report


def build_variant(manifest: Manifest, out: Path, *, unpruned: bool = False, precision: str | None = None) -> BuildResult:
    """Another build of a build's model, weights and input size, not validated (benchmarks):
    the unpruned encoder (keep 1.0), or the same schedule and parameters in `precision`."""
    points = [] if unpruned else [PrunePoint(**p) for p in manifest.schedule]
    return build(manifest.model, None if points else 1.0, schedule=format_schedule(points) if points else None,
                 params=PruneParams.from_manifest(manifest.prune_params), checkpoint=manifest.checkpoint,
                 seed=manifest.weights_seed, out=out, validate=False,
                 precision=precision or ("fp32" if unpruned else manifest.precision),
                 image_size=manifest.image_size, progress=Progress(enabled=False),
                 pad_to_square=manifest.pad_to_square, video=manifest.frames_per_input > 1)

