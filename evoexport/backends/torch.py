"""The PyTorch chain rebuilt from the manifest: the fp32 reference every other backend is
validated against (on the CPU), and a GPU runtime (CUDA, bf16 or fp16, the whole chain,
selections included, replayed as one CUDA graph per batch size)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EvoExportError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_device(device: str):
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EvoExportError(f"unknown torch device {device!r} (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvoExportError("device cuda asked for, but this PyTorch sees no CUDA GPU "
                             f"(torch {torch.__version__}; a CPU build cannot use one)")
    if dev.type not in ("cpu", "cuda"):
        raise EvoExportError(f"torch device {device!r} is not supported (cpu, cuda)")
    return dev


class TorchChain:
    """A Pipeline on one device and precision; `cuda_graphs` replays the whole chain as one
    CUDA graph per batch size. Static token budgets are what make that possible: every
    shape is fixed once the batch is, and selection is dense tensor code with no host sync."""

    def __init__(self, pipeline, device="cpu", precision: str = "fp32", cuda_graphs: bool | None = None):
        import torch

        from ..stages import Pipeline

        if precision not in DTYPES:
            raise EvoExportError(f"torch precision {precision!r} is not one of {', '.join(DTYPES)}")
        self.device = resolve_device(device) if isinstance(device, str) else device
        dtype = getattr(torch, DTYPES[precision])
        if dtype != pipeline.tower.compute_dtype:
            # the same reduced-precision tower a fp16/bf16 build exports: LayerNorm and the
            # patch conv stay fp32, importance and the selections too
            pipeline = Pipeline(pipeline.tower.reduced_precision_copy(dtype), pipeline.points, pipeline.params)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise EvoExportError("CUDA graphs need device cuda")
        pipeline.tower.to(self.device)
        self.pipeline, self.precision, self.cuda_graphs = pipeline, precision, cuda_graphs
        self._graphs: dict[int, object] = {}

    def __call__(self, pixel_values) -> dict:
        """Every named tensor of the chain, on the device."""
        if not self.cuda_graphs:
            return self.pipeline.run(pixel_values)
        from ..cuda_graphs import GraphedCall
        batch = pixel_values.shape[0]
        if batch not in self._graphs:
            self._graphs[batch] = GraphedCall(self.pipeline.run, pixel_values)
        return self._graphs[batch](pixel_values)


class TorchBackend:
    name = "torch"

    def __init__(self, build_dir: Path, manifest: dict, device: str = "cpu", precision: str | None = None,
                 cuda_graphs: bool | None = None, pipeline=None):
        from ..models import load_tower
        from ..prune import PruneParams, PrunePoint
        from ..stages import Pipeline

        device = resolve_device(device)
        if pipeline is None:
            tower = load_tower(manifest["model"], manifest.get("checkpoint"), seed=manifest.get("weights_seed") or 0,
                               expect_sha256=manifest.get("weights_sha256"), quiet=True)
            points = [PrunePoint(p["after_layer"], p["tokens"]) for p in manifest["schedule"]]
            pipeline = Pipeline(tower, points, PruneParams(**manifest["prune_params"]))
        if precision is None:   # on a GPU, what the build's stages compute in; the CPU reference is fp32
            built = manifest.get("precision", "fp32")
            precision = built if device.type == "cuda" and built in DTYPES else "fp32"
        self.chain = TorchChain(pipeline, device, precision, cuda_graphs)
        self.device, self.precision = device, precision
        self.pipeline = self.chain.pipeline
        self.modules = {g.name: g.module for g in self.pipeline.graphs}
        import torch
        self.torch = torch

    def as_input(self, array):
        return self.torch.as_tensor(array).to(self.device)

    def run_graph(self, entry: dict, feeds: dict) -> dict:
        names = [i["name"] for i in entry["inputs"]]
        with self.torch.inference_mode():
            outs = self.modules[entry["name"]](*[feeds[n] for n in names])
        return dict(zip([o["name"] for o in entry["outputs"]], outs))

    def run_chain(self, pixel_values) -> dict:
        """The whole chain in one call (one CUDA graph replay on a GPU)."""
        return self.chain(pixel_values)

    def to_numpy(self, value) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()
