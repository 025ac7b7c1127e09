"""Export each graph of a Pipeline to ONNX (torch.onnx dynamo exporter) and describe it."""
from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from pathlib import Path

import onnx
import torch

from ..errors import EvoExportError
from ..manifest import sha256_file
from ..names import GraphKind
from ..pipeline.stages import GraphSpec, Pipeline

OPSET = 20
OPSETS = (20, 23)   # 23: attention as ONNX's Attention op (fused MHA in TensorRT >= 10.14, ONNX Runtime)
BATCH_DIM = "batch"
MAX_BATCH = 4096
_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16",
                onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool"}


def export_graph(graph: GraphSpec, example: dict[str, torch.Tensor], out_dir: Path, opset: int = OPSET) -> dict:
    """Write `graph` to out_dir/<name>.onnx (+ .onnx.data for its weights); return its manifest entry."""
    path = out_dir / f"{graph.name}.onnx"
    args = tuple(example[n] for n in graph.inputs)
    batch = torch.export.Dim(BATCH_DIM, min=1, max=MAX_BATCH)
    # a temporal build's graphs that read both anchors [B] and later frames [B*(G-1)] say
    # which input has which batch (batch_scales: 1 or G-1 per input)
    scales = getattr(graph.module, "batch_scales", None) or [1] * len(args)
    dynamic = tuple({0: batch if s == 1 else s * batch} for s in scales)
    if getattr(graph.module, "varargs", False):   # forward(*inputs): torch.export binds them as one tuple
        dynamic = (dynamic,)
    # the exporter logs a warning per missing torchvision op on every call; none is used here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(graph.module, args, dynamo=True, dynamic_shapes=dynamic,
                                        input_names=graph.inputs, output_names=graph.outputs,
                                        opset_version=opset, optimize=True, verbose=False)
        except Exception as e:  # the exporter's errors are long; keep the cause
            raise RuntimeError(f"ONNX export of {graph.name} failed: {type(e).__name__}: {e}") from e
    has_weights = any(True for _ in graph.module.parameters())
    data_name = f"{graph.name}.onnx.data" if has_weights else None
    program.save(str(path), external_data=has_weights)
    onnx.checker.check_model(str(path), full_check=False)
    model = onnx.load(str(path), load_external_data=False)
    entry = {
        "name": graph.name,
        "kind": graph.kind,
        "file": path.name,
        "sha256": sha256_file(path),
        "tokens_in": graph.tokens_in,
        "tokens_out": graph.tokens_out,
        "inputs": [_tensor_spec(v) for v in model.graph.input],
        "outputs": [_tensor_spec(v) for v in model.graph.output],
        "opset": opset,
    }
    if data_name and (out_dir / data_name).is_file():
        entry["data_file"] = data_name
        entry["data_sha256"] = sha256_file(out_dir / data_name)
    if graph.layers is not None:
        entry["layers"] = list(graph.layers)
    entry.update(graph.meta)
    names = [t["name"] for t in entry["inputs"]]
    if names != graph.inputs:  # the exporter drops unused inputs; the wiring must not change silently
        raise EvoExportError(f"exported {graph.name} has inputs {names}, expected {graph.inputs}")
    return entry


def _tensor_spec(value: onnx.ValueInfoProto) -> dict:
    t = value.type.tensor_type
    shape = [d.dim_param or d.dim_value for d in t.shape.dim]
    shape = [BATCH_DIM if i == 0 and isinstance(d, str) else d for i, d in enumerate(shape)]
    return {"name": value.name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape}


def export_graphs(pipeline, out_dir: Path, progress=None, stage_source=None, opset: int = OPSET) -> list[dict]:
    """Export every graph of a Pipeline (or TemporalPipeline); returns their manifest entries in order.

    `stage_source`: the same schedule on a reduced-precision copy of the tower (fp16/bf16
    builds); its encoder stages are exported instead, the selections always from `pipeline`."""
    example = pipeline.example_inputs(batch=2)
    entries: list[dict] = []
    for i, graph in enumerate(pipeline.graphs):
        if stage_source is not None and graph.kind == GraphKind.ENCODER:
            graph = replace(graph, module=stage_source.graphs[i].module)
        if progress:
            progress(f"exporting {graph.name} ({_what(graph)}) [{i + 1}/{len(pipeline.graphs)}]")
        entries.append(export_graph(graph, example, out_dir, opset))
    return entries


def _what(graph: GraphSpec) -> str:
    if graph.kind == GraphKind.ENCODER:
        return f"layers {graph.layers[0]}-{graph.layers[1] - 1}, {graph.tokens_in} tokens"
    if graph.kind == GraphKind.ASSEMBLE:
        return f"{graph.tokens_out} tokens per group"
    return f"keep {graph.tokens_out} of {graph.tokens_in} tokens"


def nest_selects(entries: list[dict]) -> list[dict]:
    """The manifest's `stages`: each encoder stage with the selection after it nested (or None)."""
    stages: list[dict] = []
    for entry in entries:
        if entry["kind"] == GraphKind.ENCODER:
            stages.append({**entry, "select": None})
        else:
            stages[-1]["select"] = entry
    return stages


def export_pipeline(pipeline: Pipeline, out_dir: Path, progress=None, stage_source: Pipeline | None = None,
                    opset: int = OPSET) -> list[dict]:
    """Export an image chain; returns the manifest's `stages` list (selects nested in their stage)."""
    return nest_selects(export_graphs(pipeline, out_dir, progress, stage_source, opset))
