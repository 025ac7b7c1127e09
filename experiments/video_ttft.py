#!/usr/bin/env python3
"""Time to first token for a 16-frame clip through a LLaVA-OneVision-0.5B-shaped model in
transformers (random weights, full depth: SigLIP so400m/14-384, 26 layers, and Qwen2-0.5B's
24 layers), timed in one process with interleaved rounds. Backs the video TTFT table of
docs/performance.md and docs/llm.md (docs/measurements/video-ttft-onevision-0.5b-*.json).

    .venv/bin/python experiments/video_ttft.py --work /tmp/video-ttft \
        --json docs/measurements/video-ttft-onevision-0.5b-CPU.json

Systems, each one greedy generate() of one token on the same prompt and clip:
  transformers  the model as loaded, in its checkpoint's dtype (bf16, as OneVision ships and
                as transformers loads it by default): its own torch tower on every frame
  unpruned      attach() of a keep-1.0 build on --backend (the same tokens as transformers)
  per_frame     attach() of a keep --keep build: every frame pruned alone
  temporal      attach() of a keep --keep build with --temporal
A pruned frame reaches the LLM as its dense map pooled as transformers pools it
(integrations/hf_onevision_video.py), so every system prefills the same 16 x 196 + 1 video
tokens: what pruning saves here is the encoder's time.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from evoexport.export.build import build
from evoexport.inputs.video import sample_clip, video_pixels
from evoexport.integrations.hf_llava import attach
from evoexport.manifest import read_manifest
from evoexport.measure.random_vlm import make_onevision_vlm
from evoexport.measure.timing import cpu_info, time_systems
from evoexport.progress import Progress


def builds(ckpt: Path, keep: float, temporal: str, work: Path) -> dict[str, Path]:
    plan = {"unpruned": dict(keep=1.0), "per_frame": dict(keep=keep), "temporal": dict(keep=keep, temporal=temporal)}
    out = {}
    for name, options in plan.items():
        path = work / name
        if not (path / "manifest.json").is_file():
            print(f"building {path}", flush=True)
            build("llava-onevision", checkpoint=str(ckpt), out=path, validate=False,
                  progress=Progress(enabled=False), **options)
        out[name] = path
    return out


def prompt(model, frames: torch.Tensor) -> dict:
    """A short prompt around the clip with transformers' count of video tokens: every frame
    pooled to ceil(g/2)^2, one newline after the video."""
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    count = frames.shape[0] * ((g + 1) // 2) ** 2 + 1
    ids = torch.tensor([[1, 5, *[model.config.video_token_id] * count, *range(17, 57)]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": frames[None]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--temporal", default="8:0.1")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--precision", default=None, help="the torch backend's compute precision (bf16 to match "
                                                      "transformers' bf16 model)  [default: fp32]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ckpt = args.work / "onevision-0.5b"
    if not (ckpt / "config.json").is_file():
        print(f"making {ckpt}", flush=True)
        make_onevision_vlm(ckpt, size="0.5b")
    paths = builds(ckpt, args.keep, args.temporal, args.work)
    from transformers import LlavaOnevisionForConditionalGeneration
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt).eval()
    inner = model.model
    m = read_manifest(paths["unpruned"], verify=False)
    frames = torch.from_numpy(video_pixels(sample_clip("bikes"), args.frames, m.image_size, m.preprocess)[0])
    inputs = prompt(model, frames)
    # one model; each system swaps in its own video path (attach replaces get_video_features)
    video_features = {"transformers": inner.get_video_features}
    options = {"low_memory": True} if args.backend == "onnxruntime" else {}
    if args.precision:
        options["precision"] = args.precision
    for name, path in paths.items():
        attach(model, path, backend=args.backend, **options)
        video_features[name] = inner.get_video_features

    def first_token(name):
        def call():
            inner.get_video_features = video_features[name]
            with torch.inference_mode():
                return model.generate(**inputs, max_new_tokens=1, do_sample=False)
        return call

    timed = time_systems({name: first_token(name) for name in video_features}, args.rounds, 1)
    base = timed["transformers"]["median_ms"]
    rows = {name: {"median_ms": t["median_ms"], "p90_ms": t["p90_ms"], "speedup": base / t["median_ms"],
                   "times_ms": t["times_ms"]} for name, t in timed.items()}
    for name, row in rows.items():
        print(f"{name:13s} median {row['median_ms']:9.1f} ms  p90 {row['p90_ms']:9.1f} ms  "
              f"speedup {row['speedup']:.2f}x", flush=True)
    result = {"model": "llava-onevision-0.5b shape, random weights", "keep": args.keep, "temporal": args.temporal,
              "frames": args.frames, "video_tokens": int(inputs["input_ids"].eq(model.config.video_token_id).sum()),
              "backend": args.backend, "backend_options": options, "model_dtype": str(model.dtype).removeprefix("torch."),
              "machine": cpu_info(), "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
