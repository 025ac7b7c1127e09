"""Reduced-precision builds: fp16/bf16 stages inside the ONNX, int8 QDQ stages calibrated on
real images; selections always fp32; checked like any build, and on a trained model."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from evoexport.measure.digits import CHECKPOINT, DigitsBench
from evoexport.export.build import build
from evoexport.measure.digits import digits_split
from evoexport.progress import Progress
from evoexport.validate.report import validate

from tests.helpers import assert_one_error_line, cli


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    return build("llava-tiny", 0.5, precision="int8", out=out, progress=Progress(enabled=False))


def _ops(path):
    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_int8_build_quantizes_the_stages_and_nothing_else(int8_build):
    m = int8_build.manifest.data
    assert m["precision"] == "int8" and m["calibration"]["images"] >= 10
    assert int8_build.report["passed"] and int8_build.report["precision"] == "int8"
    for stage in m["stages"]:
        model = onnx.load(str(int8_build.path / stage["file"]))
        int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
        matmul_weights = sum(1 for n in model.graph.node if n.op_type == "MatMul")
        assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(int8_build.path / stage["file"])
        assert len(int8_weights) >= 6                      # q, k, v, out, fc1, fc2 of at least one layer
        assert matmul_weights > len(int8_weights)          # attention's own matmuls stay float
        if stage["select"]:
            assert not {"QuantizeLinear", "DequantizeLinear"} & _ops(int8_build.path / stage["select"]["file"])
    for t in m["inputs"] + m["outputs"]:
        assert t["dtype"] in ("float32", "int64")


@pytest.fixture(scope="module")
def half_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("half")
    return {p: build("llava-tiny", 0.5, precision=p, out=root / p, progress=Progress(enabled=False))
            for p in ("fp16", "bf16")}


@pytest.mark.parametrize("precision,dtype", [("fp16", onnx.TensorProto.FLOAT16), ("bf16", onnx.TensorProto.BFLOAT16)])
def test_half_builds_carry_their_dtype_inside_the_stages_and_fp32_around_them(half_builds, precision, dtype):
    b = half_builds[precision]
    assert b.manifest.data["precision"] == precision and b.report["passed"]
    for stage in b.manifest.data["stages"]:
        model = onnx.load(str(b.path / stage["file"]))
        weights = {t.name: t.data_type for t in model.graph.initializer if len(t.dims) == 2}
        assert weights and all(t == dtype for t in weights.values())          # every weight matrix
        inits = {t.name: t.data_type for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "LayerNormalization":                       # fp32 statistics and weights
                assert all(inits.get(i, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for i in node.input[1:])
        for t in list(model.graph.input) + list(model.graph.output):
            assert t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # graph inputs and outputs
        if stage["select"]:
            sel = onnx.load(str(b.path / stage["select"]["file"]))
            assert not {t.data_type for t in sel.graph.initializer} & {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def test_half_builds_validate_where_they_run(half_builds):
    assert validate(half_builds["fp16"].path, backend="onnxruntime", write=False)["precision"] == "fp16"
    for p in ("fp16", "bf16"):
        r = validate(half_builds[p].path, backend="openvino", write=False)
        assert r["passed"], (p, r["summary"])
    code, err, _ = cli("validate", half_builds["bf16"].path)   # ONNX Runtime's CPU provider: no bf16 kernels
    assert_one_error_line(code, err, "no bf16 kernels")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_int8_build_runs_and_validates_on(int8_build, backend):
    r = validate(int8_build.path, backend=backend, write=False)
    assert r["passed"] and r["precision"] == "int8", r["summary"]


def test_calibration_flags_are_checked(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, msg in [(["--calib", str(empty)], "--calib is only used by int8 builds"),
                      (["--precision", "int8", "--calib", str(tmp_path / "nope")], "is not a directory of images"),
                      (["--precision", "int8", "--calib", str(empty)], "holds no images")]:
        code, err, _ = cli("build", "--model", "llava-tiny", "--out", tmp_path / "o", *args)
        assert_one_error_line(code, err, msg)
        assert not (tmp_path / "o").exists()


@pytest.mark.skipif(not (CHECKPOINT / "model.safetensors").is_file(), reason="digits fixture missing")
def test_every_precision_and_backend_keeps_digits_accuracy(tmp_path):
    """keep 0.5, every precision, on ONNX Runtime and OpenVINO (its defaults: bf16 where the CPU
    has it; bf16 builds on OpenVINO only): each within 1 accuracy point of the unpruned fp32 model."""
    bench = DigitsBench()
    unpruned = bench.evaluate("evoprune", 1.0).accuracy
    train_x, *_ = digits_split()
    results = {}
    for precision in ("fp32", "fp16", "bf16", "int8"):
        calib = np.ascontiguousarray(train_x[:64]) if precision == "int8" else None
        # accuracy is what this test measures; validation of each precision has its own tests
        b = build("digits-vit", 0.5, checkpoint=str(CHECKPOINT), precision=precision, calib=calib, validate=False,
                  out=tmp_path / precision, progress=Progress(enabled=False))
        for backend in ("onnxruntime", "openvino") if precision != "bf16" else ("openvino",):
            results[(precision, backend)] = bench.build_accuracy(b.path, backend)
    (tmp_path / "results.json").write_text(json.dumps({f"{k[0]} {k[1]}": v for k, v in results.items()}))
    for key, acc in results.items():
        assert acc >= unpruned - 0.01, (key, acc, unpruned)


def test_a_wrong_selection_graph_fails_an_int8_build(int8_build, tmp_path):
    """Selection graphs compute in fp32 in every build, so on identical inputs they are held
    to fp32's decision margin (1e-4). Swapped for ones made with another redundancy weight
    (0.35 for 0.3), an int8 build must fail, although the wrong decisions miss by less than
    int8's own stage margin (2e-2), which would have let them through."""
    import shutil

    from evoexport.manifest import sha256_file
    from evoexport.prune.selection import PruneParams
    from evoexport.validate.tolerances import tolerances_for

    other = build("llava-tiny", 0.5, params=PruneParams(redundancy_weight=0.35), out=tmp_path / "other",
                  validate=False, progress=Progress(enabled=False))
    b = tmp_path / "b"
    shutil.copytree(int8_build.path, b)
    m = json.loads((b / "manifest.json").read_text())
    for stage in m["stages"]:
        if stage["select"]:   # as a builder bug would, with the manifest's hashes updated to match
            shutil.copy(other.path / stage["select"]["file"], b / stage["select"]["file"])
            stage["select"]["sha256"] = sha256_file(b / stage["select"]["file"])
    (b / "manifest.json").write_text(json.dumps(m))
    r = validate(b, backend="onnxruntime", write=False)
    assert r["precision"] == "int8" and not r["passed"]
    assert r["selection_tolerances"] == tolerances_for("fp32")
    wrong = [g for g in r["graphs"] if g["graph"].startswith("select") and g["inputs"] == "reference"]
    assert wrong and not any(g["ok"] for g in wrong)
    margins = [g["outputs"][0]["decisions"]["worst_margin"] for g in wrong]
    assert all(1e-4 < w < tolerances_for("int8")["decision_margin"] for w in margins), margins


def test_int8_weights_cannot_saturate_kernels_without_vnni(int8_build):
    """x86 int8 kernels without VNNI (AVX2, AVX-512 before Cascade Lake) add two u8 x s8
    products into int16: |weight| <= 64 keeps 2 * 255 * 64 = 32640 below 32767. Checked on
    every weight the build quantized, so a VNNI machine catches the problem too."""
    from onnx import numpy_helper

    from evoexport.export.quantize import WEIGHT_QMAX
    assert 2 * 255 * WEIGHT_QMAX <= 32767
    checked = 0
    for stage in int8_build.manifest.data["stages"]:
        model = onnx.load(str(int8_build.path / stage["file"]))
        consts = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in consts:
                q = numpy_helper.to_array(consts[node.input[0]])
                if q.ndim == 2:   # a weight matrix (activations come in through QuantizeLinear)
                    assert q.dtype == np.int8 and int(np.abs(q.astype(np.int32)).max()) <= WEIGHT_QMAX, node.name
                    checked += 1
    assert checked >= 6


@pytest.mark.parametrize("isa", ["AVX2", "AVX512_CORE"])
def test_int8_build_validates_on_openvino_without_vnni(int8_build, isa):
    """The failure seen on a machine without VNNI, reproduced on any x86 CPU: oneDNN (inside
    OpenVINO) capped at AVX2 (the reported machine's instruction set) or AVX-512 without VNNI
    (a Skylake-SP's); a CPU below the cap runs its own kernels, which lack VNNI too. The
    stages compile at an fp32 hint (OpenVINO's bf16 default has no kernels under the AVX2
    cap); the matmuls stay int8. With 8-bit weights this build's features came out rel 0.23
    off (cosine 0.985) under either cap; with 7-bit weights it validates."""
    import os
    import subprocess
    import sys

    code = ("import json; from evoexport.validate import validate; "
            f"r = validate({str(int8_build.path)!r}, backend='openvino', write=False, cache_dir=None, "
            "precision='fp32'); print(json.dumps([r['passed'], r['end_to_end']['features']['rel_err']]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "ONEDNN_MAX_CPU_ISA": isa})
    assert done.returncode == 0, done.stderr[-2000:]
    passed, rel = json.loads(done.stdout.strip().splitlines()[-1])
    assert passed and rel < 0.05, rel
