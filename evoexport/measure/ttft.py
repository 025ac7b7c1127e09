"""Time to first token: image encoding plus the language model's prefill, pruned against
unpruned, in one process. What scripts/ttft.py (a build on any backend, on the CPU or with
--device cuda) and scripts/gpu-probe share.

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
