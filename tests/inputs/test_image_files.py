"""Image files and video frames as the model's own loader reads them: upright (EXIF, display
matrix), high bit depths scaled to 8 bits rather than clipped, what has no white level
refused; long videos streamed through a build in bounded memory."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evoexport.errors import EvoExportError
from evoexport.inputs.image_files import load_image

from tests.helpers import assert_one_error_line, cli


def _photo(w: int = 80, h: int = 48) -> Image.Image:
    """A real photo (scikit-image's astronaut), not square, so a turn shows."""
    from skimage import data
    return Image.fromarray(data.astronaut()).resize((w, h), Image.BICUBIC)


def _png16(path: Path, rgb16: np.ndarray) -> Path:
    """A 16-bit RGB PNG (Pillow cannot write one)."""
    h, w, _ = rgb16.shape
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\0" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _features(build: Path, path: Path) -> np.ndarray:
    import evoexport
    from evoexport.inputs.images import read_pixels
    runner = evoexport.load(build)
    return runner(read_pixels(path, runner.manifest)).features[0].ravel()


def _cosine(a, b) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def eight_bit(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("eight")
    photo = _photo()
    photo.save(folder / "rgb.png")
    photo.convert("L").save(folder / "grey.png")
    return {"folder": folder, "rgb": np.asarray(photo), "grey": np.asarray(photo.convert("L"))}


def test_a_16_bit_grey_png_gives_the_features_of_its_8_bit_version(tiny_build, eight_bit, tmp_path):
    """Pillow's convert('RGB') clipped every 16-bit value above 255: the photo came out white
    (cosine 0.33 against the 8-bit version). The low byte holds detail the 8 bits lack."""
    grey = eight_bit["grey"].astype(np.uint32) * 257
    detail = np.random.default_rng(0).integers(0, 128, grey.shape)
    Image.fromarray((grey + detail).clip(0, 65535).astype(np.uint16)).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    loaded = np.asarray(load_image(tmp_path / "grey16.png"))
    assert np.abs(loaded.astype(int) - eight_bit["grey"]).max() <= 1
    cos = _cosine(_features(tiny_build, tmp_path / "grey16.png"), _features(tiny_build, eight_bit["folder"] / "grey.png"))
    assert cos > 0.999, cos


def test_a_16_bit_rgb_png_gives_the_features_of_its_8_bit_version(tiny_build, eight_bit, tmp_path):
    rgb16 = eight_bit["rgb"].astype(np.uint32) * 257 + np.random.default_rng(1).integers(0, 200, eight_bit["rgb"].shape)
    _png16(tmp_path / "rgb16.png", rgb16.clip(0, 65535))
    cos = _cosine(_features(tiny_build, tmp_path / "rgb16.png"), _features(tiny_build, eight_bit["folder"] / "rgb.png"))
    assert cos > 0.999, cos


def test_a_float_image_in_0_1_is_scaled_not_clipped(eight_bit, tmp_path):
    Image.fromarray(eight_bit["grey"].astype(np.float32) / 255).save(tmp_path / "f.tif")
    assert np.array_equal(np.asarray(load_image(tmp_path / "f.tif")), eight_bit["grey"])


# orientation tag -> how the sensor's pixels are turned from the upright photo, and back
_STORED = {6: (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270),
           8: (Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_90),
           3: (Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_180),
           2: (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_LEFT_RIGHT)}


@pytest.mark.parametrize("orientation", sorted(_STORED))
def test_an_exif_rotated_jpeg_gives_the_features_of_the_photo_turned_upright(tiny_build, tmp_path, orientation):
    """A phone stores the photo sideways with an orientation tag; we turn it upright as
    transformers' load_image does (ImageOps.exif_transpose): same pixels, same features."""
    from transformers.image_utils import load_image as hf_load_image

    turn, undo = _STORED[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    _photo().transpose(turn).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "phone.jpg") as stored:   # the decoded pixels, turned by hand
        upright = np.asarray(stored.convert("RGB").transpose(undo))
    Image.fromarray(upright).save(tmp_path / "upright.png")
    ours = np.asarray(load_image(tmp_path / "phone.jpg").convert("RGB"))
    assert ours.shape == (48, 80, 3)
    assert np.array_equal(ours, upright)
    assert np.array_equal(ours, np.asarray(hf_load_image(str(tmp_path / "phone.jpg"))))
    assert np.array_equal(_features(tiny_build, tmp_path / "phone.jpg"), _features(tiny_build, tmp_path / "upright.png"))


def test_a_video_with_a_display_rotation_is_read_upright(tmp_path):
    """A phone video recorded upright is stored sideways with a display matrix: each frame is
    turned as the matrix says (PyAV's rotation, counterclockwise), as FFmpeg's players do."""
    import av

    from evoexport.inputs.video import read_frames

    stored = np.asarray(_photo(64, 32))
    for rotation in (0, 90, -90):
        path = tmp_path / f"r{rotation}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=4, options={"qp": "0"})
            stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv444p"
            if rotation:
                stream.set_display_rotation(rotation)
            for _ in range(3):
                for packet in stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        frames, _ = read_frames(path, 2)
        want = {0: stored, 90: np.rot90(stored, 1), -90: np.rot90(stored, -1)}[rotation]
        got = np.asarray(frames[0])
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want).mean() < 3      # lossless x264 up to the RGB/YUV round trip


def _tiff(path: Path, array: np.ndarray) -> Path:
    import tifffile
    tifffile.imwrite(path, array)
    return path


@pytest.mark.parametrize("make,msg", [
    (lambda p: _tiff(p / "x.tif", np.full((8, 8), 70000, np.uint32)), "32-bit or signed integer pixels"),
    (lambda p: _tiff(p / "x.tif", np.full((8, 8), -5, np.int16)), "has signed integer samples"),
    (lambda p: _tiff(p / "x.tif", np.full((8, 8), -5, np.int8)), "has signed integer samples"),
    (lambda p: Image.fromarray(np.full((8, 8), 3.5, np.float32)).save(p / "x.tif"), "float pixels in [3.5, 3.5]"),
    (lambda p: Image.fromarray(np.full((8, 8), np.nan, np.float32)).save(p / "x.tif"), "NaN or infinite float pixels"),
    (lambda p: (p / "x.png").write_bytes(b""), "is not a readable image"),
    (lambda p: (p / "x.png").write_text("hello, I am text"), "is not a readable image"),
    (lambda p: (p / "x.jpg").write_bytes(_jpeg_bytes()[:300]), "is not a readable image"),
    (lambda p: (p / "x.png").write_bytes(_png_bytes()[:-30]), "is not a readable image"),
])
def test_images_without_a_white_level_or_broken_are_one_error_line(tiny_build, tmp_path, make, msg):
    make(tmp_path)
    path = next(tmp_path.glob("x.*"))
    code, err, _ = cli("run", tiny_build, "--input", path, "--output", tmp_path / "o.npz")
    assert_one_error_line(code, err, msg)
    assert not (tmp_path / "o.npz").exists()
    with pytest.raises(EvoExportError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        load_image(path)


def _jpeg_bytes() -> bytes:
    import io
    buf = io.BytesIO()
    _photo().save(buf, "JPEG")
    return buf.getvalue()


def _png_bytes() -> bytes:
    import io
    buf = io.BytesIO()
    _photo().save(buf, "PNG")
    return buf.getvalue()


def test_an_extreme_aspect_ratio_is_refused_before_the_resize(tiny_build, tmp_path):
    """A 2000000x1 strip passes the decoded-size limit, but the processor's shortest-edge
    resize would make it gigabytes: refused, in little memory."""
    Image.new("RGB", (2_000_000, 1), (200, 10, 10)).save(tmp_path / "strip.png")
    code, err, _ = cli("run", tiny_build, "--input", tmp_path / "strip.png", "--output", tmp_path / "o.npz")
    assert_one_error_line(code, err, "a 2000000x1 image resized as the model's processor does would be 112000000x56")


def test_a_damaged_exif_block_is_one_error_line_or_ignored_never_a_traceback(tiny_build, tmp_path):
    jpeg = bytearray(_jpeg_bytes())
    exif = Image.Exif()
    exif[0x0112] = 6
    payload = b"Exif\0\0" + exif.tobytes()[:10] + b"\xff" * 7     # a truncated TIFF header
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    (tmp_path / "x.jpg").write_bytes(bytes(jpeg[:2]) + app1 + bytes(jpeg[2:]))
    code, err, _ = cli("run", tiny_build, "--input", tmp_path / "x.jpg", "--output", tmp_path / "o.npz")
    assert "Traceback" not in "\n".join(err)
    if code != 0:
        assert_one_error_line(code, err, "x.jpg")


def test_frames_beyond_the_video_are_refused_and_long_runs_stream(tiny_build, tmp_path):
    """--frames far beyond a clip's length was accepted and held every repeated frame in
    memory (197 s, 7.7 GB for 100000 frames of 3). Now: refused with the clip's length; a
    long run goes through a batch at a time, its .npz written row block by row block."""
    from tests.inputs.test_video import make_video

    clip = make_video(tmp_path / "c.mp4", frames=40, w=64, h=48)
    code, err, _ = cli("run", tiny_build, "--input", clip, "--frames", 100000, "--output", tmp_path / "o.npz")
    assert_one_error_line(code, err, "--frames 100000: ")
    assert "has only 40 decodable frames; ask for at most 40" in err[-1]
    code, err, _ = cli("show", tiny_build, "--input", clip, "--frames", 65, "--output", tmp_path / "s.png")
    assert_one_error_line(code, err, "show draws at most 64")

    code, err, out = cli("run", tiny_build, "--input", clip, "--frames", 40, "--batch", 4, "--output", tmp_path / "o.npz")
    assert code == 0, err
    assert sum("frames " in line and " of 40" in line for line in err) == 10
    got = np.load(tmp_path / "o.npz")
    assert got["features"].shape[0] == 40 and got["frame_numbers"].tolist() == list(range(40))
    code, err, _ = cli("run", tiny_build, "--input", clip, "--frames", 40, "--batch", 40, "--output", tmp_path / "p.npz")
    whole = np.load(tmp_path / "p.npz")
    assert set(got) == set(whole)
    for key in got:
        np.testing.assert_allclose(got[key], whole[key], rtol=0, atol=1e-5, err_msg=key)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no scratch left


def test_npz_rows_peak_memory_stays_that_of_one_block(tmp_path):
    """The writer behind `run`: a 400 MB .npz made from 4 MB blocks never holds it whole."""
    import subprocess
    import sys
    script = f"""
import numpy as np, resource
from evoexport.files import NpzRows
block = np.ones((10, 100_000), np.float32)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with NpzRows({str(tmp_path / 'big.npz')!r}, rows=1000) as out:
    for _ in range(100):
        out.append({{"x": block}})
    out.commit({{"n": np.arange(3)}})
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""
    grew_mb = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert grew_mb < 120, grew_mb            # 400 MB of rows went through
    data = np.load(tmp_path / "big.npz")
    assert data["x"].shape == (1000, 100_000) and data["n"].tolist() == [0, 1, 2]
