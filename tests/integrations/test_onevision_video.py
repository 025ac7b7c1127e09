"""LLaVA-OneVision videos through attach(): a frame becomes its dense map, then transformers'
own 2x2 pooling and newline (integrations/hf_onevision_video.py). keep 1.0 equals
transformers token for token; a temporal build feeds the same layout from its owner map."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evoexport import names
from evoexport.errors import EvoExportError
from evoexport.export.build import build
from evoexport.inputs.video import sample_clip, video_pixels
from evoexport.integrations.hf_llava import attach
from evoexport.measure.random_vlm import make_onevision_vlm
from evoexport.progress import Progress

FRAMES = 8
QUIET = Progress(enabled=False)


@pytest.fixture(scope="module")
def onevision_video(tmp_path_factory):
    root = tmp_path_factory.mktemp("onevision-video")
    ckpt = make_onevision_vlm(root / "onevision-vlm")
    builds = {name: build("llava-onevision", 0.5 if name != "keep1" else 1.0, checkpoint=str(ckpt),
                          out=root / name, validate=False, progress=QUIET, **options).path
              for name, options in (("keep1", {}), ("per_frame", {}), ("temporal", {"temporal": "4:0.25"}))}
    return ckpt, builds


def _model(ckpt):
    from transformers import LlavaOnevisionForConditionalGeneration
    return LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt).eval()


def _inputs(model, build_dir):
    """A real clip's frames as the build preprocesses them, and a prompt with transformers'
    count of video tokens (each frame pooled to ceil(g/2)^2, one newline)."""
    from evoexport.manifest import read_manifest

    m = read_manifest(build_dir, verify=False)
    frames = video_pixels(sample_clip("carphone_pristine"), FRAMES, m.image_size, m.preprocess)[0]
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    count = FRAMES * ((g + 1) // 2) ** 2 + 1
    ids = torch.tensor([[1, 5, *[model.config.video_token_id] * count, 17, 42, 9]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values_videos": torch.from_numpy(frames)[None]}


def _greedy(model, **inputs):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]


def test_keep_1_video_generate_equals_transformers_token_for_token(onevision_video):
    ckpt, builds = onevision_video
    model = _model(ckpt)
    inputs = _inputs(model, builds["keep1"])
    expected = _greedy(model, **inputs)
    assert torch.equal(_greedy(attach(_model(ckpt), builds["keep1"]), **inputs), expected)


@pytest.mark.parametrize("which", ["per_frame", "temporal"])
def test_a_pruned_video_is_the_pooled_dense_map_of_the_builds_tokens(onevision_video, which):
    """The video features equal transformers' pooling of the dense map made by hand from the
    build's own outputs (owners, or the merges), and generate() runs on them."""
    import evoexport

    ckpt, builds = onevision_video
    model = attach(_model(ckpt), builds[which])
    inputs = _inputs(model, builds[which])
    got = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
    x = inputs["pixel_values_videos"][0].numpy()
    with evoexport.load(builds[which]) as runner:
        m = runner.manifest
        if which == "temporal":
            out = runner.arrays(x.reshape(-1, m.group, *x.shape[1:]))
            owners = out[names.OWNERS].reshape(-1, m.group * m.num_patches)
            dense = np.stack([f[o] for f, o in zip(out[names.FEATURES], owners)]).reshape(FRAMES, m.num_patches, -1)
        else:
            out = runner.arrays(x)
            owner = out[names.merge(1)][np.arange(FRAMES)[:, None], out[names.merge(0)]]
            dense = np.stack([f[o] for f, o in zip(out[names.FEATURES], owner)])
    ref = _model(ckpt).model
    with torch.inference_mode():
        pooled = ref.apply_pooling(torch.from_numpy(dense)).reshape(1, -1, dense.shape[-1])
        want = torch.cat([pooled, ref.image_newline[None, None]], dim=1)
    assert m.prune_points == 2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert len(_greedy(model, **inputs)) == 8


def test_a_temporal_build_refuses_images_and_a_video_that_does_not_fill_its_groups(onevision_video):
    ckpt, builds = onevision_video
    model = attach(_model(ckpt), builds["temporal"])
    inputs = _inputs(model, builds["temporal"])
    with pytest.raises(EvoExportError, match="multiple of 4"):
        model.model.get_video_features(inputs["pixel_values_videos"][:, :6])
    with pytest.raises(EvoExportError, match="takes videos"):
        model.model.get_image_features(torch.zeros(1, 3, 56, 56), torch.tensor([[56, 56]]))
