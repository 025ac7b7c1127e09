"""Time to first token: image encoding plus the language model's prefill, pruned against
unpruned, in one process: modelled on a CPU (ttft_modelled) or measured at full depth on a
GPU (ttft_full_depth); experiments/ttft.py runs them on a build, scripts/gpu-probe shares
ttft_torch.

The language model has random weights and a 7B model's shape (prefill cost is the shape's):
  llama-7b  LLaVA-1.5-7B's Llama: hidden 4096, 32 heads, MLP 11008, vocabulary 32000, 32 layers
  qwen2-7b  Qwen2.5-VL-7B's Qwen2: hidden 3584, 28 heads (4 KV), MLP 18944, vocabulary 152064, 28 layers
  tiny      a 2-layer stand-in of width 64, for tests of the code path only
"""
from __future__ import annotations

import torch

from .timing import time_systems

TEXT_TOKENS = 40   # a short prompt around the image

# shape, full depth
LLMS = {"llama-7b": (dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                          vocab_size=32000), 32),
        "qwen2-7b": (dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                          vocab_size=152064), 28),
        "tiny": (dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                      vocab_size=1000), 2)}
LLM_OF_FAMILY = {"qwen2.5-vl": "qwen2-7b"}


def make_llm(name: str = "llama-7b", layers: int | None = None, device="cpu", dtype=torch.float32):
    """A random-weight causal LM of `name`'s shape with `layers` layers (default: full depth),
    made on `device` (a 7B model's weights are initialized on the GPU, not copied there)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape, depth = LLMS[name]
    torch.manual_seed(0)
    # Qwen2 is a Llama with qkv biases and another RoPE base
    cfg = LlamaConfig(**shape, num_hidden_layers=depth if layers is None else layers, max_position_embeddings=4096,
                      attention_bias=name.startswith("qwen"))
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        llm = LlamaForCausalLM(cfg)
    return llm.to(dtype).eval()


def prefill_call(llm, tokens: int, batch: int = 1):
    """A no-argument call of one prefill of `tokens` embeddings per sequence (first token only)."""
    p = next(llm.parameters())
    embeds = torch.randn(batch, tokens, llm.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    embeds = embeds.to(p.device, p.dtype)

    def call():
        with torch.inference_mode():
            return llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    return call


def ttft_torch(encoders: dict, tokens: dict, llm, x: torch.Tensor, iters: int, warmup: int, sync=None) -> dict:
    """TTFT of each encoder ({"pruned": fn(x), "unpruned": fn(x)}) followed by the prefill of
    its image tokens (`tokens[name]`) plus TEXT_TOKENS, timed in one interleaved run."""
    batch = x.shape[0]
    prefill = {name: prefill_call(llm, tokens[name] + TEXT_TOKENS, batch) for name in encoders}
    systems = {}
    for name, encode in encoders.items():
        systems[f"{name} encode"] = lambda encode=encode: encode(x)
        systems[f"{name} prefill"] = prefill[name]
        systems[f"{name} ttft"] = lambda encode=encode, fill=prefill[name]: (encode(x), fill())
    timed = time_systems(systems, iters, warmup, sync=sync)
    rows = {name: {"image_tokens": tokens[name], **{part: timed[f"{name} {part}"]["median_ms"]
                                                    for part in ("encode", "prefill", "ttft")},
                   "ttft_p90_ms": timed[f"{name} ttft"]["p90_ms"]} for name in encoders}
    out = {"batch": batch, "text_tokens": TEXT_TOKENS, "layers": llm.config.num_hidden_layers, "rows": rows}
    if {"pruned", "unpruned"} <= set(rows):
        out["speedup_ttft"] = rows["unpruned"]["ttft"] / rows["pruned"]["ttft"]
    return out


def ttft_full_depth(manifest, llm_name: str, device: str = "cuda", batches=(1, 8), reps: int = 10) -> dict:
    """Full depth, bf16, on `device` (the tests run it on the CPU at test size): TTFT
    measured at each batch, the encoders being the build's torch chain and the same tower
    with no prune point (replayed as CUDA graphs on a GPU)."""
    from ..inputs.images import sample_batch
    from ..pipeline.stages import Pipeline
    from ..pipeline.temporal import pipeline_from_manifest
    from ..runtime.backends.torch import TorchChain

    device = torch.device(device)
    on_gpu = device.type == "cuda"
    pipe = pipeline_from_manifest(manifest)
    encoders = {"pruned": TorchChain(pipe, device, "bf16"),
                "unpruned": TorchChain(Pipeline(pipe.tower, [], pipe.params), device, "bf16")}
    tokens = {"pruned": manifest.kept_patches, "unpruned": manifest.num_patches}
    llm = make_llm(llm_name, None, device, torch.bfloat16)
    photos = sample_batch(manifest.image_size, manifest.preprocess)
    rows = [ttft_torch(encoders, tokens, llm, torch.from_numpy(photos[:1].repeat(b, axis=0)).to(device), reps, 3,
                       sync=torch.cuda.synchronize if on_gpu else None) for b in batches]
    return {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu", "torch": torch.__version__,
            "llm": llm_name, "precision": "bf16", "rows": rows}


def ttft_modelled(pruned, unpruned, llm_name: str, layers: int = 4, reps: int = 3) -> dict:
    """On a CPU: encoding on the builds' runners (pruned, unpruned) and the prefill of an LLM
    cut to `layers` layers, timed in one interleaved run; the full depth is modelled by
    scaling the per-layer prefill time (prefill FLOPs are linear in layers; the embeddings,
    final norm and LM head are timed once, with no layer)."""
    from ..inputs.images import sample_batch
    m = pruned.manifest
    full_depth = LLMS[llm_name][1]
    tokens = {"pruned": m.tokens_per_image, "unpruned": m.num_patches}
    x = sample_batch(m.image_size, m.preprocess)[:1]
    llm, head_only = make_llm(llm_name, layers), make_llm(llm_name, 0)
    systems = {}
    for name, runner in (("pruned", pruned), ("unpruned", unpruned)):
        systems[f"{name} encode"] = lambda runner=runner: runner(x)
        systems[f"{name} prefill"] = prefill_call(llm, tokens[name] + TEXT_TOKENS)
        systems[f"{name} head"] = prefill_call(head_only, tokens[name] + TEXT_TOKENS)
    t = {k: v["median_ms"] for k, v in time_systems(systems, reps, 1).items()}
    rows = {}
    for name in ("pruned", "unpruned"):
        e, prefill, head = t[f"{name} encode"], t[f"{name} prefill"], t[f"{name} head"]
        modelled = head + full_depth * (prefill - head) / layers
        rows[name] = {"image_tokens": tokens[name], "encode_ms": e, f"prefill_{layers}_layers_ms": prefill,
                      f"ttft_{layers}_layers_ms": e + prefill, f"prefill_{full_depth}_layers_modelled_ms": modelled,
                      f"ttft_{full_depth}_layers_modelled_ms": e + modelled}
    ratio = {key: rows["unpruned"][key] / rows["pruned"][key]
             for key in (f"ttft_{layers}_layers_ms", f"ttft_{full_depth}_layers_modelled_ms")}
    return {"llm": llm_name, "text_tokens": TEXT_TOKENS, "layers_run": layers, "rows": rows,
            "speedup_ttft_measured": ratio[f"ttft_{layers}_layers_ms"],
            f"speedup_ttft_{full_depth}_layers_modelled": ratio[f"ttft_{full_depth}_layers_modelled_ms"]}
