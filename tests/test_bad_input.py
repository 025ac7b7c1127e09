"""Bad input, in one home: flags, checkpoints, configs, images, manifests, tampered
builds and graphs get one clear error line and a non-zero exit, never a traceback."""
from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from evoexport.errors import EvoExportError
from tests.conftest import make_llava_checkpoint
from tests.helpers import assert_one_error_line, cli, rehash_build, rename_tensor, swap_graphs


@pytest.mark.parametrize("args,msg", [
    (["--keep", "-0.5"], "--keep must be in (0, 1]"),
    (["--keep", "1.01"], "--keep must be in (0, 1]"),
    (["--keep", "nan"], "--keep must be a number"),
    (["--keep", "0.001"], "leaves no token of 49"),
    (["--keep", "0.5", "--schedule", "1:30,3:10"], "the schedule ends at 10"),
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


def _edit_shape(build: Path) -> None:
    m = json.loads((build / "manifest.json").read_text())
    m["stages"][1]["inputs"][0]["shape"][1] += 1
    (build / "manifest.json").write_text(json.dumps(m))


def _edit_dtype(build: Path) -> None:
    m = json.loads((build / "manifest.json").read_text())
    m["stages"][0]["select"]["outputs"][2]["dtype"] = "int32"
    (build / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage,msg", [
    (lambda b: rename_tensor(b, "select_0.onnx", "stage0_importance", "imp"),
     "select_0.onnx (select_0) has no input 'stage0_importance', which the manifest names"),
    (lambda b: rename_tensor(b, "select_1.onnx", "merge_1", "m1"), "select_1.onnx (select_1) has no output 'merge_1'"),
    (lambda b: swap_graphs(b, "select_0.onnx", "select_1.onnx"), "select_0.onnx (select_0) has no input 'stage0_hidden'"),
    (lambda b: swap_graphs(b, "stage_1.onnx", "stage_2.onnx"), "stage_1.onnx (stage_1)"),
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
    rehash_build(build)
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
    rehash_build(build)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 56, 56), np.float32))
    code, err, _ = cli("run", build, "--input", tmp_path / "x.npy", "--output", tmp_path / "o.npz", "--backend", "openvino")
    assert_one_error_line(code, err, "OpenVINO cannot compile select_1.onnx: Model wasn't fully converted. Summary: "
                                     "-- No conversion rule found for operations: evo.custom.Frobnicate")
    assert "core.cpp" not in err[-1]
    (build / "select_1.onnx").write_bytes(b"\x08\x07 not ONNX at all")   # never handed to every frontend in turn
    rehash_build(build)
    code, err, _ = cli("run", build, "--input", tmp_path / "x.npy", "--output", tmp_path / "o.npz", "--backend", "openvino")
    assert_one_error_line(code, err, "OpenVINO cannot compile select_1.onnx: it is not an ONNX model")
    assert len(err) == 1, err                      # no parse errors of TensorFlow's frontend before it


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


def _huge_png(path: Path, side: int = 40_000) -> None:
    """A valid PNG header for a side x side image with almost no data: Pillow reads the size
    without decoding, the way a decompression bomb arrives."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("make,msg", [
    (lambda p: np.save(p / "x.npy", np.zeros((0, 3, 56, 56), np.float32)), "shape ['B', 3, 56, 56], got [0, 3, 56, 56]"),
    (lambda p: np.save(p / "x.npy", np.float32(1.0)), "rank 4"),
    (lambda p: np.save(p / "x.npy", np.full((1, 3, 56, 56), np.nan, np.float32)), "NaN or infinite"),
    (lambda p: (p / "x.npy").mkdir(), "is a directory"),
    (lambda p: (p / "x.png").mkdir(), "is a directory"),
    (lambda p: (p / "x.mp4").mkdir(), "is a directory"),
    (lambda p: _huge_png(p / "x.png"), "decodes to more pixels than the 89,478,485 allowed"),
    (lambda p: _huge_png(p / "x.png", 10_000), "decodes to more pixels than the 89,478,485 allowed"),
])
def test_degenerate_inputs(tiny_build, tmp_path, make, msg):
    make(tmp_path)
    inp = next(p for p in tmp_path.iterdir() if p.stem == "x")
    extra = ["--frames", "2"] if inp.suffix == ".mp4" else []
    code, err, _ = cli("run", tiny_build, "--input", inp, "--output", tmp_path / "o.npz", *extra)
    assert_one_error_line(code, err, msg)
    assert not (tmp_path / "o.npz").exists()
    if inp.suffix != ".mp4":
        code, err, _ = cli("show", tiny_build, "--input", inp, "--output", tmp_path / "s.png")
        assert_one_error_line(code, err, msg)


@pytest.mark.parametrize("args,msg", [
    (["run", "{build}", "--input", "{npy}", "--output", "/nonexistent/o.npz"], "folder /nonexistent does not exist"),
    (["run", "{build}", "--input", "{npy}", "--output", "{tmp}"], "is a directory"),
    (["run", "{build}", "--input", "{npy}", "--output", "{tmp}/o.txt"], "must be a .npz file"),
    (["show", "{build}", "--output", "/nonexistent/s.png"], "folder /nonexistent does not exist"),
    (["bench", "{build}", "--json", "/nonexistent/b.json"], "folder /nonexistent does not exist"),
    (["bench", "{build}", "--plot", "/nonexistent/b.png"], "folder /nonexistent does not exist"),
    (["bench", "{build}", "--plot", "{tmp}/b.svg"], "must be a .png file"),
    (["eval", "--model", "dinov2", "--json", "/nonexistent/e.json"], "folder /nonexistent does not exist"),
    (["eval", "--model", "dinov2", "--keep", "1"], "--keep must be in (0, 1)"),
    (["eval", "--model", "dinov2", "--keep", "0"], "--keep must be in (0, 1)"),
    (["run", "{build}", "--input", "{npy}", "--output", "/proc/o.npz"], "cannot write in /proc"),
    (["bench", "{build}", "--iters", "0"], "--iters and --batch must be >= 1"),
    (["bench", "{build}", "--batch", "0"], "--iters and --batch must be >= 1"),
    (["info", "{npy}"], "is a file; give the build directory"),
])
def test_output_paths_and_flags_are_checked_before_work(tiny_build, tmp_path, args, msg):
    """Refused at once: the error comes before any progress line (a bench or eval would
    otherwise run for minutes and then fail to write)."""
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 56, 56), np.float32))
    args = [a.format(build=tiny_build, npy=tmp_path / "x.npy", tmp=tmp_path) for a in args]
    code, err, out = cli(*args)
    assert_one_error_line(code, err, msg)
    assert not [line for line in err if line.startswith("[")], err   # no progress: nothing was started
    assert out == ""


def _edit_manifest(build: Path, edit) -> None:
    m = json.loads((build / "manifest.json").read_text())
    edit(m)
    (build / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit,msg", [
    (lambda m: m.pop("prune_params"), "'prune_params' is a required property"),
    (lambda m: m.pop("preprocess"), "'preprocess' is a required property"),
    (lambda m: m["stages"][0].update(file="../../etc/passwd"), "at $.stages[0].file"),
    (lambda m: m["stages"][0].update(file="/etc/passwd"), "at $.stages[0].file"),
    (lambda m: m["stages"][0]["select"].update(data_file="../w.bin", data_sha256="0" * 64), "at $.stages[0].select"),
    (lambda m: m.update(keep="half"), "at $.keep"),
    (lambda m: m["tower"].update(num_patches=-1), "at $.tower.num_patches"),
    (lambda m: m["inputs"][0].update(shape=[3, 56, 56]), "at $.inputs[0].shape"),
])
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_hostile_manifest_is_refused_by_every_backend(tiny_build, tmp_path, edit, msg, backend):
    """The manifest is input: a missing key or a file outside the build is one error, on the
    backends that open graph files and on the torch backend, which never does."""
    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    _edit_manifest(build, edit)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 56, 56), np.float32))
    code, err, _ = cli("run", build, "--input", tmp_path / "x.npy", "--output", tmp_path / "o.npz",
                       "--backend", backend)
    assert_one_error_line(code, err, msg)
    code, err, _ = cli("info", build)
    assert_one_error_line(code, err, msg)


@pytest.mark.parametrize("content,msg", [
    ("{ not json", "engines.json is not valid JSON"),
    ("[1, 2]", "has no list of engines"),
    ('{"engines": [{"name": "stage_0"}]}', "lacks 'file'"),
    ('{"engines": [{"name": "stage_0", "file": "../x.engine", "sha256": "", "onnx_sha256": ""}]}',
     "must be a plain file name"),
])
def test_a_corrupt_engines_json_is_one_error(tiny_build, tmp_path, content, msg):
    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    (build / "engines.json").write_text(content)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 56, 56), np.float32))
    code, err, _ = cli("run", build, "--input", tmp_path / "x.npy", "--output", tmp_path / "o.npz",
                       "--backend", "tensorrt")
    assert_one_error_line(code, err, msg)


def test_library_errors_name_the_problem(tmp_path):
    from evoexport.inputs.image_files import load_image
    with pytest.raises(EvoExportError, match="is a directory"):
        load_image(tmp_path)
