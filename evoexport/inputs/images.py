"""Images in, pixel values out: the model's own preprocessing recipe, and real sample photos.

A recipe is what a checkpoint's `preprocessor_config.json` says, as data (docs/manifest.md):
optionally pad to a square with the mean colour (original LLaVA-1.5, `image_aspect_ratio:
pad`), resize (shortest edge, or to height x width), optionally centre-crop, rescale,
normalize. `preprocess` reproduces transformers' PIL image processors (CLIPImageProcessor,
BitImageProcessor, SiglipImageProcessor, LlavaImageProcessor, LlavaOnevisionImageProcessor's
base view) pixel for pixel: same resampling through Pillow on uint8, the long side of a
shortest-edge resize *truncated* as `get_resize_output_image_size` does, the same crop
offsets, rescale in float64 then float32. The recipe lives in the manifest so any runtime
can do the same.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import EvoExportError
from ..names import format_size, size_hw
from .image_files import MAX_IMAGE_PIXELS, load_image, to_8bit

# PIL's resampling filters, by name and by the integer Hugging Face configs store
_RESAMPLE = {"nearest": Image.NEAREST, "lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR,
             "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING}
_RESAMPLE_BY_INT = {int(v): k for k, v in _RESAMPLE.items()}

# scikit-image ships these photos inside its wheel (no download): astronaut (NASA, public
# domain), coffee and chelsea the cat (CC0).
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea")

# processors whose int `size` means a square (default_to_square) rather than a shortest edge
_SQUARE_SIZE_PROCESSORS = ("Siglip", "LlavaOnevision")


def _processor_kind(raw: dict) -> str:
    kind = str(raw.get("image_processor_type") or "")
    for suffix in ("Fast", "Pil"):
        kind = kind.removesuffix(suffix)
    return kind


def _size_dict(value, square: bool, where: str, key: str) -> dict:
    if isinstance(value, bool):
        raise EvoExportError(f"{where}: {key} {value!r} is not a size")
    if isinstance(value, int) and value > 0:
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    if isinstance(value, dict):
        if set(value) == {"shortest_edge"}:
            out = {"shortest_edge": value["shortest_edge"]}
        elif set(value) == {"height", "width"}:
            out = {"height": value["height"], "width": value["width"]}
        else:
            raise EvoExportError(f"{where}: {key} {value!r} is not supported (expected shortest_edge, "
                                 "or height and width)")
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in out.values()):
            return out
    raise EvoExportError(f"{where}: {key} {value!r} is not a size (positive integers)")


def _flag(raw: dict, key: str, default: bool, where: str) -> bool:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise EvoExportError(f"{where}: {key} {value!r} is not true or false")
    return value


def _number(value, where: str, key: str, positive: bool) -> float:
    """A finite real number from a config (never a bool or a string); positive if asked."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EvoExportError(f"{where}: {key} {value!r} is not a number")
    value = float(value)
    if not math.isfinite(value):
        raise EvoExportError(f"{where}: {key} {value!r} is not finite")
    if positive and value <= 0:
        raise EvoExportError(f"{where}: {key} {value!r} must be positive")
    return value


def _rgb(value, where: str, key: str, positive: bool) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3   # transformers broadcasts a single number over the channels
    if not isinstance(value, list) or len(value) != 3:
        raise EvoExportError(f"{where}: {key} must be a list of 3 numbers, got {value!r}")
    return [_number(v, where, f"{key}[{i}]", positive) for i, v in enumerate(value)]


def recipe_from_processor_config(raw: dict, where: str = "preprocessor_config.json") -> dict:
    """A Hugging Face image processor's config (preprocessor_config.json) as our recipe."""
    if not isinstance(raw, dict):
        raise EvoExportError(f"{where} is not a JSON object")
    kind = _processor_kind(raw)
    square = kind.startswith(_SQUARE_SIZE_PROCESSORS)
    if _flag(raw, "do_resize", True, where) is False:
        raise EvoExportError(f"{where}: do_resize false is not supported (builds take a fixed image size)")
    if "size" not in raw:
        raise EvoExportError(f"{where} has no size")
    resize = _size_dict(raw["size"], square, where, "size")
    # LLaVA-OneVision's processor has no crop (its base view is a plain resize); the CLIP-style
    # processors crop by default
    crop = None
    if _flag(raw, "do_center_crop", not square, where) and raw.get("crop_size") is not None:
        crop = _size_dict(raw["crop_size"], True, where, "crop_size")
    if "shortest_edge" in resize and crop is None:
        raise EvoExportError(f"{where}: a shortest-edge resize without a centre crop gives non-square images; "
                             "builds take square inputs")
    resample = raw.get("resample", 3)
    if isinstance(resample, int) and not isinstance(resample, bool):
        resample = _RESAMPLE_BY_INT.get(resample)
    if resample not in _RESAMPLE:
        raise EvoExportError(f"{where}: resample {raw.get('resample')!r} is not a PIL filter")
    rescale = _number(raw.get("rescale_factor", 1 / 255), where, "rescale_factor", positive=True) \
        if _flag(raw, "do_rescale", True, where) else 1.0
    if _flag(raw, "do_normalize", True, where):
        mean, std = raw.get("image_mean"), raw.get("image_std")
        mean = _rgb(mean, where, "image_mean", positive=False)
        std = _rgb(std, where, "image_std", positive=True)
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    pad = _flag(raw, "do_pad", False, where) and kind == "LlavaImageProcessor"
    return {"processor": kind or "unknown", "pad_to_square": pad, "resize": resize, "crop": crop,
            "resample": resample, "rescale": rescale, "mean": mean, "std": std}


def output_size(recipe: dict) -> tuple[int, int]:
    box = recipe["crop"] or recipe["resize"]
    return box["height"], box["width"]


def fit_recipe(recipe: dict, size, pad_to_square: bool | None = None) -> dict:
    """The recipe for a build that takes `size` x `size` pixels (or (height, width): a Qwen
    build at a non-square grid, whose recipe already says that size): unchanged when the
    recipe's output is that size, else every size in it scaled by size / its output size
    (recorded under `scaled_from`). `pad_to_square` overrides the recipe's."""
    recipe = dict(recipe)
    if pad_to_square is not None:
        recipe["pad_to_square"] = bool(pad_to_square)
    target = size_hw(size)
    if output_size(recipe) == target:
        return recipe
    h, w = output_size(recipe)
    if h != w:
        raise EvoExportError(f"the image processor makes {h}x{w} images; builds take square inputs")
    # a non-square target (a tower at a non-square grid): the shortest edge scaled so the
    # centre crop of that height and width fits, the crop keeping the photo's proportions
    factor = max(target) / h
    resize = recipe["resize"]
    recipe["scaled_from"] = {"resize": resize, "crop": recipe["crop"], "factor": factor}
    recipe["resize"] = ({"shortest_edge": int(round(resize["shortest_edge"] * factor))} if "shortest_edge" in resize
                        else {"height": target[0], "width": target[1]})
    if recipe["crop"] is not None:
        recipe["crop"] = {"height": target[0], "width": target[1]}
    return recipe


def as_recipe(pre: dict, size: int) -> dict:
    """A manifest's `preprocess` as a recipe. Builds before recipes (no `resize` key) said only
    mean, std, resample and rescale: they get a shortest-edge resize and centre crop at `size`."""
    if "resize" in pre:
        return pre
    return {"processor": "legacy", "pad_to_square": False, "resize": {"shortest_edge": size},
            "crop": {"height": size, "width": size}, "resample": pre.get("resample", "bicubic"),
            "rescale": float(pre.get("rescale", 1 / 255)), "mean": pre["mean"], "std": pre["std"]}


def describe_recipe(recipe: dict) -> str:
    """One line for the build log."""
    r = recipe["resize"]
    steps = ["pad to square (mean colour)"] if recipe["pad_to_square"] else []
    steps.append(f"resize shortest edge to {r['shortest_edge']}" if "shortest_edge" in r
                 else f"resize to {r['height']}x{r['width']}")
    if recipe["crop"]:
        steps.append(f"centre-crop {recipe['crop']['height']}x{recipe['crop']['width']}")
    text = f"preprocessing ({recipe['processor']}): " + ", ".join(steps) + f" ({recipe['resample']})"
    if "scaled_from" in recipe:
        s = recipe["scaled_from"]
        was = (f"shortest edge {s['resize']['shortest_edge']}" if "shortest_edge" in s["resize"]
               else f"{s['resize']['height']}x{s['resize']['width']}")
        text += f"; scaled x{s['factor']:.4g} from the processor's {was}" + (
            f", crop {s['crop']['height']}" if s["crop"] else "") + " to this build's image size"
    if recipe.get("aspect"):   # a processor whose own resize keeps the aspect ratio (Qwen2.5-VL)
        text += "; aspect ratio " + recipe["aspect"].split(":")[0]
    return text


def _to_rgb(image: Image.Image, where: str = "image") -> Image.Image:
    image = to_8bit(image, where)
    try:
        # transformers' convert_to_rgb: transparency is composited onto white
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:   # a mode Pillow cannot turn into RGB (LAB, HSV, raw modes)
        raise EvoExportError(f"{where} has pixel mode {image.mode}, which cannot be read as RGB ({e})") from None


def _center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center_crop on HWC: floor offsets; zero padding where the image is smaller."""
    h, w = x.shape[:2]
    if h < height or w < width:
        nh, nw = max(h, height), max(w, width)
        padded = np.zeros((nh, nw, x.shape[2]), x.dtype)
        top, left = -(-(nh - h) // 2), -(-(nw - w) // 2)
        padded[top:top + h, left:left + w] = x
        x, h, w = padded, nh, nw
    top, left = (h - height) // 2, (w - width) // 2
    return x[top:top + height, left:left + width]


def preprocess(image: Image.Image, size, pre: dict) -> np.ndarray:
    """PIL image -> float32 [3, H, W] (size: S for a square, or (H, W)), as the recipe `pre` says."""
    recipe = as_recipe(pre, size)
    if output_size(recipe) != size_hw(size):
        raise EvoExportError(f"the preprocessing recipe makes {output_size(recipe)} images, the build takes "
                             f"{format_size(size)} px")
    image = _to_rgb(image)
    if recipe["pad_to_square"] and image.width != image.height:
        side = max(image.size)
        fill = tuple(int(m * 255) for m in recipe["mean"])   # LLaVA's expand2square colour
        square = Image.new("RGB", (side, side), fill)
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = square
    r = recipe["resize"]
    if "shortest_edge" in r:   # get_resize_output_image_size: the long side is truncated
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_short, new_long = r["shortest_edge"], int(r["shortest_edge"] * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_w, new_h = r["width"], r["height"]
    if new_w * new_h > MAX_IMAGE_PIXELS:   # a 60000x1 strip resized to a short edge of 336: gigabytes
        raise EvoExportError(f"a {image.width}x{image.height} image resized as the model's processor does would be "
                             f"{new_w}x{new_h} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed; crop it to a "
                             "less extreme aspect ratio first")
    x = np.asarray(image.resize((new_w, new_h), _RESAMPLE[recipe["resample"]]))
    if recipe["crop"]:
        x = _center_crop(x, recipe["crop"]["height"], recipe["crop"]["width"])
    x = (x.astype(np.float64) * float(recipe["rescale"])).astype(np.float32)
    x = (x - np.asarray(recipe["mean"], np.float32)) / np.asarray(recipe["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def sample_photos(names=SAMPLE_PHOTOS) -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(getattr(data, n)()) for n in names]


def sample_batch(size: int, pre: dict, names=SAMPLE_PHOTOS) -> np.ndarray:
    """The sample photos preprocessed for a model: float32 [len(names), 3, size, size]."""
    return np.stack([preprocess(im, size, pre) for im in sample_photos(names)])


def read_pixels(path: Path, manifest: dict) -> np.ndarray:
    """An input file as float32 pixel values [B,3,H,W] ([B,6,H,W] for a video build): a .npy as
    it is (never unpickled), an image file preprocessed as the build's manifest says."""
    if path.is_dir():
        raise EvoExportError(f"input {path} is a directory, not a file")
    if path.suffix == ".npy":
        if not path.is_file():
            raise EvoExportError(f"input {path} does not exist")
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise EvoExportError(f"input {path} is not a readable .npy file (no NumPy header)")
        try:
            return np.load(path, allow_pickle=False)
        except ValueError:
            raise EvoExportError(f"input {path} holds Python objects; pickled arrays are refused") from None
        except OSError as e:
            raise EvoExportError(f"input {path} is not a readable .npy file ({e})") from None
    image = load_image(path)
    x = preprocess(image, manifest.image_size, manifest.preprocess)[None]
    # a video build (frames on the channel axis) takes a still as that frame repeated,
    # which is what Qwen's image processor makes of a still
    return np.tile(x, (1, manifest.frames_per_input, 1, 1))
