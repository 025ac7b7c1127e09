#!/usr/bin/env python3
"""Time to first token, image encoding + LLM prefill, with the build's K image tokens
against the unpruned 576, in one process (medians of alternating runs).

    .venv/bin/python scripts/ttft.py graphs/llava-keep0.5 --backend openvino --layers 4

The language model (--llm, by default the build family's) has random weights and the
7B model's shape, cut to --layers layers so that a CPU prefills it in seconds:
  llama-7b  LLaVA-1.5-7B's Llama: hidden 4096, 32 heads, MLP 11008, vocabulary 32000, 32 layers
  qwen2-7b  Qwen2.5-VL-7B's Qwen2: hidden 3584, 28 heads (4 KV), MLP 18944, vocabulary 152064, 28 layers
The full depth is modelled by scaling the measured per-layer prefill time (prefill FLOPs
are linear in layers; the LM head is timed once). The encoder is the build's chain and the
unpruned keep-1.0 export of the same weights, on --backend.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import evoexport
from evoexport.measure.bench import _cpu_name
from evoexport.export.build import build_variant
from evoexport.inputs.images import sample_batch

TEXT_TOKENS = 40   # a short prompt around the image


# shape, full depth
LLMS = {"llama-7b": (dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                          vocab_size=32000), 32),
        "qwen2-7b": (dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                          vocab_size=152064), 28)}
LLM_OF_FAMILY = {"qwen2.5-vl": "qwen2-7b"}


def _llm(layers: int, name: str = "llama-7b"):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    # prefill cost is the shape's: Qwen2 is a Llama with qkv biases and another RoPE base
    cfg = LlamaConfig(**LLMS[name][0], num_hidden_layers=layers, max_position_embeddings=4096,
                      attention_bias=name.startswith("qwen"))
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def _prefill_ms(llm, tokens: int, reps: int) -> float:
    embeds = torch.randn(1, tokens, llm.config.hidden_size) * 0.02
    ts = []
    with torch.inference_mode():
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
            ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build")
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--llm", choices=sorted(LLMS), default=None, help="LLM shape (default: the build family's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    pruned = evoexport.load(args.build, backend=args.backend)
    m = pruned.manifest
    llm_name = args.llm or LLM_OF_FAMILY.get(m.get("family"), "llama-7b")
    full_depth = LLMS[llm_name][1]
    k = m["stages"][-1]["outputs"][0]["shape"][1]
    full_tokens = m["tower"]["num_patches"]
    x = sample_batch(m["tower"]["image_size"], m["preprocess"])[:1]
    with tempfile.TemporaryDirectory() as tmp:
        r = build_variant(m, Path(tmp) / "unpruned", unpruned=True)
        unpruned = evoexport.load(r.path, backend=args.backend)
        enc = {"pruned": [], "unpruned": []}
        for runner in (pruned, unpruned):
            runner(x)
        for _ in range(args.reps):
            for name, runner in (("pruned", pruned), ("unpruned", unpruned)):
                t0 = time.perf_counter()
                runner(x)
                enc[name].append((time.perf_counter() - t0) * 1e3)
    llm = _llm(args.layers, llm_name)
    prefill = {"pruned": _prefill_ms(llm, k + TEXT_TOKENS, args.reps),
               "unpruned": _prefill_ms(llm, full_tokens + TEXT_TOKENS, args.reps)}
    head = {n: _prefill_ms(_llm(0, llm_name), t + TEXT_TOKENS, args.reps)
            for n, t in (("pruned", k), ("unpruned", full_tokens))}   # embeddings, final norm, LM head
    rows = {}
    for name in ("pruned", "unpruned"):
        e = statistics.median(enc[name])
        per_layer = (prefill[name] - head[name]) / args.layers
        rows[name] = {"image_tokens": k if name == "pruned" else full_tokens, "encode_ms": e,
                      f"prefill_{args.layers}_layers_ms": prefill[name], f"ttft_{args.layers}_layers_ms": e + prefill[name],
                      f"prefill_{full_depth}_layers_modelled_ms": head[name] + full_depth * per_layer,
                      f"ttft_{full_depth}_layers_modelled_ms": e + head[name] + full_depth * per_layer}
    result = {"build": args.build, "backend": args.backend, "cpu": _cpu_name(), "threads": torch.get_num_threads(),
              "llm": llm_name, "text_tokens": TEXT_TOKENS, "layers_run": args.layers, "rows": rows,
              "speedup_ttft_measured": rows["unpruned"][f"ttft_{args.layers}_layers_ms"] / rows["pruned"][f"ttft_{args.layers}_layers_ms"],
              f"speedup_ttft_{full_depth}_layers_modelled": rows["unpruned"][f"ttft_{full_depth}_layers_modelled_ms"]
              / rows["pruned"][f"ttft_{full_depth}_layers_modelled_ms"]}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
