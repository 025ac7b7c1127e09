"""A build as a Ray Serve deployment around `evoexport.load(...)`.

    from evoexport.serve.ray_app import encoder_app
    app = encoder_app("graphs/llava-keep0.5", backend="openvino", replicas=2)
    handle = serve.run(app, name="evoexport", route_prefix="/evoexport")
    out = handle.encode.remote(pixel_values).result()      # dict of numpy arrays

HTTP: POST the pixel values as a .npy file (float32 [B, C, H, W]; a temporal build's clips
[B, G, 3, H, W]) to the route; the answer is an .npz with features, indices and, per prune
point, indices_i, merge_i, picks_i (a temporal build: also frames, owners and the later
frames' decisions, B*(G-1) rows each). A malformed request gets a 400 with one JSON error
line; the replica keeps serving.

Batching counts **images (or clips), not calls**: Ray's @serve.batch counts calls unless
told otherwise (seen here: batches of 14 and 15 images under a limit of 8 calls), so
batch_size_fn sums the batch items, and a batch never holds more than the build's batch
profile. A call with more than that is refused before it is queued.

On a Ray cluster (several nodes), the same app runs unchanged: `ray start --head` on one
node, `ray start --address=HEAD:6379` on the others, then `evoexport serve BUILD --engine ray
--address auto` (or `serve.run(app)` after `ray.init(address="auto")`); replicas are placed
by Ray across the nodes, each with `--gpus` of a GPU when asked. The build directory must
be readable at the same path on every node (a shared volume), as with any model files.
"""
from __future__ import annotations

import asyncio
import io
import json
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import EvoExportError, OptionError

try:
    from ray import serve
except ImportError:
    raise EvoExportError("Ray Serve is not installed: pip install 'evoexport[serve]'") from None

DEFAULT_WAIT_S = 0.005


def _images(items: list) -> int:
    return sum(int(x.shape[0]) for x in items)


@dataclass(frozen=True)
class RayOptions:
    backend: str = "onnxruntime"     # the runtime each replica loads the build on
    replicas: int = 1
    gpus: float = 0.0                # GPUs per replica (fractions allowed)
    max_batch: int | None = None     # images per batch; None: the build's batch profile
    wait_s: float = DEFAULT_WAIT_S   # how long a batch waits to fill
    options: dict = field(default_factory=dict)   # the backend's own options


def encoder_app(build_dir: str, options: RayOptions = RayOptions(), **fields):
    """The deployment bound to a build (an Application for serve.run); `fields` override `options`."""
    from ..manifest import read_manifest
    from ..runtime.backends import backend_class

    o = replace(options, **fields)
    files = backend_class(o.backend).reads_graph_files
    manifest = read_manifest(build_dir, verify=False, files=files)   # replicas verify on load
    profile = manifest.max_batch
    if o.max_batch is not None and not 1 <= o.max_batch <= profile:
        raise OptionError("max_batch", f"must be between 1 and the build's batch profile ({profile})")
    if o.replicas < 1 or o.gpus < 0:
        raise EvoExportError("replicas must be >= 1 and gpus >= 0")
    actor = {"num_gpus": o.gpus} if o.gpus else {}
    deployment = serve.deployment(Encoder, name="EvoExportEncoder", num_replicas=o.replicas, ray_actor_options=actor,
                                  max_ongoing_requests=4 * (o.max_batch or profile))
    return deployment.bind(str(build_dir), o.backend, o.max_batch or profile, o.wait_s, dict(o.options))


class Encoder:
    """One replica: a loaded build, a batch queue counted in images, an HTTP entry point."""

    def __init__(self, build_dir: str, backend: str, max_batch: int, wait_s: float, options: dict):
        import evoexport
        self.runner = evoexport.load(build_dir, backend=backend, **options)
        self.max_batch = max_batch
        self.batches: list[int] = []        # images per executed batch (batch_sizes() reports them)
        self._run_batch.set_max_batch_size(max_batch)
        self._run_batch.set_batch_wait_timeout_s(wait_s)

    def check(self, pixels) -> np.ndarray:
        pixels = self.runner.check_input(pixels)
        if pixels.shape[0] > self.max_batch:
            raise EvoExportError(f"{pixels.shape[0]} images in one call; this deployment takes at most "
                                 f"{self.max_batch} (the build's batch profile)")
        return pixels

    async def encode(self, pixels) -> dict:
        """The Python handle's entry: pixel values -> {name: array}."""
        return await self._run_batch(self.check(np.asarray(pixels)))

    def batch_sizes(self) -> list[int]:
        return list(self.batches)

    async def __call__(self, request):
        from starlette.responses import Response
        try:
            body = await request.body()
            try:
                pixels = np.load(io.BytesIO(body), allow_pickle=False)
            except Exception:
                raise EvoExportError("the request body must be one .npy array (numpy.save), "
                                     "float32 [B, C, H, W]") from None
            result = await self.encode(pixels)
        except EvoExportError as e:
            return Response(json.dumps({"error": str(e)}), status_code=400, media_type="application/json")
        buf = io.BytesIO()
        np.savez(buf, **result)
        return Response(buf.getvalue(), media_type="application/octet-stream")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=DEFAULT_WAIT_S, batch_size_fn=_images)
    async def _run_batch(self, items: list) -> list[dict]:
        sizes = [x.shape[0] for x in items]
        self.batches.append(sum(sizes))
        # inference off the event loop, so the replica keeps taking (and queueing) requests
        env = await asyncio.to_thread(self.runner.arrays, np.concatenate(items) if len(items) > 1 else items[0])
        bounds, scale = np.cumsum(sizes)[:-1], self.runner.manifest.batch_scale
        # a temporal build's later-frame outputs hold G-1 rows per clip
        split = {k: np.split(v, bounds * scale(k)) for k, v in env.items()}
        return [{k: parts[i] for k, parts in split.items()} for i in range(len(items))]
