"""manifest.json: the contract between the builder and every runtime.

A build directory holds one ONNX file per graph (plus its external weights) and this
manifest. Everything a runtime needs is here: the graphs in execution order, the tensor
names that wire them, shapes and dtypes, the preprocessing, and a sha256 of every file so
a runtime can refuse a truncated or edited build. See docs/manifest.md.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from .errors import EvoExportError
from .files import read_json, write_json
from . import names
from .names import Grid, Word, size_hw

class Precision(Word):
    """What a build's encoder stages compute in, in one place: the CLI's choices, the builder,
    the backends; the schema's enum is checked against it (tests/test_layout.py). Selections
    always compute in fp32."""
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"

    @property
    def is_half(self) -> bool:
        """16-bit floating stages (weights and math in the ONNX; LayerNorm and I/O fp32)."""
        return self in (Precision.FP16, Precision.BF16)

    @property
    def torch_dtype(self) -> str | None:
        """The torch dtype a floating precision computes in (None: int8, a QDQ build)."""
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(self.value)


PRECISIONS = tuple(p.value for p in Precision)
# what a runtime can be asked to compute floating stages in (OpenVINO's hint, the torch chain)
FLOAT_PRECISIONS = tuple(p.value for p in Precision if p.torch_dtype)
# the torch dtype each floating precision computes in (the reduced-precision tower, the GPU chain)
TORCH_DTYPES = {p.value: p.torch_dtype for p in Precision if p.torch_dtype}
SCHEMA_VERSION = 2   # 2: selection graphs also output their decisions (merge_i, picks_i); `precision`
MANIFEST = "manifest.json"
# a bucketed build (export/buckets.py): manifest.json is an index of grids, each grid's
# manifest is GRID.json beside it, and every graph's tensors are in one shared file
BUCKET_INDEX_KIND = "buckets"
SHARED_WEIGHTS = "weights.bin"
SCHEMA_PATH = Path(__file__).resolve().parent / "data" / "manifest.schema.json"


@functools.lru_cache(maxsize=1)
def _validator():
    import jsonschema
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))


def check_schema(manifest: dict, where: str | Path = MANIFEST) -> None:
    """Refuse a manifest that does not follow data/manifest.schema.json, naming the first
    problem: a missing key, a wrong type, a graph file that is not a plain name inside the
    build (absolute, or climbing out with '..'). A manifest is input, and input may be hostile."""
    import jsonschema
    error = jsonschema.exceptions.best_match(_validator().iter_errors(manifest))
    if error is not None:
        message = error.message if len(error.message) <= 160 else error.message[:157] + "..."
        raise EvoExportError(f"{where} is not a valid evoexport manifest: at {error.json_path}: {message}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class Manifest:
    """A checked manifest.json, read by name: the one place that knows its keys. Graph
    entries (`graphs`, `stages`, `inputs`, `outputs`) stay the plain dicts the schema
    describes (name, file, inputs, outputs with name, dtype and shape); `data` is the JSON."""

    def __init__(self, data: dict):
        self.data = data

    def __repr__(self) -> str:
        return f"Manifest({self.model}, keep {self.keep}, {self.precision})"

    # what was built
    schema_version = property(lambda self: self.data["schema_version"])
    model = property(lambda self: self.data["model"])
    family = property(lambda self: self.data["family"])
    keep = property(lambda self: self.data["keep"])
    precision = property(lambda self: Precision(self.data.get("precision", "fp32")))
    prune_params = property(lambda self: self.data["prune_params"])
    # the schedule as [{"after_layer", "tokens"}] (none: an unpruned build)
    schedule = property(lambda self: self.data["schedule"])
    flops = property(lambda self: self.data["flops"])
    ideal_speedup = property(lambda self: self.data["flops"]["ideal_speedup"])
    # the weights: "random" (seeded) or "checkpoint", and their sha256
    weights = property(lambda self: self.data["weights"])
    weights_sha256 = property(lambda self: self.data.get("weights_sha256"))
    weights_seed = property(lambda self: self.data.get("weights_seed") or 0)
    checkpoint = property(lambda self: self.data.get("checkpoint"))
    # the tower's sizes (TowerSpec's fields, plus depth, grid, num_patches, has_cls, ...)
    tower = property(lambda self: self.data["tower"])
    # an int (a square), or (height, width): a Qwen build at one of the processor's own grids
    image_size = property(lambda self: _size(self.data["tower"]["image_size"]))
    grid = property(lambda self: Grid.of(self.data["tower"]["grid"]))
    num_patches = property(lambda self: self.data["tower"]["num_patches"])
    preprocess = property(lambda self: self.data["preprocess"])
    pad_to_square = property(lambda self: self.data["preprocess"].get("pad_to_square"))
    # the chain's wiring
    stages = property(lambda self: self.data["stages"])
    inputs = property(lambda self: self.data["inputs"])
    outputs = property(lambda self: self.data["outputs"])
    pixels = property(lambda self: self.data["inputs"][0])       # [B, 3 * frames_per_input, H, W] float32
    # 2 for a Qwen2.5-VL video build (two frames stacked on the channel axis), else 1
    frames_per_input = property(lambda self: self.data["tower"].get("frames", 1))
    features = property(lambda self: self.data["outputs"][0])    # [B, K, D]
    batch_profile = property(lambda self: self.data.get("batch_profile", {}))
    max_batch = property(lambda self: self.data.get("batch_profile", {}).get("max", 32))

    @property
    def deepstack(self) -> list[str]:
        """The chain's DeepStack taps (Qwen3-VL), in order: each [B, K, D] like the features."""
        return [o["name"] for o in self.data["outputs"] if names.is_deepstack(o["name"])]

    @property
    def prune_points(self) -> int:
        return len(self.data["schedule"])

    @property
    def kept_patches(self) -> int:
        """Patch tokens (or units) the last stage keeps, of `num_patches`."""
        return self.data["stages"][-1]["tokens_out"]

    @property
    def tokens_per_image(self) -> int:
        """K: the tokens the last stage hands on per image."""
        return self.data["stages"][-1]["outputs"][0]["shape"][1]

    @property
    def temporal(self) -> dict | None:
        """A temporal build's block (group, keep, schedule, window, reuse_similarity, graphs),
        or None for an image build."""
        return self.data.get("temporal")

    def require_images(self, consumer: str, build_dir, *, clips: bool = False, pairs: bool = False) -> "Manifest":
        """Refuse a temporal build (unless `clips`: the consumer takes them) or a video build
        (unless `pairs`) where `consumer` takes image builds only (yet)."""
        if self.temporal and not clips:
            raise EvoExportError(f"{consumer} does not take temporal builds yet ({build_dir} takes groups of "
                                 f"{self.group} frames); use `evoexport run`, `validate` or `eval-video`, or build "
                                 "without --temporal")
        if self.frames_per_input > 1 and not pairs:
            raise EvoExportError(f"{consumer} does not take video builds yet ({build_dir} takes pairs of frames, "
                                 f"[B, {3 * self.frames_per_input}, H, W]); use `evoexport run`, `validate` or "
                                 "attach(), or build without --video")
        return self

    def batch_scale(self, tensor: str) -> int:
        """How many batch items tensor `tensor` has per input: G-1 for a later-frame tensor of
        a temporal build (one per later frame of each group), else 1."""
        return self.group - 1 if self.temporal and names.is_later(tensor) else 1

    @property
    def group(self) -> int:
        """Frames per batch item: G for a temporal build, 1 for an image build."""
        return self.data["temporal"]["group"] if self.data.get("temporal") else 1

    @property
    def graphs(self) -> list[dict]:
        """Every graph in execution order: stage_0, select_0, stage_1, ... (then a temporal
        build's later-frame graphs and its assemble graph)."""
        out = []
        for stage in self.data["stages"]:
            out.append(stage)
            if stage.get("select"):
                out.append(stage["select"])
        return out + list((self.data.get("temporal") or {}).get("graphs", []))

    def output(self, name: str) -> dict:
        """The chain output called `name` (names.indices(i), ...)."""
        for spec in self.data["outputs"]:
            if spec["name"] == name:
                return spec
        raise KeyError(name)

    @property
    def image_hw(self) -> tuple[int, int]:
        return size_hw(self.image_size)

    def write(self, build_dir: Path, name: str = MANIFEST) -> None:
        write_json(Path(build_dir) / name, self.data)


def _size(value):
    """A size as the manifest writes it (an int, or [height, width]) as the code holds it."""
    return tuple(value) if isinstance(value, list) else value


def build_root(build) -> Path:
    """The folder a build's files are in: the build directory, or the folder of one grid's
    manifest (GRID.json) in a bucketed build."""
    build = Path(build)
    return build.parent if build.suffix == ".json" and build.is_file() else build


def read_manifest(build_dir: str | Path, verify: bool = True, files: bool = True, hashed: dict | None = None) -> Manifest:
    """Load and check a build's manifest; with `verify`, hash every file it names. Without
    `files` the graph files are not looked at (readers that never open them: the torch
    backend rebuilds the chain from the manifest and checks the weights' own sha256).
    `build_dir` may also be one grid's manifest in a bucketed build (BUILD/13x18.json);
    `hashed` (path -> sha256) hashes a file several graphs share only once."""
    build_dir = Path(build_dir)
    path, root = _manifest_path(build_dir)
    manifest = _read_object(path)
    if manifest.get("kind") == BUCKET_INDEX_KIND:
        grids = ", ".join(str(b.get("manifest", "?")).removesuffix(".json") for b in manifest.get("buckets") or [])
        raise EvoExportError(f"{build_dir} is a bucketed build (grids {grids}): `run`, `info`, `triton`, attach(), "
                             "the vLLM plugin and the C++ runtime take it whole; for this, give one grid's manifest, "
                             f"e.g. {build_dir / (grids.split(', ')[0] + '.json')}")
    manifest = Manifest(manifest)
    for g in manifest.graphs if files else []:
        for key_file, key_hash in (("file", "sha256"), ("data_file", "data_sha256")):
            name = g.get(key_file)
            if name:
                _check_file(root, name, g.get(key_hash), verify, hashed)
    return manifest


def _manifest_path(build_dir: Path) -> tuple[Path, Path]:
    if build_dir.is_file():
        if build_dir.suffix == ".json" and (build_dir.parent / MANIFEST).is_file():
            return build_dir, build_dir.parent     # one grid of a bucketed build
        raise EvoExportError(f"{build_dir} is a file; give the build directory (the folder that holds {MANIFEST})")
    if not build_dir.is_dir():
        raise EvoExportError(f"build directory {build_dir} does not exist")
    if not (build_dir / MANIFEST).is_file():
        raise EvoExportError(f"{build_dir} is not an evoexport build: no {MANIFEST}")
    return build_dir / MANIFEST, build_dir


def _read_object(path: Path) -> dict:
    """A manifest file: a JSON object of this schema version, following the schema (an index
    of grids is checked by read_buckets)."""
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise EvoExportError(f"{path} is not a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise EvoExportError(f"{path} has schema_version {version!r}; this evoexport reads version {SCHEMA_VERSION}")
    if manifest.get("kind") != BUCKET_INDEX_KIND:
        check_schema(manifest, path)
    return manifest


def _check_file(root: Path, name: str, sha256: str | None, verify: bool, hashed: dict | None) -> None:
    f = root / name
    if not f.is_file():
        raise EvoExportError(f"{root}: {name} named by the manifest is missing")
    if not verify:
        return
    hashed = {} if hashed is None else hashed
    if f not in hashed:
        hashed[f] = sha256_file(f)
    if hashed[f] != sha256:
        raise EvoExportError(f"{root}: {name} does not match its sha256 in the manifest (truncated or edited); "
                             "rebuild it")


class Buckets:
    """A bucketed build: its grids' manifests (in the index's order) and how an image picks one."""

    def __init__(self, root: Path, data: dict, manifests: list[Manifest]):
        self.root, self.data, self.manifests = root, data, manifests

    def __repr__(self) -> str:
        return f"Buckets({self.data['model']}, {', '.join(map(str, self.grids))})"

    model = property(lambda self: self.data["model"])
    keep = property(lambda self: self.data["keep"])
    # the processor's smart_resize limits ({"unit_px", "min_pixels", "max_pixels"})
    processor = property(lambda self: self.data["processor"])
    grids = property(lambda self: [m.grid for m in self.manifests])
    sizes = property(lambda self: [m.image_hw for m in self.manifests])
    paths = property(lambda self: [self.root / b["manifest"] for b in self.data["buckets"]])
    shared_bytes = property(lambda self: self.data["shared_weights"]["bytes"])


def is_bucketed(build) -> bool:
    """A bucketed build's folder (its manifest.json an index of grids)."""
    path = Path(build) / MANIFEST
    if not path.is_file():
        return False
    data = read_json(path)
    return isinstance(data, dict) and data.get("kind") == BUCKET_INDEX_KIND


def read_buckets(build_dir: str | Path, verify: bool = True) -> Buckets:
    """A bucketed build's index, each grid's manifest checked against its sha256 and read
    (the shared weights hashed once)."""
    build_dir = Path(build_dir)
    path, root = _manifest_path(build_dir)
    data = _read_object(path)
    if data.get("kind") != BUCKET_INDEX_KIND:
        raise EvoExportError(f"{build_dir} is a one-grid build, not a bucketed one")
    buckets, shared = data.get("buckets"), data.get("shared_weights")
    if not isinstance(buckets, list) or not buckets or not isinstance(shared, dict):
        raise EvoExportError(f"{path} is not a valid index of grids: it needs `buckets` and `shared_weights`")
    hashed: dict = {}
    _check_file(root, _plain_name(shared.get("file"), path), shared.get("sha256"), verify, hashed)
    manifests = []
    for b in buckets:
        name = _plain_name(b.get("manifest") if isinstance(b, dict) else None, path)
        _check_file(root, name, b.get("sha256"), verify, hashed)
        manifests.append(read_manifest(root / name, verify=verify, hashed=hashed))
    _check_limits(data.get("processor"), path)
    return Buckets(root, data, manifests)


def _plain_name(name, where: Path) -> str:
    """A file name inside the build: no folder, no '..' (a manifest is input)."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise EvoExportError(f"{where}: {name!r} is not a plain file name inside the build")
    return name


def _check_limits(limits, where: Path) -> None:
    keys = ("unit_px", "min_pixels", "max_pixels")
    if not isinstance(limits, dict) or not all(isinstance(limits.get(k), int) and not isinstance(limits.get(k), bool)
                                               and limits[k] > 0 for k in keys):
        raise EvoExportError(f"{where}: `processor` must give {', '.join(keys)} as positive integers")


def check_graph_io(entry: dict, found_inputs: list, found_outputs: list, runtime: str) -> None:
    """The manifest is input: refuse a graph whose real inputs and outputs (what `runtime`
    loaded, as (names, dtype, shape): the names a port goes by, None or a string for a
    dynamic axis) are not the ones the manifest names, in element type, rank and fixed sizes.
    A renamed tensor or two swapped graphs would otherwise fail mid-run inside the runtime,
    or run with wrong wiring."""
    where = f"{entry['file']} ({entry['name']})"
    for kind, wanted, found in (("input", entry["inputs"], found_inputs), ("output", entry["outputs"], found_outputs)):
        found = [((names,) if isinstance(names, str) else tuple(names), dtype, shape) for names, dtype, shape in found]
        by_name = {name: (dtype, shape) for names, dtype, shape in found for name in names}
        for spec in wanted:
            if spec["name"] not in by_name:
                raise EvoExportError(f"{where} has no {kind} {spec['name']!r}, which the manifest names (the graph's "
                                     f"{kind}s: {', '.join(sorted(by_name)) or 'none'}); the graph and the manifest "
                                     "do not belong together, rebuild")
            dtype, shape = by_name[spec["name"]]
            if dtype != spec["dtype"] or not _same_dims(shape, spec["shape"]):
                raise EvoExportError(f"{where}: {kind} {spec['name']!r} is {dtype} {_dims(shape)} in the graph "
                                     f"({runtime}), {spec['dtype']} {_dims(spec['shape'])} in the manifest; rebuild")
        if kind == "input":   # a port none of whose names the manifest gives would never be fed
            named = {spec["name"] for spec in wanted}
            extra = sorted(names[0] for names, _, _ in found if names and not named & set(names))
            if extra:
                raise EvoExportError(f"{where} takes input(s) {', '.join(extra)}, which the manifest does not name; "
                                     "the graph and the manifest do not belong together, rebuild")


def _fixed(d) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 0


def _same_dims(found: list | None, wanted: list) -> bool:
    """Same rank, and the same size on every axis both fix (None: a rank not even known)."""
    return found is not None and len(found) == len(wanted) and all(
        a == b for a, b in zip(found, wanted) if _fixed(a) and _fixed(b))


def _dims(shape: list | None) -> str:
    if shape is None:
        return "of unknown rank"
    return "[" + ", ".join(str(d) if _fixed(d) else "B" for d in shape) + "]"
