"""Run a build: chain its graphs by tensor name on one backend.

    runner = evoexport.load("graphs/llava-keep0.5", backend="onnxruntime")
    out = runner(pixel_values)          # float32 [B, 3, H, W]
    out.features, out.indices, out.indices_per_point, out.merge_per_point, out.picks_per_point

Backends (backends/, one module each) share one interface, Polygraphy-style:
  onnxruntime  ONNX Runtime; CPU here, CUDA when onnxruntime-gpu is installed, with
               outputs bound on the device so tensors never visit the host between graphs
  openvino     OpenVINO on the CPU, its own defaults for the stages (bf16 where the CPU
               has it), selections always in fp32
  torch        the PyTorch reference rebuilt from the manifest (CPU or CUDA tensors)
  tensorrt     TensorRT engines via Polygraphy (see tensorrt/engines.py; needs TensorRT)
Selection between stages is one of the graphs, so it runs where the tensors are.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from .backends import backend_class, make_backend
from .. import names
from ..errors import EvoExportError
from ..manifest import build_root, read_manifest
from ..pipeline.chain import entry_names, run_chain


class Output(NamedTuple):
    features: object             # [B, K, D_out]
    indices: object              # [B, K] final kept patch positions (raster order, 0-based)
    indices_per_point: list      # [B, K_i] after each prune point
    merge_per_point: list        # [B, N_i] kept slot each entering token went to (-1: dropped, no merge)
    picks_per_point: list        # [B, N_i] step that kept each entering token (-1: dropped)
    deepstack: list = []         # [B, K, D_out] each DeepStack tap (Qwen3-VL), aligned with features


def final_owners(merges: list) -> np.ndarray:
    """[B, N]: the final kept slot of every original patch, following each point's merge map
    [B, N_i] (`merge_per_point`, `merge_i`) in order; -1 where a token was dropped unmerged."""
    b, n = np.shape(merges[0])
    owner = np.broadcast_to(np.arange(n), (b, n))
    for merge in merges:
        owner = np.where(owner >= 0, np.take_along_axis(np.asarray(merge), np.maximum(owner, 0), axis=1), -1)
    return owner


class Runner:
    """A loaded build: call it with pixel values."""

    def __init__(self, build_dir: str | Path, backend: str = "onnxruntime", verify: bool = True, **options):
        self.build_dir = build_root(build_dir)    # a bucketed build's grid: the folder of its GRID.json
        # a backend that rebuilds the chain from the manifest (torch) never opens a graph file
        self.manifest = read_manifest(build_dir, verify=verify, files=backend_class(backend).reads_graph_files)
        self.graphs = self.manifest.graphs
        self.backend = make_backend(backend, self.build_dir, self.manifest, **options)
        spec = self.manifest.pixels
        self.input_name, self.input_shape = spec["name"], spec["shape"]
        # what a call reports: the features and every point's decisions (a temporal build:
        # also each token's position and frame, the dense owner map and the later frames' decisions)
        self.output_names = names.reported(self.manifest.prune_points) + self.manifest.deepstack
        temporal = self.manifest.temporal
        if temporal:
            self.output_names += [names.INDICES, names.FRAMES, names.OWNERS, names.MATCH] + [
                names.later(names.decision(kind, i)) for i in range(len(temporal["schedule"])) for kind in names.DECISIONS]

    def check_input(self, pixel_values) -> np.ndarray | object:
        shape = tuple(getattr(pixel_values, "shape", ()))
        dtype = str(getattr(pixel_values, "dtype", type(pixel_values).__name__)).removeprefix("torch.")
        want = ["B" if isinstance(d, str) else d for d in self.input_shape]
        if len(shape) != len(want):
            raise EvoExportError(f"pixel_values must have rank {len(want)} {want}, got shape {list(shape)}")
        if shape[0] < 1 or list(shape[1:]) != want[1:]:
            raise EvoExportError(f"pixel_values must have shape {want}, got {list(shape)}")
        if dtype != "float32":
            raise EvoExportError(f"pixel_values must be float32, got {dtype}")
        if isinstance(pixel_values, np.ndarray) and not np.isfinite(pixel_values).all():
            raise EvoExportError("pixel_values hold NaN or infinite values")
        return pixel_values

    def run_all(self, pixel_values) -> dict:
        """Every named tensor of the chain (backend-native values)."""
        return self.run_native(self.backend.as_input(self.check_input(pixel_values)))

    def run_native(self, value, outputs=None) -> dict:
        """The same from an input already in the backend's own form and place (an OrtValue or
        a tensor on the GPU): what a benchmark times, without the host-to-device copy.
        `outputs` names the tensors wanted (None: every one); a backend that runs the whole
        chain in one call (a CUDA graph) then returns only those, the others may add more."""
        if self.backend.runs_whole_chain:
            return self.backend.run_chain(value, outputs)

        def run_graph(entry, args):
            return self.backend.run_graph(entry, dict(zip(entry_names(entry)[0], args)))
        return run_chain(self.graphs, {self.input_name: value}, run_graph, names=entry_names)

    def __call__(self, pixel_values) -> Output:
        return self._output(self._reported(pixel_values), pixel_values.shape[0])

    def _reported(self, pixel_values) -> dict:
        return self.run_native(self.backend.as_input(self.check_input(pixel_values)), self.output_names)

    def _output(self, env: dict, batch: int) -> Output:
        points = range(self.manifest.prune_points)
        per_point = {kind: [env[names.decision(kind, i)] for i in points] for kind in names.DECISIONS}
        if names.INDICES in env:   # a temporal build: every token's position, from its assemble graph
            final = env[names.INDICES]
        elif per_point["indices"]:
            final = per_point["indices"][-1]
        else:  # nothing pruned: every patch is kept, in raster order
            n = self.manifest.num_patches
            final = np.broadcast_to(np.arange(n, dtype=np.int64), (batch, n)).copy()
        return Output(env[names.FEATURES], final, *(per_point[kind] for kind in names.DECISIONS),
                      [env[n] for n in self.manifest.deepstack])


    def close(self) -> None:
        """Free the backend's engines and sessions; the runner cannot run afterwards."""
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def arrays(self, pixel_values) -> dict:
        """The outputs as numpy arrays under the names every consumer uses (`run --output`,
        the Triton ensemble, Ray Serve): features, indices, then indices_i, merge_i, picks_i
        (a temporal build: also frames, owners, later_match and the later frames' decisions)."""
        env = self._reported(pixel_values)
        out, to_np = self._output(env, pixel_values.shape[0]), self.backend.to_numpy
        arrays = {names.FEATURES: to_np(out.features), names.INDICES: to_np(out.indices)}
        for kind in names.DECISIONS:
            for i, value in enumerate(getattr(out, f"{kind}_per_point")):
                arrays[names.decision(kind, i)] = to_np(value)
        arrays.update({n: to_np(v) for n, v in zip(self.manifest.deepstack, out.deepstack)})
        if self.manifest.temporal:   # each token's frame, who answers for each patch, the later frames' decisions
            arrays.update({n: to_np(env[n]) for n in self.output_names if n not in arrays})
        return {k: np.asarray(v) for k, v in arrays.items()}


def load(build_dir: str | Path, backend: str = "onnxruntime", **options) -> Runner:
    """Load a build directory for inference (the manifest is checked and every file hashed)."""
    return Runner(build_dir, backend=backend, **options)
