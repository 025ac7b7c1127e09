"""Image files and decoded frames as the model's own loader reads them: upright, 8 bits per
channel.

transformers' `load_image` opens a file, turns it upright by its EXIF orientation
(`ImageOps.exif_transpose`) and converts it to RGB. We do the same, with one deliberate
difference (docs/manifest.md): Pillow's `convert("RGB")` *clips* 16-bit and float pixels at
255, so a 16-bit photo comes out almost white. Here high bit depths are scaled to 8 bits
first, and what has no defined white level (32-bit or signed integers, floats outside
[0, 1]) is refused with one line instead of guessed at.

Video frames carry their orientation in the stream's display matrix (phone videos recorded
upright are stored sideways): `upright_frame` applies it, as FFmpeg's players do.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import EvoExportError

# Decoded images larger than this are refused before their pixels are decoded: a small
# compressed file can decode to gigabytes (Pillow's own decompression-bomb limit).
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

# Pillow's 16-bit greyscale modes (16-bit RGB files are decoded to 8-bit RGB by Pillow itself,
# keeping the high byte of each channel)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_TIFF_SAMPLE_FORMAT = 339     # the TIFF tag: 1 unsigned integer, 2 signed integer, 3 float


def to_8bit(image: Image.Image, where: str = "image") -> Image.Image:
    """The image with 8 bits per channel: 16-bit greyscale scaled by 255/65535 (rounded),
    float greyscale in [0, 1] by 255; a 32-bit or signed integer image, or float pixels
    outside [0, 1] or not finite, is refused. Other modes pass through unchanged."""
    mode = image.mode
    # old Pillow releases decode a 16-bit greyscale PNG as mode I
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and image.format == "PNG"):
        x = np.asarray(image).astype(np.float64)
        if x.size and (x.min() < 0 or x.max() > 65535):
            raise EvoExportError(f"{where} has 16-bit pixels outside 0..65535")
        return Image.fromarray(np.rint(x * (255 / 65535)).astype(np.uint8), "L")
    if mode == "I":
        raise EvoExportError(f"{where} has 32-bit or signed integer pixels (Pillow mode I), which have no "
                             "defined white level; save it with 8 or 16 bits per channel")
    if mode == "F":
        x = np.asarray(image, dtype=np.float64)
        if not np.isfinite(x).all():
            raise EvoExportError(f"{where} has NaN or infinite float pixels")
        if x.size and (x.min() < 0 or x.max() > 1):
            raise EvoExportError(f"{where} has float pixels in [{x.min():.4g}, {x.max():.4g}]; float images are "
                                 "read as [0, 1] (save it with 8 or 16 bits per channel)")
        return Image.fromarray(np.rint(x * 255).astype(np.uint8), "L")
    return image


def load_image(path: str | Path) -> Image.Image:
    """An image file decoded, upright by its EXIF orientation, with 8 bits per channel
    (the mode is left to `preprocess`, which turns it into RGB as transformers does)."""
    path = Path(path)
    where = f"input {path}"
    if path.is_dir():
        raise EvoExportError(f"{where} is a directory, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow checks the size from the header, before decoding: past its limit it
            # warns (an error here) or refuses
            with Image.open(path) as im:
                im.load()
                _refuse_signed_tiff(im, where)
                image = _upright(im, where)
                if image is im:
                    image = im.copy()
                image.format = im.format   # to_8bit tells an old Pillow's 16-bit PNG by it
    except FileNotFoundError:
        raise EvoExportError(f"{where} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise EvoExportError(f"{where} decodes to more pixels than the {MAX_IMAGE_PIXELS:,} allowed "
                             f"({e}); downscale it first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise EvoExportError(f"{where} is not a readable image ({e})") from None
    return to_8bit(image, where)


def _refuse_signed_tiff(image: Image.Image, where: str) -> None:
    # Pillow reads signed 8-bit TIFF samples as if unsigned (-5 becomes 251): no mode says so
    formats = getattr(image, "tag_v2", {}).get(_TIFF_SAMPLE_FORMAT)
    if formats is not None and 2 in (formats if isinstance(formats, tuple) else (formats,)):
        raise EvoExportError(f"{where} has signed integer samples, which have no defined black and white "
                             "levels; save it with unsigned 8 or 16 bits per channel")


def _upright(image: Image.Image, where: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as e:   # a damaged EXIF block: Pillow raises what its parsers raise
        raise EvoExportError(f"{where}: its EXIF orientation cannot be read ({e}); "
                             "re-save the image without EXIF") from None


_QUARTER_TURNS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180,
                  270: Image.Transpose.ROTATE_270}


def upright_frame(image: Image.Image, rotation: float | None, where: str = "video") -> Image.Image:
    """A decoded video frame turned as its display matrix says: `rotation` is the angle (in
    degrees, counterclockwise) by which the matrix turns the frame, PyAV's VideoFrame.rotation.
    Only quarter turns exist in practice; anything else is refused rather than shown skewed."""
    if not rotation:
        return image
    turns = round(rotation) % 360
    if turns not in _QUARTER_TURNS or abs(rotation - round(rotation)) > 1e-6:
        raise EvoExportError(f"{where} asks for a display rotation of {rotation} degrees; only quarter turns "
                             "are supported")
    return image.transpose(_QUARTER_TURNS[turns])
