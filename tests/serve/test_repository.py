"""The Triton repository writer, checked without a server: every flavour's config.pbtxt
parses strictly into Triton's own ModelConfig protobuf, follows the manifest, and carries
its files; what Triton refuses at load time is refused before anything is written.
The `tensorrt` flavour uses stand-in plan files (TensorRT cannot be installed here): it
pins our file layout and config, not TensorRT."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")

from evoexport.cli import main  # noqa: E402
from evoexport.errors import EvoExportError  # noqa: E402
from evoexport.manifest import Manifest, read_manifest  # noqa: E402
from evoexport.serve.config import check_ensemble, read_config  # noqa: E402
from evoexport.serve.repository import MARKER, write_repository  # noqa: E402


def _configs(repo):
    return {p.parent.name: read_config(p) for p in sorted(repo.glob("*/config.pbtxt"))}


def _stand_in_engines(build, cc="9.0", max_batch=16):
    manifest = read_manifest(build).data
    entries = []
    for g in Manifest(manifest).graphs:
        plan = b"stand-in plan for " + g["name"].encode()
        (build / f"{g['name']}.engine").write_bytes(plan)
        entries.append({"name": g["name"], "file": f"{g['name']}.engine", "sha256": hashlib.sha256(plan).hexdigest(),
                        "onnx_sha256": g["sha256"]})
    (build / "engines.json").write_text(json.dumps({"tensorrt": "10.13.0", "gpu": "stand-in", "compute_capability": cc,
                                                   "batch_profile": {"min": 1, "opt": 1, "max": max_batch},
                                                   "engines": entries}))


@pytest.fixture()
def build_copy(tiny_build, tmp_path):
    import shutil
    return shutil.copytree(tiny_build, tmp_path / "build")


@pytest.mark.parametrize("flavour", ["onnxruntime", "openvino", "python", "tensorrt"])
def test_every_flavour_follows_the_manifest(build_copy, tmp_path, flavour):
    if flavour == "tensorrt":
        _stand_in_engines(build_copy)
    manifest = read_manifest(build_copy).data
    repo = write_repository(build_copy, tmp_path / "repo", flavour=flavour, instances=2, queue_delay_us=300)
    configs = _configs(repo.path)
    graphs = Manifest(manifest).graphs
    assert set(configs) == {"evoexport", "evoexport_pixels", "evoexport_indices"} | {
        f"evoexport_{g['name']}" for g in graphs}
    max_batch = 16 if flavour == "tensorrt" else manifest["batch_profile"]["max"]
    ensemble = configs["evoexport"]
    assert ensemble.platform == "ensemble" and ensemble.max_batch_size == max_batch
    assert [t.name for t in ensemble.input] == ["pixel_values"]
    points = range(len(manifest["schedule"]))
    assert [t.name for t in ensemble.output] == ["features", "indices"] + [
        f"{k}_{i}" for i in points for k in ("indices", "merge", "picks")]
    assert not ensemble.HasField("dynamic_batching") and not ensemble.instance_group
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["evoexport_pixels"] + [f"evoexport_{g['name']}" for g in graphs] + [
        "evoexport_indices"]
    # every flavour: the pixels go through the NaN/infinity check (Python backend) before stage_0
    check = configs["evoexport_pixels"]
    assert check.backend == "python" and (repo.path / "evoexport_pixels" / "1" / "model.py").is_file()
    assert dict(steps[0].input_map) == {"pixel_values": "pixel_values"} and dict(steps[1].input_map) == {
        "pixel_values": "pixels_checked"}
    for g in graphs:
        cfg = configs[f"evoexport_{g['name']}"]
        version = repo.path / f"evoexport_{g['name']}" / "1"
        assert cfg.max_batch_size == max_batch
        assert [(t.name, list(t.dims)) for t in cfg.input] == [(t["name"], t["shape"][1:]) for t in g["inputs"]]
        assert [(t.name, list(t.dims)) for t in cfg.output] == [(t["name"], t["shape"][1:]) for t in g["outputs"]]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 300
        assert [(i.count, i.kind) for i in cfg.instance_group] == [(2, 1 if flavour == "tensorrt" else 2)]  # GPU=1, CPU=2
        if flavour == "tensorrt":
            assert cfg.platform == "tensorrt_plan" and dict(cfg.cc_model_filenames) == {"9.0": "model_sm90.plan"}
            assert (version / "model_sm90.plan").read_bytes() == (build_copy / f"{g['name']}.engine").read_bytes()
            continue
        files = [f for f in (g["file"], g.get("data_file")) if f]
        for f in files:   # the ONNX keeps its external weights beside it, byte for byte
            assert (version / f).read_bytes() == (build_copy / f).read_bytes()
        if flavour == "python":
            assert cfg.backend == "python" and (version / "model.py").is_file()
            assert json.loads((version / "graph.json").read_text())["graph"]["name"] == g["name"]
        else:
            assert cfg.backend == flavour and cfg.default_model_filename == g["file"]
    helper = configs["evoexport_indices"]
    assert helper.backend == ("onnxruntime" if flavour == "tensorrt" else flavour)
    assert json.loads((repo.path / "evoexport" / MARKER).read_text())["flavour"] == flavour


def test_the_indices_step_gives_what_the_library_gives(tiny_build, tmp_path):
    """Pruned: the last selection's indices; unpruned (keep 1.0): every patch in raster order."""
    import onnxruntime as ort

    import evoexport
    from evoexport.export.build import build_variant

    full = build_variant(read_manifest(tiny_build), tmp_path / "full", unpruned=True).path
    x = np.random.default_rng(0).standard_normal((3, 3, 56, 56), dtype=np.float32)
    for build in (tiny_build, full):
        repo = write_repository(build, tmp_path / f"repo-{build.name}", flavour="onnxruntime")
        session = ort.InferenceSession(str(repo.path / "evoexport_indices" / "1" / "indices.onnx"))
        runner = evoexport.load(build)
        env = runner.run_all(x)
        feeds = {i.name: env[i.name] for i in session.get_inputs()}
        assert np.array_equal(session.run(["indices"], feeds)[0], runner(x).indices)


def test_what_triton_would_refuse_is_refused_first(build_copy, tmp_path):
    with pytest.raises(EvoExportError, match="larger than the build's batch profile"):
        write_repository(build_copy, tmp_path / "r", max_batch=33)
    with pytest.raises(EvoExportError, match="name .a b.: use letters"):
        write_repository(build_copy, tmp_path / "r", name="a b")
    with pytest.raises(EvoExportError, match="no TensorRT engines"):
        write_repository(build_copy, tmp_path / "r", flavour="tensorrt")
    _stand_in_engines(build_copy)
    engines = json.loads((build_copy / "engines.json").read_text())
    engines["engines"][1]["onnx_sha256"] = "f" * 64
    (build_copy / "engines.json").write_text(json.dumps(engines))
    with pytest.raises(EvoExportError, match="built from another"):
        write_repository(build_copy, tmp_path / "r", flavour="tensorrt")
    _stand_in_engines(build_copy)
    (build_copy / "select_0.engine").write_bytes(b"another plan")    # the one check of engines against a build
    with pytest.raises(EvoExportError, match="select_0.engine does not match its sha256 in engines.json"):
        write_repository(build_copy, tmp_path / "r", flavour="tensorrt")
    # the ensemble check itself: a step whose batch limit is below the ensemble's
    repo = write_repository(build_copy, tmp_path / "ok", flavour="onnxruntime")
    configs = _configs(repo.path)
    configs["evoexport_select_0"].max_batch_size = 8
    with pytest.raises(EvoExportError, match="takes batch <= 8"):
        check_ensemble(configs)
    configs = _configs(repo.path)
    configs["evoexport_stage_1"].input[0].dims[-1] += 1
    with pytest.raises(EvoExportError, match="disagrees between steps"):
        check_ensemble(configs)


def test_a_failed_write_keeps_the_previous_repository(build_copy, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["triton", str(build_copy), "--out", str(out), "--backend", "python"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = tmp_path / "not-a-repo"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["triton", str(build_copy), "--out", str(other)]) == 2
    assert (other / "keep.txt").read_text() == "mine"
    assert "refusing to replace it" in capsys.readouterr().err
    damaged = (build_copy / "stage_1.onnx").read_bytes() + b"\0"   # the build is replaced by a damaged file
    (build_copy / "stage_1.onnx").unlink()                          # (a new file: the repository's link keeps the old one)
    (build_copy / "stage_1.onnx").write_bytes(damaged)
    assert main(["triton", str(build_copy), "--out", str(out), "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "sha256" in err[0]
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_build_is_left_loadable_by_onnx(build_copy, tmp_path):
    """Files are copied, not hard-linked: onnx refuses external data with several links
    ("potential hardlink attack"), which would break loading the build itself."""
    import onnx

    repo = write_repository(build_copy, tmp_path / "repo", flavour="onnxruntime")
    for f in (build_copy / "stage_0.onnx.data", repo.path / "evoexport_stage_0" / "1" / "stage_0.onnx.data"):
        assert os.stat(f).st_nlink == 1
    onnx.load(str(build_copy / "stage_0.onnx"))
    onnx.load(str(repo.path / "evoexport_stage_0" / "1" / "stage_0.onnx"))


def test_the_bundled_server_did_not_downgrade_numpy():
    """nvidia-pytriton pins numpy<2; scripts/setup-env installs it --no-deps so the main
    environment keeps numpy 2, and the server is still found."""
    import tempfile
    from pathlib import Path

    from evoexport.serve.triton import find_tritonserver

    assert int(np.__version__.split(".")[0]) >= 2
    with tempfile.TemporaryDirectory() as scratch:
        install = find_tritonserver(Path(scratch))
        assert install.binary.is_file() and os.access(install.binary, os.X_OK)
        if install.bundled:
            assert (install.backend_dir / "python" / "triton_python_backend_stub").is_file()
