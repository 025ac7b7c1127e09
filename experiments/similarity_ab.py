#!/usr/bin/env python3
"""A/B in one run: the selection's cosine similarity as normalize-then-matmul (the earlier
form) against Gram-then-scale (prune/selection.cosine_similarity), exported to ONNX and
timed on ONNX Runtime's CPU provider, interleaved; medians and p90. Backs the similarity
table of docs/gpu.md.

    .venv/bin/python experiments/similarity_ab.py > /tmp/similarity-ab.json
"""
import io
import json

import numpy as np
import onnxruntime as ort
import torch

from evoexport.measure.timing import cpu_info, time_systems
from evoexport.prune.selection import cosine_similarity


class Before(torch.nn.Module):
    def forward(self, x):
        f = torch.nn.functional.normalize(x, dim=-1, eps=1e-6)
        return f @ f.transpose(1, 2)


class After(torch.nn.Module):
    def forward(self, x):
        return cosine_similarity(x)


def main():
    results = {}
    for b, n in ((1, 576), (8, 576), (8, 288)):
        x = torch.randn(b, n, 1024, generator=torch.Generator().manual_seed(0))
        sessions = {}
        for name, module in (("before", Before()), ("after", After())):
            buf = io.BytesIO()
            torch.onnx.export(module, (x,), buf, input_names=["x"], dynamo=False, opset_version=17)
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            sessions[name] = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])
        feed = {"x": x.numpy()}
        outs = {k: s.run(None, feed)[0] for k, s in sessions.items()}
        timed = time_systems({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, 30, 3)
        results[f"batch {b}, N {n}"] = {**{k: {"median_ms": v["median_ms"], "p90_ms": v["p90_ms"]}
                                           for k, v in timed.items()},
                                        "max_abs_diff": float(np.abs(outs["before"] - outs["after"]).max())}
    print(json.dumps({"cpu": cpu_info(), "onnxruntime": ort.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
