"""Run a build: chain its graphs by tensor name on one backend.

    runner = evoexport.load("graphs/llava-keep0.5", backend="onnxruntime")
    out = runner(pixel_values)          # float32 [B, 3, H, W]
    out.features, out.indices, out.indices_per_point, out.merge_per_point, out.picks_per_point

Backends share one interface (`run_graph(entry, feeds) -> dict`), Polygraphy-style:
  onnxruntime  ONNX Runtime; CPU here, CUDA when onnxruntime-gpu is installed, with
               outputs bound on the device so tensors never visit the host between graphs
  torch        the PyTorch reference rebuilt from the manifest (CPU or CUDA tensors)
  tensorrt     TensorRT engines via Polygraphy (see engines.py; needs TensorRT)
Selection between stages is one of the graphs, so it runs where the tensors are.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import EvoExportError
from .manifest import graph_entries, read_manifest

BACKENDS = ("onnxruntime", "torch", "tensorrt")


class Output(NamedTuple):
    features: object             # [B, K, D_out]
    indices: object              # [B, K] final kept patch positions (raster order, 0-based)
    indices_per_point: list      # [B, K_i] after each prune point
    merge_per_point: list        # [B, N_i] kept slot each entering token went to (-1: dropped, no merge)
    picks_per_point: list        # [B, N_i] step that kept each entering token (-1: dropped)


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, build_dir: Path, manifest: dict, providers: list[str] | None = None, threads: int = 0,
                 low_memory: bool = False, optimization: str = "all"):
        import onnxruntime as ort

        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise EvoExportError(f"ONNX Runtime provider(s) {unknown} not available here (have: {available})")
        levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
        if optimization not in levels:
            raise EvoExportError(f"ONNX Runtime optimization level {optimization!r} is not one of {', '.join(levels)}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = levels[optimization]
        if threads:
            opts.intra_op_num_threads = threads
        # Each graph has its own session and thread pool. Spinning workers of the graph that
        # just ran would steal the cores from the next one in the chain (measured: +35% at
        # batch 1 on 2 cores), so idle workers block instead.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if low_memory:
            # No prepacked weight copies (weights stay memory-mapped from the .onnx.data
            # files) and no arena that keeps every activation buffer it ever grew to:
            # about half the resident memory, a few percent slower on CPU.
            opts.add_session_config_entry("session.disable_prepacking", "1")
            opts.enable_cpu_mem_arena = False
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
        self.sessions = {}
        for g in graph_entries(manifest):
            try:
                self.sessions[g["name"]] = ort.InferenceSession(str(build_dir / g["file"]), opts, providers=providers)
            except Exception as e:
                raise EvoExportError(f"ONNX Runtime cannot load {g['file']}: {str(e).splitlines()[0]}") from None
        self._ort = ort

    def as_input(self, array: np.ndarray):
        if self.device == "cpu":
            return np.ascontiguousarray(array)
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", 0)

    def run_graph(self, entry: dict, feeds: dict) -> dict:
        sess = self.sessions[entry["name"]]
        outs = [o["name"] for o in entry["outputs"]]
        if self.device == "cpu":
            return dict(zip(outs, sess.run(outs, feeds)))
        binding = sess.io_binding()     # keep every tensor on the GPU between graphs
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, value)
        for name in outs:
            binding.bind_output(name, "cuda")
        sess.run_with_iobinding(binding)
        return dict(zip(outs, binding.get_outputs()))

    def to_numpy(self, value) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else value.numpy()


class TorchBackend:
    name = "torch"

    def __init__(self, build_dir: Path, manifest: dict, device: str = "cpu", pipeline=None):
        import torch

        from .models import load_tower
        from .prune import PruneParams, PrunePoint
        from .stages import Pipeline

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


class Runner:
    """A loaded build: call it with pixel values."""

    def __init__(self, build_dir: str | Path, backend: str = "onnxruntime", verify: bool = True, **options):
        self.build_dir = Path(build_dir)
        self.manifest = read_manifest(self.build_dir, verify=verify)
        self.graphs = graph_entries(self.manifest)
        if backend == "onnxruntime":
            self.backend = OrtBackend(self.build_dir, self.manifest, **options)
        elif backend == "torch":
            self.backend = TorchBackend(self.build_dir, self.manifest, **options)
        elif backend == "tensorrt":
            from .engines import TrtBackend
            self.backend = TrtBackend(self.build_dir, self.manifest, **options)
        else:
            raise EvoExportError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        spec = self.manifest["inputs"][0]
        self.input_name, self.input_shape = spec["name"], spec["shape"]

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
        return pixel_values

    def run_all(self, pixel_values) -> dict:
        """Every named tensor of the chain (backend-native values)."""
        pixel_values = self.check_input(pixel_values)
        env = {self.input_name: self.backend.as_input(pixel_values)}
        for g in self.graphs:
            env.update(self.backend.run_graph(g, {i["name"]: env[i["name"]] for i in g["inputs"]}))
        return env

    def __call__(self, pixel_values) -> Output:
        env = self.run_all(pixel_values)
        points = range(len(self.manifest["schedule"]))
        per_point = {kind: [env[f"{kind}_{i}"] for i in points] for kind in ("indices", "merge", "picks")}
        if per_point["indices"]:
            final = per_point["indices"][-1]
        else:  # nothing pruned: every patch is kept, in raster order
            b, n = pixel_values.shape[0], self.manifest["tower"]["num_patches"]
            final = np.broadcast_to(np.arange(n, dtype=np.int64), (b, n)).copy()
        return Output(env["features"], final, per_point["indices"], per_point["merge"], per_point["picks"])


def load(build_dir: str | Path, backend: str = "onnxruntime", **options) -> Runner:
    """Load a build directory for inference (the manifest is checked and every file hashed)."""
    return Runner(build_dir, backend=backend, **options)
