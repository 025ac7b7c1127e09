"""Backends behind one interface: OpenVINO next to ONNX Runtime, checked against the reference."""
from __future__ import annotations

import json
import shutil

import numpy as np
import openvino as ov
import pytest
import torch

import evoexport
from evoexport.cli import main
from evoexport.errors import EvoExportError
from evoexport.inputs.images import sample_batch
from evoexport.manifest import read_manifest
from evoexport.validate.tolerances import tolerances_for


def _photos(build):
    return sample_batch(56, read_manifest(build).data["preprocess"])


def test_openvino_fp32_matches_the_reference_tightly(tiny_build, tmp_path):
    x = _photos(tiny_build)
    got = evoexport.load(tiny_build, backend="openvino", precision="fp32", cache_dir=tmp_path / "cache")(x)
    ref = evoexport.load(tiny_build, backend="torch")(x)
    for a, b in zip(got.picks_per_point + got.merge_per_point, ref.picks_per_point + ref.merge_per_point):
        np.testing.assert_array_equal(a, b.numpy())
    np.testing.assert_allclose(got.features, ref.features.numpy(), rtol=1e-4, atol=1e-5)


def test_openvino_defaults_run_stages_in_its_precision_and_selections_in_fp32(tiny_build, tmp_path):
    runner = evoexport.load(tiny_build, backend="openvino", cache_dir=tmp_path / "cache")
    be = runner.backend
    hints = {name: r.get_compiled_model().get_property("INFERENCE_PRECISION_HINT") for name, r in be.requests.items()}
    assert all(hints[n] == ov.Type.f32 for n in hints if n.startswith("select"))
    stage = hints["stage_0"]
    assert be.precision == {ov.Type.f32: "fp32", ov.Type.bf16: "bf16", ov.Type.f16: "fp16"}[stage]
    cpu_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert (be.precision == "bf16") == cpu_bf16      # OpenVINO's own default: bf16 where the CPU has it
    assert any((tmp_path / "cache").iterdir())      # compiled models were cached


@pytest.mark.parametrize("precision", [None, "fp32"])
def test_openvino_validates_with_the_tolerances_of_its_precision(tiny_build, tmp_path, precision):
    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    flags = ["--inference-precision", precision] if precision else []
    assert main(["validate", str(build), "--backend", "openvino", *flags]) == 0
    report = json.loads((build / "validation.json").read_text())
    assert report["backend"] == "openvino" and report["passed"]
    expect = precision or evoexport.load(build, backend="openvino").backend.precision
    assert report["precision"] == expect and report["tolerances"] == tolerances_for(expect)


def test_cli_run_on_openvino_equals_the_library(tiny_build, tmp_path):
    x = _photos(tiny_build)[:2]
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.npz"
    assert main(["run", str(tiny_build), "--input", str(tmp_path / "x.npy"), "--output", str(out),
                 "--backend", "openvino"]) == 0
    r = np.load(out)
    lib = evoexport.load(tiny_build, backend="openvino")(x)
    np.testing.assert_array_equal(r["features"], lib.features)
    np.testing.assert_array_equal(r["merge_1"], lib.merge_per_point[1])


def test_openvino_outputs_are_not_overwritten_by_the_next_call(tiny_build):
    runner = evoexport.load(tiny_build, backend="openvino")
    x = _photos(tiny_build)
    first = runner(x[:1])
    kept = first.features.copy()
    runner(x[1:2])
    np.testing.assert_array_equal(first.features, kept)


def test_unknown_backend_options_are_named(tiny_build):
    with pytest.raises(EvoExportError, match="backend openvino takes no option.*optimization"):
        evoexport.load(tiny_build, backend="openvino", optimization="all")
    with pytest.raises(EvoExportError, match="precision 'int4'"):
        evoexport.load(tiny_build, backend="openvino", precision="int4")


def test_torch_backend_in_bf16_computes_in_bf16_and_validates_with_its_tolerances(tiny_build):
    from evoexport.validate.report import validate
    fp32 = evoexport.load(tiny_build, backend="torch")
    bf16 = evoexport.load(tiny_build, backend="torch", precision="bf16")
    assert fp32.backend.precision == "fp32" and bf16.backend.precision == "bf16"
    stage = bf16.backend.pipeline.graphs[0].module.tower
    assert stage.compute_dtype == torch.bfloat16
    # the reference's own tower is untouched (a bf16 copy, not a cast in place)
    assert fp32.backend.pipeline.tower.compute_dtype == torch.float32
    x = _photos(tiny_build)
    a, b = fp32(x).features.numpy(), bf16(x).features.numpy()
    assert b.dtype == np.float32 and not np.array_equal(a, b)
    report = validate(tiny_build, backend="torch", precision="bf16", write=False)
    assert report["precision"] == "bf16" and report["tolerances"] == tolerances_for("bf16")
    assert report["passed"], report["summary"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_one_clear_error(tiny_build, capsys):
    with pytest.raises(EvoExportError, match="sees no CUDA GPU"):
        evoexport.load(tiny_build, backend="torch", device="cuda")
    assert main(["bench", str(tiny_build), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: device cuda asked for")
    assert main(["validate", str(tiny_build), "--device", "cuda"]) == 2
    assert "--device is an option of --backend torch" in capsys.readouterr().err


def test_compiled_selections_pass_the_fp32_validation(tiny_build):
    """torch.compile'd selections (the GPU chain's default; here on the CPU) decide like the
    reference: validated with fp32 tolerances, per graph and end to end."""
    from evoexport.validate.report import validate
    runner = evoexport.load(tiny_build, backend="torch", compile_selections=True)
    assert runner.backend.chain.compiled
    assert set(runner.backend.chain.modules) == {"select_0", "select_1"}
    # one photo: every graph then sees one batch size, so each selection compiles once (each
    # new shape is another inductor compile, ~35 s on 2 cores; CI time)
    report = validate(tiny_build, backend="torch", runner=runner, write=False, images=("astronaut",))
    assert report["precision"] == "fp32"
    assert report["passed"], report["summary"]


def test_torch_backend_needs_only_the_manifest(tiny_build, tmp_path):
    """The torch backend rebuilds the chain from the manifest (weights checked by their own
    sha256); graph-file backends still refuse a build whose files are missing."""
    shutil.copy(tiny_build / "manifest.json", tmp_path / "manifest.json")
    x = _photos(tiny_build)
    alone = evoexport.load(tmp_path, backend="torch")(x)
    full = evoexport.load(tiny_build, backend="torch")(x)
    np.testing.assert_array_equal(alone.features.numpy(), full.features.numpy())
    with pytest.raises(EvoExportError, match="stage_0.onnx named by the manifest is missing"):
        evoexport.load(tmp_path, backend="onnxruntime")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["weights_sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EvoExportError, match="weights loaded now differ"):
        evoexport.load(tmp_path, backend="torch")


def test_every_backend_declares_what_it_takes():
    """One base class; the options each backend declares are exactly its constructor's
    keywords (the torch backend's chain options through ChainOptions), so the CLI
    (cli_options) and make_backend read them instead of a table."""
    import dataclasses
    import inspect

    from evoexport.runtime.backends import BACKENDS, Backend, backend_class
    from evoexport.runtime.backends.torch import ChainOptions
    for name in BACKENDS:
        cls = backend_class(name)
        assert issubclass(cls, Backend) and cls.name == name
        params = inspect.signature(cls.__init__).parameters
        takes = [p for p in params if p not in ("self", "build_dir", "manifest", "chain_options")]
        if "chain_options" in params:
            takes += [f.name for f in dataclasses.fields(ChainOptions) if f.name != "fp32_norms"]
        assert sorted(o.name for o in cls.options) == sorted(takes), name
    assert backend_class("torch").runs_whole_chain and not backend_class("torch").reads_graph_files
    assert backend_class("onnxruntime").reads_graph_files and not backend_class("openvino").runs_whole_chain


def test_cli_options_route_flags_by_the_backends_declarations():
    from evoexport.errors import EvoExportError
    from evoexport.runtime.backends import cli_options
    defaults = {"threads": 0, "precision": None, "device": "cpu"}
    assert cli_options("openvino", {"threads": 2, "precision": "bf16", "device": "cpu"}, defaults) == {
        "threads": 2, "precision": "bf16"}
    assert cli_options("torch", {"threads": 0, "precision": None, "device": "cuda"}, defaults) == {
        "precision": None, "device": "cuda"}
    with pytest.raises(EvoExportError, match="--threads is an option of --backend onnxruntime or openvino"):
        cli_options("torch", {"threads": 2}, defaults)


def test_a_runner_closes_its_backend(tiny_build):
    import evoexport
    with evoexport.load(tiny_build) as runner:
        closed = []
        runner.backend.close = lambda: closed.append(True)
    assert closed == [True]
