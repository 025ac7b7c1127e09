"""`evoexport engines` and the tensorrt backend, against stand-in `tensorrt` modules shaped
like TensorRT 10.x and 11.x. TensorRT cannot be installed here; these tests pin down which
calls and flags we make (strongly typed networks, no precision flags, the manifest's batch
profile, the timing cache, the version/GPU record) and do NOT claim TensorRT ran."""
from __future__ import annotations

import enum
import json
import sys
import types

import pytest

import evoexport
from evoexport.tensorrt import engines
from evoexport.cli import main
from evoexport.errors import EvoExportError
from evoexport.manifest import graph_entries, read_manifest

GPU = {"gpu": "NVIDIA H100 80GB HBM3 (stand-in)", "compute_capability": "9.0"}


def standin_tensorrt(version: str) -> types.ModuleType:
    """The slice of TensorRT's Python API that engines.py uses, recording every call."""
    major = int(version.split(".")[0])
    calls: list[tuple] = []
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = calls
    members = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if major == 10 else {"STRONGLY_TYPED": 1}
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", members)
    # 11.x has no weak-typing flags: touching BuilderFlag.FP16 there raises AttributeError
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", {"FP16": 0, "INT8": 1, "BF16": 2, "TF32": 7} if major == 10
                                   else {"DEBUG": 0})

    class Logger:
        WARNING = 2

        def __init__(self, level):
            calls.append(("Logger", level))

    class Cache:
        def __init__(self, data):
            self.data = data + b"+timed"

        def serialize(self):
            return self.data

    class Config:
        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def clear_flag(self, flag):
            calls.append(("clear_flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("add_optimization_profile", dict(profile.shapes)))

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", bytes(data)))
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", ignore_mismatch))

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("create_network", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network",))
            return b"PLAN"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.append(("parse_from_file", path))
            return True

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt


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

    manifest = read_manifest(build)
    graphs = graph_entries(manifest)
    assert [e["name"] for e in info["engines"]] == [g["name"] for g in graphs]
    flags = [c[1] for c in trt.calls if c[0] == "create_network"]
    assert flags == [1 << 1] * len(graphs)                 # STRONGLY_TYPED on every network, 10.x and 11.x
    assert not [c for c in trt.calls if c[0] == "set_flag"]  # no precision flags, ever
    cleared = [c[1] for c in trt.calls if c[0] == "clear_flag"]
    if hasattr(trt.BuilderFlag, "TF32"):                     # TF32 off on every engine: fp32 means fp32
        assert cleared == [trt.BuilderFlag.TF32] * len(graphs)
    else:
        assert cleared == []
    assert [c[1] for c in trt.calls if c[0] == "parse_from_file"] == [str(build / g["file"]) for g in graphs]
    prof = manifest["batch_profile"]
    for g, (_, shapes) in zip(graphs, [c for c in trt.calls if c[0] == "add_optimization_profile"]):
        for t in g["inputs"]:
            rest = tuple(t["shape"][1:])
            assert shapes[t["name"]] == ((prof["min"], *rest), (prof["opt"], *rest), (prof["max"], *rest))
    # the timing cache grows through the graphs and is written back
    loaded = [c[1] for c in trt.calls if c[0] == "create_timing_cache"]
    assert loaded[0] == b"" and loaded[1] == b"+timed" and cache.read_bytes() == b"+timed" * len(graphs)
    recorded = json.loads((build / "engines.json").read_text())
    assert recorded["tensorrt"] == version and recorded["compute_capability"] == "9.0"
    assert recorded["strongly_typed"] and recorded["batch_profile"] == prof
    assert (build / "select_0.engine").read_bytes() == b"PLAN"
    # a second run starts from the saved cache
    trt.calls.clear()
    engines.build_engines(build, timing_cache=cache, max_batch=8)
    assert [c[1] for c in trt.calls if c[0] == "create_timing_cache"][0] == b"+timed" * len(graphs)
    assert json.loads((build / "engines.json").read_text())["batch_profile"]["max"] == 8


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


def test_cli_engines_fp16_flag_points_to_fp16_builds(tiny_build, capsys):
    assert main(["engines", str(tiny_build), "--fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision fp16" in err[0]


def test_without_tensorrt_engines_say_so_in_one_line(tiny_build, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # import fails, as on this machine
    assert main(["engines", str(tiny_build)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: TensorRT is not installed")
