#!/usr/bin/env python3
"""The two forms of EvoPrune's selection (prune/selection.py FORMS) side by side on this
CPU: "topk" (TopK thresholds, running sums, gathers) and "compare" (pairwise compares and
sums, no TopK; meant for GPU compilers). Each selection graph of a model's default
schedule is exported in both forms and timed on torch (eager), ONNX Runtime and OpenVINO,
alternating forms (measure/timing.time_systems); decisions are checked identical on the
same inputs. Backs the selection-forms table of docs/gpu.md.

    .venv/bin/python experiments/selection_forms.py --model llava --batch 1 8 --json out.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch

from evoexport.measure.timing import cpu_info, time_systems
from evoexport.models import default_params, get_preset
from evoexport.models.loader import spec_for
from evoexport.prune.schedule import default_schedule
from evoexport.prune.selection import FORMS, SelectGraph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llava")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    spec = spec_for(args.model)
    n0 = spec.token_grid ** 2
    width = spec.vision["hidden_size"] * spec.unit ** 2
    has_cls = get_preset(args.model).family in ("llava", "dinov2")
    points = default_schedule(spec.depth, n0, 0.5, spec.prune_layers)
    params = default_params(args.model)
    rows = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        prev = n0
        for i, p in enumerate(points):
            graphs = {form: SelectGraph(p.tokens, params, has_cls, spec.token_grid, form) for form in FORMS}
            example = (torch.randn(2, int(has_cls) + prev, width), torch.rand(2, prev))
            sessions = {}
            for form, g in graphs.items():
                path = Path(tmp) / f"select_{i}_{form}.onnx"
                torch.onnx.export(g, example, str(path), dynamo=True, input_names=["hidden", "importance"],
                                  dynamic_shapes=({0: torch.export.Dim("batch")}, {0: torch.export.Dim("batch")}),
                                  opset_version=20)
                sessions[form] = {"onnxruntime": ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]),
                                  "openvino": ov.Core().compile_model(str(path), "CPU")}
            for batch in args.batch:
                x = rng.standard_normal((batch, int(has_cls) + prev, width)).astype(np.float32)
                imp = rng.random((batch, prev)).astype(np.float32)
                runs = {
                    "torch": lambda form: [t.numpy() for t in graphs[form](torch.from_numpy(x), torch.from_numpy(imp))],
                    "onnxruntime": lambda form: sessions[form]["onnxruntime"].run(None, {"hidden": x, "importance": imp}),
                    "openvino": lambda form: list(sessions[form]["openvino"]({"hidden": x, "importance": imp}).values()),
                }
                for runtime, run in runs.items():
                    outs = {form: run(form) for form in FORMS}
                    same = all(np.array_equal(a, b) for a, b in zip(outs["topk"][1:], outs["compare"][1:]))
                    with torch.inference_mode():
                        timed = time_systems({form: (lambda form=form: run(form)) for form in FORMS}, args.iters, 0)
                    row = {"point": i, "tokens_in": prev, "budget": p.tokens, "batch": batch, "runtime": runtime,
                           "decisions_identical": bool(same)}
                    for form in FORMS:
                        row[f"{form}_median_ms"] = timed[form]["median_ms"]
                        row[f"{form}_p90_ms"] = timed[form]["p90_ms"]
                    row["compare_over_topk"] = row["compare_median_ms"] / row["topk_median_ms"]
                    rows.append(row)
                    print(f"select_{i} ({prev}->{p.tokens}) batch {batch} {runtime:11s} topk {row['topk_median_ms']:8.2f} ms"
                          f"  compare {row['compare_median_ms']:8.2f} ms  ({row['compare_over_topk']:.2f}x)"
                          f"  decisions identical: {same}")
            prev = p.tokens
    result = {"model": args.model, "cpu": cpu_info(), "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
