#!/usr/bin/env python3
"""Serve LLaVA-1.5 with vLLM on precomputed, pruned image features (NOT RUN in this
project: vLLM needs a CUDA GPU and is not installed here; see docs/llm.md).

    python scripts/serve_vllm.py graphs/llava-keep0.5-fp16 photo.jpg --backend torch --device cuda

vLLM takes image embeddings of shape (num_items, K, hidden) after the projector when the
engine is created with enable_mm_embeds=True; LLaVA's <image> placeholder then expands to
the embeddings' K instead of 576.
"""
import argparse

import numpy as np
import torch

import evoexport
from evoexport.inputs.image_files import load_image
from evoexport.inputs.images import preprocess


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("build")
    ap.add_argument("image")
    ap.add_argument("--model", default="llava-hf/llava-1.5-7b-hf")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    from vllm import LLM   # imported here: the script documents a recipe this project could not run

    options = {"device": args.device} if args.backend == "torch" else {}
    runner = evoexport.load(args.build, backend=args.backend, **options)
    m = runner.manifest
    pixels = preprocess(load_image(args.image), m["tower"]["image_size"], m["preprocess"])[None]
    features = torch.as_tensor(np.asarray(runner.backend.to_numpy(runner(pixels).features)))   # [1, K, 4096]
    llm = LLM(model=args.model, enable_mm_embeds=True)
    out = llm.generate({"prompt": "USER: <image>\nWhat is in this image?\nASSISTANT:",
                        "multi_modal_data": {"image": features.to(torch.float16)}})
    print(out[0].outputs[0].text)


if __name__ == "__main__":
    main()
