"""`evoexport fuse`: a build's chain as one ONNX graph, a build of its own. The fused graph
must equal the chain (features within the build's tolerance, decisions exactly) on ONNX
Runtime and OpenVINO, validate against PyTorch, and pass the TensorRT static check."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import evoexport
from evoexport.errors import EvoExportError
from evoexport.export.build import build
from evoexport.export.fuse import fuse
from evoexport.inputs.images import sample_batch
from evoexport.manifest import read_manifest
from evoexport.progress import Progress
from evoexport.tensorrt.check import check_build
from evoexport.validate.report import validate
from tests.helpers import assert_one_error_line, cli

QUIET = Progress(enabled=False)


def _same_chain(chain_dir, fused_dir, backend: str, atol: float) -> None:
    manifest = read_manifest(chain_dir)
    x = sample_batch(manifest.image_size, manifest.preprocess)
    # OpenVINO runs the fused graph in f32 (it makes decisions) and the chain's encoder stages
    # at its default, bf16 on a CPU with AVX-512 BF16 or AMX: pin f32 so any CPU compares alike
    options = {"precision": "fp32"} if backend == "openvino" else {}
    a, b = evoexport.load(chain_dir, backend=backend, **options)(x), evoexport.load(fused_dir, backend=backend)(x)
    np.testing.assert_allclose(b.features, a.features, atol=atol, rtol=0)
    for name in ("indices_per_point", "merge_per_point", "picks_per_point"):
        for p, q in zip(getattr(a, name), getattr(b, name)):
            assert np.array_equal(p, q), name
    assert np.array_equal(a.indices, b.indices)


@pytest.mark.parametrize("model, precision", [("llava-tiny", "fp32"), ("qwen2.5-vl-tiny", "fp32"),
                                              ("onevision-tiny", "fp32"), ("llava-tiny", "fp16"),
                                              ("llava-tiny", "int8"), ("llava-tiny", "bf16")])
def test_fused_graph_equals_the_chain_validates_and_passes_the_tensorrt_check(model, precision, tmp_path):
    chain = build(model, 0.5, out=tmp_path / "chain", precision=precision, validate=False, progress=QUIET).path
    fused = fuse(chain, tmp_path / "fused")
    m, c = read_manifest(fused), read_manifest(chain)
    assert [g["name"] for g in m.graphs] == ["fused"] and m.outputs == c.outputs and m.inputs == c.inputs
    graph = onnx.load(str(fused / "fused.onnx"))
    assert [i.name for i in graph.graph.input] == ["pixel_values"]
    assert [o.name for o in graph.graph.output] == [t["name"] for t in c.outputs]
    backends = ("openvino",) if precision == "bf16" else ("onnxruntime", "openvino")   # ORT's CPU has no bf16
    for backend in backends:
        _same_chain(chain, fused, backend, atol=1e-5 if precision == "fp32" else 1e-3)
    assert validate(fused, write=False, backend=backends[0])["passed"]
    report = check_build(fused)
    assert report["ok"], report["findings"]


def test_fuse_command_and_its_refusals(tiny_build, tmp_path):
    out = tmp_path / "fused"
    code, err, stdout = cli("fuse", tiny_build, "--out", out)
    assert code == 0, err
    assert (out / "manifest.json").is_file() and "validation PASSED" in stdout
    with pytest.raises(EvoExportError, match="one graph already"):
        fuse(out, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    code, err, _ = cli("fuse", tmp_path / "no-such-build", "--out", tmp_path / "x")
    assert_one_error_line(code, err, "no-such-build")
    assert not (tmp_path / "x").exists()
