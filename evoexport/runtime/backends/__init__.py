"""Runtimes behind one interface (base.Backend, Polygraphy-style runners), one module each,
imported only when asked for. Selection is one of the graphs, so it runs where the tensors
are."""
from __future__ import annotations

import importlib
from pathlib import Path

from ...errors import EvoExportError
from .base import Backend, Option

# name -> (module, class); BACKENDS is the names, in the CLI's order
_TABLE = {"onnxruntime": ("onnxruntime", "OrtBackend"), "openvino": ("openvino", "OpenVinoBackend"),
          "torch": ("torch", "TorchBackend"), "tensorrt": ("tensorrt", "TrtBackend")}
BACKENDS = tuple(_TABLE)


def backend_class(name: str) -> type[Backend]:
    if name not in _TABLE:
        raise EvoExportError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls = _TABLE[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def make_backend(name: str, build_dir: Path, manifest: dict, **options) -> Backend:
    """Backend `name` on a build, with options it declares."""
    cls = backend_class(name)
    declared = {o.name for o in cls.options}
    unknown = sorted(set(options) - declared)
    if unknown:
        raise EvoExportError(f"backend {name} takes no option(s) {', '.join(unknown)} "
                             f"(it takes: {', '.join(sorted(declared)) or 'none'})")
    return cls(build_dir, manifest, **options)


def cli_options(backend: str, given: dict, defaults: dict) -> dict:
    """The options a command's flags give `backend` ({option name: value}): a flag set to
    other than its default must be one the backend declares (one error line naming the
    backends that take it)."""
    def flagged(b):
        return {o.name: o.flag for o in backend_class(b).options if o.flag}
    mine, out = flagged(backend), {}
    for name, value in given.items():
        if name in mine:
            out[name] = value
        elif value != defaults.get(name):
            takers = {b: flagged(b)[name] for b in BACKENDS if name in flagged(b)}
            flag = next(iter(takers.values()), name)
            raise EvoExportError(f"{flag} is an option of --backend {' or '.join(takers) or 'none'}")
    return out


__all__ = ["BACKENDS", "Backend", "Option", "backend_class", "make_backend", "cli_options"]
