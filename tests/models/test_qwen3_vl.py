"""Qwen3-VL: the encoder pruned in 2x2 merge units with its DeepStack taps carried through
every selection, against transformers' own processor and model.visual, and its language
model fed through attach() (tiny random checkpoints saved here; no hub)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evoexport
from evoexport.cli import main
from evoexport.errors import EvoExportError
from evoexport.export.build import build
from evoexport.progress import Progress
from tests.helpers import split_vision_and_language
from tests.models.test_qwen2_5_vl import IMAGE_PAD, VISION_END, VISION_START, _photo, qwen_prompt

SIZE = 256        # 16x16 patches of 16 px, 8x8 merge units
TAPS = 3


def make_qwen3_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny Qwen3VLForConditionalGeneration saved by transformers, the vision and language
    tensors in files of their own. Its position table is 8x8, so every grid interpolates."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen3VLConfig(
        vision_config=dict(depth=6, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=96,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 2, 4]),
        text_config=dict(vocab_size=300, hidden_size=96, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 4, 4],
                                          "mrope_interleaved": True}),
        image_token_id=IMAGE_PAD, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        video_token_id=293)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():   # position table and DeepStack mergers far from their zero/one init
        for name, p in model.named_parameters():
            if "visual" in name:
                p.normal_(0, 0.1 if p.dim() > 1 else 0.3)
    model.save_pretrained(path)
    return split_vision_and_language(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_qwen3_checkpoint(tmp_path_factory.mktemp("qwen3") / "qwen3-vl-tiny-hf")


@pytest.fixture(scope="module")
def full_build(ckpt, tmp_path_factory):
    return build("qwen3-vl-tiny", 1.0, checkpoint=str(ckpt), out=tmp_path_factory.mktemp("b") / "full",
                 progress=Progress(enabled=False))


@pytest.fixture(scope="module")
def half_build(ckpt, tmp_path_factory):
    return build("qwen3-vl-tiny", 0.5, checkpoint=str(ckpt), out=tmp_path_factory.mktemp("b") / "half",
                 progress=Progress(enabled=False))


def _model(ckpt):
    from transformers import Qwen3VLForConditionalGeneration
    return Qwen3VLForConditionalGeneration.from_pretrained(ckpt).eval()


def _processor():
    from transformers import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=SIZE * SIZE, max_pixels=SIZE * SIZE, patch_size=16,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _hf_visual(ckpt, images):
    """transformers' processor + model.visual on photos resized to the build's size, as the
    manifest's recipe says: (features [N, U, D], [each DeepStack tap [N, U, D]])."""
    inputs = _processor()(images=[im.resize((SIZE, SIZE), Image.BICUBIC) for im in images], return_tensors="pt")
    with torch.inference_mode():
        out = _model(ckpt).model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    n = len(images)
    return out.pooler_output.reshape(n, -1, 96).numpy(), [t.reshape(n, -1, 96).numpy() for t in out.deepstack_features]


def test_keep_1_run_equals_transformers_processor_and_visual_with_every_tap(ckpt, full_build, tmp_path):
    photos = {"astronaut": _photo("astronaut"), "coffee": _photo("coffee")}
    for name in photos:
        photos[name].save(tmp_path / f"{name}.png")
    # one image through the CLI, as a user runs it: the features and every tap
    assert main(["run", str(full_build.path), "--input", str(tmp_path / "astronaut.png"),
                 "--output", str(tmp_path / "one.npz")]) == 0
    saved = np.load(tmp_path / "one.npz")
    features, taps = _hf_visual(ckpt, [photos["astronaut"]])
    assert saved["features"].shape == features.shape == (1, 64, 96)
    np.testing.assert_allclose(saved["features"], features, atol=1e-4, rtol=0)
    for j in range(TAPS):
        np.testing.assert_allclose(saved[f"deepstack_{j}"], taps[j], atol=1e-4, rtol=0)
    # a batch of two through the library
    from evoexport.inputs.images import read_pixels
    x = np.concatenate([read_pixels(tmp_path / f"{n}.png", full_build.manifest) for n in photos])
    out = evoexport.load(full_build.path)(x)
    features, taps = _hf_visual(ckpt, list(photos.values()))
    np.testing.assert_allclose(out.features, features, atol=1e-4, rtol=0)
    assert len(out.deepstack) == TAPS
    for got, ref in zip(out.deepstack, taps):
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_keep_half_builds_validates_and_carries_the_taps_with_the_kept_units(half_build):
    m = half_build.manifest
    assert half_build.report["passed"]
    assert m.data["family"] == "qwen3-vl" and m.data["tower"]["num_patches"] == 64
    assert m.deepstack == [f"deepstack_{j}" for j in range(TAPS)]
    # tap 0 (after block 0) is taken before both prune points and carried through both selections
    select_0 = m.data["stages"][0]["select"]
    assert "deepstack0_stage_0" in [t["name"] for t in select_0["inputs"]]
    from evoexport.inputs.images import sample_batch
    out = evoexport.load(half_build.path)(sample_batch(SIZE, m.data["preprocess"]))
    k = m.tokens_per_image
    assert k == 32 and out.features.shape == (3, k, 96)
    for tap in out.deepstack:
        assert tap.shape == out.features.shape and np.isfinite(tap).all()
    for row in out.indices:
        assert len(set(row.tolist())) == k and list(row) == sorted(row)


def test_a_tap_carried_is_the_size_weighted_mean_of_the_units_merged_into_each_kept_one(half_build):
    """Carried through two selections, a tap's row for a kept token equals the plain mean of
    the tap's rows (as taken, all 64 units) over every unit that ended in that token: the
    merges weigh by size, and each unit starts at size 1."""
    from evoexport.pipeline.temporal import pipeline_from_manifest
    from evoexport.runtime.runner import final_owners

    pipe = pipeline_from_manifest(half_build.manifest)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    env = pipe.run(x)
    before = env["deepstack0_stage_0"].numpy()                         # tap 0 at all 64 units
    owners = final_owners([env["merge_0"].numpy(), env["merge_1"].numpy()])   # [B, 64] final slot
    for b in range(2):
        for slot in range(32):
            members = owners[b] == slot
            np.testing.assert_allclose(env["deepstack_0"][b, slot].numpy(), before[b, members].mean(0), atol=1e-5)


def test_keep_half_passes_the_static_tensorrt_check(half_build):
    from evoexport.tensorrt.check import check_build
    checked = check_build(half_build.path)
    assert checked["ok"], checked


def test_bad_checkpoints_get_one_clear_error(ckpt, tmp_path):
    import shutil
    from evoexport.models import load_tower
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    config = json.loads((bad / "config.json").read_text())
    config["vision_config"]["deepstack_visual_indexes"] = [4, 2]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(EvoExportError, match="deepstack_visual_indexes"):
        load_tower("qwen3-vl-tiny", bad, quiet=True)
    with pytest.raises(EvoExportError, match="multiple of 32"):
        load_tower("qwen3-vl-tiny", ckpt, quiet=True, image_size=250)
    with pytest.raises(EvoExportError, match="not a Qwen3-VL checkpoint"):
        config["model_type"] = "qwen2_5_vl"
        (bad / "config.json").write_text(json.dumps(config))
        load_tower("qwen3-vl-tiny", bad, quiet=True)


def _prompt(image: Image.Image):
    return qwen_prompt(_processor(), image, SIZE)


def test_attach_keep_1_generates_what_transformers_generates(ckpt, full_build):
    from evoexport.integrations.hf_llava import attach, shrink_image_tokens

    inputs = _prompt(_photo())
    ref = _model(ckpt).generate(**inputs, max_new_tokens=8, do_sample=False)
    model = attach(_model(ckpt), full_build.path)
    ours = model.generate(**shrink_image_tokens(inputs, model), max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, ref)


def test_attach_keep_half_equals_an_independent_splice_and_decode(ckpt, half_build):
    """The build's K features and K rows of each tap put into the language model by hand
    (features at the placeholders, taps through the decoder's own DeepStack inputs), with
    mRoPE positions of the kept units computed here, decoded greedily without a cache:
    attach() + generate() must give the same tokens."""
    from evoexport.integrations.hf_llava import attach, shrink_image_tokens

    model = attach(_model(ckpt), half_build.path)
    inputs = shrink_image_tokens(_prompt(_photo("coffee")), model)
    ids = inputs["input_ids"][0]
    assert int((ids == IMAGE_PAD).sum()) == 32
    new = 6
    ours = model.generate(**inputs, max_new_tokens=new, do_sample=False)[0, len(ids):]

    plain = _model(ckpt)
    image = _photo("coffee").resize((SIZE, SIZE), Image.BICUBIC)
    from evoexport.inputs.images import preprocess
    out = evoexport.load(half_build.path)(preprocess(image, SIZE, half_build.manifest.data["preprocess"])[None])
    kept = torch.from_numpy(out.indices)[0]
    embed = plain.get_input_embeddings()
    seq = embed(ids[None]).detach().clone()
    mask = ids == IMAGE_PAD
    seq[0, mask] = torch.from_numpy(out.features[0])
    taps = [torch.from_numpy(t[0]) for t in out.deepstack]
    start = int(mask.nonzero()[0, 0])
    rows, cols = kept // 8, kept % 8
    positions = torch.cat([torch.arange(start).expand(3, -1), torch.stack([torch.zeros_like(rows), rows, cols]) + start,
                           torch.arange(start + 8, start + 8 + len(ids) - start - 32).expand(3, -1)], dim=1)[:, None]
    tokens = []
    with torch.inference_mode():
        for _ in range(new):
            visual = torch.cat([mask, torch.zeros(seq.shape[1] - len(mask), dtype=torch.bool)])[None]
            hidden = plain.model.language_model(inputs_embeds=seq, position_ids=positions, visual_pos_masks=visual,
                                                deepstack_visual_embeds=taps).last_hidden_state
            tok = int(plain.lm_head(hidden[0, -1]).argmax())
            tokens.append(tok)
            seq = torch.cat([seq, embed(torch.tensor([[tok]]))], dim=1)
            positions = torch.cat([positions, positions[:, :, -1:] + 1], dim=2)
    assert ours.tolist() == tokens


def test_attach_refuses_a_build_of_another_family_and_videos(ckpt, full_build, tmp_path):
    from evoexport.integrations.hf_llava import attach
    from tests.models.test_qwen2_5_vl import make_qwen_checkpoint
    other = build("qwen2.5-vl-tiny", 1.0, checkpoint=str(make_qwen_checkpoint(tmp_path / "q25")),
                  out=tmp_path / "q25-build", progress=Progress(enabled=False), validate=False)
    with pytest.raises(EvoExportError, match="needs a qwen3-vl build"):
        attach(_model(ckpt), other.path, verify_weights=False)
    model = attach(_model(ckpt), full_build.path)
    with pytest.raises(EvoExportError, match="videos are not supported"):
        model.model.get_video_features(torch.zeros(1), torch.tensor([[2, 16, 16]]))


def test_cpp_runtime_writes_every_tap_bit_for_bit(half_build, tmp_path):
    """The manifest alone drives the C++ runtime through the carried taps: every output,
    the three taps included, equals the Python openvino backend's exactly."""
    import subprocess
    from tests.helpers import ROOT as root
    done = subprocess.run([str(root / "scripts" / "build-cpp-runtime")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run([done.stdout.strip().splitlines()[-1], str(half_build.path), "--input", str(tmp_path / "x.npy"),
                          "--output", str(tmp_path / "o.npz")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    ours = np.load(tmp_path / "o.npz")
    ref = evoexport.load(half_build.path, backend="openvino").arrays(x)
    assert {f"deepstack_{j}" for j in range(TAPS)} <= set(ours) and set(ours) == set(ref)
    for name in ref:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)


def test_int8_build_validates_its_taps(ckpt, tmp_path):
    """int8 (calibrated on photos): validation judges each tap like the features."""
    result = build("qwen3-vl-tiny", 0.5, checkpoint=str(ckpt), precision="int8", out=tmp_path / "int8",
                   progress=Progress(enabled=False))
    assert result.report["passed"]
    taps = result.report["end_to_end"]["deepstack"]
    assert [t["tensor"] for t in taps] == [f"deepstack_{j}" for j in range(TAPS)] and all(t["ok"] for t in taps)


def test_triton_serves_the_taps_as_the_library_gives_them(half_build, tmp_path):
    """A real Triton server (the pytriton wheel's, Python backend) on the build's repository:
    each DeepStack tap is an output of the ensemble, equal to the library's."""
    http = pytest.importorskip("tritonclient.http")
    from evoexport.serve.repository import write_repository
    from evoexport.serve.triton import TritonServer

    repo = write_repository(half_build.path, tmp_path / "repo", flavour="python", max_batch=2)
    x = np.random.default_rng(1).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    ref = evoexport.load(half_build.path).arrays(x)
    server = TritonServer(repo.path, startup_timeout=120, exit_timeout=5).start()
    try:
        client = http.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=120)
        inp = http.InferInput("pixel_values", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        result = client.infer("evoexport", [inp])
        for j in range(TAPS):
            np.testing.assert_allclose(result.as_numpy(f"deepstack_{j}"), ref[f"deepstack_{j}"], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(result.as_numpy("indices"), ref["indices"])
    finally:
        server.stop()


@pytest.mark.parametrize("flags, message", [
    (["--temporal", "4:0.25"], "not supported with DeepStack taps"),
    (["--video"], "qwen3-vl video builds are not supported yet"),
    (["--image-size", "100"], "multiple of 32"),
])
def test_what_qwen3_builds_do_not_take_gets_one_error_line(flags, message, tmp_path):
    from tests.helpers import assert_one_error_line, cli
    code, err, _ = cli("build", "--model", "qwen3-vl-tiny", "--keep", "0.5", *flags, "--out", tmp_path / "b")
    assert_one_error_line(code, err, message)
    assert not (tmp_path / "b").exists()


def test_the_torch_chain_in_the_compare_form_carries_the_taps_too(half_build):
    """The GPU chain's other selection form (no TopK) keeps its carried taps: same taps."""
    x = np.random.default_rng(2).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    ref = evoexport.load(half_build.path, backend="torch")(x)
    out = evoexport.load(half_build.path, backend="torch", selection_form="compare")(x)
    assert len(out.deepstack) == TAPS
    for got, want in zip(out.deepstack, ref.deepstack):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=0)
