"""Commands that use a build: run, validate, show, info, models."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import EvoExportError
from ..files import check_output_path
from ..manifest import FLOAT_PRECISIONS
from ..runtime.backends import BACKENDS
from .group import cli


@cli.command()
@click.argument("build_dir", type=click.Path())
@click.option("--input", "input_path", required=True, type=click.Path(),
              help="an image file, a video file (.mp4, .mkv, .webm, ...; needs --frames), "
                   "or a .npy of normalized pixel values float32 [B,3,H,W] (a video build: [B,6,H,W])")
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

    from ..files import NpzRows
    from ..inputs.images import read_pixels
    from ..inputs.video import is_video, sample
    from ..progress import Progress
    from ..runtime.runner import load

    if batch < 1:
        raise EvoExportError(f"--batch must be >= 1, got {batch}")
    output = check_output_path(output, "--output", ".npz")
    video = is_video(input_path)
    if frames is not None and not video:
        raise EvoExportError(f"--frames applies to video inputs; {input_path} is not one")
    if video and frames is None:
        raise EvoExportError(f"{input_path} is a video: say how many frames to sample with --frames N")
    build_dir, grid = _grid_for_input(build_dir, Path(input_path), video)
    runner = load(build_dir, backend=backend)
    progress, group, k = Progress(), runner.manifest.group, runner.manifest.frames_per_input
    per_group = group * k if group > 1 else 1
    if group > 1 and not (video or Path(input_path).suffix.lower() == ".npy"):
        raise EvoExportError(f"{build_dir} is a temporal build (groups of {group} inputs): give a video with "
                             f"--frames (a multiple of {per_group}) or a .npy [B, {group}, {3 * k}, H, W]")
    if video and frames % per_group:
        what = f"{group} frames" if per_group == group else f"{group} frame pairs ({per_group} frames)"
        raise EvoExportError(f"--frames {frames}: {build_dir} takes frames in groups of {what}; "
                             f"give a multiple of {per_group}")
    if video:   # decoded, run and written a batch at a time: memory does not grow with --frames
        m = runner.manifest
        progress(f"counting the frames of {input_path}")
        numbers = sample(input_path, frames)
        progress(f"sampling {len(numbers)} frames: {_short_list(numbers.tolist())}")
        total, extra, chunks = _video_chunks(input_path, numbers, m, batch)
    else:
        pixels = runner.check_input(read_pixels(Path(input_path), runner.manifest))
        total, extra = len(pixels), {}
        chunks = (pixels[start:start + batch] for start in range(0, total, batch))
    extra = {**(extra or {}), **grid}
    with NpzRows(output, total) as out:
        for pixels in chunks:
            if total > batch:
                progress(f"frames {out.filled + 1}-{out.filled + len(pixels)} of {total}")
            out.append(runner.arrays(np.ascontiguousarray(pixels)))
        shapes = out.shapes
        out.commit(extra)
    taps = runner.manifest.deepstack
    click.echo(f"wrote {output}: features {shapes['features']}, indices {shapes['indices']}"
               + (f", DeepStack taps {', '.join(taps)} {shapes[taps[0]]}" if taps else ""))


def _grid_for_input(build_dir, input_path: Path, video: bool) -> tuple[Path, dict]:
    """A bucketed build runs an input at one of its grids: the one the processor gives the
    image (or the video's frames), else the nearest aspect ratio (a .npy: the grid of its
    exact size). Returns (that grid's manifest, what the output records); a one-grid build
    is itself, recording nothing."""
    import numpy as np

    from ..manifest import is_bucketed, read_buckets
    if not is_bucketed(build_dir):
        return Path(build_dir), {}
    buckets = read_buckets(build_dir, verify=False)      # the grid's runner hashes what it reads
    if input_path.suffix.lower() == ".npy":
        from ..inputs.images import read_pixels
        height, width = read_pixels(input_path, None).shape[-2:]
        if (height, width) not in buckets.sizes:
            raise EvoExportError(f"{input_path} holds {height}x{width} pixel values; {build_dir} takes "
                                 + ", ".join(f"{h}x{w}" for h, w in buckets.sizes) + " (or give the image file)")
        i, change, exact = buckets.sizes.index((height, width)), 0.0, True
    else:
        from ..runtime.buckets import BucketRunner
        height, width = _input_size(input_path, video)
        i, change, exact = BucketRunner.choose_in(buckets, height, width)
    grid = buckets.grids[i]
    click.echo(f"grid {grid} ({buckets.sizes[i][0]}x{buckets.sizes[i][1]} px)"
               + ("; the processor's own grid" if exact else f"; resized to it, aspect ratio changed {100 * change:.1f}%"),
               err=True)
    return buckets.paths[i], {"grid": np.asarray(list(grid)), "aspect_change": np.float64(change),
                              "exact": np.bool_(exact)}


def _input_size(input_path: Path, video: bool) -> tuple[int, int]:
    """(height, width) of an image file (upright) or a video's first frame."""
    if video:
        from ..inputs.video import iter_frames
        import numpy as np
        frame = next(iter(iter_frames(input_path, np.array([0]))))
        return frame.height, frame.width
    from ..inputs.image_files import load_image
    image = load_image(input_path)
    return image.height, image.width


def _video_chunks(input_path, numbers, m, batch: int):
    """(inputs, frame_numbers, pixel chunks) of a video's sampled frames: one frame per
    input, a temporal build's groups [B, G, 3, H, W], or a video build's frames stacked in
    pairs [B, 6, H, W] (an odd count repeats the last frame, as Qwen's video processor does);
    a temporal video build's groups of pairs [B, G, 6, H, W]."""
    from ..inputs.video import iter_video_pixels, stack_frame_numbers, stack_frames

    group, k = m.group, m.frames_per_input
    pixels = iter_video_pixels(input_path, numbers, m.image_size, m.preprocess, batch * group * k)
    if group > 1:   # whole groups (of frame pairs for a video build): the caller checked the count
        shape = (-1, group, k) if k > 1 else (-1, group)
        return len(numbers) // (group * k), {"frame_numbers": numbers.reshape(shape)}, (
            stack_frames(p, k).reshape(-1, group, 3 * k, *p.shape[2:]) for p in pixels)
    # a pair's padding frame is decoded once: stack_frames repeats it in the last chunk
    per_input = stack_frame_numbers(numbers, k)
    return len(per_input), {"frame_numbers": per_input}, (stack_frames(p, k) for p in pixels)


def _short_list(values: list) -> str:
    return str(values) if len(values) <= 12 else f"[{', '.join(map(str, values[:5]))}, ..., {', '.join(map(str, values[-3:]))}]"


@cli.command()
@click.argument("build_dir", type=click.Path())
@click.option("--backend", default="onnxruntime", show_default=True,
              type=click.Choice(BACKENDS))
@click.option("--threads", type=int, default=0, help="onnxruntime, openvino: threads  [default: all cores]")
@click.option("--optimization", type=click.Choice(["all", "extended", "basic", "disable"]), default="all",
              show_default=True, help="onnxruntime: graph optimization level")
@click.option("--inference-precision", type=click.Choice(FLOAT_PRECISIONS), default=None,
              help="openvino, torch: precision of the encoder stages  [default: OpenVINO's choice for this CPU; "
                   "torch: the build's on cuda, fp32 on cpu]")
@click.option("--device", default="cpu", show_default=True, help="torch: cpu or cuda (the chain replayed as CUDA graphs)")
@click.option("--json", "as_json", is_flag=True, help="print the JSON report instead of the table")
def validate(build_dir, backend, threads, optimization, inference_precision, device, as_json):
    """Compare a build with the PyTorch model on sample photos (exit 1 beyond tolerances).

    Decisions are compared as decisions: a kept set or merge map that differs from
    PyTorch's passes only where PyTorch's own scores call it a near-tie; outputs are then
    compared tightly under the backend's decisions (docs/validation.md)."""
    from ..validate.text import format_report
    from ..validate.report import validate as run_validation

    from ..runtime.backends import cli_options

    if threads < 0:
        raise EvoExportError(f"--threads must be >= 0, got {threads}")
    given = {"threads": threads, "optimization": optimization, "precision": inference_precision, "device": device}
    options = cli_options(backend, given, defaults={"threads": 0, "optimization": "all", "precision": None,
                                                    "device": "cpu"})
    report = run_validation(build_dir, backend=backend, **options)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if not report["passed"]:
        sys.exit(1)


MAX_SHOWN = 64   # images or frames in one picture of `show`


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

    from ..inputs.images import read_pixels, sample_batch
    from ..progress import Progress
    from ..runtime.runner import load
    from ..show.panels import show as render_show
    from ..inputs.video import is_video, stack_frame_numbers, stack_frames, video_pixels

    check_output_path(output, "--output", ".png")
    videos = [p for p in inputs if is_video(p)]
    if videos and (len(inputs) > 1 or frames is None):
        raise EvoExportError("a video is drawn on its own: give one video --input and --frames N")
    if frames is not None and not videos:
        raise EvoExportError("--frames applies to a video --input")
    if (frames or len(inputs)) > MAX_SHOWN:
        what = f"--frames {frames}" if videos else f"{len(inputs)} --input images"
        raise EvoExportError(f"{what}: show draws at most {MAX_SHOWN} (one picture holds them all); "
                             "use `evoexport run` for the numbers of more")
    runner = load(build_dir, backend=backend)
    m = runner.manifest
    k = m.frames_per_input          # a video build's inputs are frame pairs, drawn by their first frame
    if m.group > 1 and (not videos or frames % (m.group * k)):
        what = f"{m.group} frame pairs" if k > 1 else f"{m.group} frames"
        raise EvoExportError(f"{build_dir} is a temporal build: give one video --input and --frames, "
                             f"a multiple of {m.group * k} (groups of {what})")
    numbers = None
    if videos:
        Progress()(f"decoding {videos[0]}")
        pixels, numbers = video_pixels(videos[0], frames, m.image_size, m.preprocess)
        if k > 1:    # pairs of consecutive frames; an odd count repeats the last, as run does
            pixels = stack_frames(pixels, k)
            numbers = stack_frame_numbers(numbers, k)
    elif inputs:
        pixels = np.concatenate([runner.check_input(np.ascontiguousarray(read_pixels(Path(p), m), dtype=np.float32))
                                 for p in inputs])
    else:
        pixels = sample_batch(m.image_size, m.preprocess)
    info = render_show(runner, np.ascontiguousarray(pixels, dtype=np.float32), Path(output), numbers)
    what = f"{info['images']} frame(s)" if videos else f"{info['images']} image(s)"
    click.echo(f"wrote {output}: {what} x {info['panels']} panels ({info['size'][0]}x{info['size'][1]})")


@cli.command()
@click.argument("build_dir", type=click.Path())
def info(build_dir):
    """Summarize a build's manifest (graphs, tensors, schedule, weights); a bucketed build's grids."""
    from ..manifest import is_bucketed, read_buckets, read_manifest

    if is_bucketed(build_dir):
        b = read_buckets(build_dir, verify=False)
        p = b.processor
        click.echo(f"{build_dir}: bucketed build of {b.model}, keep {b.keep}, {len(b.grids)} grid{'s' * (len(b.grids) != 1)} sharing "
                   f"{b.shared_bytes / 1e6:.1f} MB of weights; an image goes to its processor grid (smart_resize, "
                   f"{p['unit_px']} px units, {p['min_pixels']}..{p['max_pixels']} pixels), else the nearest "
                   "aspect ratio")
        for path, m in zip(b.paths, b.manifests):
            h, w = m.image_hw
            click.echo(f"  {str(m.grid):<7} {h}x{w} px  {m.tokens_per_image} of {m.num_patches} tokens  {path.name}")
        return
    m = read_manifest(build_dir, verify=False)
    click.echo(f"{build_dir}: model {m.model}, keep {m.keep}, weights {m.weights} "
               f"(sha256 {(m.weights_sha256 or '?')[:12]}), schema {m.schema_version}")
    click.echo(f"  prune params: {m.prune_params}")
    for g in m.graphs:
        ins = ", ".join(f"{t['name']}{t['shape']}" for t in g["inputs"])
        outs = ", ".join(f"{t['name']}{t['shape']}" for t in g["outputs"])
        click.echo(f"  {g['name']:<9} {ins} -> {outs}")


@cli.command()
def models():
    """List the model presets."""
    from ..models import list_presets

    for p in list_presets():
        click.echo(f"{p.name:<12} {p.description}")
