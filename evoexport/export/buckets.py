"""`evoexport build --grids`: one build of a Qwen model at several grids (aspect-ratio buckets).

Each grid is built (and validated) as a build of its own, then its files move into the
bucketed build's one folder, named after the grid (13x18.json, 13x18.stage_0.onnx, ...),
and every tensor of every graph goes into one shared weights.bin, each distinct tensor
once: the grids' graphs differ only in their position tables and masks, so the weights
are on disk once, not once per grid. manifest.json is then the index: the grids, their
manifests' sha256, the shared file's sha256 and the processor's pixel limits that choose
a grid per image (docs/manifest.md, "Bucketed builds"; docs/qwen.md).
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path

from ..errors import OptionError
from ..files import atomic_dir
from ..manifest import (BUCKET_INDEX_KIND, MANIFEST, SCHEMA_VERSION, SHARED_WEIGHTS, Manifest, read_buckets,
                        read_manifest, sha256_file)
from ..names import Grid
from ..progress import Progress, check_interrupted

ALIGN_LARGE, ALIGN_SMALL = 4096, 64   # offsets in weights.bin: a page for big tensors (memory maps)


AUTO = "auto"


def parse_grids(text) -> list:
    """--grids: "ROWSxCOLS,..." in merge units, where "auto" stands for the camera-ratio grids."""
    if isinstance(text, (list, tuple)):
        return [Grid.of(g) for g in text]
    parts = [part.strip().lower() for part in str(text).split(",") if part.strip()]
    grids = [AUTO if part == AUTO else Grid.parse(part) for part in parts]
    if not grids:
        raise OptionError("grids", "is empty: give auto or ROWSxCOLS,... (merge units), e.g. 16x16,12x21")
    if len(set(grids)) != len(grids):
        raise OptionError("grids", f"names a grid twice: {','.join(map(str, grids))}")
    return grids


def plan_grids(options, spec) -> list[Grid]:
    """The build's grids, "auto" expanded to the processor's grids of the camera ratios at the
    pixel budget of the model's size (its preset's, or --image-size); each grid once."""
    from ..models.qwen_processor import camera_grids
    unit_px = spec.vision["patch_size"] * spec.unit
    h, w = spec.input_hw
    grids = []
    for part in parse_grids(options.grids):
        more = [Grid(*g) for g in camera_grids(unit_px, spec.preprocess["min_pixels"], h * w)] if part == AUTO else [part]
        grids += [g for g in more if g not in grids]
    return grids


def build_buckets(options, target: Path, build_one, progress: Progress, on_commit=None):
    """Build every grid (each by `build_one(options, progress)`, export/build.run) into one
    folder `target` with shared weights; returns its index (manifest.Buckets)."""
    from ..models.loader import spec_for
    from ..models.registry import family_api, get_preset
    if not family_api(get_preset(options.model)).tower.any_grid:
        raise OptionError("grids", f"{options.model} takes square images only (aspect-ratio buckets: the qwen models)")
    if options.temporal is not None or options.video:
        raise OptionError("grids", "cannot be combined with --temporal or --video yet")
    spec = spec_for(options.model, options.checkpoint, options.image_size, options.pad_to_square)
    grids = plan_grids(options, spec)
    unit_px = spec.vision["patch_size"] * spec.unit
    if target.exists() and not (target / MANIFEST).is_file():
        raise OptionError("out", f"{target} exists and is not an evoexport build; refusing to replace it")
    progress(f"{len(grids)} grid{'s' * (len(grids) != 1)} (rows x cols of {unit_px} px units): {', '.join(map(str, grids))}")
    with atomic_dir(target, on_commit) as tmp:
        store, manifests = _Store(tmp / SHARED_WEIGHTS), []
        for i, grid in enumerate(grids):
            progress(f"grid {grid} [{i + 1}/{len(grids)}]")
            size = (grid.rows * unit_px, grid.cols * unit_px)
            part = tmp / f".{grid}"
            build_one(replace(options, grids=None, image_size=size, out=part), progress)
            manifests.append(_move_in(part, tmp, grid, store))
            check_interrupted()
        store.close()
        shared = sha256_file(store.path)
        for manifest in manifests:
            _finish(tmp, manifest, shared)
        _write_index(tmp, spec, manifests, unit_px)
        read_buckets(tmp)      # the folder reads back whole: every hash checked
        check_interrupted()
    progress(f"wrote {target}: {len(grids)} grid{'s' * (len(grids) != 1)}, shared weights {store.size / 1e6:.1f} MB")
    return read_buckets(target, verify=False)


class _Store:
    """weights.bin: each distinct tensor once (by the sha256 of its bytes, dtype and shape)."""

    def __init__(self, path: Path):
        self.path, self.file, self.offsets, self.size = path, open(path, "wb"), {}, 0

    def put(self, data: bytes, key: str) -> tuple[int, int]:
        if key not in self.offsets:
            align = ALIGN_LARGE if len(data) >= (1 << 16) else ALIGN_SMALL
            pad = -self.size % align
            self.file.write(b"\0" * pad + data)
            self.offsets[key] = self.size + pad
            self.size += pad + len(data)
        return self.offsets[key], len(data)

    def close(self) -> None:
        self.file.close()


def _move_in(part: Path, root: Path, grid: Grid, store: _Store) -> Manifest:
    """One grid's finished build (in `part`) into the bucketed folder: graphs renamed after
    the grid, their tensors into the store. Returns its manifest (written by _finish)."""
    manifest = read_manifest(part)
    for entry in manifest.graphs:
        moved = _relocate(part / entry["file"], root / f"{grid}.{entry['file']}", store)
        entry["file"] = f"{grid}.{entry['file']}"
        entry["sha256"] = sha256_file(root / entry["file"])
        entry.pop("data_file", None), entry.pop("data_sha256", None)
        if moved:
            entry["data_file"] = SHARED_WEIGHTS
    manifest.preprocess["aspect"] = (
        f"kept: one grid of a bucketed build; an image whose processor grid is {grid} comes here as the "
        "processor makes it, others of the nearest aspect ratio are resized to it (the run reports the change)")
    report = part / "validation.json"
    if report.is_file():
        shutil.move(str(report), str(root / f"{grid}.validation.json"))
    shutil.rmtree(part)
    return manifest


def _finish(root: Path, manifest: Manifest, shared: str) -> None:
    """A grid's manifest, its graphs pointing at the shared file by its sha256."""
    for entry in manifest.graphs:
        if entry.get("data_file"):
            entry["data_sha256"] = shared
    manifest.write(root, f"{manifest.grid}.json")


def _relocate(source: Path, target: Path, store: _Store) -> int:
    """Copy an ONNX graph with every external tensor moved into the store; returns how many."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    model, moved = onnx.load(str(source), load_external_data=False), 0
    for tensor in _tensors(model.graph):
        if not uses_external_data(tensor):
            continue
        moved += 1
        info = ExternalDataInfo(tensor)
        with open(source.parent / info.location, "rb") as f:
            f.seek(info.offset or 0)
            data = f.read(info.length) if info.length else f.read()
        key = hashlib.sha256(data + f"{tensor.data_type}:{list(tensor.dims)}".encode()).hexdigest()
        offset, length = store.put(data, key)
        del tensor.external_data[:]
        for key, value in (("location", SHARED_WEIGHTS), ("offset", str(offset)), ("length", str(length))):
            field = tensor.external_data.add()
            field.key, field.value = key, value
    onnx.save(model, str(target))
    return moved


def _tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.t is not None and attr.HasField("t"):
                yield attr.t
            for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _tensors(g)


def _write_index(root: Path, spec, manifests: list[Manifest], unit_px: int) -> None:
    from datetime import datetime, timezone
    from ..names import size_hw
    first = manifests[0]
    sizes = [size_hw(m.image_size) for m in manifests]
    buckets = [{"grid": list(m.grid), "image_size": list(size_hw(m.image_size)), "manifest": f"{m.grid}.json",
                "sha256": sha256_file(root / f"{m.grid}.json"), "tokens": m.tokens_per_image,
                "num_patches": m.num_patches} for m in manifests]
    Manifest({
        "schema_version": SCHEMA_VERSION,
        "kind": BUCKET_INDEX_KIND,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": first.model, "family": first.family, "keep": first.keep, "precision": first.precision,
        **{k: first.data.get(k) for k in ("weights", "weights_seed", "checkpoint", "weights_sha256")},
        # what picks a grid per image: the processor's smart_resize at these limits (the
        # largest grid's pixels are the budget), else the grid of the nearest aspect ratio
        "processor": {"unit_px": unit_px, "min_pixels": spec.preprocess["min_pixels"],
                      "max_pixels": max(h * w for h, w in sizes)},
        "buckets": buckets,
        "shared_weights": {"file": SHARED_WEIGHTS, "sha256": sha256_file(root / SHARED_WEIGHTS),
                           "bytes": (root / SHARED_WEIGHTS).stat().st_size},
    }).write(root)
