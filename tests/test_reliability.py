"""Bad input gets one clear error line and a non-zero exit; nothing is ever lost."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evoexport.errors import EvoExportError

from .conftest import make_llava_checkpoint

CLI = [sys.executable, "-m", "evoexport.cli"]


def cli(*args, cwd=None):
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd)
    return proc.returncode, proc.stderr.strip().splitlines(), proc.stdout


def assert_one_error_line(code, err, msg):
    """Exit 2; stderr ends with exactly one 'error:' line (progress lines may come before)."""
    assert code == 2, err
    assert not any("Traceback" in line for line in err), err
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert msg in errors[0], err


# ---------------------------------------------------------------- build flags and checkpoints

@pytest.mark.parametrize("args,msg", [
    (["--keep", "-0.5"], "--keep must be in (0, 1]"),
    (["--keep", "1.01"], "--keep must be in (0, 1]"),
    (["--keep", "nan"], "--keep must be a number"),
    (["--keep", "0.001"], "leaves no token of 49"),
    (["--keep", "0.5", "--schedule", "1:30,3:10"], "--schedule ends at 10"),
    (["--schedule", "1:30,1:20"], "strictly increasing"),
    (["--schedule", "9:20"], "does not fit a 5-layer encoder"),
    (["--schedule", "1:60"], "budgets must decrease"),
    (["--importance-ratio", "2"], "importance ratio must be in [0, 1]"),
    (["--keep", "abc"], "'abc' is not a valid float"),
    (["--checkpoint", "/nonexistent/ckpt"], "checkpoint /nonexistent/ckpt does not exist"),
    (["--schedule", ""], "--schedule is empty"),
    (["--schedule", " "], "--schedule is empty"),
    (["--schedule", "1:30,,2:20"], "has an empty item"),
    (["--schedule", "1:30,"], "has an empty item"),
    (["--schedule", "1:nan"], "is not LAYER:KEEP"),
    (["--schedule", "1:1e400"], "a fraction must be in (0, 1]"),
    (["--model", "qwen2.5-vl", "--image-size", "0"], "--image-size must be a positive number of pixels, got 0"),
    (["--model", "dinov2", "--image-size", "-14"], "--image-size must be a positive number of pixels, got -14"),
    (["--model", "dinov2", "--image-size", "1400000"], "more than this machine's"),
    (["--out", "{file}/sub"], "is a file, not a folder"),
    (["--out", "{file}"], "exists and is not an evoexport build"),
])
def test_bad_build_flags(args, msg, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    args = [a.replace("{file}", str(tmp_path / "afile")) for a in args]
    code, err, _ = cli("build", "--model", "llava-tiny", "--out", tmp_path / "o", *args)
    assert_one_error_line(code, err, msg)
    assert not (tmp_path / "o").exists()
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_bad_checkpoints(tmp_path):
    ckpt = make_llava_checkpoint(tmp_path / "ck", shard=None)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, err, _ = cli("build", "--checkpoint", ckpt, "--out", tmp_path / "o")
    assert_one_error_line(code, err, "truncated or corrupt")

    (tmp_path / "weights.bin").write_bytes(b"\x80\x04K\x01.")
    code, err, _ = cli("build", "--checkpoint", tmp_path / "weights.bin", "--out", tmp_path / "o")
    assert_one_error_line(code, err, "pickle")

    (tmp_path / "notckpt").mkdir()
    (tmp_path / "notckpt" / "config.json").write_text('{"model_type": "bert"}')
    code, err, _ = cli("build", "--checkpoint", tmp_path / "notckpt", "--out", tmp_path / "o")
    assert_one_error_line(code, err, "model_type 'bert'")


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    return make_llava_checkpoint(tmp_path_factory.mktemp("ck") / "llava", shard=None)


def _with_weight(ckpt: Path, out: Path, change) -> Path:
    """A copy of the checkpoint whose first vision q_proj weight is `change(tensor)`."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(ckpt, out)
    tensors = load_file(out / "model.safetensors")
    name = next(k for k in tensors if "vision_tower" in k and k.endswith("q_proj.weight"))
    tensors[name] = change(tensors[name])
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _nan_weight(t):
    t = t.clone()
    t[0, 0] = float("nan")
    return t


@pytest.mark.parametrize("change,msg", [
    (lambda t: t.to(torch.int32), "q_proj.weight is stored as int32; vision weights must be float32, float16 or bfloat16"),
    (lambda t: t > 0, "q_proj.weight is stored as bool"),
    (lambda t: t.to(torch.float64), "q_proj.weight is stored as float64"),
    (lambda t: t.to(torch.int8), "q_proj.weight is stored as int8"),
    (_nan_weight, "q_proj.weight holds NaN or infinite values"),
    (lambda t: t * float("inf"), "q_proj.weight holds NaN or infinite values"),
])
def test_weights_of_the_right_shape_but_not_floats_are_refused(small_ckpt, tmp_path, change, msg):
    """An integer or bool tensor of the right shape was cast to float and built with exit 0."""
    ckpt = _with_weight(small_ckpt, tmp_path / "ck", change)
    code, err, _ = cli("build", "--model", "llava", "--checkpoint", ckpt, "--out", tmp_path / "o")
    assert_one_error_line(code, err, msg)
    assert not (tmp_path / "o").exists()


def test_fp16_and_bf16_weights_are_accepted(small_ckpt, tmp_path):
    from evoexport.models import load_tower
    for dtype in (torch.float16, torch.bfloat16):
        ckpt = _with_weight(small_ckpt, tmp_path / str(dtype), lambda t: t.to(dtype))
        load_tower("llava", ckpt, quiet=True)


_PROCESSOR = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 32},
              "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "resample": 3,
              "rescale_factor": 0.00392156862745098, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


@pytest.mark.parametrize("change,msg", [
    ({"rescale_factor": "1/255"}, "rescale_factor '1/255' is not a number"),
    ({"rescale_factor": 0}, "rescale_factor 0.0 must be positive"),
    ({"rescale_factor": True}, "rescale_factor True is not a number"),
    ({"image_mean": ["a", 0.5, 0.5]}, "image_mean[0] 'a' is not a number"),
    ({"image_mean": [0.5, 0.5]}, "image_mean must be a list of 3 numbers"),
    ({"image_mean": "grey"}, "image_mean must be a list of 3 numbers"),
    ({"image_std": [0.5, 0.0, 0.5]}, "image_std[1] 0.0 must be positive"),
    ({"image_std": [0.5, None, 0.5]}, "image_std[1] None is not a number"),
    ("NaN", "is not valid JSON: NaN is not a JSON number"),
    ("Infinity", "is not valid JSON: Infinity is not a JSON number"),
    ({"do_normalize": "yes"}, "do_normalize 'yes' is not true or false"),
    ({"size": {"shortest_edge": 0}}, "size {'shortest_edge': 0} is not a size"),
    ({"size": -3}, "size -3 is not a size"),
    ({"crop_size": {"height": "x", "width": 32}}, "crop_size {'height': 'x', 'width': 32} is not a size"),
    ({"resample": 99}, "resample 99 is not a PIL filter"),
    ({"size": {"longest_edge": 32}}, "is not supported (expected shortest_edge, or height and width)"),
])
def test_a_hostile_preprocessor_config_is_one_error_line(small_ckpt, tmp_path, change, msg):
    """A non-numeric rescale_factor gave a traceback, and a NaN image_std was accepted, after
    which every run on an image failed; now each is named when the recipe is read."""
    ckpt = tmp_path / "ck"
    shutil.copytree(small_ckpt, ckpt)
    if isinstance(change, str):      # a JSON-like number JSON does not have, as Python's json writes it
        text = json.dumps({**_PROCESSOR, "image_std": [0.5, 0.5, 0.5]}).replace("[0.5, 0.5, 0.5]}", f"[0.5, {change}, 0.5]}}")
    else:
        text = json.dumps({**_PROCESSOR, **change})
    (ckpt / "preprocessor_config.json").write_text(text)
    code, err, _ = cli("build", "--model", "llava", "--checkpoint", ckpt, "--out", tmp_path / "o")
    assert_one_error_line(code, err, msg)
    assert "preprocessor_config.json" in err[-1]


@pytest.mark.parametrize("key,value,msg", [
    ("patch_size", 0, "patch_size 0 must be a positive integer"),
    ("num_hidden_layers", -1, "num_hidden_layers -1 must be a positive integer"),
    ("hidden_act", "swishy", "hidden_act 'swishy' is not an activation transformers knows"),
    ("num_channels", 1, "num_channels 1: builds take RGB images (3 channels)"),
    ("hidden_size", 10**7, "more than this machine's"),
    ("layer_norm_eps", 3.5, "layer_norm_eps 3.5 must be a small positive number"),
    ("image_size", None, "image_size None must be a positive integer"),
])
def test_a_hostile_config_json_is_refused_before_any_weight(small_ckpt, tmp_path, key, value, msg):
    ckpt = tmp_path / "ck"
    shutil.copytree(small_ckpt, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["vision_config"][key] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    code, err, _ = cli("build", "--model", "llava", "--checkpoint", ckpt, "--out", tmp_path / "o")
    assert_one_error_line(code, err, msg)
    assert not [line for line in err if line.startswith("[")], err     # refused before any work began


# ---------------------------------------------------------------- tampered builds

def _tamper(build: Path, how: str) -> None:
    if how == "missing":
        (build / "select_1.onnx").unlink()
    elif how == "truncated":
        data = (build / "stage_0.onnx.data").read_bytes()
        (build / "stage_0.onnx.data").write_bytes(data[:1000])
    elif how == "edited":
        with open(build / "stage_2.onnx", "r+b") as f:
            f.seek(200)
            b = f.read(1)
            f.seek(200)
            f.write(bytes([b[0] ^ 0xFF]))
    elif how == "schema":
        m = json.loads((build / "manifest.json").read_text())
        m["schema_version"] = 99
        (build / "manifest.json").write_text(json.dumps(m))
    elif how == "not-json":
        (build / "manifest.json").write_text("{ nope")


@pytest.mark.parametrize("how,msg", [("missing", "select_1.onnx named by the manifest is missing"),
                                     ("truncated", "stage_0.onnx.data does not match its sha256"),
                                     ("edited", "stage_2.onnx does not match its sha256"),
                                     ("schema", "schema_version 99"),
                                     ("not-json", "not valid JSON")])
def test_tampered_builds_are_refused_everywhere(tiny_build, tmp_path, how, msg):
    import evoexport
    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    _tamper(build, how)
    with pytest.raises(EvoExportError, match=msg.replace("(", r"\(")):
        evoexport.load(build)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 56, 56), np.float32))
    for args in (["run", build, "--input", tmp_path / "x.npy", "--output", tmp_path / "o.npz"],
                 ["validate", build]):
        code, err, _ = cli(*args)
        assert_one_error_line(code, err, msg)
    assert not (tmp_path / "o.npz").exists()


def _rehash(build: Path) -> None:
    """Recompute every sha256 in the manifest, as a careless (or hostile) edit would."""
    from evoexport.manifest import graph_entries, sha256_file
    m = json.loads((build / "manifest.json").read_text())
    for g in graph_entries(m):
        g["sha256"] = sha256_file(build / g["file"])
        if g.get("data_file"):
            g["data_sha256"] = sha256_file(build / g["data_file"])
    (build / "manifest.json").write_text(json.dumps(m))


def _rename(build: Path, file: str, old: str, new: str) -> None:
    import onnx
    model = onnx.load(str(build / file), load_external_data=False)
    for value in [*model.graph.input, *model.graph.output]:
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    onnx.save(model, str(build / file))


def _swap(build: Path, a: str, b: str) -> None:
    (build / a).rename(build / "swap.tmp")
    (build / b).rename(build / a)
    (build / "swap.tmp").rename(build / b)


def _edit_shape(build: Path) -> None:
    m = json.loads((build / "manifest.json").read_text())
    m["stages"][1]["inputs"][0]["shape"][1] += 1
    (build / "manifest.json").write_text(json.dumps(m))


def _edit_dtype(build: Path) -> None:
    m = json.loads((build / "manifest.json").read_text())
    m["stages"][0]["select"]["outputs"][2]["dtype"] = "int32"
    (build / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage,msg", [
    (lambda b: _rename(b, "select_0.onnx", "stage0_importance", "imp"),
     "select_0.onnx (select_0) has no input 'stage0_importance', which the manifest names"),
    (lambda b: _rename(b, "select_1.onnx", "merge_1", "m1"), "select_1.onnx (select_1) has no output 'merge_1'"),
    (lambda b: _swap(b, "select_0.onnx", "select_1.onnx"), "select_0.onnx (select_0) has no input 'stage0_hidden'"),
    (lambda b: _swap(b, "stage_1.onnx", "stage_2.onnx"), "stage_1.onnx (stage_1)"),
    (_edit_shape, "stage_1.onnx (stage_1): input 'pruned0_hidden' is float32 [B, 36, 64] in the graph"),
    (_edit_dtype, "select_0.onnx (select_0): output 'indices_0' is int64 [B, 35] in the graph"),
])
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_graphs_that_are_not_the_manifests_are_refused_on_load(tiny_build, tmp_path, damage, msg, backend):
    """Hashes recomputed to match: the files are intact, but they are not what the manifest
    says. Each backend compares the graphs' real inputs and outputs with the manifest when it
    loads them: one line naming the graph and the tensor, on run and validate."""
    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    damage(build)
    _rehash(build)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 56, 56), np.float32))
    for args in (["run", build, "--input", tmp_path / "x.npy", "--output", tmp_path / "o.npz", "--backend", backend],
                 ["validate", build, "--backend", backend]):
        code, err, _ = cli(*args)
        assert_one_error_line(code, err, msg)
    assert not (tmp_path / "o.npz").exists()


def test_openvino_load_errors_say_the_cause(tiny_build, tmp_path):
    """OpenVINO's message starts with the source lines that raised it ('Exception from
    src/inference/src/cpp/core.cpp:132:'); the user sees what went wrong."""
    import onnx
    from onnx import TensorProto, helper

    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="evo.custom")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("evo.custom", 1)]),
              str(build / "select_1.onnx"))
    _rehash(build)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 56, 56), np.float32))
    code, err, _ = cli("run", build, "--input", tmp_path / "x.npy", "--output", tmp_path / "o.npz", "--backend", "openvino")
    assert_one_error_line(code, err, "OpenVINO cannot compile select_1.onnx: Model wasn't fully converted. Summary: "
                                     "-- No conversion rule found for operations: evo.custom.Frobnicate")
    assert "core.cpp" not in err[-1]
    (build / "select_1.onnx").write_bytes(b"\x08\x07 not ONNX at all")   # never handed to every frontend in turn
    _rehash(build)
    code, err, _ = cli("run", build, "--input", tmp_path / "x.npy", "--output", tmp_path / "o.npz", "--backend", "openvino")
    assert_one_error_line(code, err, "OpenVINO cannot compile select_1.onnx: it is not an ONNX model")
    assert len(err) == 1, err                      # no parse errors of TensorFlow's frontend before it


# ---------------------------------------------------------------- run inputs

def test_run_on_a_missing_build(tmp_path):
    code, err, _ = cli("run", tmp_path / "nope", "--input", "x.png", "--output", tmp_path / "o.npz")
    assert_one_error_line(code, err, "does not exist")


@pytest.mark.parametrize("make,msg", [
    (lambda p: np.save(p / "x.npy", np.zeros((3, 56, 56), np.float32)), "rank 4"),
    (lambda p: np.save(p / "x.npy", np.zeros((1, 3, 32, 32), np.float32)), "shape ['B', 3, 56, 56]"),
    (lambda p: np.save(p / "x.npy", np.zeros((1, 3, 56, 56), np.float64)), "float32, got float64"),
    (lambda p: np.save(p / "x.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True), "holds Python objects; pickled arrays are refused"),
    (lambda p: (p / "x.npy").write_bytes(b"garbage"), "not a readable .npy file (no NumPy header)"),
    (lambda p: (p / "x.png").write_bytes(b"\x89PNG not really"), "not a readable image"),
])
def test_bad_run_inputs(tiny_build, tmp_path, make, msg):
    make(tmp_path)
    inp = tmp_path / "x.npy" if (tmp_path / "x.npy").exists() else tmp_path / "x.png"
    code, err, _ = cli("run", tiny_build, "--input", inp, "--output", tmp_path / "o.npz")
    assert_one_error_line(code, err, msg)
    assert not (tmp_path / "o.npz").exists()


# ---------------------------------------------------------------- interrupted builds

# SIGTERM goes through our own handler (SIGINT raises KeyboardInterrupt in Python anyway, and
# tests/test_bad_input.py interrupts a build with it); SIGKILL cannot be handled at all
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_build_leaves_the_previous_build_untouched(tiny_build, tmp_path, sig):
    out = tmp_path / "graphs" / "tiny"
    shutil.copytree(tiny_build, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.Popen([*CLI, "build", "--model", "llava-tiny", "--seed", "7", "--out", str(out)],
                            stderr=subprocess.PIPE, text=True)
    midway = False
    deadline = time.time() + 120
    for line in proc.stderr:  # kill it once the new stage files are being written
        if "exporting select_1" in line:
            partials = [p for p in out.parent.iterdir() if ".partial-" in p.name]
            midway = len(partials) == 1 and (partials[0] / "stage_0.onnx").is_file()
            proc.send_signal(sig)
            break
        assert time.time() < deadline
    rest = proc.stderr.read()
    code = proc.wait(timeout=60)
    assert midway, "the build was not midway"
    assert code != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before      # the good build, byte for byte
    leftovers = [p for p in out.parent.iterdir() if p.name != "tiny"]
    if sig == signal.SIGKILL:
        # SIGKILL cannot clean up: the hidden partial directory stays until the next build
        # at that path sees its process is gone and removes it (checked here without a rebuild)
        from evoexport.files import _remove_stale_partials
        _remove_stale_partials(out)
        assert [p for p in out.parent.iterdir() if p.name != "tiny"] == []
    else:
        assert leftovers == []
        assert rest.strip().splitlines()[-1] == "error: interrupted"
    import evoexport
    evoexport.load(out)  # still loads and verifies


# ---------------------------------------------------------------- selection: exported graph fuzzed against torch

# The configurations builds ship: the spatial term on (the default), first and later prune
# points (a later one takes sizes and the kept tokens' original positions), with and
# without CLS, several grids and budgets. (grid, tokens entering, budget, has_cls)
SELECT_CONFIGS = [(7, 49, 35, True), (7, 35, 24, True), (5, 25, 12, False), (6, 20, 9, False), (4, 16, 5, True)]


@pytest.fixture(scope="module")
def select_sessions(tmp_path_factory):
    """One exported selection graph per configuration, exported on first use."""
    import onnxruntime as ort

    from evoexport.export.onnx import export_graph
    from evoexport.prune.selection import PruneParams, SelectGraph
    from evoexport.pipeline.stages import GraphSpec

    d, sessions = tmp_path_factory.mktemp("sel"), {}
    params = PruneParams()
    assert params.spatial_weight > 0   # the shipped default scoring

    def get(config):
        if config not in sessions:
            grid, n, k, cls = config
            later = n < grid * grid
            name = f"select_{grid}_{n}_{k}_{int(cls)}"
            inputs = ["h", "imp", "sizes", "pos"] if later else ["h", "imp"]
            graph = GraphSpec(name, "select", SelectGraph(k, params, cls, grid), inputs,
                              ["h_out", "sizes_out", "pos_out", "merge_out", "picks_out"], None, n, k)
            example = {"h": torch.randn(2, n + cls, 6), "imp": torch.rand(2, n)}
            if later:
                example |= {"sizes": torch.ones(2, n), "pos": torch.arange(n).expand(2, n).contiguous()}
            export_graph(graph, example, d)
            sessions[config] = ort.InferenceSession(str(d / f"{name}.onnx"), providers=["CPUExecutionProvider"]), \
                graph.module, inputs
        return sessions[config]
    return get


@settings(max_examples=60, deadline=None)
@given(config=st.sampled_from(SELECT_CONFIGS), b=st.integers(1, 4), seed=st.integers(0, 2**16),
       pattern=st.sampled_from(["random", "ties", "nan", "inf", "equal", "duplicate_tokens", "zero_features"]))
def test_exported_selection_matches_torch_exactly(select_sessions, config, b, seed, pattern):
    sess, module, inputs = select_sessions(config)
    grid, n, k, cls = config
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, n + cls, 6, generator=g)
    imp = torch.rand(b, n, generator=g)
    sizes = torch.randint(1, 4, (b, n), generator=g).float()
    pos = torch.stack([torch.randperm(grid * grid, generator=g)[:n].sort().values for _ in range(b)])
    if pattern == "ties":
        imp = torch.round(imp * 3) / 3
    elif pattern == "nan":
        imp[torch.rand(b, n, generator=g) < 0.4] = float("nan")
    elif pattern == "inf":
        imp[torch.rand(b, n, generator=g) < 0.3] = float("inf")
        imp[torch.rand(b, n, generator=g) < 0.3] = -float("inf")
    elif pattern == "equal":
        imp[:] = 0.05
    elif pattern == "duplicate_tokens":
        h[:, cls:] = h[:, cls:cls + 1]
    elif pattern == "zero_features":
        h[:, cls:] = 0
    feeds = {"h": h, "imp": imp, "sizes": sizes, "pos": pos}
    ref = module(*(feeds[i] for i in inputs))
    got = sess.run(None, {i: feeds[i].numpy() for i in inputs})
    np.testing.assert_array_equal(got[2], ref[2].numpy())                 # the same tokens, in the same order
    np.testing.assert_array_equal(got[3], ref[3].numpy())                 # merged into the same kept tokens
    np.testing.assert_array_equal(got[4], ref[4].numpy())                 # picked at the same steps
    np.testing.assert_array_equal(got[1], ref[1].numpy())
    np.testing.assert_allclose(got[0], ref[0].numpy(), rtol=1e-5, atol=1e-5)
    assert got[2].shape == (b, k)
    for row in got[2]:
        assert list(row) == sorted(set(row))


def test_an_interrupt_swallowed_by_a_library_still_stops_the_build(tiny_build, tmp_path, monkeypatch):
    """The signal handler raises KeyboardInterrupt *and* sets a flag: were the exception lost
    inside an exporter that retries on any error, the next progress step or the final rename
    raises it again, so the previous build stays."""
    from evoexport import progress as progress_mod
    from evoexport.export.build import build
    from evoexport.progress import Progress

    out = tmp_path / "graphs" / "tiny"
    shutil.copytree(tiny_build, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(progress_mod, "_interrupted", [signal.SIGINT])   # as if the handler had run
    with pytest.raises(KeyboardInterrupt):
        build("llava-tiny", 0.5, seed=7, out=out, validate=False, progress=Progress(enabled=False))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]
