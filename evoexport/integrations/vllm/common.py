"""What the plugin's model classes share: the build that a model's config names, loaded once
per process by the multimodal processor in vLLM's frontend, and the start-up check that it
was made from the checkpoint's own vision weights.

The engine process never loads the build: its model has no encoder, and the one image (or
video) it processes, vLLM's memory-profiling dummy, is marked by `ProfilingImages` (or
`ProfilingVideos`, read by `VideoMarks`) and answered with zeros of the build's shape (what
the model sees of an image is K rows of features, whatever their values). That keeps a
second copy of the encoder's weights out of the engine."""
from __future__ import annotations

import functools
import threading

import numpy as np

from ...errors import EvoExportError
from . import BACKEND_KEY, BUILD_KEY, THREADS_KEY


PROFILING = "evoexport_profiling"      # the mark on vLLM's dummy images (PIL's Image.info) ...
# ... and its value: an object, never a string, so that no client's PNG text chunk can forge it
_MARK = object()


class ProfilingImages:
    """Mixed into a vLLM dummy-inputs builder: its images carry the profiling mark."""

    def _get_dummy_images(self, **kwargs):
        images = [image.copy() for image in super()._get_dummy_images(**kwargs)]
        for image in images:
            image.info[PROFILING] = _MARK
        return images


class _ProfilingFrames(np.ndarray):
    """The mark on vLLM's dummy videos: their frames are this subclass of ndarray, which no
    request can make (vLLM's video loaders make plain arrays)."""


def _marked(frames) -> np.ndarray:
    return np.asarray(frames).view(_ProfilingFrames)


class ProfilingVideos:
    """Mixed into a vLLM dummy-inputs builder: its videos' frames (bare arrays, or Qwen's
    (frames, metadata) pairs) carry the mark."""

    def _get_dummy_videos(self, **kwargs):
        return [(_marked(v[0]), *v[1:]) if isinstance(v, tuple) else _marked(v)
                for v in super()._get_dummy_videos(**kwargs)]


class VideoMarks:
    """Mixed into a multimodal processor: whether the call in progress on this thread holds
    vLLM's profiling videos (`dummy_videos`), read as the videos arrive, before the processor
    resizes, converts or pops them."""
    _calls = threading.local()

    def _get_hf_mm_inputs(self, mm_items, hf_kwargs):
        inputs = super()._get_hf_mm_inputs(mm_items, hf_kwargs)
        videos = inputs.hf_data.get("videos") or []
        self._calls.dummy = bool(videos) and all(isinstance(v, _ProfilingFrames) for v in videos)
        return inputs

    @property
    def dummy_videos(self) -> bool:
        return getattr(self._calls, "dummy", False)


def profiling(hf_data) -> bool:
    """Whether the processor's images are vLLM's profiling dummies."""
    images = hf_data.get("images") or []
    return bool(images) and all(getattr(image, "info", {}).get(PROFILING) is _MARK for image in images)


def build_path(hf_config) -> str:
    path = getattr(hf_config, BUILD_KEY, None)
    if not path:
        raise EvoExportError(f"the evoexport vLLM plugin needs hf_overrides[{BUILD_KEY!r}] (the build directory); "
                             "start it with `evoexport serve BUILD --engine vllm --model DIR`")
    return path


# One run of the build at a time per process: a run uses every core it is given, and
# concurrent runs would only contend and each grow their own activation memory.
ONE_RUN = threading.Lock()


@functools.lru_cache(maxsize=None)
def _runner(path: str, backend: str, threads: int):
    from ... import load
    options = {"threads": threads} if threads and backend in ("onnxruntime", "openvino") else {}
    if backend == "onnxruntime":
        # weights stay memory-mapped and no arena keeps activations: the frontend shares the
        # machine's memory with vLLM's engine (measured: Qwen2.5-VL-3B's engine was killed
        # for memory at concurrency 8 on 24 GB without it)
        options["low_memory"] = True
    if backend == "torch":
        import torch
        options["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return load(path, backend=backend, **options)


@functools.lru_cache(maxsize=None)
def _grids(path: str) -> "BuildGrids":
    from ...manifest import is_bucketed, read_buckets, read_manifest
    return BuildGrids(read_buckets(path, verify=False) if is_bucketed(path)
                      else read_manifest(path, verify=False, files=False))


class BuildGrids:
    """A build's grids as the plugin sees them: one, or a bucketed build's (each image at the
    grid chosen for its size, runtime/buckets.py), each with its own K."""

    def __init__(self, build):
        self.build = build
        self.bucketed = hasattr(build, "manifests")
        self.manifests = build.manifests if self.bucketed else [build]

    @property
    def manifest(self):
        """The first grid's manifest: what every grid shares (model, weights, taps, width)."""
        return self.manifests[0]

    def index_for(self, height: int, width: int) -> int:
        """The grid an image of height x width pixels goes to."""
        if not self.bucketed:
            return 0
        from ...runtime.buckets import BucketRunner
        return BucketRunner.choose_in(self.build, height, width)[0]

    def index_of(self, grid) -> int | None:
        """The grid's index, if the build holds it."""
        return next((i for i, m in enumerate(self.manifests) if tuple(m.grid) == tuple(grid)), None)

    def most_tokens(self):
        return max(self.manifests, key=lambda m: m.tokens_per_image)

    def describe(self) -> str:
        return ", ".join(f"{m.image_hw[0]}x{m.image_hw[1]} px ({m.grid})" for m in self.manifests)


def grids_for(hf_config) -> BuildGrids:
    """The grids of the build the model's config names (the build itself not loaded)."""
    return _grids(build_path(hf_config))


def manifest_for(hf_config):
    """The manifest of the build the model's config names (a bucketed build's first grid's)."""
    return grids_for(hf_config).manifest


def runner_for(hf_config):
    """The build named by the model's config, on the runtime it names."""
    return _runner(build_path(hf_config), getattr(hf_config, BACKEND_KEY, "onnxruntime"),
                   int(getattr(hf_config, THREADS_KEY, 0) or 0))


def encode(hf_config, pixels, dummy: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, K, D] float32, kept indices [N, K]) of pixel values [N, 3, H, W]; for
    vLLM's profiling dummies (`dummy`), zeros and the first K positions. A build with
    DeepStack taps (Qwen3-VL) gives [N, K, D * (1 + taps)]: the features, then each tap,
    on the hidden axis, which is how vLLM's Qwen3-VL takes its encoder's output."""
    import torch
    manifest = manifest_for(hf_config)
    if dummy:
        return _zeros(manifest, len(pixels))
    x = pixels if isinstance(pixels, torch.Tensor) else torch.as_tensor(np.asarray(pixels))
    return _run(runner_for(hf_config), x)


def encode_each(hf_config, images: list, index: list[int], dummy: bool = False) -> list[tuple]:
    """encode() image by image, image n [3, H, W] at the build's grid index[n]:
    [(features [K_n, D'], kept indices [K_n])] in order. A bucketed build's images go through
    its BucketRunner, which runs each grid's images as batches of that grid."""
    import torch
    grids = grids_for(hf_config)
    if dummy:
        return [tuple(a[0] for a in _zeros(grids.manifests[i], 1)) for i in index]
    if not grids.bucketed:
        return list(zip(*encode(hf_config, torch.stack([torch.as_tensor(x) for x in images]))))
    with ONE_RUN:
        results = runner_for(hf_config).run_arrays([np.asarray(torch.as_tensor(x).float()) for x in images])
    return [(np.concatenate([r.features, *r.deepstack], axis=-1).astype(np.float32), r.indices) for r in results]


def _zeros(manifest, n: int) -> tuple[np.ndarray, np.ndarray]:
    """What vLLM's profiling dummies get: zero features (taps too) of the grid's K, the first K positions."""
    k, d = manifest.features["shape"][1:]
    return np.zeros((n, k, d * (1 + len(manifest.deepstack))), np.float32), np.tile(np.arange(k), (n, 1))


def _run(runner, x) -> tuple[np.ndarray, np.ndarray]:
    """(features with any DeepStack taps on the hidden axis, kept indices) of pixel values x."""
    x = x.detach().float()
    with ONE_RUN:
        out = runner(x if runner.backend.name == "torch" else np.ascontiguousarray(x.cpu().numpy()))
    to_np = runner.backend.to_numpy
    features = np.concatenate([to_np(f) for f in (out.features, *out.deepstack)], axis=-1)
    return np.asarray(features, dtype=np.float32), np.asarray(to_np(out.indices), dtype=np.int64)


def check_weights(hf_config, checkpoint: str) -> None:
    """Refuse a build made from other vision weights than the checkpoint's: the sha256
    evoexport's tower gives the checkpoint's vision weights against the manifest's."""
    import torch

    from ...models.loader import load_tower
    manifest = manifest_for(hf_config)
    # vLLM builds its model under the engine's dtype as torch's default (bf16 for a bf16
    # checkpoint): the tower is hashed as evoexport builds it, in fp32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        tower = load_tower(manifest.model, checkpoint, image_size=manifest.image_size,
                           pad_to_square=manifest.pad_to_square, quiet=True, video=manifest.frames_per_input > 1)
    finally:
        torch.set_default_dtype(previous)
    sha256 = tower.weights_info["weights_sha256"]
    del tower
    _give_back_memory()               # the tower was only hashed: its memory goes back before the LLM's KV cache
    if sha256 != manifest.weights_sha256:
        raise EvoExportError(f"{build_path(hf_config)} was built from other vision weights than {checkpoint}'s "
                             "(sha256 differs); build it from this checkpoint: evoexport build --checkpoint "
                             f"{checkpoint}")


def _give_back_memory() -> None:
    """Free what was freed: glibc keeps freed blocks under 32 MB (most of a tower's weights) in
    the process's heap, so the engine process would hold a vision tower's worth of memory it
    does not use (measured: the OOM killer took vLLM's worker with Qwen2.5-VL-3B on 24 GB)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc: nothing to trim
        pass
