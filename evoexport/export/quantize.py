"""int8 builds: explicit quantization (QDQ) of the encoder stages' weight matmuls.

QuantizeLinear/DequantizeLinear pairs around every MatMul with a constant weight (q, k, v,
out, fc1, fc2, the projector), the format TensorRT and OpenVINO consume as explicit
quantization; ONNX Runtime runs it with int8 kernels. Weights are per-channel symmetric
int8; activations per-tensor symmetric int8, with ranges calibrated on real images run
through the fp32 reference (each stage calibrated on the inputs it sees in the fp32
chain). Attention's own matmuls (QK^T, AV), LayerNorm, softmax, the importance output and
every selection graph stay fp32. The quantizer is ONNX Runtime's (`quantize_static`), not
ours.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import EvoExportError, OptionError
from ..inputs.image_files import load_image
from ..inputs.images import preprocess

CALIB_DIR = Path(__file__).resolve().parents[2] / "calib"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MAX_CALIB_IMAGES = 64


def calibration_pixels(calib: str | Path | np.ndarray | None, size: int, pre: dict, progress=None) -> np.ndarray:
    """Calibration inputs float32 [N, 3, size, size]: a folder of images (None: calib/, filled
    from the photos our dependencies ship), or pixel values already preprocessed."""
    if isinstance(calib, np.ndarray):
        if calib.ndim != 4 or calib.shape[1:] != (3, size, size) or calib.dtype != np.float32:
            raise EvoExportError(f"calibration pixels must be float32 [N, 3, {size}, {size}], "
                                 f"got {calib.dtype} {list(calib.shape)}")
        return calib
    folder = Path(calib).expanduser() if calib is not None else default_calib_dir()
    files = calibration_files(folder)
    if progress:
        progress(f"calibration set: {len(files)} images from {folder}")
    return np.stack([preprocess(load_image(f), size, pre) for f in files])


def calibration_files(folder: Path) -> list[Path]:
    """The images of a calibration folder, or one error line; `build` calls it before any
    weight is touched, so a wrong --calib costs nothing."""
    if not folder.is_dir():
        raise OptionError("calib", f"{folder} is not a directory of images")
    # hidden files are skipped: an interrupted write leaves only a hidden partial file
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))[:MAX_CALIB_IMAGES]
    if not files:
        raise OptionError("calib", f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def default_calib_dir() -> Path:
    """calib/ beside the package, filled on first use (see calib/README.md)."""
    from .calibration import materialize
    return materialize(CALIB_DIR)


class _Feeds:
    """onnxruntime.quantization.CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict], progress=None, label: str = ""):
        self.feeds, self.i, self.progress, self.label = feeds, 0, progress, label

    def get_next(self):
        if self.i >= len(self.feeds):
            return None
        if self.progress and (self.i % 8 == 0 or self.i == len(self.feeds) - 1):
            self.progress(f"calibrating {self.label}: image {self.i + 1}/{len(self.feeds)}")
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self):
        self.i = 0


# Weights are quantized to 7 bits ([-64, 64]), which x86 int8 kernels without VNNI need. A
# build is made once and deployed on many CPUs; on AVX2 or AVX-512 without VNNI, ONNX
# Runtime's and oneDNN's u8 x s8 kernels (vpmaddubsw) add two u8*s8 products into int16,
# and 255 * 127 * 2 overflows it: the tiny build's features came out 23% off on such a
# machine. 255 * 64 * 2 = 32640 cannot overflow. The accuracy this costs was measured
# (docs/validation.md, int8 on any x86 CPU).
WEIGHT_QMAX = 64


def quantize_build(pipeline, stages: list[dict], out_dir: Path, pixels: np.ndarray, progress=None,
                   reduce_range: bool = True) -> None:
    """Replace every encoder stage file in `out_dir` by its int8 QDQ version, in place
    (the manifest entries in `stages` get the new hashes). `reduce_range`: 7-bit weights,
    safe on every x86 CPU (WEIGHT_QMAX); False only to measure what that costs."""
    import torch
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from ..manifest import sha256_file

    feeds_per_stage: dict[str, list[dict]] = {}
    if progress:
        progress(f"running the fp32 reference on {len(pixels)} calibration images")
    for i in range(len(pixels)):   # one image at a time: calibration memory stays flat
        env = pipeline.run(torch.from_numpy(pixels[i:i + 1]))
        for s in stages:
            feeds_per_stage.setdefault(s["name"], []).append(
                {t["name"]: env[t["name"]].numpy() for t in s["inputs"]})
    for s in stages:
        src = out_dir / s["file"]
        tmp = out_dir / f".{s['name']}.int8"
        tmp.mkdir(exist_ok=True)
        try:
            with _quiet_root_logger():   # ORT logs a generic "consider pre-processing" hint per call
                quantize_static(
                    str(src), str(tmp / s["file"]), _Feeds(feeds_per_stage.pop(s["name"]), progress, s["name"]),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"], per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, use_external_data_format=True,
                    calibrate_method=CalibrationMethod.MinMax, reduce_range=reduce_range,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True})
        except Exception as e:
            raise EvoExportError(f"int8 quantization of {s['name']} failed: {type(e).__name__}: {e}") from None
        data = [p for p in tmp.iterdir() if p.name != s["file"]]
        if len(data) != 1:
            raise EvoExportError(f"int8 quantization of {s['name']} wrote {len(data)} weight files, expected 1")
        for old in (src, out_dir / s.get("data_file", "")):
            if old.is_file():
                old.unlink()
        data_name = f"{s['name']}.onnx.data"
        _rename_external_data(tmp / s["file"], data[0].name, data_name)
        os.replace(tmp / s["file"], src)
        os.replace(data[0], out_dir / data_name)
        shutil.rmtree(tmp, ignore_errors=True)
        s["sha256"], s["data_file"], s["data_sha256"] = sha256_file(src), data_name, sha256_file(out_dir / data_name)


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _rename_external_data(model_path: Path, old: str, new: str) -> None:
    """Point every external tensor of `model_path` from file `old` to `new`."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save(model, str(model_path))
