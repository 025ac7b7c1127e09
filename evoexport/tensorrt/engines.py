"""TensorRT engines for a build: strongly typed, one per graph, for TensorRT 10 and 11.

    evoexport build --model llava --keep 0.5 --precision fp16 --target tensorrt
    evoexport engines graphs/llava-keep0.5-fp16 --timing-cache ~/.cache/evoexport/trt.cache
    evoexport.load("graphs/llava-keep0.5-fp16", backend="tensorrt")   # runtime/backends/tensorrt.py

Precision comes from the ONNX, never from builder flags. TensorRT 11 removed the weak
typing flags (BuilderFlag.FP16 and friends), and on TensorRT 10 weakly typed fp16 is
known to wreck ViT accuracy (TensorRT-LLM #3223: a Qwen2.5-VL ViT at cosine 0.14 with
--fp16, 0.9997 strongly typed; TensorRT #2709: a CLIP ViT). So every network is created
strongly typed:
  - TensorRT 10: NetworkDefinitionCreationFlag.STRONGLY_TYPED;
  - TensorRT 11: strong typing is always on; the flag is passed if it still exists.
An fp16 engine is built from an `--precision fp16` build, whose stages carry fp16 in the
ONNX and whose selections stay fp32.

One optimization profile over the batch axis, from the manifest's batch_profile
(min/opt/max) unless given. A timing cache (`--timing-cache FILE`, as with trtexec) is
read if present and written back atomically. engines.json records the TensorRT version,
the GPU and its compute capability; loading engines on another TensorRT or GPU is one
clear error (runtime/backends/tensorrt.py). Engines are built through Polygraphy's loaders
(network_from_onnx_path, CreateConfig, engine_bytes_from_network) and run by its TrtRunner;
tests run the real Polygraphy over stand-in TensorRT 10 and 11 modules, pinning what
reaches TensorRT.

Where this code has and has not run: docs/gpu.md ("Not run").
"""
from __future__ import annotations

from pathlib import Path

from ..errors import EvoExportError
from ..files import atomic_write, read_json, write_json
from ..manifest import read_manifest, sha256_file

ENGINES = "engines.json"
DEFAULT_BATCH_PROFILE = {"min": 1, "opt": 1, "max": 32}


def _require_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise EvoExportError("TensorRT is not installed: on a machine with an NVIDIA GPU, "
                             "pip install 'evoexport[tensorrt]' (and a CUDA build of torch)") from None
    return tensorrt


def trt_major(trt) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        raise EvoExportError(f"cannot read TensorRT's version {trt.__version__!r}") from None


def gpu_info() -> dict:
    """The GPU engines are built for (engines are specific to its compute capability)."""
    import torch
    if not torch.cuda.is_available():
        raise EvoExportError("TensorRT engines are built on the GPU that will run them; this machine has no CUDA GPU")
    major, minor = torch.cuda.get_device_capability(0)
    return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def network_flags(trt) -> int:
    """Creation flags of a strongly typed network on this TensorRT."""
    major = trt_major(trt)
    if major < 10:
        raise EvoExportError(f"TensorRT {trt.__version__} is too old: strongly typed engines need TensorRT >= 10")
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        if major >= 11:
            return 0   # always strongly typed
        raise EvoExportError(f"TensorRT {trt.__version__} has no strongly typed networks (needs >= 10.0)")
    return 1 << int(flag)


def build_plan(onnx_path: Path, shapes: dict, timing_cache: bytes = b"", strongly_typed: bool = True) -> tuple[bytes, bytes]:
    """One serialized engine from one ONNX file, through Polygraphy's loaders; returns
    (plan, updated timing cache).

    - network_from_onnx_path(strongly_typed=True): precision is what the ONNX says (False
      only on a TensorRT 11 without the flag, whose networks are always strongly typed);
    - CreateConfig(profiles=[one batch profile], load_timing_cache=...): no precision flags,
      and tf32=False, which clears TensorRT's default-on TF32 (10 mantissa bits, ~1e-3
      relative): the selections' decisions are validated at fp32's 1e-4 margin, so an fp32
      build means fp32;
    - engine_bytes_from_network: engine_from_network without deserializing the engine we
      are about to write to a file.
    The timing cache travels as bytes, through temporary files to Polygraphy: the caller
    writes it atomically, where Polygraphy would rewrite the user's file in place."""
    import tempfile

    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path
    from polygraphy.logger import G_LOGGER

    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    try:
        # real files, as Polygraphy wants of file objects (a mode; fsync on save); its info
        # lines would name those temporary files: warnings and errors only, our progress says the rest
        with tempfile.TemporaryFile("w+b") as loaded, tempfile.TemporaryFile("w+b") as saved, \
                G_LOGGER.verbosity(G_LOGGER.WARNING):
            loaded.write(timing_cache)
            loaded.seek(0)
            config = CreateConfig(profiles=[profile], tf32=False, load_timing_cache=loaded)
            network = network_from_onnx_path(str(onnx_path), strongly_typed=strongly_typed)
            plan = engine_bytes_from_network(network, config, save_timing_cache=saved)
            saved.seek(0)
            cache = saved.read()
    except Exception as e:   # Polygraphy reports failures as PolygraphyException after logging them
        raise EvoExportError(f"TensorRT failed to build an engine for {onnx_path.name}: "
                             f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}") from None
    return bytes(plan), cache or timing_cache


def batch_profile(manifest: dict, min_batch=None, opt_batch=None, max_batch=None) -> dict:
    prof = {**DEFAULT_BATCH_PROFILE, **manifest.batch_profile}
    for key, value in (("min", min_batch), ("opt", opt_batch), ("max", max_batch)):
        if value is not None:
            prof[key] = value
    if not 1 <= prof["min"] <= prof["opt"] <= prof["max"]:
        raise EvoExportError(f"need 1 <= min ({prof['min']}) <= opt ({prof['opt']}) <= max ({prof['max']}) batch")
    return prof


def build_engines(build_dir: str | Path, min_batch: int | None = None, opt_batch: int | None = None,
                  max_batch: int | None = None, timing_cache: str | Path | None = None, progress=None) -> dict:
    build_dir = Path(build_dir)
    if build_dir.is_file():   # engines.json beside every grid's graphs would be one file for all
        raise EvoExportError(f"evoexport engines takes a build directory; {build_dir} is one grid of a bucketed "
                             "build (engines for bucketed builds are not written yet)")
    manifest = read_manifest(build_dir)
    prof = batch_profile(manifest, min_batch, opt_batch, max_batch)
    trt = _require_tensorrt()
    # TensorRT >= 10, or one clear error first; on an 11.x without the flag, networks are
    # always strongly typed and Polygraphy must not be asked for the missing flag
    strongly_typed = bool(network_flags(trt))
    gpu = gpu_info()
    cache_path = Path(timing_cache).expanduser() if timing_cache else None
    cache = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    entries = []
    for g in manifest.graphs:
        if progress:
            progress(f"building the TensorRT engine for {g['name']} (strongly typed, batch {prof['min']}..{prof['max']})")
        # a temporal build's later-frame tensors hold G-1 items per clip of the profile
        shapes = {t["name"]: tuple((b * manifest.batch_scale(t["name"]), *t["shape"][1:])
                                   for b in (prof["min"], prof["opt"], prof["max"])) for t in g["inputs"]}
        plan, cache = build_plan(build_dir / g["file"], shapes, cache, strongly_typed)
        path = build_dir / f"{g['name']}.engine"
        atomic_write(path, plan)
        entries.append({"name": g["name"], "file": path.name, "sha256": sha256_file(path), "onnx_sha256": g["sha256"]})
        if cache_path:   # after every engine: an interrupted run keeps what it learned
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache_path, cache)
    info = {"tensorrt": str(trt.__version__), **gpu, "strongly_typed": True, "precision": manifest.precision,
            "batch_profile": prof, "timing_cache": str(cache_path) if cache_path else None, "engines": entries}
    write_json(build_dir / ENGINES, info)
    return info


def read_engines(build_dir: Path) -> dict:
    """engines.json, checked: a JSON object whose `engines` list names, for every graph, a
    plain file inside the build and the hashes it is checked by. It is input: a hostile or
    truncated one is refused with one line."""
    path = Path(build_dir) / ENGINES
    if not path.is_file():
        raise EvoExportError(f"{build_dir} has no TensorRT engines; run `evoexport engines {build_dir}` on the target GPU")
    info = read_json(path, "rebuild the engines")
    entries = info.get("engines") if isinstance(info, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise EvoExportError(f"{path} has no list of engines; rebuild the engines")
    for e in entries:
        for key in ("name", "file", "sha256", "onnx_sha256"):
            if not isinstance(e.get(key), str):
                raise EvoExportError(f"{path}: an engine entry lacks {key!r}; rebuild the engines")
        if Path(e["file"]).name != e["file"] or e["file"] in ("", ".", ".."):
            raise EvoExportError(f"{path}: engine file {e['file']!r} must be a plain file name inside the build")
    return info


def engine_files(build_dir: Path, manifest: dict, info: dict, verify: bool = True) -> dict:
    """{graph name: its engine file}: one engine per graph of the build, made from that very
    ONNX (engines.json's onnx_sha256), present and, with `verify`, matching its own sha256.
    The one check of engines against a build (the TensorRT backend, the Triton repository)."""
    by_name = {e["name"]: e for e in info["engines"]}
    files = {}
    for g in manifest.graphs:
        e = by_name.get(g["name"])
        if e is None:
            raise EvoExportError(f"{build_dir}: {ENGINES} has no engine for {g['name']}; rerun `evoexport engines`")
        if e["onnx_sha256"] != g["sha256"]:
            raise EvoExportError(f"{build_dir}: the engine for {g['name']} was built from another {g['file']}; "
                                 "rerun `evoexport engines`")
        path = Path(build_dir) / e["file"]
        if not path.is_file():
            raise EvoExportError(f"{build_dir}: engine file {e['file']} is missing; rerun `evoexport engines`")
        if verify and sha256_file(path) != e["sha256"]:
            raise EvoExportError(f"{build_dir}: {e['file']} does not match its sha256 in {ENGINES}; "
                                 "rerun `evoexport engines`")
        files[g["name"]] = path
    return files


def check_engines_match(info: dict, trt, gpu: dict) -> None:
    """Engines run only on the TensorRT version and GPU compute capability they were built for."""
    have = (str(trt.__version__), gpu["compute_capability"])
    built = (info.get("tensorrt"), info.get("compute_capability"))
    if have != built:
        raise EvoExportError(f"these engines were built with TensorRT {built[0]} for {info.get('gpu')} (sm {built[1]}); "
                             f"this machine has TensorRT {have[0]} and {gpu['gpu']} (sm {have[1]}): "
                             "rebuild them here with `evoexport engines DIR`")
