"""`evoexport check DIR --target tensorrt`: will TensorRT take these graphs? Checked on a CPU.

TensorRT cannot run here, so this reads every graph of a build the way TensorRT's ONNX
parser would and reports what it would reject or change, against the operator table
vendored in data/tensorrt_onnx_ops.json (onnx-tensorrt's docs/operators.md for TensorRT
10.15; source and version inside). Rules:

  op          every op is in the table, and the type of its data input is one it accepts
  opset       the model's opset lies in the table's range
  cast        every Cast targets a type TensorRT has
  topk        K a build-time constant below 3840, sorted = 1
  axes        Reduce*, Squeeze, Unsqueeze, Slice take their axes from constants
  argmax      no ArgMax/ArgMin: TensorRT lowers them to TopK(k=1) with no documented tie
              rule, and our selections promise the lowest index on ties
  select-fp32 selection graphs compute entirely in fp32 (a fp16 selection changes the kept set)
  weights     a fp16/bf16 build's stage matmuls really carry weights of that type
  layernorm   LayerNormalization keeps stash_type = 1 (fp32 statistics)
  qdq         Quantize/DequantizeLinear zero points are 0 (TensorRT's explicit quantization)

Constants are folded first (Polygraphy's surgeon, when the graph is small enough to load
here), so an axes tensor computed from constants counts as constant, as it will in TensorRT.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import EvoExportError
from ..manifest import Precision, build_root, read_manifest
from ..names import GraphKind

TABLE_PATH = Path(__file__).resolve().parents[1] / "data" / "tensorrt_onnx_ops.json"
TOPK_MAX = 3840
ONNX_TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE",
              16: "BF16", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 22: "INT4", 23: "FP4"}
AXES_INPUT = {"Squeeze": 1, "Unsqueeze": 1, "Slice": 3}   # Reduce* (opset >= 18): input 1


@dataclass
class Finding:
    graph: str
    node: str
    op: str
    rule: str
    message: str


def load_table() -> dict:
    return json.loads(TABLE_PATH.read_text())


def _dtype_of(model) -> dict[str, str]:
    import onnx
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = ONNX_TYPES.get(vi.type.tensor_type.elem_type, str(vi.type.tensor_type.elem_type))
    for init in model.graph.initializer:
        types[init.name] = ONNX_TYPES.get(init.data_type, str(init.data_type))
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = ONNX_TYPES.get(a.t.data_type, str(a.t.data_type))
    return types


def _constants(model) -> dict[str, np.ndarray | None]:
    """Names of constant tensors (initializers and Constant outputs), with values where small."""
    from onnx import numpy_helper
    out: dict[str, np.ndarray | None] = {}
    for init in model.graph.initializer:
        small = not init.external_data and np.prod(init.dims, dtype=np.int64) <= 64
        out[init.name] = numpy_helper.to_array(init) if small else None
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            out[node.output[0]] = numpy_helper.to_array(value) if value is not None else None
    return out


def _attr(node, name, default=None):
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def check_model(model, graph: str, kind: str, precision: str = "fp32", table: dict | None = None) -> list[Finding]:
    """Every rule on one ONNX model. kind: 'select' or 'encoder'; precision: the build's."""
    table = table or load_table()
    found: list[Finding] = []

    def add(node, rule, message):
        found.append(Finding(graph, node.name if node is not None else "", node.op_type if node is not None else "",
                             rule, message))

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not table["opset_min"] <= opset <= table["opset_max"]:
        add(None, "opset", f"opset {opset} is outside TensorRT {table['tensorrt']}'s range "
                           f"{table['opset_min']}..{table['opset_max']}")
    types, consts = _dtype_of(model), _constants(model)
    for node in model.graph.node:
        for rule, message in _node_findings(node, table, types, consts):
            add(node, rule, message)
    for rule, message in _precision_findings(model, kind, precision, types):
        add(None, rule, message)
    return found


def _node_findings(node, table: dict, types: dict, consts: dict):
    """(rule, message) for each way TensorRT's parser would refuse or mistreat one node."""
    op, supported = node.op_type, table["supported"]
    if node.domain not in ("", "ai.onnx"):
        yield "op", f"custom-domain op {node.domain}::{op} needs a TensorRT plugin"
        return
    if op in ("ArgMax", "ArgMin"):
        yield "argmax", (f"{op} has no documented tie rule in TensorRT (lowered to TopK k=1); "
                         "use ReduceMax + Equal + the smallest index (prune.first_max_index)")
    if op in set(table["unsupported"]) or op not in supported:
        yield "op", f"{op} is not supported by TensorRT {table['tensorrt']}'s ONNX parser"
        return
    data = node.input[1] if op == "Where" else (node.input[0] if node.input else "")
    dtype = types.get(data)
    if dtype is not None and op != "Constant" and dtype not in supported[op]:
        yield "op", f"{op} on {dtype} is not supported (TensorRT takes {', '.join(supported[op])})"
    if op in ("Cast", "CastLike"):
        target = ONNX_TYPES.get(_attr(node, "to"), str(_attr(node, "to"))) if op == "Cast" else types.get(node.input[1])
        if target is not None and target not in supported[op]:
            yield "cast", f"Cast to {target}: not a TensorRT type"
    if op == "TopK":
        yield from _topk_findings(node, consts)
    axes = 1 if op.startswith("Reduce") else AXES_INPUT.get(op)
    if axes is not None and len(node.input) > axes and node.input[axes] and node.input[axes] not in consts:
        yield "axes", f"{op} takes its axes from a run-time tensor; TensorRT needs constants"
    if op == "LayerNormalization" and _attr(node, "stash_type", 1) != 1:
        yield "layernorm", "stash_type != 1: statistics would be computed in the input's type"
    if op in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
        zp = consts.get(node.input[2])
        if zp is not None and np.any(zp != 0):
            yield "qdq", "non-zero zero point; TensorRT's explicit quantization is symmetric"


def _topk_findings(node, consts: dict):
    k = consts.get(node.input[1], "missing") if node.input[1] in consts else "missing"
    if isinstance(k, str):
        yield "topk", "K is computed at run time; TensorRT needs a build-time constant"
    elif k is not None and int(np.asarray(k).reshape(-1)[0]) >= TOPK_MAX:
        yield "topk", f"K = {int(np.asarray(k).reshape(-1)[0])} >= {TOPK_MAX}, TensorRT's TopK limit"
    if _attr(node, "sorted", 1) != 1:
        yield "topk", "sorted = 0; TensorRT needs sorted = 1"


def _precision_findings(model, kind: str, precision: str, types: dict):
    """Selections compute in fp32; a fp16/bf16 build's stages carry weights of that type."""
    if kind == GraphKind.SELECT:
        low = sorted({n for n, t in types.items() if t in ("FP16", "BF16")})
        if low:
            yield "select-fp32", (f"selection graph holds {len(low)} fp16/bf16 tensors (e.g. {low[0]}); "
                                  "selections must compute in fp32")
    if kind == GraphKind.ENCODER and Precision(precision).is_half:
        want = {"fp16": "FP16", "bf16": "BF16"}[precision]
        inits = {i.name: i for i in model.graph.initializer}
        weights = [n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
        wrong = [w for w in weights if ONNX_TYPES.get(inits[w].data_type) != want]
        if not weights:
            yield "weights", f"a {precision} stage with no constant matmul weights to check"
        elif wrong:
            yield "weights", (f"{len(wrong)} of {len(weights)} matmul weights are not {want} (e.g. {wrong[0]}): "
                              f"the {precision} build does not carry {precision} weights")


def _load(path: Path):
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    try:   # fold constants as TensorRT will (small graphs: the selections)
        if not any(i.external_data for i in model.graph.initializer):
            from polygraphy.backend.onnx import fold_constants
            from polygraphy.logger import G_LOGGER
            with G_LOGGER.verbosity(G_LOGGER.CRITICAL):   # its progress lines are not ours to print
                model = fold_constants(model, error_ok=True)
    except Exception:   # folding is a help, not a requirement
        pass
    return model


def check_build(build_dir: str | Path) -> dict:
    """Check every graph of a build; returns {target, tensorrt, source, graphs, findings, ok}."""
    manifest = read_manifest(build_dir, verify=False)
    build_dir = build_root(build_dir)     # a bucketed build's grid: the folder of its GRID.json
    table = load_table()
    findings: list[Finding] = []
    graphs = manifest.graphs
    for g in graphs:
        kind = GraphKind(g["kind"])
        try:
            model = _load(build_dir / g["file"])
        except Exception as e:
            raise EvoExportError(f"cannot read {g['file']}: {str(e).splitlines()[0]}") from None
        findings += check_model(model, g["name"], kind, manifest.precision, table)
    return {"target": "tensorrt", "tensorrt": table["tensorrt"], "source": table["source"],
            "graphs": [g["name"] for g in graphs], "findings": [asdict(f) for f in findings], "ok": not findings}


def format_check(report: dict) -> str:
    head = (f"TensorRT {report['tensorrt']} static check of {len(report['graphs'])} graphs "
            f"(operator table: {report['source']})")
    if report["ok"]:
        return head + "\n  no problems found: every op, type, constant input and precision rule holds"
    lines = [head]
    for f in report["findings"]:
        where = f["graph"] + (f" {f['op']} {f['node']}" if f["op"] else "")
        lines.append(f"  [{f['rule']}] {where}: {f['message']}")
    lines.append(f"{len(report['findings'])} problem(s): TensorRT would reject or change these graphs")
    return "\n".join(lines)
