"""What Qwen's image processor does that a build must do too, shared by both Qwen families:
its recipe at a build's fixed size (in place of smart_resize), the sizes a build may take,
and the processor's patch layout (Qwen2VLImageProcessor's flattened patches)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import EvoExportError, OptionError
from ..inputs.images import recipe_from_processor_config
from ..names import plain_size, size_hw, valid_size
from .registry import Preset

# Qwen2VLImageProcessor's normalization (OpenAI CLIP's mean and std), bicubic resampling.
# Its smart_resize keeps each image's aspect ratio and so changes the grid per image; a
# build has one grid, so every image is resized to the build's S x S (the manifest's
# `resize` says so, and `aspect` says that the aspect ratio is not kept).
# The reference checkpoint's own preprocessor_config.json, as data: Qwen/Qwen2.5-VL-7B-Instruct.
QWEN_PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 0.00392156862745098,
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
}


def qwen_recipe(size, raw: dict = QWEN_PROCESSOR, source: str = "Qwen/Qwen2.5-VL-7B-Instruct") -> dict:
    """The processor's recipe (the shared reader of preprocessor_config.json) at the build's
    fixed size (S, or height x width) in place of smart_resize."""
    height, width = size_hw(size)
    recipe = recipe_from_processor_config({**raw, "size": {"height": height, "width": width},
                                           "do_center_crop": False}, source)
    return {**recipe, "source": source, "min_pixels": min_pixels_of(raw),
            "aspect": "stretched: every image is resized to the build's size (the processor's smart_resize "
                      "would keep its aspect ratio and give it another grid)"}


def flatten_patches(pixel_values: torch.Tensor, patch: int, merge: int, temporal: int):
    """Images [B, 3, H, W] as Qwen2VLImageProcessor lays them out for the encoder: each still
    image repeated `temporal` times, patches of a merge unit contiguous. Temporal patches
    [B, 3 * temporal, H, W] (a video build's input: frames stacked on the channel axis) as
    Qwen2VLVideoProcessor lays them out, each one a video of one temporal patch (the encoder
    attends within a temporal patch, so a clip's patches may go one by one). Returns
    (patches [B * h * w, 3 * temporal * patch * patch], grid_thw [B, 3])."""
    b, c, hh, ww = pixel_values.shape
    gh, gw = hh // patch, ww // patch
    if c == 3 * temporal:
        c = 3
        x = pixel_values.reshape(b, temporal, c, hh, ww)
    else:
        x = pixel_values.unsqueeze(1).expand(b, temporal, c, hh, ww)
    x = x.reshape(b, 1, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    patches = x.reshape(b * gh * gw, c * temporal * patch * patch)
    return patches, torch.tensor([[1, gh, gw]] * b)


def checked_size(image_size, preset: Preset, unit_px: int, what: str):
    """The build's input size: an int (a square) or (height, width), each side a whole number
    of merge units (`what` says what a unit is)."""
    size = image_size or preset.input_size
    if not valid_size(size, unit_px):
        shown = "x".join(map(str, size)) if isinstance(size, (list, tuple)) else size
        raise OptionError("image_size", f"for {preset.name} must be a multiple of {unit_px} ({what}), "
                                        f"e.g. {8 * unit_px} or {12 * unit_px}; got {shown}")
    return plain_size(*size_hw(size))


def recipe_from_checkpoint(ckpt: Path, size: int, default: dict, source: str) -> dict:
    """The checkpoint's own preprocessor_config.json at the build's size, else `default`'s."""
    from ..files import read_json
    path = ckpt / "preprocessor_config.json"
    if not path.is_file():
        return qwen_recipe(size, default, source)
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise EvoExportError(f"{path} is not a JSON object")
    return qwen_recipe(size, raw, str(path))


# -- aspect-ratio buckets (docs/qwen.md): a build holds several grids; an image goes to the
# one its processor grid is, else to the nearest aspect ratio --

# camera and screen ratios (width:height), chosen before looking at any photo; `--grids auto`
# holds the processor's own grid of each at the build's pixel budget
CAMERA_RATIOS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16))


def processor_hw(height: int, width: int, unit_px: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) in pixels that Qwen's processor resizes an image to: its own smart_resize."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    if max(height, width) > 200 * min(height, width):
        raise EvoExportError(f"a {width}x{height} image has an aspect ratio beyond 200:1, which Qwen's processor "
                             "refuses; crop it first")
    return smart_resize(height, width, factor=unit_px, min_pixels=min_pixels, max_pixels=max_pixels)


def camera_grids(unit_px: int, min_pixels: int, max_pixels: int) -> list[tuple[int, int]]:
    """The processor's grids (rows, cols in merge units) of CAMERA_RATIOS at the budget, distinct."""
    grids = []
    for w, h in CAMERA_RATIOS:
        rh, rw = processor_hw(1000 * h, 1000 * w, unit_px, min_pixels, max_pixels)
        if (rh // unit_px, rw // unit_px) not in grids:
            grids.append((rh // unit_px, rw // unit_px))
    return grids


def min_pixels_of(raw: dict) -> int:
    """The processor config's lower pixel limit (Qwen2.5-VL: min_pixels; Qwen3-VL: size.shortest_edge)."""
    size = raw.get("size") if isinstance(raw.get("size"), dict) else {}
    value = raw.get("min_pixels", size.get("shortest_edge", 56 * 56))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvoExportError(f"the processor's min_pixels {value!r} is not a positive integer")
    return value


def aspect_change(ratio_from: float, ratio_to: float) -> float:
    """How much an aspect ratio moves, as a factor minus one (0.10: stretched by 10%)."""
    return math.exp(abs(math.log(ratio_to / ratio_from))) - 1


def choose_bucket(height: int, width: int, sizes: list[tuple[int, int]], unit_px: int, min_pixels: int,
                  max_pixels: int) -> tuple[int, float, bool]:
    """(index into `sizes`, aspect change, exact) for an image of height x width: the bucket
    of the processor's own size for it (exact: no change at all), else the one of the
    nearest aspect ratio."""
    own = processor_hw(height, width, unit_px, min_pixels, max_pixels)
    if tuple(own) in sizes:
        return sizes.index(tuple(own)), 0.0, True
    ratio = width / height
    best = min(range(len(sizes)), key=lambda i: (abs(math.log(sizes[i][1] / sizes[i][0] / ratio)), i))
    return best, aspect_change(ratio, sizes[best][1] / sizes[best][0]), False
