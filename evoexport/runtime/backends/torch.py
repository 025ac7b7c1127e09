"""The PyTorch chain rebuilt from the manifest: the fp32 reference every other backend is
validated against (on the CPU), and a GPU runtime (CUDA, bf16 or fp16, the whole chain,
selections included, replayed as one CUDA graph per batch size)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ...errors import EvoExportError
from ...manifest import TORCH_DTYPES as DTYPES
from ...manifest import Manifest
from ...names import GraphKind
from .base import Backend, Option


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


@dataclass(frozen=True)
class ChainOptions:
    """How a TorchChain runs; None: the device's default (on a GPU: on; on a CPU: off)."""
    cuda_graphs: bool | None = None          # replay the whole chain as one CUDA graph per batch size
    compile_selections: bool | None = None   # torch.compile the selections
    fp32_norms: bool | None = None           # LayerNorm in fp32 in a reduced-precision chain (default: on a CPU)
    selection_form: str = "topk"             # or "compare" (prune/selection.py FORMS)
    keep_dtype: bool | None = None           # hand reduced-precision states on without an fp32 round trip
    sdpa: tuple[str, ...] | None = None      # SDPA backends in order of preference


class TorchChain:
    """A Pipeline on one device and precision.

    On a GPU (the defaults there): the selection graphs are compiled by torch.compile
    (inductor fuses their few hundred small element-wise kernels into a handful), and the
    whole chain is replayed as one CUDA graph per batch size. Static token budgets make
    both possible: every shape is fixed once the batch is, and selection is dense tensor
    code with no host sync. A reduced-precision chain keeps LayerNorm in fp32 on the CPU
    (as the build's ONNX does) and in its own dtype on a GPU, where PyTorch's kernel
    accumulates the statistics in fp32 anyway."""

    def __init__(self, pipeline, device="cpu", precision: str = "fp32", options: ChainOptions | None = None, **fields):
        import torch

        o = replace(options or ChainOptions(), **fields)
        cuda_graphs, compile_selections, keep_dtype = o.cuda_graphs, o.compile_selections, o.keep_dtype

        if precision not in DTYPES:
            raise EvoExportError(f"torch precision {precision!r} is not one of {', '.join(DTYPES)}")
        self.device = resolve_device(device) if isinstance(device, str) else device
        on_gpu = self.device.type == "cuda"
        dtype = getattr(torch, DTYPES[precision])
        # keep_dtype (default on a GPU): stages hand their hidden states on in the chain's
        # dtype, not through fp32 (same numbers: stages.EncoderStage, selection.select)
        keep_dtype = on_gpu if keep_dtype is None else keep_dtype
        if dtype != pipeline.tower.compute_dtype:
            # the reduced-precision tower a fp16/bf16 build exports: the patch conv stays
            # fp32, importance and the selections too
            twin = pipeline.tower.reduced_precision_copy(dtype, fp32_norms=not on_gpu if o.fp32_norms is None else o.fp32_norms)
            pipeline = pipeline.with_tower(twin, keep_dtype)   # a temporal chain stays temporal
        elif keep_dtype != pipeline.keep_dtype and dtype != torch.float32:   # fp32 stages: nothing to keep
            pipeline = pipeline.with_tower(pipeline.tower, keep_dtype)
        self.sdpa = sdpa_backends(o.sdpa)
        cuda_graphs = on_gpu if cuda_graphs is None else cuda_graphs
        compile_selections = on_gpu if compile_selections is None else compile_selections
        if cuda_graphs and not on_gpu:
            raise EvoExportError("CUDA graphs need device cuda")
        pipeline.tower.to(self.device)
        self.pipeline, self.precision, self.cuda_graphs = pipeline, precision, cuda_graphs
        # selection_form "compare": the TopK-free selections (same decisions; prune/selection.py
        # FORMS), which inductor can fuse whole; "topk" runs the pipeline's own modules
        forms = _selection_modules(pipeline, o.selection_form)
        compiled = _compiled_selections(pipeline, forms) if compile_selections else {}
        self.modules = {**forms, **compiled}
        self.compiled, self.selection_form = bool(compiled), o.selection_form
        self._graphs: dict[int, object] = {}

    def run(self, pixel_values) -> dict:
        """Every named tensor of the chain (eager)."""
        if self.sdpa is None:
            return self.pipeline.run(pixel_values, modules=self.modules)
        from torch.nn.attention import sdpa_kernel
        with sdpa_kernel(self.sdpa, set_priority=True):   # at capture too: a CUDA graph keeps the kernels chosen
            return self.pipeline.run(pixel_values, modules=self.modules)

    def __call__(self, pixel_values, outputs=("features",)) -> dict:
        """The named tensors `outputs` of the chain (None: every one), on the device. From a
        CUDA graph only these are copied out of its buffers: the features by default,
        decisions on request, never the ~100 MB of intermediate hidden states."""
        if not self.cuda_graphs:
            env = self.run(pixel_values)
            return env if outputs is None else {k: env[k] for k in outputs}
        from ..cuda_graphs import GraphedCall
        batch = pixel_values.shape[0]
        if batch not in self._graphs:
            self._graphs[batch] = GraphedCall(self.run, pixel_values)
        return self._graphs[batch](pixel_values, keys=outputs)


SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


def sdpa_backends(names):
    """('cudnn', 'efficient', ...) -> SDPBackend members in that priority order; None: PyTorch's choice."""
    if names is None:
        return None
    from torch.nn.attention import SDPBackend
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in SDPA_BACKENDS]
    if unknown or not names:
        raise EvoExportError(f"SDPA backends must be some of {', '.join(SDPA_BACKENDS)}, got {', '.join(unknown) or 'none'}")
    return [getattr(SDPBackend, SDPA_BACKENDS[n]) for n in names]


def _selection_modules(pipeline, form: str) -> dict:
    """The pipeline's selections in another form (same budgets and parameters), by graph name."""
    if form == "topk":
        return {}
    return {g.name: g.module.in_form(form) for g in pipeline.graphs if g.kind == GraphKind.SELECT}


def _compiled_selections(pipeline, modules: dict | None = None) -> dict:
    """torch.compile'd selection modules (batch dynamic), or {} with a warning where
    compilation fails here (no C++ compiler or Triton): the eager modules then run.
    `modules` replaces the pipeline's own selections by name (another form)."""
    import sys

    import torch

    # every selection shares SelectGraph.forward's code, so dynamo keeps one cache entry per
    # (graph, batch 1 or more) under that code: more than its default limit of 8 for long schedules
    dynamo = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, limit):
            setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    modules = modules or {}
    compiled = {g.name: torch.compile(modules.get(g.name, g.module), dynamic=True, fullgraph=True)
                for g in pipeline.graphs if g.kind == GraphKind.SELECT}
    env = pipeline.example_inputs(batch=2)   # compile now, not inside a CUDA graph capture
    try:
        with torch.inference_mode():   # the mode the chain runs in: no recompile for it later
            for g in pipeline.graphs:
                if g.name in compiled:
                    compiled[g.name](*[env[n] for n in g.inputs])
    except Exception as e:   # inductor's errors have no common base class
        print(f"WARNING: torch.compile failed for the selections ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
              "they run eagerly", file=sys.stderr)
        return {}
    return compiled


class TorchBackend(Backend):
    name = "torch"
    reads_graph_files = False   # the chain is rebuilt from the manifest; the weights' sha256 is checked
    runs_whole_chain = True
    options = (Option("device", "cpu or cuda (the chain replayed as CUDA graphs)", "--device"),
               Option("precision", "what the stages compute in  [default: the build's on cuda, fp32 on cpu]",
                      "--inference-precision"),
               Option("cuda_graphs", "replay the chain as one CUDA graph per batch  [default: on cuda]"),
               Option("compile_selections", "torch.compile the selections  [default: on cuda]"),
               Option("pipeline", "an already loaded Pipeline of the build (validation reuses the reference's)"),
               Option("selection_form", "topk or compare (prune/selection.py FORMS)"),
               Option("keep_dtype", "stages hand reduced-precision states on without an fp32 round trip"),
               Option("sdpa", "SDPA backends in order of preference (cudnn, flash, efficient, math)"))

    def __init__(self, build_dir: Path, manifest: Manifest, device: str = "cpu", precision: str | None = None,
                 pipeline=None, **chain_options):
        from ...pipeline.temporal import pipeline_from_manifest

        device = resolve_device(device)
        if pipeline is None:
            pipeline = pipeline_from_manifest(manifest)
        if precision is None:   # on a GPU, what the build's stages compute in; the CPU reference is fp32
            built = manifest.precision
            precision = built if device.type == "cuda" and built in DTYPES else "fp32"
        self.chain = TorchChain(pipeline, device, precision, ChainOptions(**chain_options))
        self.device, self.precision = device, precision
        self.pipeline = self.chain.pipeline
        self.modules = {g.name: self.chain.modules.get(g.name, g.module) for g in self.pipeline.graphs}
        import torch
        self.torch = torch

    def as_input(self, array):
        return self.torch.as_tensor(array).to(self.device)

    def run_graph(self, entry: dict, feeds: dict) -> dict:
        names = [i["name"] for i in entry["inputs"]]
        with self.torch.inference_mode():
            outs = self.modules[entry["name"]](*[feeds[n] for n in names])
        return dict(zip([o["name"] for o in entry["outputs"]], outs))

    def run_chain(self, pixel_values, outputs=None) -> dict:
        """The whole chain in one call (one CUDA graph replay on a GPU): the tensors named in
        `outputs` (None: every one), nothing else copied out."""
        return self.chain(pixel_values, outputs=outputs)

    def to_numpy(self, value) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else value.detach().cpu().numpy()
