"""`evoexport triton BUILD --out REPO`: a Triton model repository from a build.

    REPO/
      evoexport/              the ensemble: pixel_values -> features, indices, indices_i, merge_i, picks_i
        config.pbtxt
        1/                    (empty: an ensemble has no file, but Triton wants the version)
      evoexport_pixels/       the first step, in every flavour: pixels holding NaN or infinity get a
        1/model.py            client error (Python backend, numpy only: triton_model.py)
      evoexport_stage_0/      one model per graph of the build, wired by the manifest's tensor names
        config.pbtxt
        1/stage_0.onnx, stage_0.onnx.data       (onnxruntime, openvino: the ONNX with its weights)
        1/model_sm90.plan                       (tensorrt: the engine from `evoexport engines`)
        1/model.py, graph.json, stage_0.onnx... (python: our runtime inside Triton's Python backend)
      evoexport_select_0/ ...
      evoexport_indices/      `indices` under its own name (graphs.py says why)
      multimodal_encoders/    with --for-trtllm: TensorRT-LLM's multimodal encoder contract
      evoexport_mm_in/, evoexport_mm_out/

The manifest decides every name, dtype and shape; the build's batch profile caps
max_batch_size. The repository is written beside REPO and swapped in whole, so a failed
run leaves the previous one as it was.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import EvoExportError, OptionError
from ..files import atomic_dir, write_json
from ..manifest import SHARED_WEIGHTS, Manifest, build_root, is_bucketed, read_buckets, read_manifest, sha256_file
from . import config as tc
from .graphs import indices_graph, mm_in_graph, mm_out_graph

RUNTIMES = ("onnxruntime", "openvino")     # what runs a graph inside the Python backend
MARKER = "evoexport_repository.json"       # inside the ensemble's folder (Triton reads only model folders)
TRTLLM_ENSEMBLE = "multimodal_encoders"
CHECK_STEP = "pixels"                      # {name}_pixels: the step that refuses NaN and infinity
CHECKED = "pixels_checked"                 # the ensemble's name for the pixels that step let through


@dataclass(frozen=True)
class RepositoryOptions:
    """How a build becomes a repository (the CLI fills it from `evoexport triton`'s flags)."""
    flavour: str = "python"        # Triton backend of each graph (FLAVOURS)
    name: str = "evoexport"        # the ensemble's name; its steps are NAME_stage_0, ...
    max_batch: int | None = None   # None: the build's batch profile (and the engines')
    instances: int = 1
    kind: str | None = None        # KIND_GPU or KIND_CPU; None: GPU for tensorrt, else CPU
    queue_delay_us: int = 500
    runtime: str = "onnxruntime"   # python flavour: what runs a graph inside the stub
    for_trtllm: bool = False       # also TensorRT-LLM's `multimodal_encoders` ensemble
    threads: int = 0               # python flavour: threads per graph (0: the runtime's default)

    def check(self) -> None:
        if self.flavour not in FLAVOURS:
            raise EvoExportError(f"unknown Triton backend {self.flavour!r}; choose one of {', '.join(FLAVOURS)}")
        if self.runtime not in RUNTIMES:
            raise OptionError("runtime", f"must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if not self.name.replace("_", "").replace("-", "").isalnum() or self.name == TRTLLM_ENSEMBLE:
            raise OptionError("name", f"{self.name!r}: use letters, digits, '-' and '_' (and not {TRTLLM_ENSEMBLE})")
        if self.instances < 1 or self.queue_delay_us < 0 or (self.max_batch is not None and self.max_batch < 1):
            raise EvoExportError("instances and max_batch must be >= 1, queue_delay_us >= 0")
        if self.kind not in (None, "KIND_GPU", "KIND_CPU"):
            raise EvoExportError(f"instance kind must be KIND_GPU or KIND_CPU, got {self.kind!r}")


@dataclass
class Repository:
    path: Path
    name: str
    flavour: str
    max_batch: int
    models: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    trtllm: dict | None = None
    # a bucketed build's: {ensemble name: [height, width]}, one ensemble per grid
    ensembles: dict | None = None


def _copy(src: Path, dst: Path) -> None:
    """A copy, never a hard link: onnx refuses external data files with more than one link
    ("potential hardlink attack"), so a link would break `onnx.load` of the build itself
    (seen here). shutil.copyfile uses the kernel's in-place copy where it can."""
    shutil.copyfile(src, dst)


def _sys_path() -> list[str]:
    """Where this evoexport and its dependencies live: the Python backend's stub ignores
    PYTHONPATH, so model.py puts these on sys.path itself."""
    import onnxruntime
    here = str(Path(__file__).resolve().parents[2])
    deps = str(Path(onnxruntime.__file__).resolve().parents[1])
    return list(dict.fromkeys([here, deps] + [p for p in sys.path if p.endswith("site-packages")]))


def _python_model(version: Path, parameters: dict) -> dict:
    """Triton's Python backend running triton_model.py; returns the config's parameters."""
    shutil.copy2(Path(__file__).with_name("triton_model.py"), version / "model.py")
    return {"EVOEXPORT_SYS_PATH": json.dumps(_sys_path()), **parameters}


class StepWriter:
    """Writes one graph of the build as a Triton model, in one flavour. `made_here`: a small
    graph this module made (indices, mm_in, mm_out), saved by the caller; the build's
    graphs are copied from it with their weights."""
    platform = ""

    def __init__(self, build_dir: Path, manifest: Manifest, options: RepositoryOptions, batching: tc.Batching):
        self.build_dir, self.manifest, self.options, self.batching = build_dir, manifest, options, batching

    def copy_graph(self, entry: dict, version: Path) -> dict:
        """The graph and its weights into `version`; returns {file: sha256} of what it wrote
        (the manifest's, for a copy: read_manifest just checked the build's files)."""
        if entry.get("data_file") == SHARED_WEIGHTS:   # a bucketed build's grid: only this graph's tensors
            import onnx
            data = f"{entry['file']}.data"
            model = onnx.load(str(self.build_dir / entry["file"]), load_external_data=True)
            onnx.save_model(model, str(version / entry["file"]), save_as_external_data=True, location=data,
                            all_tensors_to_one_file=True)
            return {name: sha256_file(version / name) for name in (entry["file"], data)}
        pairs = ((entry["file"], entry["sha256"]), (entry.get("data_file"), entry.get("data_sha256")))
        for name, _ in pairs:
            if name:
                _copy(self.build_dir / name, version / name)
        return {name: digest for name, digest in pairs if name}

    def write(self, model: str, entry: dict, version: Path, made_here: bool):
        if not made_here:
            self.copy_graph(entry, version)
        return tc.step_config(model, entry, self.batching, platform=self.platform, model_file=entry["file"])


class OnnxRuntimeStep(StepWriter):
    platform = "onnxruntime"


class OpenVinoStep(StepWriter):
    platform = "openvino"


class PythonStep(StepWriter):
    """Our runtime (ONNX Runtime or OpenVINO on the CPU) inside Triton's Python backend."""
    platform = "python"

    def write(self, model: str, entry: dict, version: Path, made_here: bool):
        # what was copied keeps the manifest's hashes; what was written here is hashed here
        hashes = ({entry["file"]: sha256_file(version / entry["file"])} if made_here
                  else self.copy_graph(entry, version))
        if entry.get("data_file") == SHARED_WEIGHTS:     # copied with this graph's tensors alone
            entry = {**entry, "data_file": f"{entry['file']}.data"}
        graph = {"graph": entry, "runtime": self.options.runtime, "threads": self.options.threads,
                 "precision": self.manifest.precision, "sha256": hashes}
        write_json(version / "graph.json", graph)
        # the graph runs on the CPU inside the stub, so inputs arrive as CPU tensors even next to GPU steps
        params = _python_model(version, {"FORCE_CPU_ONLY_INPUT_TENSORS": "yes"})
        return tc.step_config(model, entry, self.batching, platform="python", parameters=params)


class TensorRTStep(StepWriter):
    """The plans of `evoexport engines`, checked against the build (Triton would load whatever
    plan it is given); the small graphs made here run on ONNX Runtime."""
    platform = "tensorrt_plan"

    def __init__(self, build_dir: Path, manifest: Manifest, options: RepositoryOptions, batching: tc.Batching):
        super().__init__(build_dir, manifest, options, batching)
        from ..tensorrt.engines import engine_files, read_engines
        self.engines = read_engines(build_dir)
        engine_files(build_dir, manifest, self.engines)
        if not isinstance(self.engines.get("compute_capability"), str):
            raise EvoExportError(f"{build_dir}: engines.json records no compute capability; rerun `evoexport engines`")

    @property
    def max_batch(self) -> int | None:
        return self.engines.get("batch_profile", {}).get("max")

    def write(self, model: str, entry: dict, version: Path, made_here: bool):
        if made_here:
            return tc.step_config(model, entry, self.batching, platform="onnxruntime", model_file=entry["file"])
        engine = next(e for e in self.engines["engines"] if e["name"] == entry["name"])
        cc = self.engines["compute_capability"]
        plan = f"model_sm{cc.replace('.', '')}.plan"
        _copy(self.build_dir / engine["file"], version / plan)
        return tc.step_config(model, entry, self.batching, platform=self.platform, cc_files={cc: plan})


FLAVOUR_WRITERS = {"onnxruntime": OnnxRuntimeStep, "openvino": OpenVinoStep, "tensorrt": TensorRTStep,
                   "python": PythonStep}
FLAVOURS = tuple(FLAVOUR_WRITERS)


def write_repository(build_dir: str | Path, out: str | Path, options: RepositoryOptions | None = None, *,
                     progress=None, on_commit=None, **fields) -> Repository:
    """Write a build as a Triton model repository at `out`, swapped in whole. `fields`
    override `options` (write_repository(build, out, flavour="onnxruntime"))."""
    options = replace(options or RepositoryOptions(), **fields)
    options.check()
    if is_bucketed(build_dir):    # one ensemble per grid, NAME_ROWSxCOLS, the client choosing the grid
        buckets = read_buckets(build_dir)
        parts = [(m, replace(options, name=f"{options.name}_{m.grid}")) for m in buckets.manifests]
        root = buckets.root
    else:
        parts = [(_check_clips(read_manifest(build_dir), options, build_dir), options)]
        root = build_root(build_dir)     # a bucketed build's grid: its folder
    out = Path(out)
    writers = [(_writer(root, m, o), o) for m, o in parts]
    _check_target(out, parts[0][1].name)
    say = progress or (lambda *_: None)
    with atomic_dir(out, on_commit) as tmp:
        repos = [_write_ensemble(tmp, out, writer, o, say) for writer, o in writers]
    if len(repos) == 1:
        return repos[0]
    return Repository(out, options.name, options.flavour, min(r.max_batch for r in repos),
                      sorted(m for r in repos for m in r.models), repos[0].outputs,
                      ensembles={r.name: list(m.image_hw) for r, (m, _) in zip(repos, parts)})


def _check_clips(manifest: Manifest, options: RepositoryOptions, build_dir) -> Manifest:
    """A temporal build serves whole clips [B, G, 3, H, W], a video build frame pairs
    [B, 6, H, W]; TensorRT-LLM's multimodal contract is one image per item."""
    if manifest.temporal and options.max_batch is not None:
        raise OptionError("max_batch", f"does not apply to {build_dir}: a temporal build's steps take whole clips "
                                       "per request (max_batch_size 0); leave it out")
    if options.for_trtllm and (manifest.temporal or manifest.frames_per_input > 1):
        raise EvoExportError(f"{build_dir} takes {'clips' if manifest.temporal else 'frame pairs'}: TensorRT-LLM's "
                             "multimodal_encoders ensemble takes images; write the repository without --for-trtllm")
    return manifest


def _writer(build_dir: Path, manifest: Manifest, options: RepositoryOptions) -> StepWriter:
    kind = options.kind or ("KIND_GPU" if options.flavour == "tensorrt" else "KIND_CPU")
    batching = tc.Batching(0, options.instances, kind, options.queue_delay_us)
    writer = FLAVOUR_WRITERS[options.flavour](build_dir, manifest, options, batching)
    max_batch = _max_batch(manifest, options, getattr(writer, "max_batch", None))
    # a temporal build's steps read tensors of two batches (B groups, B*(G-1) later frames),
    # which Triton's one batch axis cannot split: each request runs whole (max_batch_size 0)
    writer.batching = batching._replace(max_batch=0 if manifest.temporal else max_batch)
    return writer


def _write_ensemble(tmp: Path, out: Path, writer: StepWriter, options: RepositoryOptions, say) -> Repository:
    """One build's (or grid's) steps and ensemble into the repository being written, and its marker."""
    manifest, max_batch = writer.manifest, writer.batching.max_batch
    repo = _write_models(tmp, writer, Repository(out, options.name, options.flavour, max_batch), say)
    write_json(tmp / options.name / MARKER, {
        "build": str(writer.build_dir.resolve()), "model": manifest.model, "keep": manifest.keep,
        "weights_sha256": manifest.weights_sha256, "flavour": options.flavour,
        "runtime": options.runtime if options.flavour == "python" else None, "max_batch_size": max_batch,
        "image_size": list(manifest.image_hw), "models": repo.models, "outputs": repo.outputs, "trtllm": repo.trtllm})
    return repo


def _max_batch(manifest: Manifest, options: RepositoryOptions, engines_max: int | None) -> int:
    profile = min(manifest.max_batch, engines_max or manifest.max_batch)
    if options.max_batch is not None and options.max_batch > profile:
        raise OptionError("max_batch", f"{options.max_batch} is larger than the build's batch profile "
                             f"(max {profile}); Triton would refuse the ensemble")
    return options.max_batch or profile


def _check_target(out: Path, name: str) -> None:
    if out.is_file() or (out.exists() and not (out / name / MARKER).is_file() and any(out.iterdir())):
        raise EvoExportError(f"{out} exists and is not a repository evoexport wrote for the ensemble {name}; "
                             "refusing to replace it")


def _write_models(tmp: Path, writer: StepWriter, repo: Repository, say) -> Repository:
    """Every step, the ensemble that chains them (and TensorRT-LLM's), and their configs."""
    import onnx
    manifest, name = writer.manifest, repo.name
    # each graph on its own (a stage's entry nests its selection's)
    graphs = [{k: v for k, v in g.items() if k != "select"} for g in manifest.graphs]
    # a temporal build's assemble graph writes `indices` itself
    made = [] if manifest.temporal else [indices_graph(manifest)]
    if writer.options.for_trtllm:
        made += [mm_in_graph(manifest), mm_out_graph(manifest)]
    configs = {}
    for entry, graph in [(g, None) for g in graphs] + [(e, m) for m, e in made]:
        model, version = f"{name}_{entry['name']}", tmp / f"{name}_{entry['name']}" / "1"
        version.mkdir(parents=True)
        if graph is not None:
            onnx.save(graph, version / entry["file"])
        else:
            say(f"{model}: {entry['file']}")
        configs[model] = writer.write(model, entry, version, made_here=graph is not None)
    indices = made[0][1] if made else None
    configs.update(_ensemble(tmp, writer, repo, graphs + ([indices] if indices else []), indices))
    if writer.options.for_trtllm:
        configs.update(_trtllm_ensemble(repo, made[1][1], made[2][1], manifest))
    tc.check_ensemble(configs)
    for model, cfg in configs.items():
        (tmp / model / "1").mkdir(parents=True, exist_ok=True)
        (tmp / model / "config.pbtxt").write_text(tc.to_text(cfg))
    repo.models = sorted(configs)
    return repo


def _ensemble(tmp: Path, writer: StepWriter, repo: Repository, graphs: list[dict], indices: dict | None) -> dict:
    """The pixels check (NaN or infinity: a client error, as the library gives), then every
    graph, wired by the manifest's tensor names; the ensemble's outputs are the chain's
    (`indices` from the indices step made here, or from a temporal build's assemble graph)."""
    manifest, name = writer.manifest, repo.name
    pixels, checked = manifest.pixels, {**manifest.pixels, "name": CHECKED}
    check_model = f"{name}_{CHECK_STEP}"
    (tmp / check_model / "1").mkdir(parents=True)
    params = _python_model(tmp / check_model / "1", {"EVOEXPORT_STEP": "pixels"})
    configs = {check_model: tc.step_config(check_model, {"inputs": [pixels], "outputs": [checked]},
                                           writer.batching._replace(kind="KIND_CPU"), platform="python",
                                           parameters=params)}
    # features, indices (the indices step's; or a temporal build's assemble graph's, then
    # frames and owners), then per prune point indices_i, merge_i, picks_i
    outputs = ([manifest.features, indices["outputs"][0], *manifest.outputs[1:]] if indices
               else list(manifest.outputs))
    steps = [(check_model, {pixels["name"]: pixels["name"]}, {CHECKED: CHECKED})]
    steps += [(f"{name}_{e['name']}", {t["name"]: CHECKED if t["name"] == pixels["name"] else t["name"]
                                       for t in e["inputs"]},
               {t["name"]: t["name"] for t in e["outputs"]}) for e in graphs]
    configs[name] = tc.ensemble_config(name, manifest.inputs, outputs, steps, writer.batching.max_batch)
    repo.outputs = [t["name"] for t in outputs]
    return configs


def _trtllm_ensemble(repo: Repository, mm_in: dict, mm_out: dict, manifest: Manifest) -> dict:
    """TensorRT-LLM's multimodal encoder contract: fp16 IMAGE in, the prompt table out."""
    name, spec = repo.name, manifest.pixels
    steps = [(f"{name}_mm_in", {"IMAGE": "IMAGE"}, {spec["name"]: spec["name"]}),
             (name, {spec["name"]: spec["name"]}, {"features": "features"}),
             (f"{name}_mm_out", {"features": "features"}, {t["name"]: t["name"] for t in mm_out["outputs"]})]
    k, hidden = manifest.features["shape"][1:]
    repo.trtllm = {"ensemble": TRTLLM_ENSEMBLE, "tokens_per_image": k, "hidden": hidden,
                   "max_multimodal_len": repo.max_batch * k}
    return {TRTLLM_ENSEMBLE: tc.ensemble_config(TRTLLM_ENSEMBLE, mm_in["inputs"], mm_out["outputs"], steps,
                                                repo.max_batch)}


def describe(repo: Repository) -> str:
    ensembles = (", ".join(f"'{n}' ({h}x{w} px)" for n, (h, w) in repo.ensembles.items()) if repo.ensembles
                 else f"'{repo.name}'")
    batch = (f"max_batch_size {repo.max_batch}" if repo.max_batch
             else "whole clips per request (max_batch_size 0: pixel_values [B, G, C, H, W])")
    lines = [f"wrote {repo.path}: Triton model repository ({repo.flavour}), "
             f"ensemble{'s' * bool(repo.ensembles)} {ensembles}, {batch}, "
             f"{len(repo.models)} models", f"  outputs: {', '.join(repo.outputs)}"]
    if repo.trtllm:
        t = repo.trtllm
        lines.append(f"  TensorRT-LLM: ensemble '{t['ensemble']}' gives OUT_PROMPT_EMBEDDING_TABLE fp16 "
                     f"[B, {t['tokens_per_image']}, {t['hidden']}] and OUT_PROMPT_VOCAB_SIZE int32 [B, 1]")
        lines.append(f"  build the LLM engine with --max_multimodal_len {t['max_multimodal_len']} "
                     f"(max batch {repo.max_batch} x {t['tokens_per_image']} tokens per image)")
    return "\n".join(lines)
