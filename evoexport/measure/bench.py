"""`evoexport bench`: the pruned chain against what users would run instead.

Systems: the pruned chain and the unpruned (keep 1.0) export of the same weights on each
`--backend` (ONNX Runtime, OpenVINO with its defaults: bf16 where the CPU has it), and
transformers' own model in fp32 and under `torch.autocast("cpu", torch.bfloat16)`. All
run in one process on the same photos and threads, one after the other in blocks
(interleaving them lets one runtime's spinning worker threads steal the cores from the
next). Reported: median and p90 latency per batch size, each backend's pruned vs unpruned
speedup as a fraction of the FLOP ideal, and the fastest pruned system against the
fastest unpruned one of any kind: the comparison that decides whether pruning pays.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import EvoExportError, OptionError
from ..inputs.images import sample_batch
from ..manifest import Manifest, read_manifest
from ..models.loader import tower_from_manifest
from ..progress import Progress
from ..runtime.runner import Runner
from .timing import CPU_BENCH, BenchOptions, cpu_info, time_systems

SPEEDUP_TARGET = 0.95   # measured pruned/unpruned speedup must reach 95% of the FLOP ideal
HF_FP32 = "transformers fp32 (torch)"
HF_BF16 = "transformers bf16 autocast (torch)"


def run_bench(build_dir: str | Path, options: BenchOptions = CPU_BENCH, progress: Progress | None = None,
              **fields) -> dict:
    """Time the pruned chain and the unpruned export on each backend, and transformers'
    model in fp32 and under bf16 autocast, on the same photos; medians, p90 and ratios.
    `options.precisions`: also time builds of these precisions (same weights, schedule and
    parameters), exported now, on each backend that runs them. `fields` override `options`."""
    import onnxruntime
    import torch

    o = replace(options, **fields)
    o.check()
    backends = tuple(dict.fromkeys(o.backends))
    progress = progress or Progress()
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir).require_images("evoexport bench", build_dir)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    systems = {f"pruned ({b})": Runner(build_dir, backend=b) for b in backends}
    computes_in = {b: systems[f"pruned ({b})"].backend.precision for b in backends}
    with tempfile.TemporaryDirectory(prefix="evoexport-bench-") as tmp:
        tower = _add_unpruned(systems, manifest, o.baseline, backends, Path(tmp), progress)
        extra = _other_precisions(manifest, o.precisions, backends, Path(tmp), progress)
        systems.update(extra["systems"])
        if o.hf:
            systems.update(_transformers_systems(tower or tower_from_manifest(manifest), progress))
        del tower  # transformers' model holds its own copy of the weights
        photos = sample_batch(manifest.image_size, manifest.preprocess)
        rows = [row for b in o.batches for row in _time_batch(systems, photos, b, o, progress)]
    summary = [_summarize(b, [r for r in rows if r["batch"] == b], backends, manifest.ideal_speedup)
               for b in o.batches]
    return {"build": str(build_dir), "model": manifest.model, "keep": manifest.keep,
            "weights": manifest.weights, "threads": threads, "cpu": cpu_info()["cpu"], "precisions": computes_in,
            "build_precision": manifest.precision, "other_precisions": extra["computed"],
            "skipped": extra["skipped"],
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, **_openvino_version(backends)},
            "flops_per_image": manifest.flops, "rows": rows, "summary": summary, "target": SPEEDUP_TARGET}


def _add_unpruned(systems: dict, manifest: Manifest, baseline, backends, tmp: Path, progress: Progress):
    """The unpruned build on each backend (exported now when no baseline is given: its
    tower, then loaded, is returned for transformers' systems)."""
    from ..export.build import build_variant
    tower = None
    if baseline is None:
        progress("exporting the unpruned encoder (keep 1.0, same weights) for comparison")
        result = build_variant(manifest, tmp / "unpruned", unpruned=True)
        baseline, tower = result.path, result.tower
    base_manifest = read_manifest(baseline)
    if base_manifest.prune_points or base_manifest.weights_sha256 != manifest.weights_sha256:
        raise OptionError("baseline", f"{baseline} must be an unpruned (keep 1.0) build of the same weights")
    systems.update({f"unpruned ({b})": Runner(baseline, backend=b) for b in backends})
    return tower


def _transformers_systems(tower, progress: Progress) -> dict:
    """transformers' model with the same weights, in fp32 and under bf16 autocast (what a
    PyTorch user gets from one line)."""
    import torch
    progress("loading transformers' PyTorch model with the same weights")
    run = tower.hf_forward()

    def hf_fp32(x):
        with torch.inference_mode():
            return run(torch.from_numpy(x))

    def hf_bf16(x):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return run(torch.from_numpy(x))
    return {HF_FP32: hf_fp32, HF_BF16: hf_bf16}


def _time_batch(systems: dict, photos: np.ndarray, batch: int, o: BenchOptions, progress: Progress) -> list[dict]:
    x = np.ascontiguousarray(np.resize(photos, (batch, *photos.shape[1:])))
    progress(f"batch {batch}: {o.warmup} warm-up + {o.iters} timed iterations of each of {len(systems)} systems, "
             "interleaved")
    timed = time_systems({name: (lambda fn=fn: fn(x)) for name, fn in systems.items()}, o.iters, o.warmup)
    return [{"batch": batch, "system": name, **{k: v for k, v in t.items() if k != "times_ms"}}
            for name, t in timed.items()]


def _other_precisions(manifest: Manifest, precisions, backends, tmp: Path, progress: Progress) -> dict:
    """Builds of the same weights, schedule and parameters in other precisions, loaded on
    each backend that can run them: systems "pruned PREC (backend)"."""
    from ..export.build import build_variant

    systems, computed, skipped = {}, {}, []
    for prec in dict.fromkeys(precisions):
        if prec == manifest.precision:
            continue
        progress(f"exporting a {prec} build of the same weights and schedule for comparison")
        result = build_variant(manifest, tmp / f"pruned-{prec}", precision=prec)
        for b in backends:
            try:
                runner = Runner(result.path, backend=b)
            except EvoExportError as e:   # e.g. bf16 on ONNX Runtime's CPU provider
                skipped.append(f"{prec} on {b}: {e}")
                continue
            systems[f"pruned {prec} ({b})"] = runner
            computed[f"{prec} on {b}"] = runner.backend.precision
    return {"systems": systems, "computed": computed, "skipped": skipped}


def _summarize(batch: int, rows: list[dict], backends: list[str], ideal: float) -> dict:
    """Per backend: pruned vs its own unpruned export; overall: fastest pruned vs fastest unpruned of any kind."""
    by = {r["system"]: r["median_ms"] for r in rows}
    per_backend = []
    for b in backends:
        speedup = by[f"unpruned ({b})"] / by[f"pruned ({b})"]
        per_backend.append({"backend": b, "speedup_vs_unpruned": speedup, "fraction_of_ideal": speedup / ideal,
                            "meets_target": speedup / ideal >= SPEEDUP_TARGET})
    pruned = min((n for n in by if n.startswith("pruned")), key=by.get)
    unpruned = min((n for n in by if not n.startswith("pruned")), key=by.get)
    best = by[unpruned] / by[pruned]
    return {"batch": batch, "ideal_speedup": ideal, "backends": per_backend, "best_pruned": pruned,
            "best_unpruned": unpruned, "best_vs_best": best, "best_vs_best_fraction_of_ideal": best / ideal}


def _openvino_version(backends) -> dict:
    if "openvino" not in backends:
        return {}
    import openvino
    return {"openvino": openvino.__version__}


def format_bench(r: dict) -> str:
    lines = [f"bench {r['build']} ({r['model']}, keep {r['keep']}, {r['weights']} weights) on {r['cpu']}, "
             f"{r['threads']} threads; stages compute in "
             + ", ".join(f"{p} on {b}" for b, p in r["precisions"].items())
             + "".join(f"; {k} build: {p}" for k, p in r.get("other_precisions", {}).items()),
             f"  {'batch':>5}  {'system':<36} {'median ms':>10} {'p90 ms':>10} {'ms/image':>9}"]
    for row in r["rows"]:
        lines.append(f"  {row['batch']:>5}  {row['system']:<36} {row['median_ms']:>10.1f} {row['p90_ms']:>10.1f} "
                     f"{row['median_ms'] / row['batch']:>9.1f}")
    for note in r.get("skipped", []):
        lines.append(f"  not timed: {note}")
    mixed = r.get("build_precision", "fp32") != "fp32"
    if mixed:
        lines.append(f"  (the pruned build is {r['build_precision']}, the unpruned export fp32: the speedups below are "
                     "pruning and precision together, so no FLOP-ideal target applies)")
    for s in r["summary"]:
        for b in s["backends"]:
            verdict = "" if mixed else (f" -> {100 * b['fraction_of_ideal']:.0f}% of ideal "
                                        f"({'meets' if b['meets_target'] else 'MISSES'} the {100 * r['target']:.0f}% target)")
            lines.append(f"  batch {s['batch']}, {b['backend']}: pruned vs unpruned {b['speedup_vs_unpruned']:.2f}x, "
                         f"FLOP ideal {s['ideal_speedup']:.2f}x{verdict}")
        other = s["best_pruned"] not in {f"pruned ({b})" for b in r["precisions"]}   # a build of another precision
        ideal = "" if mixed or other else f" ({100 * s['best_vs_best_fraction_of_ideal']:.0f}% of the FLOP ideal)"
        lines.append(f"  batch {s['batch']}, best vs best: {s['best_pruned']} is {s['best_vs_best']:.2f}x faster than "
                     f"the fastest unpruned option, {s['best_unpruned']}{ideal}")
    return "\n".join(lines)
