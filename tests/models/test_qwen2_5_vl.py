"""Qwen2.5-VL: the encoder pruned in 2x2 merge units, against transformers' own model, and
its language model fed through attach() (tiny random checkpoints saved here; no hub)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import evoexport
from evoexport.cli import main
from evoexport.errors import EvoExportError
from evoexport.export.build import build
from evoexport.models import load_tower
from evoexport.progress import Progress
from tests.helpers import split_vision_and_language

SIZE = 224        # 16x16 patches, 8x8 merge units, 2x2 windows of 4x4 units
IMAGE_PAD, VISION_START, VISION_END = 290, 291, 292


def make_qwen_checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny Qwen2_5_VLForConditionalGeneration saved by transformers, re-sharded so the
    language model's tensors sit in their own file."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=8, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=96,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[3, 7]),
        text_config=dict(vocab_size=300, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 7]}),
        image_token_id=IMAGE_PAD, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
        video_token_id=293)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    return split_vision_and_language(path)


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory) -> Path:
    return make_qwen_checkpoint(tmp_path_factory.mktemp("qwen") / "qwen2.5-vl-tiny-hf")


@pytest.fixture(scope="module")
def full_build(qwen_ckpt, tmp_path_factory):
    return build("qwen2.5-vl-tiny", 1.0, checkpoint=str(qwen_ckpt), out=tmp_path_factory.mktemp("b") / "full",
                 progress=Progress(enabled=False))


@pytest.fixture(scope="module")
def half_build(qwen_ckpt, tmp_path_factory):
    return build("qwen2.5-vl-tiny", 0.5, checkpoint=str(qwen_ckpt), out=tmp_path_factory.mktemp("b") / "half",
                 progress=Progress(enabled=False))


def _model(ckpt):
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt).eval()


def _photo(name="astronaut") -> Image.Image:
    import skimage.data
    return Image.fromarray(getattr(skimage.data, name)())


def _processor():
    from transformers import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=SIZE * SIZE, max_pixels=SIZE * SIZE)


def _hf_visual_features(ckpt, images) -> torch.Tensor:
    """transformers' processor + model.visual on photos resized to the build's size, as the
    manifest's recipe says (PIL bicubic to S x S)."""
    inputs = _processor()(images=[im.resize((SIZE, SIZE), Image.BICUBIC) for im in images], return_tensors="pt")
    model = _model(ckpt)
    with torch.inference_mode():
        out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    return out.reshape(len(images), -1, out.shape[-1])


def test_keep_1_run_equals_transformers_processor_and_visual(qwen_ckpt, full_build, tmp_path):
    photos = {"astronaut": _photo("astronaut"), "coffee": _photo("coffee")}
    for name in photos:
        photos[name].save(tmp_path / f"{name}.png")
    # one image through the CLI, as a user runs it
    assert main(["run", str(full_build.path), "--input", str(tmp_path / "astronaut.png"),
                 "--output", str(tmp_path / "one.npz")]) == 0
    ours = np.load(tmp_path / "one.npz")["features"]
    ref = _hf_visual_features(qwen_ckpt, [photos["astronaut"]]).numpy()
    assert ours.shape == ref.shape == (1, 64, 96)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # a batch of two through the library
    from evoexport.inputs.images import read_pixels
    manifest = full_build.manifest.data
    x = np.concatenate([read_pixels(tmp_path / f"{n}.png", full_build.manifest) for n in photos])
    batch = evoexport.load(full_build.path)(x)
    ref2 = _hf_visual_features(qwen_ckpt, list(photos.values())).numpy()
    np.testing.assert_allclose(batch.features, ref2, atol=1e-4, rtol=0)
    assert manifest["preprocess"]["resize"] == {"height": SIZE, "width": SIZE} and "aspect" in manifest["preprocess"]
    np.testing.assert_array_equal(batch.indices, np.tile(np.arange(64), (2, 1)))


def test_keep_half_builds_validates_and_keeps_sorted_units(half_build):
    m = half_build.manifest.data
    assert half_build.report["passed"]
    assert m["family"] == "qwen2.5-vl" and m["tower"]["unit"] == 2 and m["tower"]["num_patches"] == 64
    # the default schedule prunes right after the first full-attention block (3), in units
    assert m["schedule"] == [{"after_layer": 3, "tokens": 32}]
    # later stages take the kept unit indices (rotary positions, windows)
    assert [t["name"] for t in m["stages"][1]["inputs"]] == ["pruned0_hidden", "sizes_0", "indices_0"]
    assert m["stages"][0]["outputs"][0]["shape"] == ["batch", 64, 4 * 64]     # units: 4 patches x D
    from evoexport.inputs.images import sample_batch
    out = evoexport.load(half_build.path)(sample_batch(SIZE, m["preprocess"]))
    assert out.features.shape == (3, 32, 96)
    for row in out.indices:
        assert len(set(row.tolist())) == 32 and list(row) == sorted(row) and row.max() < 64


def test_keep_half_passes_the_static_tensorrt_check(half_build):
    """The window mask, the rotary gathers and the unit reshapes use only ops, types and
    constant inputs TensorRT's ONNX parser takes (static check; TensorRT itself cannot run here)."""
    from evoexport.tensorrt.check import check_build
    checked = check_build(half_build.path)
    assert checked["ok"], checked


def test_all_kept_through_the_masked_path_equals_the_window_reshape():
    """Every unit 'kept' (indices 0..U-1, sizes 1) through the pruned stages' code (block
    window mask, gathered rotary) equals the unpruned code (windows by reshape)."""
    tower = load_tower("qwen2.5-vl-tiny", quiet=True)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        hidden = tower.embed(x)
        by_reshape = tower.run_layers(hidden, 0, tower.depth, None, None, False)
        units = torch.arange(tower.num_patches).expand(2, -1)
        by_mask = tower.run_layers(hidden, 0, tower.depth, torch.zeros(2, 4 * tower.num_patches), units, False)
    torch.testing.assert_close(by_mask, by_reshape, atol=1e-5, rtol=1e-5)
    # and the mask matters: without windows (every block global) the answer differs
    tower.full_blocks = frozenset(range(tower.depth))
    with torch.inference_mode():
        all_global = tower.run_layers(hidden, 0, tower.depth, torch.zeros(2, 4 * tower.num_patches), units, False)
    assert (all_global - by_reshape).abs().max() > 1e-3


def test_checkpoint_loader_never_reads_the_language_model(qwen_ckpt, tmp_path):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(qwen_ckpt, ckpt)
    (ckpt / "language.safetensors").write_bytes(b"not a safetensors file")
    tower = load_tower("qwen2.5-vl-tiny", ckpt, quiet=True)
    saved = load_file(ckpt / "vision.safetensors")
    prefix = "model.visual." if any(k.startswith("model.visual.") for k in saved) else "visual."
    torch.testing.assert_close(tower.visual.blocks[5].attn.qkv.weight, saved[prefix + "blocks.5.attn.qkv.weight"])
    torch.testing.assert_close(tower.visual.merger.mlp[2].weight, saved[prefix + "merger.mlp.2.weight"])
    with pytest.raises(EvoExportError, match="multiple of 28"):
        load_tower("qwen2.5-vl-tiny", ckpt, quiet=True, image_size=200)


def _prompt(model, image: Image.Image):
    return qwen_prompt(_processor(), image, SIZE)


def qwen_prompt(processor, image: Image.Image, size: int) -> dict:
    """A prompt with one image, written out by hand (no tokenizer is needed): text, then
    <|vision_start|>, U <|image_pad|>, <|vision_end|>, text."""
    inputs = dict(processor(images=[image.resize((size, size), Image.BICUBIC)], return_tensors="pt"))
    units = int(inputs["image_grid_thw"].prod()) // 4
    ids = [5, 6, 7, VISION_START] + [IMAGE_PAD] * units + [VISION_END, 8, 9, 10]
    inputs["input_ids"] = torch.tensor([ids])
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == IMAGE_PAD).long()
    return inputs


def test_attach_keep_1_generates_what_transformers_generates(qwen_ckpt, full_build):
    from evoexport.integrations.hf_llava import attach, shrink_image_tokens

    ref_model = _model(qwen_ckpt)
    inputs = _prompt(ref_model, _photo())
    ref = ref_model.generate(**inputs, max_new_tokens=8, do_sample=False)
    model = attach(_model(qwen_ckpt), full_build.path)
    ours = model.generate(**shrink_image_tokens(inputs, model), max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, ref)


def test_attach_keep_half_equals_an_independent_splice_and_decode(qwen_ckpt, half_build):
    """The build's K features spliced by hand into the prompt's embeddings, with mRoPE
    positions (t, s + row, s + col) of the kept units computed here, decoded greedily
    step by step without a cache: attach() + generate() must give the same tokens."""
    from evoexport.integrations.hf_llava import attach, shrink_image_tokens
    from evoexport.integrations.hf_qwen2_5_vl import images_from_patches

    model = attach(_model(qwen_ckpt), half_build.path)
    inputs = shrink_image_tokens(_prompt(model, _photo("coffee")), model)
    ids = inputs["input_ids"][0]
    assert int((ids == IMAGE_PAD).sum()) == 32
    new = 6
    ours = model.generate(**inputs, max_new_tokens=new, do_sample=False)[0, len(ids):]

    plain = _model(qwen_ckpt)
    images = images_from_patches(inputs["pixel_values"], inputs["image_grid_thw"], 14, 2, 2)
    out = evoexport.load(half_build.path)(images.numpy())
    feats, kept = torch.from_numpy(out.features), torch.from_numpy(out.indices)[0]
    embed = plain.get_input_embeddings()
    seq = embed(ids[None]).detach().clone()
    where = (ids == IMAGE_PAD).nonzero()[:, 0]
    seq[0, where] = feats[0].to(seq.dtype)
    start = int(where[0])                       # 4 text tokens, then the image at s = 4
    text_before = torch.arange(start).expand(3, -1)
    rows, cols = kept // 8, kept % 8
    image_pos = torch.stack([torch.zeros_like(rows), rows, cols]) + start
    after = len(ids) - start - 32
    resume = start + 8                          # s + max(h, w) / 2: as the unpruned prompt
    text_after = torch.arange(resume, resume + after).expand(3, -1)
    positions = torch.cat([text_before, image_pos, text_after], dim=1)[:, None]     # [3, 1, L]
    tokens = []
    with torch.inference_mode():
        for step in range(new):
            logits = plain(inputs_embeds=seq, position_ids=positions,
                           attention_mask=torch.ones(1, seq.shape[1], dtype=torch.long)).logits[0, -1]
            if step == 0:   # the first step's logits, not just its argmax
                first = model(**inputs).logits[0, -1]
                torch.testing.assert_close(first, logits, atol=1e-5, rtol=1e-5)
            tok = int(logits.argmax())
            tokens.append(tok)
            seq = torch.cat([seq, embed(torch.tensor([[tok]]))], dim=1)
            positions = torch.cat([positions, positions[:, :, -1:] + 1], dim=2)
    assert ours.tolist() == tokens


def test_attach_refuses_an_image_of_another_grid(qwen_ckpt, half_build):
    from evoexport.integrations.hf_llava import attach
    model = attach(_model(qwen_ckpt), half_build.path)
    inputs = _processor()(images=[_photo().resize((SIZE, 336))], return_tensors="pt")
    with pytest.raises(EvoExportError, match=f"resize images to {SIZE}x{SIZE}"):
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])


def test_cpp_runtime_runs_the_qwen_build_bit_for_bit(half_build, tmp_path):
    """The manifest alone drives the C++ runtime through the extra indices input of the
    later stages: features and decisions equal the Python openvino backend's exactly."""
    import subprocess
    from tests.helpers import ROOT as root
    done = subprocess.run([str(root / "scripts" / "build-cpp-runtime")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    binary = done.stdout.strip().splitlines()[-1]
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run([binary, str(half_build.path), "--input", str(tmp_path / "x.npy"),
                          "--output", str(tmp_path / "o.npz")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    got = np.load(tmp_path / "o.npz")
    ref = evoexport.load(half_build.path, backend="openvino")(x)
    np.testing.assert_array_equal(got["features"], ref.features)
    for name, value in (("indices", ref.indices), ("merge_0", ref.merge_per_point[0]), ("picks_0", ref.picks_per_point[0])):
        assert np.array_equal(got[name], value), name
