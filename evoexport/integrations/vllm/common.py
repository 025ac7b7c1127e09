"""What the plugin's model classes share: the build that a model's config names, loaded once
per process (vLLM's frontend runs it in the multimodal processor; the engine loads it for
its profiling run), and the start-up check that it was made from the checkpoint's own
vision weights."""
from __future__ import annotations

import functools

import numpy as np

from ...errors import EvoExportError
from . import BACKEND_KEY, BUILD_KEY, THREADS_KEY


def build_path(hf_config) -> str:
    path = getattr(hf_config, BUILD_KEY, None)
    if not path:
        raise EvoExportError(f"the evoexport vLLM plugin needs hf_overrides[{BUILD_KEY!r}] (the build directory); "
                             "start it with `evoexport serve BUILD --engine vllm --model DIR`")
    return path


@functools.lru_cache(maxsize=None)
def _runner(path: str, backend: str, threads: int):
    from ...runtime.runner import load
    options = {"threads": threads} if threads and backend in ("onnxruntime", "openvino") else {}
    if backend == "torch":
        import torch
        options["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return load(path, backend=backend, **options)


def runner_for(hf_config):
    """The build named by the model's config, on the runtime it names."""
    return _runner(build_path(hf_config), getattr(hf_config, BACKEND_KEY, "onnxruntime"),
                   int(getattr(hf_config, THREADS_KEY, 0) or 0))


def encode(hf_config, pixels) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, K, D] float32, kept indices [N, K]) of pixel values [N, 3, H, W]."""
    import torch
    runner = runner_for(hf_config)
    x = pixels.detach().float() if isinstance(pixels, torch.Tensor) else torch.as_tensor(np.asarray(pixels))
    out = runner(x if runner.backend.name == "torch" else np.ascontiguousarray(x.cpu().numpy()))
    to_np = runner.backend.to_numpy
    return np.asarray(to_np(out.features), dtype=np.float32), np.asarray(to_np(out.indices), dtype=np.int64)


def check_weights(hf_config, checkpoint: str) -> None:
    """Refuse a build made from other vision weights than the checkpoint's: the sha256
    evoexport's tower gives the checkpoint's vision weights against the manifest's."""
    from ...models.loader import load_tower
    manifest = runner_for(hf_config).manifest
    tower = load_tower(manifest.model, checkpoint, image_size=manifest.image_size,
                       pad_to_square=manifest.pad_to_square, quiet=True)
    if tower.weights_info["weights_sha256"] != manifest.weights_sha256:
        raise EvoExportError(f"{build_path(hf_config)} was built from other vision weights than {checkpoint}'s "
                             "(sha256 differs); build it from this checkpoint: evoexport build --checkpoint "
                             f"{checkpoint}")
