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
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EvoExportError
from ..files import atomic_dir, write_json
from ..manifest import graph_entries, read_manifest, sha256_file
from . import config as tc
from .graphs import indices_graph, mm_in_graph, mm_out_graph

FLAVOURS = ("onnxruntime", "openvino", "tensorrt", "python")
RUNTIMES = ("onnxruntime", "openvino")     # what runs a graph inside the Python backend
MARKER = "evoexport_repository.json"       # inside the ensemble's folder (Triton reads only model folders)
TRTLLM_ENSEMBLE = "multimodal_encoders"
CHECK_STEP = "pixels"                      # {name}_pixels: the step that refuses NaN and infinity
CHECKED = "pixels_checked"                 # the ensemble's name for the pixels that step let through


@dataclass
class Repository:
    path: Path
    name: str
    flavour: str
    max_batch: int
    models: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    trtllm: dict | None = None


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


def write_repository(build_dir: str | Path, out: str | Path, *, flavour: str = "python", name: str = "evoexport",
                     max_batch: int | None = None, instances: int = 1, kind: str | None = None,
                     queue_delay_us: int = 500, runtime: str = "onnxruntime", for_trtllm: bool = False,
                     threads: int = 0, progress=None, on_commit=None) -> Repository:
    build_dir, out = Path(build_dir), Path(out)
    if flavour not in FLAVOURS:
        raise EvoExportError(f"unknown Triton backend {flavour!r}; choose one of {', '.join(FLAVOURS)}")
    if runtime not in RUNTIMES:
        raise EvoExportError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if not name.replace("_", "").replace("-", "").isalnum() or name == TRTLLM_ENSEMBLE:
        raise EvoExportError(f"--name {name!r}: use letters, digits, '-' and '_' (and not {TRTLLM_ENSEMBLE})")
    if instances < 1 or queue_delay_us < 0 or (max_batch is not None and max_batch < 1):
        raise EvoExportError("--instances and --max-batch must be >= 1, --queue-delay-us >= 0")
    manifest = read_manifest(build_dir)
    kind = kind or ("KIND_GPU" if flavour == "tensorrt" else "KIND_CPU")
    if kind not in ("KIND_GPU", "KIND_CPU"):
        raise EvoExportError(f"instance kind must be KIND_GPU or KIND_CPU, got {kind!r}")
    profile = manifest.get("batch_profile", {}).get("max", 32)
    engines = None
    if flavour == "tensorrt":
        from ..tensorrt.engines import engine_files, read_engines
        engines = read_engines(build_dir)
        profile = min(profile, engines.get("batch_profile", {}).get("max", profile))
        engine_files(build_dir, manifest, engines)   # Triton would load whatever plan it is given
        if not isinstance(engines.get("compute_capability"), str):
            raise EvoExportError(f"{build_dir}: engines.json records no compute capability; rerun `evoexport engines`")
    if max_batch is not None and max_batch > profile:
        raise EvoExportError(f"--max-batch {max_batch} is larger than the build's batch profile (max {profile}); "
                             "Triton would refuse the ensemble")
    max_batch = max_batch or profile
    if out.is_file() or (out.exists() and not (out / name / MARKER).is_file() and any(out.iterdir())):
        raise EvoExportError(f"--out {out} exists and is not a repository evoexport wrote for --name {name}; "
                             "refusing to replace it")

    # each graph on its own (a stage's entry nests its selection's)
    graphs = [{k: v for k, v in g.items() if k != "select"} for g in graph_entries(manifest)]
    extra = [indices_graph(manifest)] + ([mm_in_graph(manifest), mm_out_graph(manifest)] if for_trtllm else [])
    common = dict(max_batch=max_batch, instances=instances, kind=kind, queue_delay_us=queue_delay_us)
    configs, repo = {}, Repository(out, name, flavour, max_batch)
    say = progress or (lambda *_: None)
    with atomic_dir(out, on_commit) as tmp:
        for entry in graphs + [e for _, e in extra]:
            model = f"{name}_{entry['name']}"
            version = tmp / model / "1"
            version.mkdir(parents=True)
            onnx_model = next((m for m, e in extra if e is entry), None)
            if onnx_model is not None:
                import onnx
                onnx.save(onnx_model, version / entry["file"])
            else:
                say(f"{model}: {entry['file']}")
            step_flavour = "onnxruntime" if flavour == "tensorrt" and onnx_model is not None else flavour
            if step_flavour == "tensorrt":
                engine = next(e for e in engines["engines"] if e["name"] == entry["name"])
                cc = engines["compute_capability"]
                plan = f"model_sm{cc.replace('.', '')}.plan"
                _copy(build_dir / engine["file"], version / plan)
                configs[model] = tc.step_config(model, entry, platform="tensorrt_plan", cc_files={cc: plan}, **common)
                continue
            if onnx_model is None:
                for key in ("file", "data_file"):
                    if entry.get(key):
                        _copy(build_dir / entry[key], version / entry[key])
            if step_flavour == "python":
                graph = {"graph": entry, "runtime": runtime, "threads": threads,
                         "precision": manifest.get("precision", "fp32"),
                         # the manifest's hashes (read_manifest just checked the build's files against
                         # them); only the small graphs made here are hashed here
                         "sha256": _hashes(entry, version, made_here=onnx_model is not None)}
                write_json(version / "graph.json", graph)
                shutil.copy2(Path(__file__).with_name("triton_model.py"), version / "model.py")
                # our runtime runs the graph on the CPU inside the stub (ONNX Runtime's CPU
                # provider or OpenVINO), so inputs arrive as CPU tensors even next to GPU steps
                params = {"EVOEXPORT_SYS_PATH": json.dumps(_sys_path()), "FORCE_CPU_ONLY_INPUT_TENSORS": "yes"}
                configs[model] = tc.step_config(model, entry, platform="python", parameters=params, **common)
            else:
                configs[model] = tc.step_config(model, entry, platform=step_flavour, model_file=entry["file"], **common)

        # the first step refuses pixels holding NaN or infinity (a client error), as the library does
        pixels, checked = manifest["inputs"][0], {**manifest["inputs"][0], "name": CHECKED}
        check_model = f"{name}_{CHECK_STEP}"
        (tmp / check_model / "1").mkdir(parents=True)
        shutil.copy2(Path(__file__).with_name("triton_model.py"), tmp / check_model / "1" / "model.py")
        configs[check_model] = tc.step_config(check_model, {"inputs": [pixels], "outputs": [checked]},
                                              platform="python", **{**common, "kind": "KIND_CPU"},
                                              parameters={"EVOEXPORT_SYS_PATH": json.dumps(_sys_path()),
                                                          "EVOEXPORT_STEP": "pixels"})
        # features, indices, then per prune point indices_i, merge_i, picks_i
        outputs = [manifest["outputs"][0], extra[0][1]["outputs"][0], *manifest["outputs"][1:]]
        steps = [(check_model, {pixels["name"]: pixels["name"]}, {CHECKED: CHECKED})]
        steps += [(f"{name}_{e['name']}", {t["name"]: CHECKED if t["name"] == pixels["name"] else t["name"]
                                           for t in e["inputs"]},
                   {t["name"]: t["name"] for t in e["outputs"]}) for e in graphs + [extra[0][1]]]
        configs[name] = tc.ensemble_config(name, manifest["inputs"], outputs, steps, max_batch)
        repo.outputs = [t["name"] for t in outputs]
        if for_trtllm:
            (_, mm_in), (_, mm_out) = extra[1], extra[2]
            spec = manifest["inputs"][0]
            steps = [(f"{name}_mm_in", {"IMAGE": "IMAGE"}, {spec["name"]: spec["name"]}),
                     (name, {spec["name"]: spec["name"]}, {"features": "features"}),
                     (f"{name}_mm_out", {"features": "features"},
                      {t["name"]: t["name"] for t in mm_out["outputs"]})]
            configs[TRTLLM_ENSEMBLE] = tc.ensemble_config(TRTLLM_ENSEMBLE, mm_in["inputs"], mm_out["outputs"], steps,
                                                          max_batch)
            k = manifest["outputs"][0]["shape"][1]
            repo.trtllm = {"ensemble": TRTLLM_ENSEMBLE, "tokens_per_image": k, "hidden": manifest["outputs"][0]["shape"][2],
                           "max_multimodal_len": max_batch * k}
        tc.check_ensemble(configs)
        for model, cfg in configs.items():
            (tmp / model / "1").mkdir(parents=True, exist_ok=True)
            (tmp / model / "config.pbtxt").write_text(tc.to_text(cfg))
        repo.models = sorted(configs)
        write_json(tmp / name / MARKER, {
            "build": str(build_dir.resolve()), "model": manifest["model"], "keep": manifest["keep"],
            "weights_sha256": manifest.get("weights_sha256"), "flavour": flavour,
            "runtime": runtime if flavour == "python" else None, "max_batch_size": max_batch, "models": repo.models,
            "outputs": repo.outputs, "trtllm": repo.trtllm})
    return repo


def _hashes(entry: dict, version: Path, made_here: bool) -> dict:
    if made_here:
        return {entry["file"]: sha256_file(version / entry["file"])}
    pairs = ((entry["file"], entry["sha256"]), (entry.get("data_file"), entry.get("data_sha256")))
    return {f: h for f, h in pairs if f}


def describe(repo: Repository) -> str:
    lines = [f"wrote {repo.path}: Triton model repository ({repo.flavour}), ensemble '{repo.name}', "
             f"max_batch_size {repo.max_batch}, {len(repo.models)} models",
             f"  outputs: {', '.join(repo.outputs)}"]
    if repo.trtllm:
        t = repo.trtllm
        lines.append(f"  TensorRT-LLM: ensemble '{t['ensemble']}' gives OUT_PROMPT_EMBEDDING_TABLE fp16 "
                     f"[B, {t['tokens_per_image']}, {t['hidden']}] and OUT_PROMPT_VOCAB_SIZE int32 [B, 1]")
        lines.append(f"  build the LLM engine with --max_multimodal_len {t['max_multimodal_len']} "
                     f"(max batch {repo.max_batch} x {t['tokens_per_image']} tokens per image)")
    return "\n".join(lines)
