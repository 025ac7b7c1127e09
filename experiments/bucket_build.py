"""docs/qwen.md, "Aspect-ratio buckets": a bucketed build of Qwen2.5-VL-7B's encoder at full
size (random weights) against a one-grid build of the same model: size on disk, build time
and peak memory, each build a CLI run of its own (validation included, as a user builds).

    .venv/bin/python experiments/bucket_build.py --json docs/measurements/buckets-qwen2.5-vl-7b-448-CPU.json
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the example set of 5 (merge units, rows x cols) and the 7 camera ratios (`--grids auto`)
SETS = {"example5": "16x16,12x20,20x12,14x18,18x14", "auto7": "auto"}


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def one_build(args: list[str], out: Path) -> dict:
    cli = [sys.executable, "-m", "evoexport.cli", "build", "--model", "qwen2.5-vl", "--keep", "0.5", "--quiet",
           "--out", str(out), *args]
    start = time.perf_counter()
    proc = subprocess.run(cli, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cli)} failed:\n{proc.stderr[-3000:]}")
    line = proc.stdout.strip().splitlines()[-1]
    files = {f.name: f.stat().st_size for f in out.iterdir()}
    return {"args": args, "seconds": round(seconds, 1), "stdout": line,
            "peak_memory_gb": float(re.search(r"peak memory ([\d.]+) GB", line).group(1)),
            "bytes": sum(files.values()), "files": len(files)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--sets", default=",".join(SETS), help="which grid sets to build")
    args = parser.parse_args()
    result = {"cpu": cpu(), "model": "qwen2.5-vl (7B encoder), random weights, keep 0.5, fp32", "builds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        one = one_build([], Path(tmp) / "one")
        result["builds"]["one grid (16x16, 448 px)"] = one
        print(f"one grid: {one['bytes'] / 1e9:.3f} GB, {one['seconds']:.0f} s, peak {one['peak_memory_gb']} GB",
              flush=True)
        for label in args.sets.split(","):
            b = one_build(["--grids", SETS[label]], Path(tmp) / "buckets")
            b["size_vs_one_grid"] = b["bytes"] / one["bytes"]
            b["index"] = json.loads((Path(tmp) / "buckets" / "manifest.json").read_text())["buckets"]
            result["builds"][label] = b
            print(f"{label}: {b['bytes'] / 1e9:.3f} GB ({b['size_vs_one_grid']:.3f}x one grid), {b['seconds']:.0f} s, "
                  f"peak {b['peak_memory_gb']} GB", flush=True)
            subprocess.run(["rm", "-rf", str(Path(tmp) / "buckets")], check=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
