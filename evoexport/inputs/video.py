"""Video in, frames out: decoded with PyAV and sampled evenly, each frame then preprocessed
exactly as an image file would be, so frames go through a build as its batch.

Frames are sampled at `numpy.linspace(0, T-1, N).round()` of the T decoded frames (the
first and the last always included, as LLaVA-OneVision's and Video-LLaVA's samplers do).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EvoExportError

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts"}


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def frame_indices(total: int, count: int) -> np.ndarray:
    """The `count` frame numbers sampled from `total` decoded frames (ascending; repeats when
    the video is shorter than `count`)."""
    return np.linspace(0, total - 1, count).round().astype(np.int64)


def _av():
    try:
        import av
    except ImportError:
        raise EvoExportError("video input needs PyAV: pip install av") from None
    return av


def _reason(error) -> str:
    return getattr(error, "strerror", None) or str(error)


def _open(path: Path):
    av = _av()

    if path.is_dir():
        raise EvoExportError(f"input {path} is a directory, not a video file")
    if not path.is_file():
        raise EvoExportError(f"input {path} does not exist")
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise EvoExportError(f"input {path} is not a decodable video ({_reason(e)})") from None
    if not container.streams.video:
        container.close()
        raise EvoExportError(f"input {path} has no video stream")
    return container


def _decode(path: Path):
    """Every decoded frame of the first video stream, in order."""
    av = _av()
    container = _open(path)
    try:
        yield from container.decode(video=0)
    except av.FFmpegError as e:
        raise EvoExportError(f"input {path} could not be decoded ({_reason(e)})") from None
    finally:
        container.close()


def count_frames(path: str | Path) -> int:
    """Frames that really decode. A container's own count can be missing or wrong, so the
    video is decoded twice: once to count, once to take the sampled frames."""
    total = sum(1 for _ in _decode(Path(path)))
    if total == 0:
        raise EvoExportError(f"input {path} has no decodable frames")
    return total


def read_frames(path: str | Path, count: int) -> tuple[list, np.ndarray]:
    """The sampled frames as RGB PIL images, and their frame numbers."""
    if count < 1:
        raise EvoExportError(f"--frames must be >= 1, got {count}")
    path = Path(path)
    wanted = frame_indices(count_frames(path), count)
    want, taken = set(wanted.tolist()), {}
    for number, frame in enumerate(_decode(path)):
        if number in want:
            taken[number] = frame.to_image()
        if number >= wanted[-1]:
            break
    frames = [taken[int(n)] for n in wanted]
    return frames, wanted


def video_pixels(path: str | Path, count: int, size: int, pre: dict) -> tuple[np.ndarray, np.ndarray]:
    """float32 [count, 3, size, size] pixel values of the sampled frames, and their frame numbers."""
    from .images import preprocess

    frames, numbers = read_frames(path, count)
    return np.stack([preprocess(f, size, pre) for f in frames]), numbers
