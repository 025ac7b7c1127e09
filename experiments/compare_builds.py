#!/usr/bin/env python3
"""Time two or more builds of the same model on one backend, in one process: medians, p90
and each build's ratio to the first. Blocks of iterations alternate between the builds so
that drift (thermal, other load) hits them alike. Backs the opset-23 and the fused-vs-chain
comparisons of docs/performance.md (docs/measurements/opset23-vs-opset20-*.json,
fuse-vs-chain-*.json).

    .venv/bin/python experiments/compare_builds.py graphs/llava-keep0.5 graphs/llava-keep0.5-opset23 \
        --backend onnxruntime --batch 1 --rounds 5 --iters 4
"""
from __future__ import annotations

import argparse
import json

import numpy as np

import evoexport
from evoexport.measure.timing import cpu_info, time_systems
from evoexport.inputs.images import sample_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5, help="alternating blocks per build")
    ap.add_argument("--iters", type=int, default=4, help="timed iterations per block")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    runners = [evoexport.load(b, backend=args.backend) for b in args.builds]
    m = runners[0].manifest
    x = sample_batch(m.image_size, m.preprocess)
    x = np.ascontiguousarray(np.resize(x, (args.batch, *x.shape[1:])))
    timed = time_systems({b: (lambda r=r: r(x)) for b, r in zip(args.builds, runners)},
                         iters=args.rounds * args.iters, warmup=1, rounds=args.rounds)
    first = timed[args.builds[0]]["median_ms"]
    rows = [{"build": b, "median_ms": timed[b]["median_ms"], "p90_ms": timed[b]["p90_ms"],
             "ratio_to_first": first / timed[b]["median_ms"]} for b in args.builds]
    cpu = cpu_info()["cpu"]
    print(f"{args.backend}, batch {args.batch}, {args.rounds * args.iters} runs each, on {cpu}")
    for row in rows:
        print(f"  {row['build']:<44} median {row['median_ms']:8.1f} ms  p90 {row['p90_ms']:8.1f} ms  "
              f"speedup vs first {row['ratio_to_first']:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": args.backend, "batch": args.batch, "cpu": cpu, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
