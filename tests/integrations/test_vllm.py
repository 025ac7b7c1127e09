"""vLLM with a build as its vision encoder, offline (`vllm.LLM`): the evoexport plugin
(integrations/vllm) on vLLM's CPU build, in its own environment (scripts/setup-env --vllm),
on tiny checkpoints with tokenizers made here. Greedy tokens are compared with vLLM's own
pipeline and transformers at keep 1.0, and with attach() + transformers' generate() at keep
0.5. The server's tests are in test_vllm_server.py."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.integrations.conftest import drive, generate

LLAVA_PROMPT = "USER: <image>\nwhat is in the image? ASSISTANT:"
QWEN_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is in the image?<|im_end|>\n"
               "<|im_start|>assistant\n")


def llava_transformers(ckpt: Path, build_dir: Path, photo: Path) -> dict:
    """transformers' own generate() and attach() + generate() on the build, same prompt and image."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

    from evoexport.integrations.hf_llava import attach, shrink_image_tokens
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    pixels = CLIPImageProcessor.from_pretrained(ckpt)(images=[Image.open(photo)], return_tensors="pt")["pixel_values"]
    model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    ids = tokenizer(LLAVA_PROMPT.replace("<image>", "<image>" * 16), return_tensors="pt").input_ids
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    out = {"transformers": generate(model, **inputs)}
    attach(model, build_dir)
    small = shrink_image_tokens(inputs, model)
    return {**out, "attach": generate(model, **small), "attach_prompt_tokens": small["input_ids"].shape[1],
            "text_tokens": ids.shape[1] - 16}


def qwen_transformers(ckpt: Path, build_dir: Path, photo: Path, model_class=None, blind=None) -> dict:
    """Greedy tokens of transformers' own Qwen model (Qwen2.5-VL unless `model_class`), then of
    attach() at the build; `blind(model)`, if given, also answers with a changed copy."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    from evoexport.integrations.hf_llava import attach, shrink_image_tokens
    model_class = model_class or Qwen2_5_VLForConditionalGeneration
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    px = Qwen2VLImageProcessor.from_pretrained(ckpt)(images=[Image.open(photo)], return_tensors="pt")
    model = model_class.from_pretrained(ckpt).eval()
    n = int(px["image_grid_thw"].prod()) // 4
    ids = tokenizer(QWEN_PROMPT.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt").input_ids
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": px["pixel_values"],
              "image_grid_thw": px["image_grid_thw"], "mm_token_type_ids": (ids == model.config.image_token_id).long()}
    out = {"transformers": generate(model, **inputs)}
    if blind is not None:
        out["blind"] = generate(blind(model_class.from_pretrained(ckpt).eval()), **inputs)
    attach(model, build_dir)
    small = shrink_image_tokens(inputs, model)
    return {**out, "attach": generate(model, **small), "attach_prompt_tokens": small["input_ids"].shape[1],
            "text_tokens": ids.shape[1] - n}


def test_llava_plugin_equals_vllm_transformers_and_attach(vllm_python, llava, tmp_path):
    ckpt, builds, photo = llava
    ref = llava_transformers(ckpt, builds[0.5], photo)
    got = drive(vllm_python, tmp_path, ckpt,
                 [{"name": "stock"}, {"name": "keep1", "build": str(builds[1.0])},
                  {"name": "keep0.5", "build": str(builds[0.5])},
                  {"name": "stock+embeds", "embeds_build": str(builds[0.5])}],
                 [{"prompt": LLAVA_PROMPT, "images": [str(photo)]}])
    assert got["stock"][0]["tokens"] == ref["transformers"]
    assert got["keep1"][0]["tokens"] == ref["transformers"]
    assert got["keep0.5"][0]["tokens"] == ref["attach"]
    assert got["keep0.5"][0]["prompt_tokens"] == ref["attach_prompt_tokens"] == ref["text_tokens"] + 8
    # without the plugin: the build's features as stock vLLM's image_embeds
    assert got["stock+embeds"][0] == got["keep0.5"][0]


def _check_qwen_plugin(vllm_python, tmp_path, ckpt, builds, photo, ref: dict) -> None:
    """Stock vLLM and the plugin at keep 1.0 answer as transformers; at keep 0.5 as attach(),
    with 32 of the 64 units' placeholders."""
    got = drive(vllm_python, tmp_path, ckpt,
                 [{"name": "stock"}, {"name": "keep1", "build": str(builds[1.0])},
                  {"name": "keep0.5", "build": str(builds[0.5])}],
                 [{"prompt": QWEN_PROMPT, "images": [str(photo)]}])
    assert got["stock"][0]["tokens"] == ref["transformers"]
    assert got["keep1"][0]["tokens"] == ref["transformers"]
    assert got["keep0.5"][0]["tokens"] == ref["attach"]
    assert got["keep0.5"][0]["prompt_tokens"] == ref["attach_prompt_tokens"] == ref["text_tokens"] + 32


def test_qwen_plugin_keeps_the_kept_units_mrope_positions(vllm_python, qwen, tmp_path):
    """keep 0.5 equals attach(), whose positions put each kept unit at its own (row, col):
    a dense grid of 32 would give other tokens (checked below), so equality checks them."""
    ckpt, builds, photo = qwen
    _check_qwen_plugin(vllm_python, tmp_path, ckpt, builds, photo, qwen_transformers(ckpt, builds[0.5], photo))


def qwen_transformers_images(ckpt: Path, build_dir: Path, photos: list[Path]) -> dict:
    """transformers' own generate() and attach() + generate() on one prompt of several images,
    each at the processor's own grid for it."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    from evoexport.integrations.hf_llava import attach, shrink_image_tokens
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    px = Qwen2VLImageProcessor.from_pretrained(ckpt)(images=[Image.open(p) for p in photos], return_tensors="pt")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt).eval()
    counts = [int(row.prod()) // 4 for row in px["image_grid_thw"]]
    prompt = QWEN_IMAGES_PROMPT
    for n in counts:
        prompt = prompt.replace("<|image_pad|>", "<|IMAGE|>" * n, 1)
    ids = tokenizer(prompt.replace("<|IMAGE|>", "<|image_pad|>"), return_tensors="pt").input_ids
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": px["pixel_values"],
              "image_grid_thw": px["image_grid_thw"], "mm_token_type_ids": (ids == model.config.image_token_id).long()}
    out = {"transformers": generate(model, **inputs), "grids": px["image_grid_thw"].tolist()}
    attach(model, build_dir)
    small = shrink_image_tokens(inputs, model)
    return {**out, "attach": generate(model, **small), "attach_prompt_tokens": small["input_ids"].shape[1],
            "text_tokens": ids.shape[1] - sum(counts)}


QWEN_IMAGES_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|>"
                      "<|vision_end|>what is in the images?<|im_end|>\n<|im_start|>assistant\n")


def test_qwen_plugin_runs_each_image_at_its_own_grid_of_a_bucketed_build(vllm_python, qwen_buckets, tmp_path):
    """Aspect-ratio buckets: a 168x252 photo at its processor grid (6x9) and a square one
    (8x8) in one prompt. keep 1.0 equals stock vLLM and transformers (no stretching); keep
    0.5 equals attach() on the same bucketed build, with each image's own K (27 and 32)."""
    ckpt, builds, photos = qwen_buckets
    ref = qwen_transformers_images(ckpt, builds[0.5], photos)
    assert ref["grids"] == [[1, 12, 18], [1, 16, 16]]
    got = drive(vllm_python, tmp_path, ckpt,
                [{"name": "stock"}, {"name": "keep1", "build": str(builds[1.0])},
                 {"name": "keep0.5", "build": str(builds[0.5])}],
                [{"prompt": QWEN_IMAGES_PROMPT, "images": [str(p) for p in photos]}])
    assert got["stock"][0]["tokens"] == got["keep1"][0]["tokens"] == ref["transformers"]
    assert got["keep0.5"][0]["tokens"] == ref["attach"]
    assert got["keep0.5"][0]["prompt_tokens"] == ref["attach_prompt_tokens"] == ref["text_tokens"] + 27 + 32


def _without_taps(model):
    """The same Qwen3-VL model with every DeepStack tap zero."""
    with torch.no_grad():
        for merger in model.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.zero_()
            merger.linear_fc2.bias.zero_()
    return model


def test_qwen3_plugin_feeds_the_deepstack_taps_and_kept_positions(vllm_python, qwen3, tmp_path):
    """Qwen3-VL: keep 1.0 equals stock vLLM and transformers (the taps reach vLLM's own
    DeepStack path); keep 0.5 equals attach() (K features, K rows of each tap, kept units'
    positions)."""
    from transformers import Qwen3VLForConditionalGeneration
    ckpt, builds, photo = qwen3
    ref = qwen_transformers(ckpt, builds[0.5], photo, Qwen3VLForConditionalGeneration, blind=_without_taps)
    assert ref["blind"] != ref["transformers"]     # the taps change the answer: equality checks them
    _check_qwen_plugin(vllm_python, tmp_path, ckpt, builds, photo, ref)


def test_onevision_plugin_packs_tiles_as_attach_does(onevision_answers):
    """Two images of other tilings: keep 1.0 equals stock vLLM and transformers; keep 0.5
    equals attach() (kept tile tokens at their places on the unpadded grid, newlines),
    with the packed length as its placeholder count."""
    for stem, answers in onevision_answers.items():
        got, ref = answers["vllm"], answers["ref"]
        assert got["stock"]["tokens"] == got["keep1"]["tokens"] == ref["transformers"], stem
        assert got["stock"]["prompt_tokens"] == got["keep1"]["prompt_tokens"] == ref["full_prompt_tokens"], stem
        assert got["keep0.5"]["tokens"] == ref["attach"], stem
        assert got["keep0.5"]["prompt_tokens"] == ref["attach_prompt_tokens"] < ref["full_prompt_tokens"], stem


ONEVISION_VIDEO_PROMPT = "<|im_start|>user\n<video>\nwhat happens?<|im_end|>\n<|im_start|>assistant\n"


def onevision_video_transformers(ckpt: Path, builds: dict, pixels: Path) -> dict:
    """Greedy tokens of transformers' own LLaVA-OneVision on the video pixels vLLM's processor
    made, then of attach() at each build (dense maps, transformers' pooling and newline)."""
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    from evoexport.integrations.hf_llava import attach
    video = torch.from_numpy(np.load(pixels)["pixel_values_videos"]).float()
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt).eval()
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    n = video.shape[1] * ((g + 1) // 2) ** 2 + 1
    ids = AutoTokenizer.from_pretrained(ckpt)(ONEVISION_VIDEO_PROMPT.replace("<video>", "<video>" * n),
                                              return_tensors="pt").input_ids
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": video}
    out = {"transformers": _answer(model, inputs), "prompt_tokens": ids.shape[1]}
    for name, build_dir in builds.items():
        out[name] = _answer(attach(LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt).eval(), build_dir),
                            inputs)
    return out


def _answer(model, inputs) -> dict:
    """Greedy tokens and the first token's log probabilities (over the vocabulary)."""
    with torch.inference_mode():
        logits = model(**inputs).logits[0, -1]
    return {"tokens": generate(model, **inputs), "logprobs": torch.log_softmax(logits.float(), -1)}


def _same_answer(got: dict, want: dict) -> bool:
    """vLLM's answer equals transformers': the same tokens, and the first token's top log
    probabilities within 1e-3 (the video's features reach the logits, not only the argmax)."""
    return got["tokens"] == want["tokens"] and all(
        abs(p - float(want["logprobs"][int(t)])) < 1e-3 for t, p in got["first_logprobs"].items())


def test_onevision_plugin_takes_videos_as_attach_does(vllm_python, onevision, tmp_path):
    """8 frames of a real clip (carphone): keep 1.0 equals stock vLLM and transformers; a
    per-frame keep-0.5 build and a temporal build (groups of 4, later frames keep 0.25)
    equal attach(), each frame's dense map pooled by the engine, the prompt as long as
    stock's. Equal means the same greedy tokens and the first token's top-5 log
    probabilities within 1e-3, which differ between the builds (the tiny model's tokens
    alone do not tell them apart)."""
    from evoexport.export.build import build
    from evoexport.inputs.video import sample_clip
    from evoexport.progress import Progress
    import av
    ckpt, builds, _ = onevision
    temporal = build("llava-onevision", 0.5, checkpoint=str(ckpt), out=tmp_path / "temporal", validate=False,
                     temporal="4:0.25", progress=Progress(enabled=False)).path
    with av.open(str(sample_clip("carphone_pristine"))) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for _, f in zip(range(8), container.decode(video=0))])
    np.save(tmp_path / "carphone8.npy", frames)
    got = drive(vllm_python, tmp_path, ckpt,
                [{"name": "stock"}, {"name": "keep1", "build": str(builds[1.0])},
                 {"name": "keep0.5", "build": str(builds[0.5])}, {"name": "temporal", "build": str(temporal)}],
                [{"prompt": ONEVISION_VIDEO_PROMPT, "video": {"frames": str(tmp_path / "carphone8.npy"), "fps": 25.0}}],
                pixels_dir=str(tmp_path), logprobs=5)
    ref = onevision_video_transformers(ckpt, {"keep0.5": builds[0.5], "temporal": temporal},
                                       tmp_path / "carphone8.npz")
    for run, want in (("stock", "transformers"), ("keep1", "transformers"), ("keep0.5", "keep0.5"),
                      ("temporal", "temporal")):
        assert _same_answer(got[run][0], ref[want]), run
    for pruned in ("keep0.5", "temporal"):      # the check can tell the builds apart
        assert not _same_answer(got[pruned][0], ref["transformers"]), pruned
    assert {run[0]["prompt_tokens"] for run in got.values()} == {ref["prompt_tokens"]}


def test_positions_match_transformers_side():
    """positions.py and hf_qwen2_5_vl.pruned_rope_index agree on a prompt of two images."""
    from evoexport.integrations.hf_qwen2_5_vl import pruned_rope_index
    from evoexport.integrations.vllm.positions import pruned_mrope_positions
    rng = np.random.default_rng(0)
    kept = [np.sort(rng.choice(64, 20, replace=False)) for _ in range(2)]
    types = [0] * 5 + [1] * 20 + [0] * 3 + [1] * 20 + [0] * 4
    ids = torch.zeros(1, len(types), dtype=torch.long)
    from evoexport.names import Grid
    ref, ref_delta = pruned_rope_index(ids, torch.tensor([types]), [(torch.from_numpy(k), Grid(8, 8)) for k in kept])
    ours, delta = pruned_mrope_positions(len(types), [(28, kept[1], 8), (5, kept[0], 8)])
    assert np.array_equal(ours, ref[:, 0].numpy()) and delta == int(ref_delta)


QWEN_VIDEO_PROMPT = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>what happens?<|im_end|>\n"
                     "<|im_start|>assistant\n")


def qwen_video_transformers(ckpt: Path, build_dir: Path, pixels: Path) -> dict:
    """Greedy tokens of transformers' own Qwen2.5-VL on the video pixels vLLM's processor made,
    then of attach() at the video build (each temporal patch's K units, shrink_image_tokens)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from evoexport.integrations.hf_qwen2_5_vl import attach, shrink_image_tokens
    from transformers import AutoTokenizer
    video = {k: torch.from_numpy(v) for k, v in np.load(pixels).items()}
    video["pixel_values_videos"] = video["pixel_values_videos"].float()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt).eval()
    n = int(video["video_grid_thw"].prod()) // 4
    ids = AutoTokenizer.from_pretrained(ckpt)(QWEN_VIDEO_PROMPT.replace("<|video_pad|>", "<|video_pad|>" * n),
                                              return_tensors="pt").input_ids
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **video,
              "mm_token_type_ids": 2 * (ids == model.config.video_token_id).long()}
    out = {"transformers": generate(model, **inputs), "full_prompt_tokens": ids.shape[1]}
    attach(model, build_dir)
    small = shrink_image_tokens(inputs, model)
    with torch.inference_mode():
        logits = model(**small).logits[0, -1]
    return {**out, "attach": generate(model, **small), "attach_prompt_tokens": small["input_ids"].shape[1],
            "attach_logprobs": torch.log_softmax(logits.float(), -1)}


def test_qwen_plugin_takes_videos_of_a_video_build(vllm_python, qwen_video_builds, tmp_path):
    """A real clip's frames (bikes, 4 frames at 272x640, resized by the plugin to the build's
    224x224) through vLLM: the plugin at keep 1.0 answers as transformers on the same pixels,
    at keep 0.5 as attach() (each temporal patch keeps 32 of 64 units, at vLLM's time
    positions), and the two answers differ (the tiny model does read the video). Stock vLLM
    would give 272x640 frames another grid, so it is compared on the frames at 224x224."""
    from evoexport.inputs.video import sample_clip
    import av
    ckpt, builds = qwen_video_builds
    with av.open(str(sample_clip("bikes"))) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for _, f in zip(range(4), container.decode(video=0))])
    np.save(tmp_path / "bikes4.npy", frames)
    np.save(tmp_path / "square.npy", np.stack([np.asarray(Image.fromarray(f).resize((224, 224))) for f in frames]))
    videos = [{"frames": str(tmp_path / f"{name}.npy"), "fps": 2.0, "size": [224, 224]} for name in ("bikes4", "square")]
    got = drive(vllm_python, tmp_path, ckpt,
                [{"name": "stock"}, {"name": "keep1", "build": str(builds[1.0])},
                 {"name": "keep0.5", "build": str(builds[0.5])}],
                [{"prompt": QWEN_VIDEO_PROMPT, "video": v} for v in videos], pixels_dir=str(tmp_path))
    assert got["stock"][1] == got["keep1"][1]
    ref = qwen_video_transformers(ckpt, builds[0.5], tmp_path / "bikes4.npz")
    assert got["keep1"][0]["tokens"] == ref["transformers"]
    assert got["keep1"][0]["prompt_tokens"] == ref["full_prompt_tokens"]
    assert got["keep0.5"][0]["tokens"] == ref["attach"] != ref["transformers"]
    assert got["keep0.5"][0]["prompt_tokens"] == ref["attach_prompt_tokens"] == ref["full_prompt_tokens"] - 2 * 32


def test_qwen_plugin_takes_videos_of_a_temporal_video_build(vllm_python, qwen_video_builds, tmp_path):
    """A temporal video build (groups of 2 temporal patches; anchors keep 32 units, later
    patches 16) through vLLM: 4 frames of bikes answer as attach() does (greedy tokens and
    the first token's top-5 log probabilities within 1e-3), with 32 + 48 fewer prompt
    tokens than the unpruned video; 6 frames (3 patches) do not fill the groups and are
    refused as a client error."""
    from evoexport.export.build import build
    from evoexport.inputs.video import sample_clip
    from evoexport.progress import Progress
    import av
    ckpt, _ = qwen_video_builds
    temporal = build("qwen2.5-vl", 0.5, checkpoint=str(ckpt), out=tmp_path / "temporal", validate=False,
                     image_size=224, video=True, temporal="2:0.25", progress=Progress(enabled=False))
    ka, kl = temporal.manifest.tokens_per_image, temporal.manifest.temporal["schedule"][-1]["tokens"]
    with av.open(str(sample_clip("bikes"))) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for _, f in zip(range(6), container.decode(video=0))])
    for n in (4, 6):
        np.save(tmp_path / f"bikes{n}.npy", frames[:n])
    video = lambda n: {"frames": str(tmp_path / f"bikes{n}.npy"), "fps": 2.0, "size": [224, 224]}  # noqa: E731
    got = drive(vllm_python, tmp_path, ckpt, [{"name": "temporal", "build": str(temporal.path)}],
                [{"prompt": QWEN_VIDEO_PROMPT, "video": video(4)},
                 {"prompt": QWEN_VIDEO_PROMPT, "video": video(6), "error": True}],
                pixels_dir=str(tmp_path), logprobs=5)["temporal"]
    ref = qwen_video_transformers(ckpt, temporal.path, tmp_path / "bikes4.npz")
    assert _same_answer(got[0], {"tokens": ref["attach"], "logprobs": ref["attach_logprobs"]})
    assert got[0]["prompt_tokens"] == ref["attach_prompt_tokens"] == ref["full_prompt_tokens"] - (64 - ka) - (64 - kl)
    assert "does not fill groups of 2" in got[1]["error"]


def test_video_positions_are_vllms_own_at_keep_1():
    """Every unit kept: positions.py gives vLLM's own video positions (its dense rule written
    out from vllm/model_executor/models/qwen2_5_vl.py), times scaled by tokens_per_second x
    second_per_grid_t and text resuming after the last time where that is beyond the grid;
    and a pruned video keeps its kept units' own positions."""
    from evoexport.integrations.vllm.positions import pruned_mrope_positions
    t, rows, cols, factor, text, tail = 4, 3, 5, 4.0, 6, 3
    times = (np.arange(t) * factor).astype(np.int64)
    grid = np.indices((t, rows, cols)).reshape(3, -1)
    grid[0] = (grid[0] * factor).astype(np.int64)
    want = np.concatenate([np.broadcast_to(np.arange(text), (3, text)), grid + text,
                           np.broadcast_to(np.arange(tail), (3, tail)) + grid.max() + text + 1], axis=1)
    n = text + t * rows * cols + tail
    ours, delta = pruned_mrope_positions(n, [(text, np.tile(np.arange(rows * cols), t), (rows, cols),
                                              np.repeat(times, rows * cols))])
    assert np.array_equal(ours, want) and delta == int(want.max()) + 1 - n
    kept = np.sort(np.random.default_rng(0).choice(rows * cols, (t, 7)), axis=1)
    pruned, _ = pruned_mrope_positions(text + t * 7 + tail, [(text, kept, (rows, cols), np.repeat(times, 7))])
    dense_of_kept = want[:, text:text + t * rows * cols].reshape(3, t, rows * cols)
    assert np.array_equal(pruned[:, text:text + t * 7],
                          np.take_along_axis(dense_of_kept, kept[None].repeat(3, 0), axis=2).reshape(3, -1))
    assert np.array_equal(pruned[:, -tail:], want[:, -tail:])      # text resumes where the unpruned prompt does


def test_the_weight_check_hashes_the_tower_in_fp32_under_vllms_default_dtype(qwen):
    """vLLM builds its model with the engine's dtype as torch's default (bf16 for a bf16
    checkpoint); the plugin's weight check must still hash the tower as the build did."""
    from types import SimpleNamespace

    from evoexport.integrations.vllm import BUILD_KEY
    from evoexport.integrations.vllm.common import check_weights
    ckpt, builds, _ = qwen
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        check_weights(SimpleNamespace(**{BUILD_KEY: str(builds[0.5])}), str(ckpt))
        assert torch.get_default_dtype() == torch.bfloat16
    finally:
        torch.set_default_dtype(previous)


def test_image_embeds_part_for_a_stock_server():
    from evoexport.errors import EvoExportError
    from evoexport.integrations.vllm import image_embeds_part
    part = image_embeds_part(np.ones((8, 16), np.float32))
    tensor = torch.load(io.BytesIO(base64.b64decode(part["image_embeds"])), weights_only=True)
    assert part["type"] == "image_embeds" and tensor.shape == (1, 8, 16)
    with pytest.raises(EvoExportError, match="one image's features"):
        image_embeds_part(np.ones((2, 8, 16), np.float32))
