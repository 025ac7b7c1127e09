"""Running a build: the Runner (runner.py) over one backend (backends/: onnxruntime,
openvino, torch, tensorrt), and CUDA-graph replay for the torch chain (cuda_graphs.py)."""
from .runner import Output, Runner, load  # noqa: F401
