"""The PyTorch reference rebuilt from the manifest (CPU or CUDA tensors): what every other
backend is validated against."""
from __future__ import annotations

from pathlib import Path

import numpy as np


class TorchBackend:
    name = "torch"
    precision = "fp32"

    def __init__(self, build_dir: Path, manifest: dict, device: str = "cpu", pipeline=None):
        import torch

        from ..models import load_tower
        from ..prune import PruneParams, PrunePoint
        from ..stages import Pipeline

        self.torch = torch
        self.device = torch.device(device)
        if pipeline is None:
            tower = load_tower(manifest["model"], manifest.get("checkpoint"), seed=manifest.get("weights_seed") or 0,
                               expect_sha256=manifest.get("weights_sha256"), quiet=True)
            points = [PrunePoint(p["after_layer"], p["tokens"]) for p in manifest["schedule"]]
            pipeline = Pipeline(tower, points, PruneParams(**manifest["prune_params"]))
        pipeline.tower.to(self.device)
        self.pipeline = pipeline
        self.modules = {g.name: g.module for g in pipeline.graphs}

    def as_input(self, array):
        t = self.torch.as_tensor(array)
        return t.to(self.device)

    def run_graph(self, entry: dict, feeds: dict) -> dict:
        names = [i["name"] for i in entry["inputs"]]
        with self.torch.inference_mode():
            outs = self.modules[entry["name"]](*[feeds[n] for n in names])
        return dict(zip([o["name"] for o in entry["outputs"]], outs))

    def to_numpy(self, value) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()
