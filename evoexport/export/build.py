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
from ..errors import EvoExportError
from ..inputs.images import describe_recipe
from ..manifest import PRECISIONS, SCHEMA_VERSION, TORCH_DTYPES, Precision, write_manifest
from ..models import default_params, get_preset, load_tower
from ..models.loader import spec_for
from ..files import atomic_dir
from ..progress import Progress, check_interrupted
from ..prune.cost import tower_flops
from ..prune.selection import PruneParams
from ..prune.schedule import PrunePoint, budget_for, default_schedule, format_schedule, parse_schedule

DEFAULT_ROOT = Path("graphs")


@dataclass
class BuildResult:
    path: Path
    manifest: dict
    report: dict | None
    tower: object = None    # the loaded tower, for callers that go on to use it (bench)




def default_out(model: str, keep: float, precision: str = "fp32") -> Path:
    return DEFAULT_ROOT / (f"{model}-keep{keep:g}" + ("" if precision == "fp32" else f"-{precision}"))


def plan_schedule(depth: int, num_patches: int, keep: float | None, schedule: str | None,
                  layers: tuple | None = None) -> tuple[float, list[PrunePoint]]:
    """Resolve --keep / --schedule into (keep, prune points); they must agree when both are given."""
    if schedule is not None:
        points = parse_schedule(schedule, depth, num_patches)
        implied = points[-1].tokens / num_patches
        if keep is not None and budget_for(num_patches, keep) != points[-1].tokens:
            raise EvoExportError(f"--keep {keep} keeps {budget_for(num_patches, keep)} tokens but --schedule ends at "
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


def build(model: str = "llava", keep: float | None = 0.5, *, schedule: str | None = None,
          params: PruneParams | None = None, checkpoint: str | None = None, seed: int = 0,
          out: str | Path | None = None, validate: bool = True, precision: str = "fp32", calib=None,
          target_runtime: str | None = None, opset: int = 20, image_size: int | None = None,
          pad_to_square: bool | None = None, progress: Progress | None = None,
          round_budgets: int | None = None, on_commit=None) -> BuildResult:
    """Build a pruned tower. precision "int8": QDQ-quantized encoder stages, calibrated on
    `calib` (a folder of images, or float32 pixel values [N,3,H,W]; default: calib/).
    target_runtime "tensorrt": the graphs must also pass the static TensorRT check (tensorrt/check.py).
    opset 23: attention exported as ONNX's Attention op (fused in TensorRT >= 10.14).
    pad_to_square: pad images to a square with the mean colour before the processor's resize
    (LLaVA-1.5's original `image_aspect_ratio: pad`); None: as the model's processor does.
    round_budgets: move every budget so the stage's sequence length is a multiple of it (8 or 64).
    on_commit: called the moment the new build is in place (files.atomic_dir)."""
    from .onnx import OPSETS, export_pipeline
    from ..pipeline.stages import Pipeline
    from ..validate.report import print_report
    from ..validate.report import validate as run_validation

    progress = progress or Progress()
    params = params or default_params(model)
    if precision not in PRECISIONS:
        raise EvoExportError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if opset not in OPSETS:
        raise EvoExportError(f"--opset {opset} is not one of {', '.join(map(str, OPSETS))}")
    if calib is not None and precision != "int8":
        raise EvoExportError("--calib is only used by --precision int8")
    if round_budgets is not None and round_budgets not in (8, 16, 32, 64):
        raise EvoExportError(f"--round-budgets must be 8, 16, 32 or 64, got {round_budgets}")
    preset = get_preset(model)
    # Everything the user typed is checked before the (slow) weights are touched.
    spec = spec_for(model, checkpoint, image_size, pad_to_square)
    grid = spec.token_grid
    keep, points = plan_schedule(spec.depth, grid * grid, keep, schedule, spec.prune_layers)
    if precision == "int8" and calib is not None and not hasattr(calib, "shape"):
        from .quantize import calibration_files
        calibration_files(Path(calib).expanduser())
    target = Path(out) if out else default_out(model, keep, precision)
    if target.exists() and not (target / "manifest.json").is_file():
        raise EvoExportError(f"--out {target} exists and is not an evoexport build; refusing to replace it")

    with atomic_dir(target, on_commit) as tmp:
        progress(f"loading {model} ({'checkpoint ' + str(checkpoint) if checkpoint else 'random weights, seed %d' % seed})")
        tower = load_tower(model, checkpoint, seed=seed, image_size=image_size, pad_to_square=pad_to_square)
        if round_budgets and points:
            from ..prune.schedule import round_budgets as rounded
            points = rounded(points, round_budgets, tower.patches_per_token, int(tower.has_cls), tower.num_patches)
        progress(describe_recipe(spec.preprocess))
        square = opset >= 23   # the Attention op's mask spells out its query axis
        pipeline = Pipeline(tower, points, params, square_mask=square)
        flops_full, flops_pruned = tower_flops(tower, []), tower_flops(tower, points, params)
        progress(f"schedule {format_schedule(points)} (after_layer:tokens of {tower.num_patches}); "
                 f"ideal FLOP speedup {flops_full / flops_pruned:.2f}x")
        stage_source = None
        if Precision(precision).is_half:   # stages carry weights and math in that dtype; selections stay fp32
            import torch
            half = tower.reduced_precision_copy(getattr(torch, TORCH_DTYPES[precision]))
            stage_source = Pipeline(half, points, params, square_mask=square)
        stages = export_pipeline(pipeline, tmp, progress, stage_source=stage_source, opset=opset)
        del stage_source
        calibration = None
        if precision == "int8":
            from .quantize import calibration_pixels, quantize_build
            pixels = calibration_pixels(calib, tower.image_size, spec.preprocess, progress)
            quantize_build(pipeline, stages, tmp, pixels, progress)
            calibration = {"images": int(len(pixels)),
                           "source": "pixel values" if hasattr(calib, "shape") else str(calib or "calib/ (default)")}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": model,
            "family": preset.family,
            "keep": keep,
            "schedule": [{"after_layer": p.after_layer, "tokens": p.tokens} for p in points],
            "budget_multiple": round_budgets,
            "prune_params": params.to_dict(),
            **tower.weights_info,
            "tower": {"vision": spec.vision, "projector": spec.projector, "feature_layer": spec.feature_layer,
                      "select_strategy": spec.select_strategy, "depth": tower.depth, "image_size": tower.image_size,
                      "grid": tower.grid, "num_patches": tower.num_patches, "has_cls": tower.has_cls,
                      "unit": spec.unit,
                      "hidden_size": tower.hidden_size, "out_features": tower.out_features},
            "preprocess": spec.preprocess,
            "inputs": [stages[0]["inputs"][0]],
            "precision": precision,
            "calibration": calibration,
            # batch range engines are built for (TensorRT optimization profile); every graph
            # takes any batch, the only dynamic axis
            "batch_profile": {"min": 1, "opt": 1, "max": 32},
            # features, then per prune point the decisions: indices_i, merge_i, picks_i
            "outputs": [stages[-1]["outputs"][0]] + [o for s in stages if s["select"] for o in s["select"]["outputs"][2:]],
            "stages": stages,
            "flops": {"unpruned": flops_full, "pruned": flops_pruned, "ideal_speedup": flops_full / flops_pruned},
            "versions": versions(),
        }
        write_manifest(tmp, manifest)
        if target_runtime == "tensorrt":
            from ..tensorrt.check import check_build, format_check
            progress("checking the graphs against TensorRT's ONNX operator table")
            checked = check_build(tmp)
            if not checked["ok"]:
                print(format_check(checked), file=sys.stderr)
                raise EvoExportError(f"the TensorRT check failed; nothing written to {target} (see above)")
        report = None
        if validate:
            progress("validating against PyTorch on sample photos")
            # ONNX Runtime's CPU provider has no bf16 kernels: such builds are checked on OpenVINO
            report = run_validation(tmp, backend="openvino" if precision == "bf16" else "onnxruntime",
                                    pipeline=pipeline)
            print_report(report, file=sys.stderr)
            if not report["passed"]:
                raise EvoExportError(f"validation failed; nothing written to {target} (see the table above)")
        check_interrupted()   # the commit point: an interrupt swallowed on the way still counts
    progress(f"wrote {target}")
    return BuildResult(target, manifest, report, tower)


def build_variant(manifest: dict, out: Path, *, unpruned: bool = False, precision: str | None = None) -> BuildResult:
    """Another build of a build's model, weights and input size, not validated (benchmarks):
    the unpruned encoder (keep 1.0), or the same schedule and parameters in `precision`."""
    points = [] if unpruned else [PrunePoint(**p) for p in manifest["schedule"]]
    return build(manifest["model"], None if points else 1.0, schedule=format_schedule(points) if points else None,
                 params=PruneParams.from_manifest(manifest["prune_params"]), checkpoint=manifest.get("checkpoint"),
                 seed=manifest.get("weights_seed") or 0, out=out, validate=False,
                 precision=precision or ("fp32" if unpruned else manifest.get("precision", "fp32")),
                 image_size=manifest["tower"]["image_size"], progress=Progress(enabled=False),
                 pad_to_square=manifest["preprocess"].get("pad_to_square"))

