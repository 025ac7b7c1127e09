"""Runtimes behind one interface (Polygraphy-style runners).

Every backend has `name`, `precision` (what its encoder stages really compute in, which
picks the validation tolerances) and three methods:

    as_input(numpy array) -> native value      (on the backend's device)
    run_graph(manifest graph entry, {input name: native value}) -> {output name: native value}
    to_numpy(native value) -> numpy array

Selection is one of the graphs, so it runs where the tensors are. Each backend lives in its
own module and is imported only when asked for.
"""
from __future__ import annotations

import inspect
from pathlib import Path

from ...errors import EvoExportError

BACKENDS = ("onnxruntime", "openvino", "torch", "tensorrt")


def make_backend(name: str, build_dir: Path, manifest: dict, **options):
    if name == "onnxruntime":
        from .onnxruntime import OrtBackend as cls
    elif name == "openvino":
        from .openvino import OpenVinoBackend as cls
    elif name == "torch":
        from .torch import TorchBackend as cls
    elif name == "tensorrt":
        from .tensorrt import TrtBackend as cls
    else:
        raise EvoExportError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    takes = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise EvoExportError(f"backend {name} takes no option(s) {', '.join(unknown)} "
                             f"(it takes: {', '.join(k for k in takes if k not in ('self', 'build_dir', 'manifest'))})")
    return cls(build_dir, manifest, **options)
