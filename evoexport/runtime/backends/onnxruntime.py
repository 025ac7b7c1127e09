"""ONNX Runtime: CPU here, CUDA when onnxruntime-gpu is installed (outputs bound on the
device through IO binding, so tensors never visit the host between graphs)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import EvoExportError, cause
from ...manifest import check_graph_io
from .base import Backend, Option


def _io(args) -> list:
    """A session's inputs or outputs as (name, dtype, shape): 'tensor(float)' -> float32."""
    return [(a.name, _ORT_DTYPES.get(a.type, a.type), list(a.shape)) for a in args]


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
               "tensor(double)": "float64", "tensor(int64)": "int64", "tensor(int32)": "int32",
               "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


class OrtBackend(Backend):
    name = "onnxruntime"
    options = (Option("providers", "execution providers in order  [default: CUDA if installed, then CPU]"),
               Option("threads", "threads per graph  [default: all cores]", "--threads"),
               Option("low_memory", "no prepacked weights and no arena: about half the memory, a few % slower"),
               Option("optimization", "graph optimization level: all, extended, basic, disable", "--optimization"))

    def __init__(self, build_dir: Path, manifest: dict, providers: list[str] | None = None, threads: int = 0,
                 low_memory: bool = False, optimization: str = "all"):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise EvoExportError(f"ONNX Runtime provider(s) {unknown} not available here (have: {available})")
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        if optimization not in levels:
            raise EvoExportError(f"ONNX Runtime optimization level {optimization!r} is not one of {', '.join(levels)}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = levels[optimization]
        if threads:
            opts.intra_op_num_threads = threads
        # Each graph has its own session and thread pool. Spinning workers of the graph that
        # just ran would steal the cores from the next one in the chain (measured: +35% at
        # batch 1 on 2 cores), so idle workers block instead.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if low_memory:
            # No prepacked weight copies (weights stay memory-mapped from the .onnx.data
            # files) and no arena that keeps every activation buffer it ever grew to:
            # about half the resident memory, a few percent slower on CPU.
            opts.add_session_config_entry("session.disable_prepacking", "1")
            opts.enable_cpu_mem_arena = False
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
        self.precision = manifest.precision   # ORT computes in what the ONNX says
        if self.precision == "bf16" and self.device == "cpu":
            raise EvoExportError("ONNX Runtime's CPU provider has no bf16 kernels for this build's stages; "
                                 "use the openvino backend (or torch)")
        self.sessions = {}
        for g in manifest.graphs:
            try:
                session = ort.InferenceSession(str(build_dir / g["file"]), opts, providers=providers)
            except Exception as e:
                raise EvoExportError(f"ONNX Runtime cannot load {g['file']}: {cause(e)}") from None
            check_graph_io(g, _io(session.get_inputs()), _io(session.get_outputs()), "ONNX Runtime")
            self.sessions[g["name"]] = session
        self._ort = ort

    def as_input(self, array: np.ndarray):
        if self.device == "cpu":
            return np.ascontiguousarray(array)
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)

    def run_graph(self, entry: dict, feeds: dict) -> dict:
        sess = self.sessions[entry["name"]]
        outs = [o["name"] for o in entry["outputs"]]
        if self.device == "cpu":
            return dict(zip(outs, sess.run(outs, feeds)))
        binding = sess.io_binding()     # keep every tensor on the GPU between graphs
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, value)
        for name in outs:
            binding.bind_output(name, "cuda")
        sess.run_with_iobinding(binding)
        return dict(zip(outs, binding.get_outputs()))

    def to_numpy(self, value) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else value.numpy()
