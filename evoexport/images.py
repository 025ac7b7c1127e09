"""Images in, pixel values out: the model's preprocessing, and real sample photos.

Preprocessing follows CLIP's image processor (what LLaVA-1.5 uses): resize the shortest
edge to the model's size (bicubic), center-crop, scale to [0, 1], normalize per channel.
The parameters live in the manifest so a C++ runtime can do the same.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import EvoExportError

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}

# scikit-image ships these photos inside its wheel (no download): astronaut (NASA, public
# domain), coffee and chelsea the cat (CC0).
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea")


def preprocess(image: Image.Image, size: int, pre: dict) -> np.ndarray:
    """PIL image -> float32 [3, size, size]."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((new_w, new_h), _RESAMPLE[pre.get("resample", "bicubic")])
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = np.asarray(image, dtype=np.float32) * float(pre.get("rescale", 1 / 255))
    x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def load_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise EvoExportError(f"input {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise EvoExportError(f"input {path} is not a readable image ({e})") from None


def sample_photos(names=SAMPLE_PHOTOS) -> list[Image.Image]:
    from skimage import data

    return [Image.fromarray(getattr(data, n)()) for n in names]


def sample_batch(size: int, pre: dict, names=SAMPLE_PHOTOS) -> np.ndarray:
    """The sample photos preprocessed for a model: float32 [len(names), 3, size, size]."""
    return np.stack([preprocess(im, size, pre) for im in sample_photos(names)])


def read_pixels(path: Path, manifest: dict) -> np.ndarray:
    """An input file as float32 pixel values [B,3,H,W]: a .npy as it is (never unpickled), an
    image file preprocessed as the build's manifest says."""
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
    return preprocess(image, manifest["tower"]["image_size"], manifest["preprocess"])[None]
