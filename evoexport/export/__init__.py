"""From a pipeline to a build directory: ONNX per graph (onnx.py), int8 quantization
(quantize.py) and its calibration photos (calibration.py), and the build itself
(build.py: export, manifest, validation, atomic swap into place)."""
