"""The reference C++ runtime (runtimes/cpp, `evoexport-run`) runs a build from its manifest
alone and gives what the Python `openvino` backend gives: the contract proven outside Python."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import rehash_build, rename_tensor, swap_graphs

import evoexport

from tests.helpers import ROOT


@pytest.fixture(scope="session")
def cpp_runtime() -> Path:
    """The binary, built by scripts/build-cpp-runtime (scripts/test builds it before pytest)."""
    done = subprocess.run([str(ROOT / "scripts" / "build-cpp-runtime")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    binary = Path(done.stdout.strip().splitlines()[-1])
    assert binary.is_file()
    return binary


@pytest.fixture(scope="session")
def keep1_build(tmp_path_factory) -> Path:
    from evoexport.export.build import build
    from evoexport.progress import Progress
    return build("llava-tiny", 1.0, out=tmp_path_factory.mktemp("builds") / "tiny-keep1",
                 progress=Progress(enabled=False)).path


@pytest.fixture(scope="session")
def fp16_build(tmp_path_factory) -> Path:
    from evoexport.export.build import build
    from evoexport.progress import Progress
    return build("llava-tiny", 0.5, out=tmp_path_factory.mktemp("builds") / "tiny-fp16", precision="fp16",
                 progress=Progress(enabled=False)).path


def pixels(build: Path, batch: int, seed: int = 0) -> np.ndarray:
    shape = json.loads((build / "manifest.json").read_text())["inputs"][0]["shape"]
    return np.random.default_rng(seed).standard_normal((batch, *shape[1:])).astype(np.float32)


def run_cpp(binary: Path, build: Path, x: np.ndarray, tmp: Path, name: str = "out.npz"):
    np.save(tmp / "x.npy", x)
    out = tmp / name
    done = subprocess.run([str(binary), str(build), "--input", str(tmp / "x.npy"), "--output", str(out)],
                          capture_output=True, text=True)
    return done, out


@pytest.fixture(scope="session")
def temporal_cpp_build(tmp_path_factory) -> Path:
    from evoexport.export.build import build
    from evoexport.progress import Progress
    return build("llava-tiny", 0.5, temporal="3:0.25", out=tmp_path_factory.mktemp("builds") / "tiny-temporal",
                 validate=False, progress=Progress(enabled=False)).path


@pytest.mark.parametrize("which", ["tiny_build", "keep1_build", "fp16_build", "temporal_cpp_build"])
def test_cpp_equals_python_openvino(which, cpp_runtime, tmp_path, request):
    build = request.getfixturevalue(which)
    x = pixels(build, batch=3)
    done, out = run_cpp(cpp_runtime, build, x, tmp_path)
    assert done.returncode == 0, done.stderr
    got = dict(np.load(out))

    runner = evoexport.load(build, backend="openvino")
    env, ref = runner.run_all(x), runner(x)
    manifest = runner.manifest.data
    want = {"features": ref.features, "indices": ref.indices}
    want.update({k: env[k] for k in (o["name"] for o in manifest["outputs"]) if k != "features"})
    if manifest.get("temporal"):   # every output of its assemble graph and both chains' decisions
        assert {"frames", "owners", "later_merge_1", "later_match"} <= set(got)
    assert sorted(got) == sorted(want)
    np.testing.assert_array_equal(got["features"], want["features"])   # bit for bit, as the docs say
    for name in want:
        if name != "features":   # decisions and positions: identical, dtype included
            assert got[name].dtype == np.int64 and np.array_equal(got[name], want[name]), name
    points = len(manifest["schedule"])
    assert points == (0 if which == "keep1_build" else 2)
    n = manifest["tower"]["num_patches"]
    if points == 0:   # nothing pruned: every patch, raster order
        assert np.array_equal(got["indices"], np.broadcast_to(np.arange(n), (3, n)))
    elif manifest.get("temporal"):   # every token of a group: the anchor's, then each later frame's
        later = manifest["temporal"]["schedule"][-1]["tokens"]
        assert got["indices"].shape == (3, manifest["schedule"][-1]["tokens"] + 2 * later)
    else:
        assert got["indices"].shape == (3, manifest["schedule"][-1]["tokens"])


def _edit_manifest(build: Path, **changes) -> None:
    m = json.loads((build / "manifest.json").read_text())
    m.update(changes)
    (build / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage, message", [
    (lambda b: _edit_manifest(b, schema_version=99), "has schema_version 99; this runtime reads version 2"),
    (lambda b: (b / "select_1.onnx").unlink(), "select_1.onnx named by the manifest is missing"),
    (lambda b: (b / "stage_1.onnx.data" if (b / "stage_1.onnx.data").exists() else b / "stage_1.onnx")
        .open("ab").write(b"\0"), "does not match its sha256 in the manifest"),
    (lambda b: (b / "manifest.json").unlink(), "is not an evoexport build: no manifest.json"),
    (lambda b: (swap_graphs(b, "select_0.onnx", "select_1.onnx"), rehash_build(b)),
     "select_0.onnx (select_0) has no input 'stage0_hidden', which the manifest names"),
    (lambda b: (rename_tensor(b, "select_1.onnx", "merge_1", "m1"), rehash_build(b)), "select_1.onnx (select_1) has no output 'merge_1'"),
    (lambda b: ((b / "select_1.onnx").write_bytes((b / "select_1.onnx").read_bytes()[:300]), rehash_build(b)),
     "OpenVINO cannot compile select_1.onnx: Model can't be parsed"),
])
def test_cpp_refuses_a_damaged_build(damage, message, cpp_runtime, tiny_build, tmp_path):
    build = tmp_path / "build"
    shutil.copytree(tiny_build, build)
    damage(build)
    done, out = run_cpp(cpp_runtime, build, pixels(tiny_build, 1), tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("make_input, message", [
    (lambda x: x.astype(np.float64), "pixel_values must be float32, got numpy dtype '<f8'"),
    (lambda x: x[:, :, :-2], "pixel_values must have shape [B, 3, 56, 56], got [2, 3, 54, 56]"),
    (lambda x: x[0], "pixel_values must have shape [B, 3, 56, 56], got [3, 56, 56]"),
])
def test_cpp_checks_the_input_against_the_manifest(make_input, message, cpp_runtime, tiny_build, tmp_path):
    done, out = run_cpp(cpp_runtime, tiny_build, make_input(pixels(tiny_build, 2)), tmp_path)
    assert done.returncode != 0 and done.stderr.strip() == f"error: {message}"
    assert not out.exists()


def test_cpp_never_clobbers_a_good_output_on_failure(cpp_runtime, tiny_build, tmp_path):
    out = tmp_path / "out.npz"
    out.write_bytes(b"previous good result")
    done, _ = run_cpp(cpp_runtime, tiny_build, pixels(tiny_build, 1).astype(np.float16), tmp_path)
    assert done.returncode != 0 and out.read_bytes() == b"previous good result"
