#!/usr/bin/env python3
"""Time the selection graphs of two builds of the same model, graph by graph, in one process,
on ONNX Runtime and OpenVINO (fp32, as the runtimes run them): medians, p90, the ratio
before/after, and whether the two builds' decisions (every integer output) are identical
on the same inputs. Blocks alternate between the builds so drift hits both alike
(measure/timing.time_systems). Backs the selection-speed table of docs/gpu.md.

    .venv/bin/python experiments/compare_selections.py BEFORE_BUILD AFTER_BUILD --batch 1 8 --json out.json

Inputs are seeded random hidden states and importance, and for later points sorted random
positions and sizes of 1-2: a selection's cost does not depend on its values.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov

from evoexport.manifest import read_manifest
from evoexport.measure.timing import cpu_info, time_systems


def _inputs(spec: list[dict], batch: int, num_patches: int, rng) -> dict:
    feeds = {}
    for inp in spec:
        shape = [batch if isinstance(d, str) else d for d in inp["shape"]]
        name = inp["name"]
        if "importance" in name:
            feeds[name] = rng.random(shape, dtype=np.float32)
        elif name.startswith("sizes"):
            feeds[name] = rng.integers(1, 3, shape).astype(np.float32)
        elif name.startswith("indices"):
            rows = [np.sort(rng.choice(num_patches, shape[1], replace=False)) for _ in range(batch)]
            feeds[name] = np.stack(rows).astype(np.int64)
        else:
            feeds[name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=4, help="alternating blocks per build")
    ap.add_argument("--iters", type=int, default=8, help="timed iterations per block")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    builds = {"before": Path(args.before), "after": Path(args.after)}
    manifests = {k: read_manifest(d) for k, d in builds.items()}
    selects = [s["select"] for s in manifests["after"].stages if s.get("select")]
    if manifests["before"].schedule != manifests["after"].schedule:
        raise SystemExit("error: the two builds have different prune schedules")
    num_patches = manifests["after"].num_patches
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": args.threads})
    rows = []
    for batch in args.batch:
        for index, spec in enumerate(selects):
            feeds = _inputs(spec["inputs"], batch, num_patches, np.random.default_rng(index))
            runners, outputs = {}, {}
            for key, d in builds.items():
                so = ort.SessionOptions()
                so.intra_op_num_threads = args.threads
                session = ort.InferenceSession(str(d / spec["file"]), so, providers=["CPUExecutionProvider"])
                request = core.compile_model(str(d / spec["file"]), "CPU",
                                             {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
                runners[f"{key} onnxruntime"] = lambda s=session: s.run(None, feeds)
                runners[f"{key} openvino"] = lambda r=request: r.infer(feeds)
                outputs[key] = session.run(None, feeds)
            timed = time_systems(runners, args.rounds * args.iters, warmup=2, rounds=args.rounds)
            integer_equal = all(np.array_equal(a, b) for a, b in zip(outputs["before"], outputs["after"])
                                if a.dtype.kind == "i")
            hidden_diff = float(np.abs(outputs["before"][0] - outputs["after"][0]).max())
            row = {"graph": spec["file"], "batch": batch, "decisions_identical": integer_equal,
                   "hidden_max_abs_diff": hidden_diff}
            for backend in ("onnxruntime", "openvino"):
                before, after = (
                    {k: round(timed[f"{key} {backend}"][k], 3) for k in ("median_ms", "p90_ms")} for key in builds)
                row[backend] = {"before": before, "after": after,
                                "speedup": round(before["median_ms"] / after["median_ms"], 3)}
                print(f"batch {batch} {spec['file']} {backend:11s}: {before['median_ms']:8.2f} -> "
                      f"{after['median_ms']:8.2f} ms median (p90 {before['p90_ms']:.2f} -> {after['p90_ms']:.2f}), "
                      f"{row[backend]['speedup']:.2f}x", flush=True)
            print(f"batch {batch} {spec['file']}: decisions identical {integer_equal}, "
                  f"merged states max |diff| {hidden_diff:.1e}", flush=True)
            rows.append(row)
    if args.json:
        result = {"cpu": cpu_info()["cpu"], "threads": args.threads, "before": str(builds["before"]),
                  "after": str(builds["after"]), "rounds": args.rounds, "iters": args.iters,
                  "versions": {"onnxruntime": ort.__version__, "openvino": ov.__version__}, "graphs": rows}
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
