#!/usr/bin/env python3
"""Time to first token for a 16-frame clip through vLLM (offline `vllm.LLM`, its CPU build)
with a LLaVA-OneVision-0.5B-shaped model: stock vLLM (its own tower on every frame) against
the evoexport plugin with an unpruned build, per-frame keep 0.5 and temporal 8:0.1. Backs
the vLLM rows of the video TTFT table in docs/performance.md
(docs/measurements/vllm-video-ttft-onevision-0.5b-*.json).

    .venv/bin/python experiments/vllm_video_ttft.py --work /tmp/video-ttft --json OUT [--backend openvino]

The checkpoint has the published shapes and random weights (evoexport.measure.random_vlm),
saved in bf16 as OneVision ships; vLLM runs it in bf16. Every system prefills the same
16 x 196 + 1 video tokens (a pruned frame reaches the LLM as its pooled dense map), so what
pruning saves is the encoder's time. One engine at a time, each in its own process (two
would not fit in memory), in rounds whose order rotates; per system and round one warm-up
request, then --requests timed ones, each `generate()` of one token on the clip with one
pixel changed (vLLM's multimodal cache would otherwise skip the encoder). The plugin's encoder runs on --backend.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "<|im_start|>user\n<video>\nDescribe the video.<|im_end|>\n<|im_start|>assistant\n"
SYSTEMS = {"stock": None, "unpruned": {"keep": 1.0}, "per_frame": {"keep": 0.5},
           "temporal": {"keep": 0.5, "temporal": "8:0.1"}}


def prepare(work: Path, frames: int) -> tuple[Path, dict, Path]:
    """The checkpoint, the builds and the clip's frames (uint8 [F, H, W, 3]), made once."""
    from evoexport.export.build import build
    from evoexport.inputs.video import sample_clip
    from evoexport.measure.random_vlm import make_onevision_vlm
    from evoexport.progress import Progress
    import av
    ckpt = work / "onevision-0.5b"
    if not (ckpt / "config.json").is_file():
        print(f"making {ckpt}", flush=True)
        make_onevision_vlm(ckpt, size="0.5b")
    builds = {}
    for name, options in SYSTEMS.items():
        if options is None:
            continue
        path = work / name
        if not (path / "manifest.json").is_file():
            print(f"building {path}", flush=True)
            build("llava-onevision", checkpoint=str(ckpt), out=path, validate=False, progress=Progress(enabled=False),
                  **options)
        builds[name] = path
    clip = work / f"bikes-{frames}.npy"
    with av.open(str(sample_clip("bikes"))) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    np.save(clip, np.stack([decoded[i] for i in np.linspace(0, len(decoded) - 1, frames).round().astype(int)]))
    return ckpt, builds, clip


def engine_side(spec_path: str) -> None:
    """Runs in vLLM's environment, one engine per process (an engine's memory is not all
    given back when it is deleted: three in one process held 21 GB here): the spec's one
    system, a warm-up request, then the timed ones."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    from evoexport.integrations.vllm import hf_overrides
    spec = json.loads(Path(spec_path).read_text())
    frames, params = np.load(spec["clip"]), SamplingParams(temperature=0, max_tokens=1)
    build = spec["build"]
    kwargs = {"hf_overrides": hf_overrides(build, spec["model"], backend=spec["backend"])} if build else {}
    llm = LLM(model=spec["model"], dtype="bfloat16", max_model_len=4096, seed=0,
              limit_mm_per_prompt={"video": 1, "image": 0}, **kwargs)
    times = []
    for i in range(1 + spec["requests"]):
        clip = frames.copy()
        n = spec["seed"] * 100 + i
        clip[0, 0, 0] = (n % 256, n // 256 % 256, 7)     # a new video to vLLM's caches
        t = time.perf_counter()
        out = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"video": clip}}], params, use_tqdm=False)
        if i:
            times.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"times_ms": times, "prompt_tokens": len(out[0].prompt_token_ids)}))


def run_engine(work: Path, spec: dict) -> dict:
    """One system's engine in vLLM's environment; its timed requests."""
    path = work / "spec.json"
    path.write_text(json.dumps(spec))
    python = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
    done = subprocess.run([str(python), __file__, "--engine-side", str(path)], stdout=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"the vLLM side failed (rc {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=2, help="timed requests per system and round")
    ap.add_argument("--backend", default="openvino", help="the plugin's runtime for the builds")
    ap.add_argument("--engine-side", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine_side:
        return engine_side(args.engine_side)
    from evoexport.measure.timing import cpu_info, stats
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt, builds, clip = prepare(args.work, args.frames)
    result, names = {"times_ms": {name: [] for name in SYSTEMS}, "prompt_tokens": {}}, list(SYSTEMS)
    for r in range(args.rounds):
        for k, name in enumerate(names[r % len(names):] + names[:r % len(names)]):
            out = run_engine(args.work, {"model": str(ckpt), "clip": str(clip), "requests": args.requests,
                                         "backend": args.backend, "build": str(builds[name]) if name in builds else None,
                                         "seed": r * len(names) + k})
            result["times_ms"][name] += out["times_ms"]
            result["prompt_tokens"][name] = out["prompt_tokens"]
            print(f"round {r + 1} {name}: {[round(t) for t in out['times_ms']]} ms", flush=True)
    base = stats(result["times_ms"]["stock"])["median_ms"]
    rows = {}
    for name, times in result["times_ms"].items():
        s = stats(times)
        rows[name] = {"median_ms": s["median_ms"], "p90_ms": s["p90_ms"], "speedup_vs_stock": base / s["median_ms"],
                      "prompt_tokens": result["prompt_tokens"][name], "times_ms": times}
        print(f"{name:10s} median {s['median_ms'] / 1e3:7.1f} s  p90 {s['p90_ms'] / 1e3:7.1f} s  "
              f"{base / s['median_ms']:.2f}x stock  ({result['prompt_tokens'][name]} prompt tokens)", flush=True)
    args.json.write_text(json.dumps({"model": "llava-onevision-0.5b shape, random weights, bf16 in vLLM",
                                     "vllm": "vllm-cpu 0.32.0, offline LLM, in-process engine", "frames": args.frames,
                                     "backend": args.backend, "machine": cpu_info(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
