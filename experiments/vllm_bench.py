#!/usr/bin/env python3
"""The whole VLM served by vLLM, from OpenAI chat requests with one image: stock vLLM (its
own encoder, unpruned) against the evoexport plugin at keep 1.0 (our encoder, unpruned) and
at keep 0.5. Backs docs/llm.md (the vLLM serving table) and docs/measurements/vllm-*.json.

    .venv/bin/python experiments/vllm_bench.py --model qwen2.5-vl-3b --work /tmp/vllm-bench
    .venv/bin/python experiments/vllm_bench.py --model llava-onevision-0.5b --work /tmp/vllm-bench

Models have the full shapes of the published ones and random weights
(evoexport.measure.random_vlm), so speed is the shape's and answers mean nothing: every
request asks for a fixed number of tokens (ignore_eos). The three systems run with the
same vLLM options, one server at a time (three would not fit in this machine's memory),
in interleaved rounds (the order rotates each round). Per system and round:
  - TTFT at concurrency 1: the latency of a request for one token (prefill + first token);
  - concurrency 8: 8 clients at once, each sending requests for --tokens tokens:
    requests per second over the round's wall time, and every request's latency.
The FLOP ideal of the whole prefill (encoder, from the build's manifest, plus the
language model's prefill of its prompt) is reported beside the measured ratios.
"""
from __future__ import annotations

import argparse
import base64
import io
import itertools
import json
import os
import statistics
import time
import urllib.request
from pathlib import Path

import numpy as np

from evoexport.export.build import build
from evoexport.files import read_json
from evoexport.manifest import read_manifest
from evoexport.measure.random_vlm import make_onevision_vlm, make_qwen_vlm
from evoexport.measure.timing import cpu_info, stats, time_clients
from evoexport.progress import Progress
from evoexport.serve.vllm_server import serve_vllm

# vLLM kills its engine when one step takes over 300 s; stock vLLM encodes all 8 images of the
# concurrency round in one step, several minutes on 2 cores. The KV cache: 2 GB (memory is tight)
os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "7200")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

# name -> (maker, size, evoexport preset, image side in px, build options)
MODELS = {"qwen2.5-vl-3b": (make_qwen_vlm, "3b", "qwen2.5-vl", 448, {"image_size": 448}),
          "llava-onevision-0.5b": (make_onevision_vlm, "0.5b", "llava-onevision", 384, {})}
TEXT = "Describe this image in detail."


def prepare(model: str, work: Path, keeps: list[float], say) -> tuple[Path, dict]:
    """The random checkpoint and its builds (made once, reused)."""
    maker, size, preset, _, options = MODELS[model]
    ckpt = work / model
    if not (ckpt / "config.json").is_file():
        say(f"making {ckpt} (random weights, full shape)")
        maker(ckpt, size=size)
    builds = {}
    for keep in keeps:
        out = work / f"{model}-keep{keep}"
        if not (out / "manifest.json").is_file():
            say(f"building {out}")
            build(preset, keep, checkpoint=str(ckpt), out=out, validate=False, progress=Progress(), **options)
        builds[keep] = out
    return ckpt, builds


class Photos:
    """A real photo (scikit-image's astronaut) resized to side x side, as PNG data URLs that
    differ in one pixel from call to call: every request is a new image to vLLM, whose
    prefix and multimodal caches would otherwise skip the encoder and most of the prefill."""

    def __init__(self, side: int):
        from PIL import Image
        from skimage import data
        self.pixels = np.asarray(Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.BICUBIC))
        self.count = itertools.count()

    def __call__(self) -> str:
        from PIL import Image
        n, pixels = next(self.count), self.pixels.copy()
        pixels[0, 0] = (n % 256, n // 256 % 256, 7)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(url: str, image: str, tokens: int) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": TEXT}]
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True}
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as r:
        answer = json.loads(r.read())
    if answer["usage"]["completion_tokens"] != tokens:
        raise RuntimeError(f"asked for {tokens} tokens, got {answer['usage']['completion_tokens']}")
    return answer["usage"]


def measure(url: str, photos: Photos, args) -> dict:
    """One round on a running server: TTFT at concurrency 1, then concurrency 8."""
    usage = chat(url, photos(), 1)                                  # warm-up (and the prompt's length)
    ttft = []
    for _ in range(args.ttft_requests):
        image = photos()
        t = time.perf_counter()
        chat(url, image, 1)
        ttft.append((time.perf_counter() - t) * 1e3)
    images = [photos() for _ in range(args.concurrency * args.per_client)]
    loaded = time_clients(lambda: (lambda: chat(url, images.pop(), args.tokens), lambda: None), args.concurrency,
                          args.per_client)
    if loaded["errors"]:
        raise RuntimeError(f"{len(loaded['errors'])} requests failed: {loaded['errors'][0]}")
    return {"prompt_tokens": usage["prompt_tokens"], "ttft_ms": ttft,
            "latency_ms": [s * 1e3 for s in loaded["latencies"]],
            "requests_per_s": len(loaded["latencies"]) / loaded["wall_s"]}


def run_round(systems: dict, ckpt: Path, photos: Photos, args, say) -> dict:
    results = {}
    for name, build_dir in systems.items():
        say(f"{name}: starting vLLM")
        encoder = {"threads": args.encoder_threads} if build_dir else None
        with serve_vllm(build_dir, ckpt, port=args.port, vllm_args=tuple(args.vllm_args), say=say,
                        encoder=encoder) as (url, _):
            results[name] = measure(url, photos, args)
        say(f"{name}: TTFT median {statistics.median(results[name]['ttft_ms']):.0f} ms, "
            f"{results[name]['requests_per_s']:.3f} req/s at concurrency {args.concurrency}")
    return results


def llm_prefill_flops(ckpt: Path, tokens: int) -> float:
    """2 x the language model's matrix weights x tokens, plus causal attention's scores and
    mixing (2 x layers x tokens^2 x hidden); the vocabulary projection of the last token."""
    cfg = read_json(ckpt / "config.json")["text_config"]
    h, layers, mlp = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * mlp
    return 2.0 * per_layer * layers * tokens + 2.0 * layers * tokens ** 2 * h + 2.0 * h * cfg["vocab_size"]


def summary(rounds: list[dict], builds: dict, ckpt: Path, tiles: int) -> dict:
    merged = {name: {key: [v for r in rounds for v in r[name][key]] for key in ("ttft_ms", "latency_ms")}
              for name in rounds[0]}
    table = {}
    for name, m in merged.items():
        rps = [r[name]["requests_per_s"] for r in rounds]
        table[name] = {"prompt_tokens": rounds[0][name]["prompt_tokens"], "ttft": stats(m["ttft_ms"]),
                       "latency_p50_ms": float(np.percentile(m["latency_ms"], 50)),
                       "latency_p99_ms": float(np.percentile(m["latency_ms"], 99)),
                       "requests_per_s_median": statistics.median(rps), "requests_per_s": rps}
    flops = {}
    for name, build_dir in {"stock": builds[1.0], **{f"keep{k}": b for k, b in builds.items()}}.items():
        manifest = read_manifest(build_dir, verify=False, files=False)
        encoder = manifest.flops["pruned"] * tiles
        flops[name] = encoder + llm_prefill_flops(ckpt, table[name if name in table else "stock"]["prompt_tokens"])
    for name in table:
        table[name]["ttft_speedup_vs_stock"] = table["stock"]["ttft"]["median_ms"] / table[name]["ttft"]["median_ms"]
        table[name]["throughput_ratio_vs_stock"] = (table[name]["requests_per_s_median"]
                                                   / table["stock"]["requests_per_s_median"])
        table[name]["prefill_gflops"] = flops[name] / 1e9
        table[name]["flop_ideal_vs_stock"] = flops["stock"] / flops[name]
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--work", type=Path, required=True, help="checkpoints and builds (kept between runs)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ttft-requests", type=int, default=3, help="per system and round")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--per-client", type=int, default=1, help="requests per client per round")
    p.add_argument("--tokens", type=int, default=16, help="tokens each request of the concurrency round asks for")
    p.add_argument("--encoder-threads", type=int, default=0, help="the build's runtime threads (0: its default)")
    p.add_argument("--tiles", type=int, default=1, help="anyres tiles of the photo besides the base view (OneVision)")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="after --: options of every vLLM server")
    args = p.parse_args()
    args.vllm_args = [a for a in args.vllm_args if a != "--"]
    say = lambda line: print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
    ckpt, builds = prepare(args.model, args.work, [1.0, 0.5], say)
    photos = Photos(MODELS[args.model][3] * (2 if args.tiles > 1 else 1))
    systems = {"stock": None, "keep1.0": builds[1.0], "keep0.5": builds[0.5]}
    tiles = 1 + args.tiles if MODELS[args.model][2] == "llava-onevision" else 1
    rounds = []
    for r in range(args.rounds):
        order = list(systems)[r % 3:] + list(systems)[:r % 3]
        say(f"round {r + 1}/{args.rounds}: {', '.join(order)}")
        rounds.append(run_round({name: systems[name] for name in order}, ckpt, photos, args, say))
        write(args, rounds, summary(rounds, builds, ckpt, tiles))      # after every round: a stopped run keeps its rounds


def write(args, rounds: list[dict], table: dict) -> None:
    result = {"model": args.model, "machine": cpu_info(), "vllm_args": args.vllm_args,
              "encoder_threads": args.encoder_threads, "rounds": rounds, "summary": table,
              "settings": {k: getattr(args, k) for k in ("rounds", "ttft_requests", "concurrency", "per_client",
                                                         "tokens", "tiles")}}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(table, indent=1), flush=True)


if __name__ == "__main__":
    main()
