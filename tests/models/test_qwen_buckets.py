"""Aspect-ratio buckets (`build --grids`) for both Qwen families: a photo whose processor grid
the build holds gets transformers' own features, not stretched; a bucketed build keeps one
copy of the weights; an image the build holds no grid for goes to the nearest aspect ratio,
as documented (tiny random checkpoints saved here; no hub)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import evoexport
from evoexport.cli import main
from evoexport.errors import EvoExportError
from evoexport.export.build import build
from evoexport.manifest import read_buckets, read_manifest
from evoexport.progress import Progress
from tests.helpers import assert_one_error_line, cli
from tests.models.test_qwen2_5_vl import _photo, make_qwen_checkpoint
from tests.models.test_qwen3_vl import make_qwen3_checkpoint

GRIDS = "8x8,6x9,9x6"     # the tiny presets' square grid, and coffee's (400x600) processor grid both ways
FAMILIES = {
    # model, checkpoint maker, the processor's arguments (patch, mean/std, its min_pixels), pixel budget
    "qwen2.5-vl": ("qwen2.5-vl-tiny", make_qwen_checkpoint, dict(min_pixels=3136), 224 * 224),
    "qwen3-vl": ("qwen3-vl-tiny", make_qwen3_checkpoint,
                 dict(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=65536), 256 * 256),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    model, make, processor_args, budget = FAMILIES[request.param]
    ckpt = make(tmp_path_factory.mktemp("ckpt") / "hf")
    full = build(model, 1.0, checkpoint=str(ckpt), out=tmp_path_factory.mktemp("b") / "full", grids=GRIDS,
                 progress=Progress(enabled=False))
    return request.param, ckpt, full, processor_args, budget


def _hf(family, image: Image.Image):
    """transformers' processor (at the build's pixel budget) + model.visual on the photo as it
    is: (features [U, D], [each DeepStack tap], grid_thw)."""
    from transformers import Qwen2VLImageProcessorPil
    name, ckpt, _, processor_args, budget = family
    inputs = Qwen2VLImageProcessorPil(max_pixels=budget, **processor_args)(images=[image], return_tensors="pt")
    if name == "qwen3-vl":
        from transformers import Qwen3VLForConditionalGeneration as Model
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
    with torch.inference_mode():
        out = Model.from_pretrained(ckpt).eval().model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    taps = [t.numpy() for t in getattr(out, "deepstack_features", None) or []]
    return out.pooler_output.numpy(), taps, inputs["image_grid_thw"][0].tolist()


def test_a_photo_at_a_grid_the_build_holds_gets_transformers_own_features(family, tmp_path):
    coffee = _photo("coffee")                                  # 400x600: the processor gives it 6x9 units
    coffee.save(tmp_path / "coffee.png")
    assert main(["run", str(family[2].path), "--input", str(tmp_path / "coffee.png"),
                 "--output", str(tmp_path / "out.npz")]) == 0
    saved = np.load(tmp_path / "out.npz")
    features, taps, grid_thw = _hf(family, coffee)
    assert grid_thw == [1, 12, 18] and saved["grid"].tolist() == [6, 9] and float(saved["aspect_change"]) == 0.0 and saved["exact"]
    assert saved["features"].shape == (1, 54, 96)
    np.testing.assert_allclose(saved["features"][0], features, atol=1e-4, rtol=0)
    for j, tap in enumerate(taps):
        np.testing.assert_allclose(saved[f"deepstack_{j}"][0], tap, atol=1e-4, rtol=0)


def test_a_mixed_list_is_split_by_grid_and_comes_back_in_order(family):
    coffee = _photo("coffee")
    photos = [coffee, _photo("astronaut"), coffee.transpose(Image.Transpose.ROTATE_90), coffee]
    with evoexport.load(family[2].path) as runner:
        results = runner.run_images(photos, batch=2)
    assert [str(r.grid) for r in results] == ["6x9", "8x8", "9x6", "6x9"]
    for photo, result in zip(photos, results):
        features, taps, _ = _hf(family, photo)
        np.testing.assert_allclose(result.features, features, atol=1e-4, rtol=0)
        assert result.exact and result.aspect_change == 0.0 and len(result.deepstack) == len(taps)
        for got, ref in zip(result.deepstack, taps):
            np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_an_image_of_no_held_grid_goes_to_the_nearest_aspect_ratio_and_says_so(family, tmp_path):
    strip = _photo("coffee").resize((600, 100))       # 6:1, far wider than any grid of the build
    with evoexport.load(family[2].path) as runner:
        (result,) = runner.run_images([strip])
    assert str(result.grid) == "6x9"                   # the widest grid
    assert not result.exact and result.aspect_change == pytest.approx(6 / 1.5 - 1)
    assert result.features.shape == (54, 96)
    # beyond the processor's own limit (200:1): one error line
    Image.new("RGB", (2010, 10)).save(tmp_path / "thread.png")
    assert_one_error_line(*cli("run", str(family[2].path), "--input", str(tmp_path / "thread.png"),
                               "--output", str(tmp_path / "o.npz"))[:2], "aspect ratio beyond 200:1")


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    return build("qwen2.5-vl-tiny", 0.5, out=tmp_path_factory.mktemp("b") / "half", grids=GRIDS,
                 progress=Progress(enabled=False))


def test_every_grid_is_built_validated_and_shares_one_copy_of_the_weights(half, tmp_path):
    index = half.buckets
    assert [str(g) for g in index.grids] == GRIDS.split(",")
    assert [m.tokens_per_image for m in index.manifests] == [32, 27, 27]
    root = half.path
    for grid in GRIDS.split(","):
        assert json.loads((root / f"{grid}.validation.json").read_text())["passed"]
        m = read_manifest(root / f"{grid}.json")
        assert {g["data_file"] for g in m.graphs if g.get("data_file")} == {"weights.bin"}
    # one grid alone, for comparison: its weights are about what the three grids share
    one = build("qwen2.5-vl-tiny", 0.5, out=tmp_path / "one", validate=False, progress=Progress(enabled=False))
    one_bytes = sum(f.stat().st_size for f in one.path.iterdir())
    all_bytes = sum(f.stat().st_size for f in root.iterdir() if "validation" not in f.name)
    assert (root / "weights.bin").stat().st_size < 1.25 * sum(f.stat().st_size for f in one.path.glob("*.data"))
    assert all_bytes < 2 * one_bytes       # three grids, much less than three builds
    # one grid works with every command that takes a build, by its manifest
    assert main(["validate", str(root / "6x9.json")]) == 0
    assert main(["check", str(root / "9x6.json"), "--target", "tensorrt"]) == 0


def test_a_bucketed_build_is_refused_whole_where_one_grid_is_needed_and_checked_when_read(half, tmp_path):
    with pytest.raises(EvoExportError, match="bucketed build .*give one grid's manifest"):
        read_manifest(half.path)
    assert_one_error_line(*cli("validate", str(half.path))[:2], "is a bucketed build (grids 8x8, 6x9, 9x6)")
    broken = tmp_path / "broken"
    shutil.copytree(half.path, broken)
    with open(broken / "weights.bin", "r+b") as f:     # one flipped byte in the shared weights
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(EvoExportError, match="weights.bin does not match its sha256"):
        read_buckets(broken)
    index = json.loads((half.path / "manifest.json").read_text())
    index["buckets"][1]["manifest"] = "../escape.json"
    (broken / "manifest.json").write_text(json.dumps(index))
    with pytest.raises(EvoExportError, match="not a plain file name inside the build"):
        read_buckets(broken, verify=False)


@pytest.mark.parametrize("args, message", [
    (["--model", "qwen2.5-vl-tiny", "--grids", "0x5"], "is not a grid"),
    (["--model", "qwen2.5-vl-tiny", "--grids", "8x8,8x8"], "names a grid twice"),
    (["--model", "llava-tiny", "--grids", "auto"], "takes square images only"),
    (["--model", "qwen2.5-vl-tiny", "--grids", "8x8", "--temporal", "4:0.25"], "cannot be combined with --temporal"),
    (["--model", "llava-tiny", "--image-size", "224x280"], "takes square images"),
])
def test_bad_grids_are_one_error_line(args, message, tmp_path):
    assert_one_error_line(*cli("build", *args, "--out", str(tmp_path / "b"))[:2], message)
    assert not (tmp_path / "b").exists()


def _prompt(family, images) -> dict:
    """A prompt of text and each image at the processor's own grid for it (the build's pixel
    budget), written out by hand (no tokenizer needed)."""
    from transformers import Qwen2VLImageProcessorPil
    from tests.models.test_qwen2_5_vl import IMAGE_PAD, VISION_END, VISION_START
    _, _, _, processor_args, budget = family
    inputs = dict(Qwen2VLImageProcessorPil(max_pixels=budget, **processor_args)(images=images, return_tensors="pt"))
    ids = [5, 6]
    for row in inputs["image_grid_thw"].tolist():
        ids += [VISION_START] + [IMAGE_PAD] * (row[1] * row[2] // 4) + [VISION_END, 7]
    inputs["input_ids"] = torch.tensor([ids + [8, 9]])
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE_PAD).long()
    return inputs


def _model(family):
    name, ckpt = family[:2]
    if name == "qwen3-vl":
        from transformers import Qwen3VLForConditionalGeneration as Model
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
    return Model.from_pretrained(ckpt).eval()


def test_attach_takes_images_of_every_grid_and_generates_what_transformers_generates(family):
    from evoexport.integrations.hf_llava import attach, shrink_image_tokens
    coffee = _photo("coffee")
    inputs = _prompt(family, [coffee, _photo("astronaut"), coffee.transpose(Image.Transpose.ROTATE_90)])
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 18], [1, 16, 16], [1, 18, 12]]
    ref = _model(family).generate(**inputs, max_new_tokens=8, do_sample=False)
    model = attach(_model(family), family[2].path)
    ours = model.generate(**shrink_image_tokens(inputs, model), max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, ref)


def test_attach_runs_an_image_of_no_held_grid_at_the_nearest_one_and_warns(family):
    from evoexport.integrations.hf_llava import attach, shrink_image_tokens
    from tests.models.test_qwen2_5_vl import IMAGE_PAD
    strip = _photo("coffee").resize((600, 100))
    inputs = _prompt(family, [strip])
    model = attach(_model(family), family[2].path)
    small = shrink_image_tokens(inputs, model)
    assert int((small["input_ids"] == IMAGE_PAD).sum()) == 54        # the 6x9 grid's K at keep 1.0
    with pytest.warns(UserWarning, match="ran resized to grid 6x9"):
        out = model.generate(**small, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == small["input_ids"].shape[1] + 4


def test_info_lists_the_grids_and_show_draws_a_non_square_grid(half, tmp_path):
    code, err, out = cli("info", str(half.path))
    assert code == 0, err
    assert "3 grids sharing" in out and "6x9     168x252 px  27 of 54 tokens  6x9.json" in out
    _photo("coffee").save(tmp_path / "coffee.png")
    code, err, out = cli("show", str(half.path / "6x9.json"), "--input", str(tmp_path / "coffee.png"),
                         "--output", str(tmp_path / "show.png"))
    assert code == 0, err
    panel = Image.open(tmp_path / "show.png")
    assert panel.width > 3 * 252 and "1 image(s) x 4 panels" in out


def test_a_grid_of_a_bucketed_build_makes_a_triton_repository_with_only_its_own_tensors(half, tmp_path):
    assert main(["triton", str(half.path / "9x6.json"), "--out", str(tmp_path / "repo")]) == 0
    files = {f.name: f.stat().st_size for f in (tmp_path / "repo").rglob("*") if f.is_file()}
    assert "weights.bin" not in files and "9x6.stage_0.onnx.data" in files
    assert sum(v for k, v in files.items() if k.endswith(".data")) < (half.path / "weights.bin").stat().st_size


def test_the_cpp_runtime_runs_the_grid_of_the_input_bit_for_bit(half, tmp_path):
    import subprocess
    from tests.helpers import ROOT as root
    done = subprocess.run([str(root / "scripts" / "build-cpp-runtime")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    binary = done.stdout.strip().splitlines()[-1]
    x = np.random.default_rng(0).standard_normal((2, 3, 168, 252)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run([binary, str(half.path / "6x9.json"), "--input", str(tmp_path / "x.npy"),
                          "--output", str(tmp_path / "o.npz")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    got, ref = np.load(tmp_path / "o.npz"), evoexport.load(half.path / "6x9.json", backend="openvino")(x)
    np.testing.assert_array_equal(got["features"], ref.features)
    assert np.array_equal(got["indices"], ref.indices)
    # the whole bucketed build: the grid of the input's height x width runs
    whole = subprocess.run([binary, str(half.path), "--input", str(tmp_path / "x.npy"),
                            "--output", str(tmp_path / "o2.npz")], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "o2.npz")["features"], ref.features)
    np.save(tmp_path / "y.npy", x[:, :, :100])
    other = subprocess.run([binary, str(half.path), "--input", str(tmp_path / "y.npy"),
                            "--output", str(tmp_path / "o3.npz")], capture_output=True, text=True)
    assert other.returncode != 0 and not (tmp_path / "o3.npz").exists()
    assert other.stderr.strip().splitlines()[-1].startswith("error: the input is 100x252 pixels; ")


def test_a_failed_bucketed_rebuild_keeps_the_good_build_whole(half, tmp_path):
    good = tmp_path / "good"
    shutil.copytree(half.path, good)
    before = {f.name: f.read_bytes() for f in good.iterdir()}
    # the second grid leaves no token at keep 0.5: the build stops there, nothing replaced
    assert_one_error_line(*cli("build", "--model", "qwen2.5-vl-tiny", "--grids", "8x8,1x1", "--keep", "0.5",
                               "--no-validate", "--out", str(good))[:2], "leaves no token")
    assert {f.name: f.read_bytes() for f in good.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]      # no half-written folder left


def test_a_clip_runs_at_the_grid_of_its_frames(half, tmp_path):
    from evoexport.inputs.video import sample_clip
    assert main(["run", str(half.path), "--input", str(sample_clip("bikes")), "--frames", "3",
                 "--output", str(tmp_path / "clip.npz")]) == 0
    saved = np.load(tmp_path / "clip.npz")
    # 640x272 frames: the processor's 5x12 grid is not held; the widest grid (6x9) is the nearest
    assert saved["grid"].tolist() == [6, 9] and not saved["exact"]
    assert float(saved["aspect_change"]) == pytest.approx((640 / 272) / 1.5 - 1)
    assert saved["features"].shape == (3, 27, 96) and saved["frame_numbers"].shape == (3,)


def test_auto_is_the_processors_grids_of_the_camera_ratios_and_takes_more():
    from evoexport.export.build import BuildOptions
    from evoexport.export.buckets import plan_grids
    from evoexport.models.loader import spec_for
    spec = spec_for("qwen2.5-vl", None, 448)
    grids = plan_grids(BuildOptions(model="qwen2.5-vl", grids="auto,16x16,10x23"), spec)
    # 1:1, 4:3, 3:4, 3:2, 2:3, 16:9, 9:16 at 448x448 pixels: the processor's own grids, then the extra one
    assert [str(g) for g in grids] == ["16x16", "13x18", "18x13", "13x19", "19x13", "12x21", "21x12", "10x23"]


def test_an_exif_rotated_photo_picks_the_grid_of_its_upright_shape(half, tmp_path):
    """A 600x400 JPEG whose EXIF says rotate 90 degrees is a 400x600 (tall) photo as the
    model's loader reads it: it goes to the tall grid, with the upright pixels."""
    from evoexport.inputs.images import read_pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo("coffee").save(tmp_path / "rotated.jpg", exif=exif)
    assert main(["run", str(half.path), "--input", str(tmp_path / "rotated.jpg"),
                 "--output", str(tmp_path / "o.npz")]) == 0
    saved = np.load(tmp_path / "o.npz")
    assert saved["grid"].tolist() == [9, 6] and saved["exact"]
    x = read_pixels(tmp_path / "rotated.jpg", read_manifest(half.path / "9x6.json"))
    np.testing.assert_array_equal(saved["features"], evoexport.load(half.path / "9x6.json")(x).features)
