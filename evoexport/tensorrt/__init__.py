"""TensorRT: the static check of a build against its ONNX parser's operator table
(check.py, runs on any CPU) and the engine builder (engines.py, needs TensorRT and a GPU)."""
