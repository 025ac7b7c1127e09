"""TensorRT engines for a build, through Polygraphy's loaders and runner (kept thin on purpose).

    evoexport engines graphs/llava-keep0.5 --fp16 --max-batch 32
    evoexport.load("graphs/llava-keep0.5", backend="tensorrt")     # backends/tensorrt.py

One engine per graph (stages and selections alike: the selection graph is TopK, Gather,
MatMul and elementwise ops, all TensorRT layers), each with one optimization profile over
the batch axis. Engines are GPU- and TensorRT-version-specific, so they are described in
engines.json beside the manifest rather than in it. TensorRT is imported only here.

Not run in this project's CI: TensorRT cannot be installed on its machines (see README).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import EvoExportError
from .manifest import graph_entries, read_manifest, sha256_file

ENGINES = "engines.json"


def _require_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise EvoExportError("TensorRT is not installed: on a machine with an NVIDIA GPU, "
                             "pip install 'evoexport[tensorrt]' (and a CUDA build of torch)") from None
    return tensorrt


def build_engines(build_dir: str | Path, fp16: bool = False, opt_batch: int = 1, max_batch: int = 16,
                  progress=None) -> dict:
    trt = _require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    if not 1 <= opt_batch <= max_batch:
        raise EvoExportError(f"need 1 <= --opt-batch ({opt_batch}) <= --max-batch ({max_batch})")
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    entries = []
    for g in graph_entries(manifest):
        if progress:
            progress(f"building TensorRT engine for {g['name']}")
        profile = Profile()
        for t in g["inputs"]:
            rest = tuple(t["shape"][1:])
            profile.add(t["name"], min=(1, *rest), opt=(opt_batch, *rest), max=(max_batch, *rest))
        engine = EngineFromNetwork(NetworkFromOnnxPath(str(build_dir / g["file"])),
                                   config=CreateConfig(fp16=fp16, profiles=[profile]))
        path = build_dir / f"{g['name']}.engine"
        tmp = path.with_suffix(".engine.partial")
        SaveEngine(engine, path=str(tmp))()
        os.replace(tmp, path)
        entries.append({"name": g["name"], "file": path.name, "sha256": sha256_file(path)})
    import torch
    info = {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "fp16": fp16, "batch": {"min": 1, "opt": opt_batch, "max": max_batch}, "engines": entries}
    (build_dir / ENGINES).write_text(json.dumps(info, indent=2) + "\n")
    return info
