"""One graph of a build inside Triton's Python backend, run by our own runtime (ONNX Runtime
or OpenVINO, runtime/backends): the `--backend python` flavour, the one that runs with the
Triton server bundled in the nvidia-pytriton wheel.

Triton's dynamic batcher hands execute() several requests at once: their inputs are joined
along the batch axis, the graph runs once, and the outputs are split back by request. A step
without a batcher (max_batch_size 0: a temporal build's, whose tensors have two batches) runs
each request alone. The files are checked against their sha256 at start, as the library's
loader does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import read_json
from ..manifest import Manifest, sha256_file
from ..runtime.backends import make_backend


class GraphStep:
    def __init__(self, version_dir: str | Path, model_config: dict | None = None):
        version_dir = Path(version_dir)
        spec = read_json(version_dir / "graph.json")
        for name, digest in spec["sha256"].items():
            if sha256_file(version_dir / name) != digest:
                raise RuntimeError(f"{version_dir / name} does not match its sha256 (truncated or edited); "
                                   "write the repository again with `evoexport triton`")
        self.entry = spec["graph"]
        options = {"threads": spec["threads"]} if spec.get("threads") else {}
        if spec["runtime"] == "onnxruntime":
            options["providers"] = ["CPUExecutionProvider"]
        manifest = Manifest({"stages": [self.entry], "precision": spec["precision"]})   # this one graph
        self.backend = make_backend(spec["runtime"], version_dir, manifest, **options)
        self.inputs = [t["name"] for t in self.entry["inputs"]]
        self.outputs = [t["name"] for t in self.entry["outputs"]]
        self.batched = bool((model_config or {}).get("max_batch_size", 1))

    def run(self, feeds: dict) -> dict:
        out = self.backend.run_graph(self.entry, {k: self.backend.as_input(v) for k, v in feeds.items()})
        return {k: np.asarray(self.backend.to_numpy(v)) for k, v in out.items()}

    def execute(self, requests: list, pb_utils) -> list:
        if self.batched:
            return self._execute(requests, pb_utils)
        return [response for r in requests for response in self._execute([r], pb_utils)]

    def _execute(self, requests: list, pb_utils) -> list:
        # through DLPack both ways: the Python backend stub bundled with nvidia-pytriton was
        # built for numpy 1, and under numpy 2 its as_numpy() reads zeros and pb_utils.Tensor()
        # sends empty tensors (seen here; docs/serving.md). DLPack is the ABI both agree on.
        arrays = {name: [np.from_dlpack(pb_utils.get_input_tensor_by_name(r, name)) for r in requests]
                  for name in self.inputs}
        sizes = [a.shape[0] for a in arrays[self.inputs[0]]]
        try:
            out = self.run({name: np.concatenate(parts) if len(parts) > 1 else parts[0]
                            for name, parts in arrays.items()})
        except Exception as e:   # one error per request; the model stays up for the next batch
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.entry['name']}: {e}"))
                    for _ in requests]
        bounds = np.cumsum(sizes)[:-1]
        per_request = {name: np.split(value, bounds) for name, value in out.items()}
        return [pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(per_request[name][i]).__dlpack__()) for name in self.outputs])
                for i in range(len(requests))]
