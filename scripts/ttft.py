#!/usr/bin/env python3
"""Time to first token, image encoding + LLM prefill, with the build's K image tokens
against the unpruned ones, in one process (medians of alternating runs).

    .venv/bin/python scripts/ttft.py graphs/llava-keep0.5 --backend openvino --layers 4
    python scripts/ttft.py graphs/llava-keep0.5 --device cuda --batch 1 --batch 8

The language model (--llm, by default the build family's; shapes in
evoexport/measure/ttft.py) has random weights and a 7B model's shape.
On the CPU (default) it is cut to --layers layers so that a CPU prefills it in seconds, and
the full depth is modelled by scaling the measured per-layer prefill time (prefill FLOPs are
linear in layers; the LM head is timed once). The encoder is the build's chain and the
unpruned keep-1.0 export of the same weights, on --backend.
With --device cuda everything runs at full depth in bf16 on the GPU: the encoders are the
torch chains (pruned: the build's; unpruned: the same tower with no prune point) replayed as
CUDA graphs, the LLM is made on the GPU, and TTFT is measured, not modelled, at each --batch.
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
from evoexport.measure.ttft import LLM_OF_FAMILY, LLMS, TEXT_TOKENS, make_llm, prefill_call, ttft_torch
from evoexport.export.build import build_variant
from evoexport.inputs.images import sample_batch


def _prefill_ms(llm, tokens: int, reps: int) -> float:
    call = prefill_call(llm, tokens)
    ts = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        call()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts[1:])


def measure_full_depth(args, m: dict, llm_name: str, device: str = "cuda") -> dict:
    """Full depth, bf16, on the GPU (`device`; the tests run it on the CPU at test size):
    measured TTFT at each batch."""
    from evoexport.pipeline.stages import Pipeline, pipeline_from_manifest
    from evoexport.runtime.backends.torch import TorchChain

    device = torch.device(device)
    on_gpu = device.type == "cuda"
    pipe = pipeline_from_manifest(m)
    encoders = {"pruned": TorchChain(pipe, device, "bf16"),
                "unpruned": TorchChain(Pipeline(pipe.tower, [], pipe.params), device, "bf16")}
    tokens = {"pruned": pipe.points[-1].tokens if pipe.points else m["tower"]["num_patches"],
              "unpruned": m["tower"]["num_patches"]}
    llm = make_llm(llm_name, None, device, torch.bfloat16)
    photos = sample_batch(m["tower"]["image_size"], m["preprocess"])
    rows = []
    for b in args.batch or [1, 8]:
        x = torch.from_numpy(photos[:1].repeat(b, axis=0)).to(device)
        rows.append(ttft_torch(encoders, tokens, llm, x, args.reps, 3, sync=torch.cuda.synchronize if on_gpu else None))
    return {"build": args.build, "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
            "torch": torch.__version__,
            "llm": llm_name, "precision": "bf16", "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build")
    ap.add_argument("--backend", default="openvino")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--llm", choices=sorted(LLMS), default=None, help="LLM shape (default: the build family's)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, action="append", help="--device cuda: batch sizes (default 1 and 8)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if args.device == "cuda":
        from evoexport.manifest import read_manifest
        m = read_manifest(args.build, verify=False, files=False)
        llm_name = args.llm or LLM_OF_FAMILY.get(m.get("family"), "llama-7b")
        result = measure_full_depth(args, m, llm_name)
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return
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
    llm = make_llm(llm_name, args.layers)
    prefill = {"pruned": _prefill_ms(llm, k + TEXT_TOKENS, args.reps),
               "unpruned": _prefill_ms(llm, full_tokens + TEXT_TOKENS, args.reps)}
    head = {n: _prefill_ms(make_llm(llm_name, 0), t + TEXT_TOKENS, args.reps)
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
