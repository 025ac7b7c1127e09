"""TensorRT engines (built by `evoexport engines`, see tensorrt/engines.py) run through Polygraphy's
TrtRunner on torch CUDA tensors: tensors stay on the GPU between graphs.

Where this code has and has not run: docs/gpu.md ("Not run").
"""
from __future__ import annotations

from pathlib import Path

from ...tensorrt import engines
from ...tensorrt.engines import _require_tensorrt, check_engines_match, engine_files, read_engines
from ...manifest import check_graph_io
from .base import Backend, Option


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


class TrtBackend(Backend):
    """Runs every graph as a TensorRT engine; tensors stay on the GPU between graphs."""
    name = "tensorrt"
    options = (Option("device", "the CUDA device the engines run on  [default: cuda]"),)

    def __init__(self, build_dir: Path, manifest: dict, device: str = "cuda"):
        info = read_engines(build_dir)   # input first: a corrupt engines.json is named even without TensorRT
        trt = _require_tensorrt()
        check_engines_match(info, trt, engines.gpu_info())
        # strongly typed engines compute in what the ONNX says
        self.precision = manifest.precision
        files = engine_files(build_dir, manifest, info)

        import torch
        from polygraphy.backend.trt import EngineFromPath, TrtRunner

        self.torch, self.device = torch, torch.device(device)
        self.runners = {}
        try:
            for g in manifest.graphs:
                runner = TrtRunner(EngineFromPath(str(files[g["name"]])), name=g["name"])
                runner.activate()
                self.runners[g["name"]] = runner
                check_graph_io(g, *_io(runner.engine, trt), "TensorRT")
        except BaseException:
            self.close()
            raise

    def as_input(self, array):
        return self.torch.as_tensor(array).to(self.device)

    def run_graph(self, entry: dict, feeds: dict) -> dict:
        return dict(self.runners[entry["name"]].infer(feeds, copy_outputs_to_host=False))

    def to_numpy(self, value):
        import numpy as np
        return value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()

    def close(self) -> None:
        """Deactivate every engine's runner (Polygraphy's activate/deactivate)."""
        runners, self.runners = getattr(self, "runners", {}), {}
        for r in runners.values():
            r.deactivate()
