"""Commands that make things: build, fuse, engines, check, genai."""
from __future__ import annotations

import json
import sys

import click

from ..manifest import PRECISIONS
from .group import cli


class ImageSize(click.ParamType):
    """--image-size: S (a square) or HEIGHTxWIDTH, in pixels."""
    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, tuple)):
            return value
        text = str(value).strip().lower()
        try:
            if "x" in text:
                height, width = (int(v) for v in text.split("x"))
                return (height, width) if height != width else height
            return int(text)
        except ValueError:
            self.fail(f"{value!r} is not a size: give S or HEIGHTxWIDTH in pixels, e.g. 448 or 364x504", param, ctx)


@cli.command()
@click.option("--model", default="llava", show_default=True, help="model preset (see `evoexport models`)")
@click.option("--keep", type=float, default=None, help="final fraction of patch tokens kept, in (0, 1]  [default: 0.5]")
@click.option("--schedule", default=None, metavar="L:K,...",
              help="explicit prune points: prune after layer L (0-based) to K tokens (count) or K of the patches (fraction)")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="local Hugging Face checkpoint directory (LLaVA or CLIP vision, safetensors)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the random weights (without --checkpoint)")
@click.option("--out", type=click.Path(), default=None, help="build directory  [default: graphs/MODEL-keepKEEP]")
@click.option("--importance-ratio", type=float, default=0.5, show_default=True,
              help="share of each budget filled by importance (rest: diversity)")
@click.option("--redundancy-weight", type=float, default=0.3, show_default=True,
              help="penalty on tokens that have a near-duplicate")
@click.option("--diversity-rounds", type=int, default=4, show_default=True,
              help="rounds in which the diversity share is picked (novelty refreshed each round)")
@click.option("--spatial-weight", type=float, default=None,
              help="similarity lost per grid width between two patches (novelty and merge); 0: cosine alone  "
                   "[default: 0.3; the digits-vit preset 0]")
@click.option("--merge/--no-merge", default=True, show_default=True, help="merge dropped tokens into kept ones")
@click.option("--proportional-attention/--no-proportional-attention", default=True, show_default=True,
              help="weight attention by merged token size")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="what the encoder stages compute in: fp16/bf16 inside the ONNX (LayerNorm, importance, "
                   "inputs and outputs fp32), int8 QDQ (calibrated); selections always fp32")
@click.option("--calib", type=click.Path(), default=None,
              help="int8: folder of calibration images  [default: calib/, photos shipped by scikit-image]")
@click.option("--validate/--no-validate", default=True, show_default=True, help="check the build against PyTorch")
@click.option("--target", type=click.Choice(["tensorrt"]), default=None,
              help="also require the static check for this runtime (`evoexport check`) to pass")
@click.option("--opset", type=click.Choice(["20", "23"]), default="20", show_default=True,
              help="ONNX opset; 23 exports attention as ONNX's Attention op (TensorRT >= 10.14 maps it to fused "
                   "attention; ONNX Runtime runs it)")
@click.option("--image-size", type=ImageSize(), default=None, metavar="S|HxW",
              help="dinov2: input size in pixels, a multiple of 14 (position embeddings interpolated at build time); "
                   "qwen2.5-vl / qwen3-vl: S or HEIGHTxWIDTH, multiples of 28 / 32 (a non-square size is one of "
                   "the processor's own grids)  [default: the preset's]")
@click.option("--round-budgets", type=click.Choice(["8", "16", "32", "64"]), default=None,
              help="move each budget to the nearest token count whose sequence length is a multiple of this "
                   "(tensor-core tiles on a GPU); the last budget may then differ slightly from --keep")
@click.option("--pad-to-square/--no-pad-to-square", default=None,
              help="pad images to a square with the mean colour before resizing (LLaVA-1.5's original "
                   "`image_aspect_ratio: pad`)  [default: as the model's image processor does]")
@click.option("--temporal", default=None, metavar="G:KEEP",
              help="video: frames in groups of G, the first (anchor) pruned to --keep, the later G-1 to KEEP against "
                   "it; the build's input is [B, G, 3, H, W] ([B, G, 6, H, W] with --video: G temporal patches) "
                   "(docs/evoprune.md, \"Video\")")
@click.option("--temporal-window", type=int, default=None,
              help="rows and columns around a patch searched for its anchor match  [default: 1]")
@click.option("--temporal-reuse", type=float, default=None,
              help="a later patch at least this like its anchor match (cosine) reuses the anchor's token; "
                   "above 1: never  [default: 0.99]")
@click.option("--video", is_flag=True,
              help="qwen2.5-vl: take its temporal patches of two frames, [B, 6, S, S] (frame t's RGB, then frame "
                   "t+1's), for video through attach(); stills go in as a frame twice")
@click.option("--grids", default=None, metavar="RxC|auto,...",
              help="qwen models: aspect-ratio buckets, one build at each grid (rows x cols of merge units) sharing "
                   "one copy of the weights; each image goes to its processor grid, else the nearest aspect ratio. "
                   "auto: the processor's grids of 7 camera ratios at the --image-size budget, with any others given "
                   "(auto,10x23) (docs/qwen.md)")
@click.option("--quiet", is_flag=True, help="no progress lines")
def build(model, keep, schedule, checkpoint, seed, out, importance_ratio, redundancy_weight, diversity_rounds,
          spatial_weight, merge, proportional_attention, precision, calib, validate, target, opset, image_size,
          pad_to_square, round_budgets, temporal, temporal_window, temporal_reuse, video, grids, quiet):
    """Build a pruned tower: stage graphs + manifest.json, validated against PyTorch."""
    from ..export.build import BuildOptions, run
    from ..progress import Progress, mark_decided, peak_rss_gb
    from ..prune.selection import PruneParams
    from ..prune.temporal import TemporalParams

    from ..models import default_params
    if spatial_weight is None:
        spatial_weight = default_params(model).spatial_weight
    params = PruneParams(importance_ratio=importance_ratio, redundancy_weight=redundancy_weight,
                         diversity_rounds=diversity_rounds, spatial_weight=spatial_weight, merge=merge,
                         proportional_attention=proportional_attention)
    if temporal is None and (temporal_window is not None or temporal_reuse is not None):
        raise click.UsageError("--temporal-window and --temporal-reuse apply to --temporal builds")
    if temporal is not None:
        temporal = TemporalParams.parse(temporal, window=temporal_window, reuse_similarity=temporal_reuse)
    progress = Progress(enabled=not quiet)
    # once the new build is in place the command has succeeded: a Ctrl-C after that is ignored
    options = BuildOptions(model=model, keep=keep, schedule=schedule, params=params, checkpoint=checkpoint, seed=seed,
                           out=out, validate=validate, precision=precision, calib=calib, target=target,
                           opset=int(opset), image_size=image_size, pad_to_square=pad_to_square,
                           round_budgets=int(round_budgets) if round_budgets else None, temporal=temporal,
                           video=video, grids=grids)
    result = run(options, progress, on_commit=mark_decided)
    if result.buckets is not None:
        b = result.buckets
        click.echo(f"built {result.path}: {len(b.grids)} grid{'s' * (len(b.grids) != 1)} ({', '.join(map(str, b.grids))}), keep {b.keep}, "
                   f"shared weights {b.shared_bytes / 1e6:.1f} MB, {progress.elapsed:.1f} s, "
                   f"peak memory {peak_rss_gb():.2f} GB")
        return
    m = result.manifest
    if m.weights == "random":
        click.echo("WARNING: built from RANDOM weights (no --checkpoint); recorded as \"weights\": \"random\"", err=True)
    later = (f", later frames of {m.group} keep {m.temporal['keep']} ({m.temporal['schedule'][-1]['tokens']} tokens)"
             if m.temporal else "")
    click.echo(f"built {result.path}: {len(m.graphs)} graphs, keep {m.keep} "
               f"({m.kept_patches} of {m.num_patches} tokens){later}, "
               f"ideal FLOP speedup {m.ideal_speedup:.2f}x, "
               f"{progress.elapsed:.1f} s, peak memory {peak_rss_gb():.2f} GB")


@cli.command()
@click.argument("build_dir", type=click.Path())
@click.option("--out", type=click.Path(), required=True, help="the fused build's directory")
@click.option("--validate/--no-validate", default=True, show_default=True, help="check the fused build against PyTorch")
def fuse(build_dir, out, validate):
    """A build's whole chain (stages and selections) as one ONNX graph, written as a build of
    its own: same input and outputs, one graph for engines that take one vision model
    (OpenVINO GenAI, TensorRT-LLM's visual engine)."""
    from ..export.fuse import fuse as fuse_build
    from ..progress import Progress, mark_decided
    from ..validate.report import validate as validate_build

    progress = Progress()
    path = fuse_build(build_dir, out, progress=progress, on_commit=mark_decided)
    if validate:
        report = validate_build(path)
        click.echo(f"validation {'PASSED' if report['passed'] else 'FAILED'} (onnxruntime against PyTorch)")
        if not report["passed"]:
            sys.exit(1)
    click.echo(f"fused {build_dir} into {path} (one graph), {progress.elapsed:.1f} s")


@cli.command()
@click.argument("build_dir", type=click.Path())
@click.option("--min-batch", type=int, default=None, help="smallest batch accepted  [default: the manifest's batch_profile]")
@click.option("--opt-batch", type=int, default=None, help="batch the engines are tuned for  [default: the manifest's]")
@click.option("--max-batch", type=int, default=None, help="largest batch (video frames, tiles)  [default: the manifest's]")
@click.option("--timing-cache", type=click.Path(), default=None,
              help="TensorRT timing cache file: read if present, written back (faster rebuilds, as with trtexec)")
def engines(build_dir, min_batch, opt_batch, max_batch, timing_cache):
    """Strongly typed TensorRT engines for every graph of a build (needs TensorRT >= 10 and an NVIDIA GPU).

    Precision comes from the build: make an fp16 build (`build --precision fp16`) for fp16
    engines; its selections stay fp32."""
    from ..tensorrt.engines import build_engines
    from ..progress import Progress

    info = build_engines(build_dir, min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch,
                         timing_cache=timing_cache, progress=Progress())
    click.echo(f"wrote {len(info['engines'])} engines to {build_dir} (TensorRT {info['tensorrt']}, {info['gpu']}, "
               f"sm {info['compute_capability']}, batch {info['batch_profile']['min']}..{info['batch_profile']['max']})")


@cli.command()
@click.argument("build_dir", type=click.Path())
@click.option("--target", type=click.Choice(["tensorrt"]), default="tensorrt", show_default=True,
              help="the runtime whose ONNX parser the graphs are checked against")
@click.option("--json", "as_json", is_flag=True, help="print the JSON report")
def check(build_dir, target, as_json):
    """Static check that TensorRT would take a build's graphs (runs on a CPU; exit 1 on a problem).

    Every graph against onnx-tensorrt's operator table for TensorRT 10 (vendored, source
    named in the report): ops and input types, Cast targets, opset, TopK K, constant axes,
    no ArgMax, fp32 selections, fp16/bf16 weights in such builds."""
    from ..tensorrt.check import check_build, format_check

    report = check_build(build_dir)
    click.echo(json.dumps(report, indent=2) if as_json else format_check(report))
    if not report["ok"]:
        sys.exit(1)


@cli.command()
@click.argument("build_dir", type=click.Path())
@click.option("--from", "export_dir", type=click.Path(), required=True,
              help="the folder `optimum-cli export openvino --task image-text-to-text` wrote for the same checkpoint")
@click.option("--out", type=click.Path(), required=True, help="the VLMPipeline folder to write")
def genai(build_dir, export_dir, out):
    """An OpenVINO GenAI VLMPipeline folder whose vision model is the build (LLaVA-1.5).

    Copies the export with openvino_vision_embeddings_model replaced by the build's chain as
    one OpenVINO graph; VLMPipeline then gives each image K tokens instead of N. Refused:
    another model's export, other vision weights, other preprocessing, a half-written export."""
    from ..integrations.genai import write_genai_folder
    from ..progress import Progress, mark_decided

    progress = Progress()
    path = write_genai_folder(build_dir, export_dir, out, progress=progress, on_commit=mark_decided)
    click.echo(f"wrote {path}: openvino_genai.VLMPipeline({str(path)!r}, \"CPU\") runs it, "
               f"{progress.elapsed:.1f} s")
