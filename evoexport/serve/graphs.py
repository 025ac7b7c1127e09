"""The small graphs a served chain needs beside the build's own, written as ONNX so that
every Triton flavour runs them the same way (ONNX Runtime, OpenVINO, or our runtime inside
the Python backend):

  indices   the final kept positions under the ensemble's own name `indices`. Triton maps
            each step output to one ensemble tensor, so `indices_{last}` cannot be given a
            second name without a step; an unpruned build has no selection and gets every
            patch position, in raster order, as the library's Runner does.
  mm_in     TensorRT-LLM's `IMAGE` [B, 1, C, H, W] fp16 -> our `pixel_values` [B, C, H, W] fp32
  mm_out    our `features` [B, K, D] -> `OUT_PROMPT_EMBEDDING_TABLE` fp16 [B, K, D] and
            `OUT_PROMPT_VOCAB_SIZE` int32 [B, 1] holding K

Each function returns the model and its manifest-style entry (name, file, inputs, outputs)
so the repository writer and the Python backend treat it like any graph of the build.
"""
from __future__ import annotations

import numpy as np

from .. import names

OPSET = 17
_ONNX_TYPES = {"float32": 1, "int64": 7, "float16": 10, "int32": 6}   # onnx.TensorProto values


def _tensor(name: str, dtype: str, shape: list) -> dict:
    return {"name": name, "dtype": dtype, "shape": shape}


def _model(name: str, nodes, inputs: list[dict], outputs: list[dict], initializers=()):
    from onnx import helper, numpy_helper

    def info(t):
        return helper.make_tensor_value_info(t["name"], _ONNX_TYPES[t["dtype"]], t["shape"])
    graph = helper.make_graph(nodes, name, [info(t) for t in inputs], [info(t) for t in outputs],
                              [numpy_helper.from_array(a, n) for n, a in initializers])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="evoexport")
    model.ir_version = 8   # readable by the ONNX Runtime in NVIDIA's older Triton containers too
    import onnx
    onnx.checker.check_model(model, full_check=True)
    return model


def _batch_shape(source: str, tail: list[int], out: str) -> tuple[list, list]:
    """Nodes computing [batch, *tail] from `source`'s first axis, as an int64 shape tensor."""
    from onnx import helper
    nodes = [helper.make_node("Shape", [source], [f"{out}_full"]),
             helper.make_node("Slice", [f"{out}_full", "zero", "one"], [f"{out}_batch"]),
             helper.make_node("Concat", [f"{out}_batch", f"{out}_tail"], [out], axis=0)]
    consts = [("zero", np.array([0], np.int64)), ("one", np.array([1], np.int64)),
              (f"{out}_tail", np.array(tail, np.int64))]
    return nodes, consts


def indices_graph(manifest: dict) -> tuple[object, dict]:
    from onnx import helper
    if manifest.prune_points:
        last = manifest.output(names.indices(manifest.prune_points - 1))
        k = last["shape"][1]
        inputs = [_tensor(last["name"], "int64", ["batch", k])]
        nodes, consts = [helper.make_node("Identity", [last["name"]], ["indices"])], []
    else:
        spec = manifest.pixels
        k = manifest.num_patches
        inputs = [_tensor(spec["name"], spec["dtype"], spec["shape"])]
        nodes, consts = _batch_shape(spec["name"], [k], "shape")
        nodes.append(helper.make_node("Expand", ["positions", "shape"], ["indices"]))
        consts.append(("positions", np.arange(k, dtype=np.int64)))
    outputs = [_tensor("indices", "int64", ["batch", k])]
    return _model("indices", nodes, inputs, outputs, consts), _entry("indices", inputs, outputs)


def mm_in_graph(manifest: dict) -> tuple[object, dict]:
    from onnx import helper
    spec = manifest.pixels
    chw = spec["shape"][1:]
    inputs = [_tensor("IMAGE", "float16", ["batch", 1, *chw])]
    outputs = [_tensor(spec["name"], "float32", spec["shape"])]
    nodes = [helper.make_node("Squeeze", ["IMAGE", "axis1"], ["image"]),
             helper.make_node("Cast", ["image"], [spec["name"]], to=_ONNX_TYPES["float32"])]
    return (_model("mm_in", nodes, inputs, outputs, [("axis1", np.array([1], np.int64))]),
            _entry("mm_in", inputs, outputs))


def mm_out_graph(manifest: dict) -> tuple[object, dict]:
    from onnx import helper
    feats = manifest.features
    k, d = feats["shape"][1:]
    inputs = [_tensor(feats["name"], feats["dtype"], feats["shape"])]
    outputs = [_tensor("OUT_PROMPT_EMBEDDING_TABLE", "float16", ["batch", k, d]),
               _tensor("OUT_PROMPT_VOCAB_SIZE", "int32", ["batch", 1])]
    nodes, consts = _batch_shape(feats["name"], [1], "vocab_shape")
    nodes += [helper.make_node("Cast", [feats["name"]], ["OUT_PROMPT_EMBEDDING_TABLE"], to=_ONNX_TYPES["float16"]),
              helper.make_node("Expand", ["k", "vocab_shape"], ["OUT_PROMPT_VOCAB_SIZE"])]
    consts.append(("k", np.array([k], np.int32)))
    return _model("mm_out", nodes, inputs, outputs, consts), _entry("mm_out", inputs, outputs)


def _entry(name: str, inputs: list[dict], outputs: list[dict]) -> dict:
    return {"name": name, "kind": "adapter", "file": f"{name}.onnx", "inputs": inputs, "outputs": outputs}
