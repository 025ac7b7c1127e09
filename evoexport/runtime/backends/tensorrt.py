"""TensorRT engines (built by `evoexport engines`, see tensorrt/engines.py) run through Polygraphy's
TrtRunner on torch CUDA tensors: tensors stay on the GPU between graphs.

Where this code has and has not run: docs/gpu.md ("Not run").
"""
from __future__ import annotations

from pathlib import Path

from ...tensorrt import engines
from ...tensorrt.engines import ENGINES, _require_tensorrt, check_engines_match, read_engines
from ...errors import EvoExportError
from ...manifest import check_graph_io, graph_entries, sha256_file


def _io(engine, trt) -> tuple[list, list]:
    """An engine's inputs and outputs as (name, dtype, shape), -1 on a dynamic axis."""
    dtypes = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.INT64: "int64",
              trt.DataType.INT32: "int32", trt.DataType.INT8: "int8", trt.DataType.BOOL: "bool",
              getattr(trt.DataType, "BF16", None): "bfloat16", getattr(trt.DataType, "UINT8", None): "uint8"}
    found = {trt.TensorIOMode.INPUT: [], trt.TensorIOMode.OUTPUT: []}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = engine.get_tensor_dtype(name)
        found[engine.get_tensor_mode(name)].append((name, dtypes.get(dtype, str(dtype)),
                                                    list(engine.get_tensor_shape(name))))
    return found[trt.TensorIOMode.INPUT], found[trt.TensorIOMode.OUTPUT]


class TrtBackend:
    """Runs every graph as a TensorRT engine; tensors stay on the GPU between graphs."""
    name = "tensorrt"

    def __init__(self, build_dir: Path, manifest: dict, device: str = "cuda"):
        info = read_engines(build_dir)   # input first: a corrupt engines.json is named even without TensorRT
        trt = _require_tensorrt()
        check_engines_match(info, trt, engines.gpu_info())
        # strongly typed engines compute in what the ONNX says
        self.precision = manifest.get("precision", "fp32")
        by_name = {e["name"]: e for e in info["engines"]}
        files = []
        for g in graph_entries(manifest):
            e = by_name.get(g["name"])
            if e is None or not (build_dir / e["file"]).is_file():
                raise EvoExportError(f"{build_dir}: engine for {g['name']} is missing; rebuild the engines")
            if e.get("onnx_sha256") != g["sha256"]:
                raise EvoExportError(f"{build_dir}: {e['file']} was built from another {g['file']}; rebuild the engines")
            if sha256_file(build_dir / e["file"]) != e["sha256"]:
                raise EvoExportError(f"{build_dir}: {e['file']} does not match its sha256 in {ENGINES}")
            files.append((g["name"], build_dir / e["file"]))

        import torch
        from polygraphy.backend.trt import EngineFromPath, TrtRunner

        self.torch, self.device = torch, torch.device(device)
        self.runners = {}
        entries = {g["name"]: g for g in graph_entries(manifest)}
        for name, file in files:
            runner = TrtRunner(EngineFromPath(str(file)), name=name)
            runner.activate()
            self.runners[name] = runner
            check_graph_io(entries[name], *_io(runner.engine, trt), "TensorRT")

    def as_input(self, array):
        return self.torch.as_tensor(array).to(self.device)

    def run_graph(self, entry: dict, feeds: dict) -> dict:
        return dict(self.runners[entry["name"]].infer(feeds, copy_outputs_to_host=False))

    def to_numpy(self, value):
        import numpy as np
        return value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()

    def __del__(self):
        for r in getattr(self, "runners", {}).values():
            try:
                r.deactivate()
            except Exception:
                pass
