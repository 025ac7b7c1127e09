"""vLLM with a build as its vision encoder.

Two ways, for two kinds of deployment:

- **The plugin** (this package's `plugin.register`, vLLM's `vllm.general_plugins` entry
  point): vLLM serves the whole VLM and runs the build itself. Start it with
  `evoexport serve BUILD --engine vllm --model CHECKPOINT_DIR`, or pass `hf_overrides(BUILD)`
  to `vllm.LLM(...)` / `--hf-overrides`. An image goes through vLLM's own processor to pixel
  values, then through the build (ONNX Runtime or OpenVINO on a CPU, the torch chain on a
  GPU), and the language model sees exactly the build's K tokens per image: for
  LLaVA-OneVision the packed length of its base view and tiles, as `attach` packs them; for
  Qwen2.5-VL at the mRoPE positions of the units the build kept (`positions.py`). Videos:
  a Qwen2.5-VL video build (`build --video`) keeps K units per temporal patch; a
  LLaVA-OneVision build (a temporal one too) gives each frame's dense map, pooled by vLLM.
- **Stock vLLM, no plugin** (LLaVA): the encoder runs elsewhere (Triton, Ray Serve,
  `evoexport.load`) and vLLM takes its features as `image_embeds` (any K works there):
  `image_embeds_part(features)` makes the OpenAI request part, `image_embeds_input(features)`
  the `multi_modal_data` of `LLM.generate`. The server needs `--enable-mm-embeds`.

Nothing here imports vLLM: the model classes (`llava.py`, `llava_onevision.py`, `qwen2_5_vl.py`, `qwen3_vl.py`) are imported by
vLLM, in its own environment (docs/llm.md).
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from ...errors import EvoExportError

BUILD_KEY = "evoexport_build"        # hf_overrides: the build directory
BACKEND_KEY = "evoexport_backend"    # hf_overrides: the runtime that runs it (default: onnxruntime)
THREADS_KEY = "evoexport_threads"    # hf_overrides: the encoder's threads (0: the runtime's default)
# checkpoint architecture -> the plugin's module and class (vLLM's own, with the build as its encoder)
ARCHITECTURES = {
    "LlavaForConditionalGeneration": ("llava", "EvoExportLlavaForConditionalGeneration"),
    "LlavaOnevisionForConditionalGeneration": ("llava_onevision", "EvoExportLlavaOnevisionForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "EvoExportQwen2_5_VLForConditionalGeneration"),
    "Qwen3VLForConditionalGeneration": ("qwen3_vl", "EvoExportQwen3VLForConditionalGeneration"),
}


def hf_overrides(build_dir, checkpoint_dir, backend: str = "onnxruntime", threads: int = 0) -> dict:
    """vLLM's `hf_overrides` that run `checkpoint_dir` with the plugin and `build_dir` as its
    vision encoder (the architecture read from the checkpoint's config.json)."""
    from ...files import read_json
    from ...manifest import is_bucketed, read_buckets, read_manifest
    config = Path(checkpoint_dir) / "config.json"
    if not config.is_file():
        raise EvoExportError(f"{checkpoint_dir} is not a Hugging Face checkpoint directory: no config.json")
    found = read_json(config).get("architectures") or []
    module, arch = next((ARCHITECTURES[a] for a in found if a in ARCHITECTURES), (None, None))
    if arch is None:
        raise EvoExportError(f"{checkpoint_dir} is a {', '.join(found) or 'model of no architecture'}; the vLLM "
                             f"plugin runs {', '.join(ARCHITECTURES)}")
    if is_bucketed(build_dir):    # aspect-ratio buckets: the Qwen models' plugins pick a grid per image
        manifest = read_buckets(build_dir, verify=False).manifests[0]
    else:
        # videos: a Qwen2.5-VL video build's frame pairs, LLaVA-OneVision's dense maps; temporal builds of either
        manifest = read_manifest(build_dir, verify=False, files=False)
        manifest.require_images("the vLLM plugin", build_dir, pairs=True,
                                clips=module == "llava_onevision" or manifest.frames_per_input > 1)
    if not manifest.grid.square and not manifest.family.startswith("qwen"):
        raise EvoExportError(f"the vLLM plugin takes this family's builds at square grids; {build_dir} is at "
                             f"{manifest.grid}")
    return {"architectures": [arch], BUILD_KEY: str(Path(build_dir).resolve()), BACKEND_KEY: backend,
            THREADS_KEY: int(threads)}


def image_embeds_input(features) -> "object":
    """A build's features of one image ([K, D] or [1, K, D], after the projector) as stock
    vLLM's `multi_modal_data={"image": ...}` for LLaVA (engine made with enable_mm_embeds=True)."""
    import torch
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if x.dim() == 2:
        x = x[None]
    if x.dim() != 3 or x.shape[0] != 1:
        raise EvoExportError(f"image_embeds take one image's features [K, D] or [1, K, D], got {list(x.shape)}")
    return x


def image_embeds_part(features) -> dict:
    """The OpenAI chat content part that carries one image's features to a stock vLLM server
    started with --enable-mm-embeds: {"type": "image_embeds", "image_embeds": base64 of
    torch.save}."""
    import torch
    buf = io.BytesIO()
    torch.save(image_embeds_input(features), buf)
    return {"type": "image_embeds", "image_embeds": base64.b64encode(buf.getvalue()).decode()}
