"""OpenVINO on the CPU: what a CPU user would run instead of us, so it must be fast here too.

The encoder stages compile with OpenVINO's own defaults, its fastest accurate choice on the
machine: bf16 where the CPU has it (AMX, or AVX-512 BF16 as on AMD Zen 4), fp32 elsewhere.
Selection graphs always compile with an fp32 inference precision: their decisions are
comparisons of scores, and bf16 rounding (about 3 significant digits) would flip them.
One compiled model and one infer request per graph, inputs shared with the caller's
arrays rather than copied, and a model cache, so a second load skips compilation.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...errors import EvoExportError, cause
from ...manifest import FLOAT_PRECISIONS, Precision, check_graph_io
from ... import names
from ...names import GraphKind
from .base import Backend, Option

# ours -> OpenVINO's inference precision hint
_HINTS = {Precision.FP32: "f32", Precision.BF16: "bf16", Precision.FP16: "f16"}


def default_cache_dir() -> Path:
    root = os.environ.get("EVOEXPORT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                             os.path.expanduser("~/.cache"), "evoexport")
    return Path(root) / "openvino"


def _io(ports) -> list:
    """A compiled model's inputs or outputs as (names, dtype, shape), a row per port: OpenVINO
    gives a port every name its tensor goes by (an fp16 graph's input also answers to the name
    of the cast that follows it)."""
    def dims(shape):   # None: not even the rank is known
        return [d.get_length() if d.is_static else None for d in shape] if shape.rank.is_static else None
    return [(sorted(p.get_names()), _OV_DTYPES.get(p.get_element_type().get_type_name(),
                                                    p.get_element_type().get_type_name()),
             dims(p.get_partial_shape())) for p in ports]


_OV_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64", "i64": "int64",
              "i32": "int32", "i8": "int8", "u8": "uint8", "boolean": "bool"}


def _require_onnx(path: Path) -> None:
    """A file that is not ONNX at all would be tried by every OpenVINO frontend in turn, and
    TensorFlow's would print its parse errors to stderr: it is refused here, in one line."""
    import onnx
    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise EvoExportError(f"OpenVINO cannot compile {path.name}: it is not an ONNX model ({cause(e)})") from None


class OpenVinoBackend(Backend):
    name = "openvino"
    options = (Option("precision", "the stages' inference precision (fp32, bf16, fp16)  [default: OpenVINO's for "
                                   "this CPU]", "--inference-precision"),
               Option("threads", "inference threads  [default: all cores]", "--threads"),
               Option("cache_dir", "compiled-model cache  [default: ~/.cache/evoexport/openvino; None: off]"),
               Option("device", "OpenVINO device  [default: CPU]"))

    def __init__(self, build_dir: Path, manifest: dict, precision: str | None = None, threads: int = 0,
                 cache_dir: str | Path | None = "default", device: str = "CPU"):
        """precision: None = OpenVINO's default for the stages, or fp32 / bf16 / fp16;
        cache_dir: compiled-model cache ("default": ~/.cache/evoexport/openvino, None: off)."""
        import openvino as ov

        if precision is not None and precision not in FLOAT_PRECISIONS:
            raise EvoExportError(f"OpenVINO precision {precision!r} is not one of {', '.join(FLOAT_PRECISIONS)}")
        core = ov.Core()
        if cache_dir is not None:
            cache = default_cache_dir() if cache_dir == "default" else Path(cache_dir)
            try:
                cache.mkdir(parents=True, exist_ok=True)
                core.set_property({"CACHE_DIR": str(cache)})
            except OSError:
                pass   # a read-only home only costs compile time
        common = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            common["INFERENCE_NUM_THREADS"] = int(threads)
        self.requests, self.ports = {}, {}
        stage_precisions = set()
        # a graph that makes decisions or assembles them (a selection, a temporal build's
        # graphs, a fused chain: export/fuse.py) computes in f32
        for g in manifest.graphs:
            config = dict(common)
            if g["kind"] != GraphKind.ENCODER or any(names.is_decision(o["name"]) for o in g["outputs"]):
                config["INFERENCE_PRECISION_HINT"] = "f32"
            elif precision is not None:
                config["INFERENCE_PRECISION_HINT"] = _HINTS[Precision(precision)]
            _require_onnx(build_dir / g["file"])
            try:
                compiled = core.compile_model(str(build_dir / g["file"]), device, config)
            except Exception as e:
                raise EvoExportError(f"OpenVINO cannot compile {g['file']}: {cause(e)}") from None
            check_graph_io(g, _io(compiled.inputs), _io(compiled.outputs), "OpenVINO")
            if g["kind"] == GraphKind.ENCODER:
                stage_precisions.add(compiled.get_property("INFERENCE_PRECISION_HINT"))
            self.requests[g["name"]] = compiled.create_infer_request()
            self.ports[g["name"]] = [(o["name"], compiled.output(o["name"])) for o in g["outputs"]]
        # the precision the stages really compute in: validation picks its tolerances by it
        ours = {ov.Type.f32: Precision.FP32, ov.Type.bf16: Precision.BF16, ov.Type.f16: Precision.FP16}
        found = {ours.get(t, "fp32") for t in stage_precisions} | {manifest.precision}
        loosest_first = (Precision.INT8, Precision.BF16, Precision.FP16, Precision.FP32)
        self.precision = next(p.value for p in loosest_first if p in found)

    def as_input(self, array: np.ndarray):
        return np.ascontiguousarray(array)

    def run_graph(self, entry: dict, feeds: dict) -> dict:
        request = self.requests[entry["name"]]
        # share_inputs: OpenVINO reads the arrays in place (they live until infer returns);
        # outputs are copied out, since the next call of this request overwrites its buffers
        results = request.infer(feeds, share_inputs=True)
        return {name: results[port] for name, port in self.ports[entry["name"]]}

    def to_numpy(self, value) -> np.ndarray:
        return value

