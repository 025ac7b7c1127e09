"""manifest.json: the contract between the builder and every runtime.

A build directory holds one ONNX file per graph (plus its external weights) and this
manifest. Everything a runtime needs is here: the graphs in execution order, the tensor
names that wire them, shapes and dtypes, the preprocessing, and a sha256 of every file so
a runtime can refuse a truncated or edited build. See docs/manifest.md.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import EvoExportError

SCHEMA_VERSION = 2   # 2: selection graphs also output their decisions (merge_i, picks_i); `precision`
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("schema_version", "model", "keep", "weights", "stages", "inputs", "outputs")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(build_dir: Path, manifest: dict) -> None:
    tmp = build_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, build_dir / MANIFEST)


def graph_entries(manifest: dict) -> list[dict]:
    """Every graph in execution order: stage_0, select_0, stage_1, ..."""
    out = []
    for stage in manifest["stages"]:
        out.append(stage)
        if stage.get("select"):
            out.append(stage["select"])
    return out


def read_manifest(build_dir: str | Path, verify: bool = True, files: bool = True) -> dict:
    """Load and check a build's manifest; with `verify`, hash every file it names. Without
    `files` the graph files are not looked at (readers that never open them: the torch
    backend rebuilds the chain from the manifest and checks the weights' own sha256)."""
    build_dir = Path(build_dir)
    path = build_dir / MANIFEST
    if not build_dir.is_dir():
        raise EvoExportError(f"build directory {build_dir} does not exist")
    if not path.is_file():
        raise EvoExportError(f"{build_dir} is not an evoexport build: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvoExportError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise EvoExportError(f"{path} is not a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EvoExportError(f"{path} has schema_version {version!r}; this evoexport reads version {SCHEMA_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise EvoExportError(f"{path} lacks required keys: {', '.join(missing)}")
    for g in graph_entries(manifest) if files else []:
        for key_file, key_hash in (("file", "sha256"), ("data_file", "data_sha256")):
            name = g.get(key_file)
            if not name:
                continue
            f = build_dir / name
            if Path(name).name != name:
                raise EvoExportError(f"{path}: graph file {name!r} must be a plain file name inside the build")
            if not f.is_file():
                raise EvoExportError(f"{build_dir}: {name} named by the manifest is missing")
            if verify and sha256_file(f) != g.get(key_hash):
                raise EvoExportError(f"{build_dir}: {name} does not match its sha256 in the manifest "
                                     "(truncated or edited); rebuild it")
    return manifest
