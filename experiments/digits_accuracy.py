#!/usr/bin/env python
"""Print the EvoPrune accuracy/FLOPs table for the trained digits ViT. Backs the digits
table of docs/evoprune.md.

    .venv/bin/python experiments/digits_accuracy.py
"""
from __future__ import annotations

import statistics

from evoexport.measure.digits import ATTENTION_TOPK, EVOPRUNE, RANDOM, DigitsBench


def main() -> None:
    bench = DigitsBench()
    full = bench.evaluate(EVOPRUNE, 1.0)
    rows = [("unpruned", full.keep, full.schedule, full.accuracy, full.gflops)]
    for keep in (0.5, 0.25):
        variants = [
            ("EvoPrune (default: merge, default schedule)", bench.evaluate(EVOPRUNE, keep)),
            ("EvoPrune, no merge", bench.evaluate(EVOPRUNE, keep, merge=False)),
            ("EvoPrune, one cut after the first layer", bench.evaluate(EVOPRUNE, keep, first_layer=True)),
            ("EvoPrune, no merge, cut after the first layer", bench.evaluate(EVOPRUNE, keep, merge=False, first_layer=True)),
            ("attention-only top-k", bench.evaluate(ATTENTION_TOPK, keep)),
        ]
        for name, r in variants:
            rows.append((name, keep, r.schedule, r.accuracy, r.gflops))
        rand = [bench.evaluate(RANDOM, keep, seed=s) for s in range(5)]
        rows.append(("random selection (mean of 5 seeds)", keep, rand[0].schedule,
                     statistics.mean(r.accuracy for r in rand), rand[0].gflops))
    print(f"digits ViT (8 layers, 64 patch tokens), {len(bench.y)} held-out digits\n")
    print("| method | keep | schedule (after_layer:tokens) | accuracy | MFLOPs / image |")
    print("|---|---|---|---|---|")
    for name, keep, sched, acc, gflops in rows:
        print(f"| {name} | {keep} | {sched} | {100 * acc:.1f}% | {1000 * gflops:.1f} |")


if __name__ == "__main__":
    main()
