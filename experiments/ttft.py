#!/usr/bin/env python3
"""Time to first token, image encoding + LLM prefill, with the build's K image tokens
against the unpruned ones, in one process. Backs docs/llm.md (the TTFT tables) and
docs/measurements/ttft-*.json.

    .venv/bin/python experiments/ttft.py graphs/llava-keep0.5 --backend openvino --layers 4
    python experiments/ttft.py graphs/llava-keep0.5 --device cuda --batch 1 --batch 8

The language model (--llm, by default the build family's; shapes in
evoexport/measure/ttft.py) has random weights and a 7B model's shape. On the CPU (default)
it is cut to --layers layers and the full depth is modelled (measure.ttft.ttft_modelled);
the encoders are the build's chain and the unpruned export of the same weights, on
--backend. With --device cuda everything runs at full depth in bf16 on the GPU
(measure.ttft.ttft_full_depth).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import evoexport
from evoexport.export.build import build_variant
from evoexport.manifest import read_manifest
from evoexport.measure.timing import cpu_info
from evoexport.measure.ttft import LLM_OF_FAMILY, LLMS, ttft_full_depth, ttft_modelled


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
    manifest = read_manifest(args.build, verify=False, files=False)
    llm_name = args.llm or LLM_OF_FAMILY.get(manifest.family, "llama-7b")
    if args.device == "cuda":
        result = ttft_full_depth(manifest, llm_name, batches=args.batch or (1, 8), reps=args.reps)
    else:
        pruned = evoexport.load(args.build, backend=args.backend)
        with tempfile.TemporaryDirectory() as tmp:
            unpruned = evoexport.load(build_variant(pruned.manifest, Path(tmp) / "unpruned", unpruned=True).path,
                                      backend=args.backend)
            result = ttft_modelled(pruned, unpruned, llm_name, args.layers, args.reps)
        result.update(backend=args.backend, cpu=cpu_info()["cpu"], threads=torch.get_num_threads())
    result = {"build": args.build, **result}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
