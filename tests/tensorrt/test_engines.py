"""`evoexport engines` and the tensorrt backend: the real Polygraphy loaders over stand-in
`tensorrt` modules shaped like TensorRT 10.x and 11.x (tests/tensorrt/standin_tensorrt.py).
TensorRT cannot be installed here; these tests pin down what reaches TensorRT (strongly
typed networks, no precision flags, TF32 cleared, the manifest's batch profile, the timing
cache, the version/GPU record) and do NOT claim TensorRT ran."""
from __future__ import annotations

import json
import sys

import pytest

import evoexport
from evoexport.tensorrt import engines
from evoexport.cli import main
from evoexport.errors import EvoExportError
from evoexport.manifest import Manifest, read_manifest

from tests.tensorrt.standin_tensorrt import forget_tensorrt, standin_tensorrt

GPU = {"gpu": "NVIDIA H100 80GB HBM3 (stand-in)", "compute_capability": "9.0"}


@pytest.fixture(autouse=True)
def polygraphy_forgets_tensorrt():
    # each test's stand-in TensorRT is the one Polygraphy sees, and none outlives its test
    forget_tensorrt()
    yield
    forget_tensorrt()


@pytest.fixture
def fake_gpu(monkeypatch):
    # a GPU cannot exist here: the engines record this one
    monkeypatch.setattr(engines, "gpu_info", lambda: dict(GPU))


@pytest.mark.parametrize("version", ["10.15.1", "11.4.0"])
def test_engines_are_strongly_typed_with_the_manifest_profile_and_a_timing_cache(tiny_build, tmp_path, monkeypatch,
                                                                                 fake_gpu, version):
    trt = standin_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    build = tmp_path / "b"
    import shutil
    shutil.copytree(tiny_build, build)
    cache = tmp_path / "cache" / "trt.cache"
    info = engines.build_engines(build, timing_cache=cache)

    manifest = read_manifest(build).data
    graphs = Manifest(manifest).graphs
    assert [e["name"] for e in info["engines"]] == [g["name"] for g in graphs]
    flags = [c[1] for c in trt.calls if c[0] == "create_network"]
    assert flags == [1 << 1] * len(graphs)                 # STRONGLY_TYPED on every network, 10.x and 11.x
    assert not [c for c in trt.calls if c[0] == "set_flag"]  # no precision flags, ever
    cleared = [c[1] for c in trt.calls if c[0] == "clear_flag"]
    if hasattr(trt.BuilderFlag, "TF32"):                     # TF32 off on every engine: fp32 means fp32
        assert cleared == [trt.BuilderFlag.TF32] * len(graphs)
    else:
        assert cleared == []
    # what the builder saw: no flag at all left on (TF32 cleared, nothing set)
    assert [c[1] for c in trt.calls if c[0] == "build_serialized_network"] == [[]] * len(graphs)
    assert [c[1] for c in trt.calls if c[0] == "parse_from_file"] == [str(build / g["file"]) for g in graphs]
    prof = manifest["batch_profile"]
    for g, (_, shapes) in zip(graphs, [c for c in trt.calls if c[0] == "add_optimization_profile"]):
        for t in g["inputs"]:
            rest = tuple(t["shape"][1:])
            assert shapes[t["name"]] == ((prof["min"], *rest), (prof["opt"], *rest), (prof["max"], *rest))
    # the timing cache grows through the graphs and is written back
    loaded = [c[1] for c in trt.calls if c[0] == "set_timing_cache"]
    assert loaded == [b"+timed" * i for i in range(len(graphs))] and cache.read_bytes() == b"+timed" * len(graphs)
    assert all(c[2] is False for c in trt.calls if c[0] == "set_timing_cache")
    recorded = json.loads((build / "engines.json").read_text())
    assert recorded["tensorrt"] == version and recorded["compute_capability"] == "9.0"
    assert recorded["strongly_typed"] and recorded["batch_profile"] == prof
    assert (build / "select_0.engine").read_bytes() == b"PLAN"
    # a second run starts from the saved cache
    trt.calls.clear()
    engines.build_engines(build, timing_cache=cache, max_batch=8)
    assert [c[1] for c in trt.calls if c[0] == "set_timing_cache"][0] == b"+timed" * len(graphs)
    assert json.loads((build / "engines.json").read_text())["batch_profile"]["max"] == 8


def test_a_temporal_builds_later_frame_inputs_get_the_profile_times_g_minus_1(tmp_path, monkeypatch, fake_gpu):
    """A temporal build's later-frame tensors hold G-1 items per clip: their engines' profiles
    are the build's batch profile times G-1; the anchors' and the clip input's are the profile."""
    from evoexport import names
    from evoexport.export.build import build
    from evoexport.progress import Progress
    trt = standin_tensorrt("10.15.1")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    b = build("llava-tiny", 0.5, temporal="3:0.25", out=tmp_path / "b", validate=False,
              progress=Progress(enabled=False))
    info = engines.build_engines(b.path, min_batch=1, opt_batch=2, max_batch=4)
    graphs = b.manifest.graphs
    assert [e["name"] for e in info["engines"]] == [g["name"] for g in graphs]
    profiles = [c[1] for c in trt.calls if c[0] == "add_optimization_profile"]
    seen = set()
    for g, shapes in zip(graphs, profiles):
        for t in g["inputs"]:
            scale = 2 if names.is_later(t["name"]) else 1
            rest = tuple(t["shape"][1:])
            assert shapes[t["name"]] == ((scale, *rest), (2 * scale, *rest), (4 * scale, *rest)), t["name"]
            seen.add(scale)
    assert seen == {1, 2}


def test_engines_refuse_tensorrt_9_and_a_bad_profile(tiny_build, monkeypatch, fake_gpu):
    monkeypatch.setitem(sys.modules, "tensorrt", standin_tensorrt("10.0.0"))
    with pytest.raises(EvoExportError, match="min .* <= opt .* <= max"):
        engines.build_engines(tiny_build, opt_batch=64, max_batch=8)
    old = standin_tensorrt("10.0.0")
    old.__version__ = "9.3.0"
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(EvoExportError, match="strongly typed engines need TensorRT >= 10"):
        engines.build_engines(tiny_build)


def test_engines_for_another_tensorrt_or_gpu_are_one_clear_error(tiny_build, tmp_path, monkeypatch, fake_gpu):
    import shutil
    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    monkeypatch.setitem(sys.modules, "tensorrt", standin_tensorrt("10.15.1"))
    engines.build_engines(build)
    monkeypatch.setitem(sys.modules, "tensorrt", standin_tensorrt("11.4.0"))
    with pytest.raises(EvoExportError, match=r"built with TensorRT 10\.15\.1 .*this machine has TensorRT 11\.4\.0"):
        evoexport.load(build, backend="tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", standin_tensorrt("10.15.1"))
    monkeypatch.setattr(engines, "gpu_info", lambda: {"gpu": "NVIDIA L4", "compute_capability": "8.9"})
    with pytest.raises(EvoExportError, match=r"sm 9\.0.*NVIDIA L4 \(sm 8\.9\)"):
        evoexport.load(build, backend="tensorrt")


def test_without_tensorrt_engines_say_so_in_one_line(tiny_build, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # import fails, as on this machine
    assert main(["engines", str(tiny_build)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: TensorRT is not installed")


def test_a_network_tensorrt_cannot_parse_is_one_clear_error(tiny_build, tmp_path, monkeypatch, fake_gpu, capsys):
    import shutil
    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    trt = standin_tensorrt("10.15.1")

    class Refusing(trt.OnnxParser):
        num_errors = 1

        def parse_from_file(self, path):
            return False

        def get_error(self, index):
            return "In node 12 (TopK): UNSUPPORTED_NODE (stand-in parser error)"

    trt.OnnxParser = Refusing
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    assert main(["engines", str(build)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: TensorRT failed to build an engine for stage_0.onnx: ")
    assert not (build / "engines.json").exists() and not list(build.glob("*.engine"))
