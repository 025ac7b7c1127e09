"""The static TensorRT check: our builds pass it, and each rule catches a graph TensorRT
would reject or change. TensorRT itself does not run here; the table it checks against is
onnx-tensorrt's operator table (evoexport/data/tensorrt_onnx_ops.json)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from evoexport.cli import main
from evoexport.manifest import read_manifest, sha256_file
from evoexport.tensorrt.check import check_build, check_model, load_table


def _model(nodes, inputs, outputs, inits=(), opset=20):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _rules(model, kind="select", precision="fp32"):
    return sorted({f.rule for f in check_model(model, "g", kind, precision)})


def test_table_is_tensorrt_10_with_its_source():
    table = load_table()
    assert table["tensorrt"].startswith("10.") and "onnx-tensorrt" in table["source"]
    assert "TopK" in table["supported"] and "Unique" in table["unsupported"]
    assert "UINT16" not in {t for types in table["supported"].values() for t in types}


def test_our_build_passes_and_its_selections_hold_no_argmax(tiny_build):
    report = check_build(tiny_build)
    assert report["ok"], report["findings"]
    m = read_manifest(tiny_build).data
    for g in m["stages"]:
        if g.get("select"):
            ops = {n.op_type for n in onnx.load(str(tiny_build / g["select"]["file"])).graph.node}
            assert "ArgMax" not in ops and "TopK" in ops


def test_a_clean_graph_has_no_findings():
    k = numpy_helper.from_array(np.array([3], dtype=np.int64), "k")
    m = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1)],
               [_vi("x", TensorProto.FLOAT, [2, 8])], [_vi("v", TensorProto.FLOAT, [2, 3]), _vi("i", TensorProto.INT64, [2, 3])], [k])
    assert _rules(m) == []


@pytest.mark.parametrize("case, rule", [
    ("argmax", "argmax"), ("topk_runtime_k", "topk"), ("topk_too_big", "topk"), ("unique", "op"),
    ("cast_double", "cast"), ("uint16_equal", "op"), ("fp16_in_select", "select-fp32"), ("opset_25", "opset"),
    ("reduce_runtime_axes", "axes"), ("layernorm_stash0", "layernorm"), ("qdq_zero_point", "qdq"),
])
def test_each_rule_catches_a_graph_tensorrt_would_reject(case, rule):
    f32 = TensorProto.FLOAT
    x = _vi("x", f32, [2, 8])
    if case == "argmax":
        m = _model([helper.make_node("ArgMax", ["x"], ["y"], axis=-1)], [x], [_vi("y", TensorProto.INT64, [2, 1])])
    elif case == "topk_runtime_k":
        m = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"])], [x, _vi("k", TensorProto.INT64, [1])],
                   [_vi("v", f32, None), _vi("i", TensorProto.INT64, None)])
    elif case == "topk_too_big":
        k = numpy_helper.from_array(np.array([4000], dtype=np.int64), "k")
        m = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"])], [_vi("x", f32, [2, 5000])],
                   [_vi("v", f32, None), _vi("i", TensorProto.INT64, None)], [k])
    elif case == "unique":
        m = _model([helper.make_node("Unique", ["x"], ["y"])], [x], [_vi("y", f32, None)])
    elif case == "cast_double":
        m = _model([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)], [x], [_vi("y", TensorProto.DOUBLE, [2, 8])])
    elif case == "uint16_equal":   # what torch.eye's export left in our selections until the check found it
        a = numpy_helper.from_array(np.arange(8, dtype=np.uint16).reshape(8, 1), "a")
        m = _model([helper.make_node("Equal", ["a", "b"], ["y"])], [_vi("b", TensorProto.UINT16, [8])],
                   [_vi("y", TensorProto.BOOL, [8, 8])], [a])
    elif case == "fp16_in_select":
        m = _model([helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
                    helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)], [x], [_vi("y", f32, [2, 8])])
    elif case == "opset_25":
        m = _model([helper.make_node("Relu", ["x"], ["y"])], [x], [_vi("y", f32, [2, 8])], opset=25)
    elif case == "reduce_runtime_axes":
        m = _model([helper.make_node("ReduceMax", ["x", "ax"], ["y"])], [x, _vi("ax", TensorProto.INT64, [1])],
                   [_vi("y", f32, None)], opset=20)
    elif case == "layernorm_stash0":
        s = numpy_helper.from_array(np.ones(8, np.float32), "s")
        m = _model([helper.make_node("LayerNormalization", ["x", "s"], ["y"], stash_type=0)], [x],
                   [_vi("y", f32, [2, 8])], [s])
    else:
        sc = numpy_helper.from_array(np.array(0.1, np.float32), "sc")
        zp = numpy_helper.from_array(np.array(3, np.int8), "zp")
        m = _model([helper.make_node("QuantizeLinear", ["x", "sc", "zp"], ["q"]),
                    helper.make_node("DequantizeLinear", ["q", "sc", "zp"], ["y"])], [x], [_vi("y", f32, [2, 8])], [sc, zp])
    assert rule in _rules(m)


def test_a_fp16_build_whose_stages_hold_fp32_weights_is_caught(tiny_build):
    m = read_manifest(tiny_build).data
    stage = onnx.load(str(tiny_build / m["stages"][0]["file"]))
    assert _rules(stage, "encoder", "fp32") == []
    assert "weights" in _rules(stage, "encoder", "fp16")


def test_cli_check_fails_a_build_with_an_argmax_selection(tiny_build, tmp_path, capsys):
    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    assert main(["check", str(build)]) == 0
    assert "no problems found" in capsys.readouterr().out
    m = json.loads((build / "manifest.json").read_text())
    sel = m["stages"][0]["select"]
    model = onnx.load(str(build / sel["file"]))
    model.graph.node.append(helper.make_node("ArgMax", [model.graph.input[1].name], ["am"], axis=-1))
    model.graph.output.append(_vi("am", TensorProto.INT64, None))
    onnx.save(model, str(build / sel["file"]))
    sel["sha256"] = sha256_file(build / sel["file"])
    (build / "manifest.json").write_text(json.dumps(m))
    assert main(["check", str(build)]) == 1
    out = capsys.readouterr().out
    assert "[argmax] select_0 ArgMax" in out and "1 problem(s)" in out
