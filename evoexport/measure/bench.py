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
from pathlib import Path

import numpy as np

from ..errors import EvoExportError
from ..inputs.images import sample_batch
from ..manifest import read_manifest
from ..progress import Progress
from .timing import time_systems
from ..runtime.runner import Runner

SPEEDUP_TARGET = 0.95   # measured pruned/unpruned speedup must reach 95% of the FLOP ideal
HF_FP32 = "transformers fp32 (torch)"
HF_BF16 = "transformers bf16 autocast (torch)"


def run_bench(build_dir: str | Path, batches=(1, 4), iters: int = 10, warmup: int = 2, baseline: str | None = None,
              hf: bool = True, backends=("onnxruntime",), precisions=(), progress: Progress | None = None) -> dict:
    """Time the pruned chain and the unpruned export on each backend, and transformers'
    model in fp32 and under bf16 autocast, on the same photos; medians, p90 and ratios.
    `precisions`: also time builds of these precisions (same weights, schedule and
    parameters), exported now, on each backend that runs them."""
    import torch

    from ..export.build import build_variant
    from ..models.loader import tower_from_manifest

    if iters < 1 or warmup < 0 or any(b < 1 for b in batches):
        raise EvoExportError("--iters and --batch must be >= 1, --warmup >= 0")
    backends = list(dict.fromkeys(backends))
    progress = progress or Progress()
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    systems = {f"pruned ({b})": Runner(build_dir, backend=b) for b in backends}
    computes_in = {b: systems[f"pruned ({b})"].backend.precision for b in backends}
    tower = None
    with tempfile.TemporaryDirectory(prefix="evoexport-bench-") as tmp:
        if baseline is None:
            progress("exporting the unpruned encoder (keep 1.0, same weights) for comparison")
            result = build_variant(manifest, Path(tmp) / "unpruned", unpruned=True)
            baseline, tower = result.path, result.tower
            del result
        base_manifest = read_manifest(baseline)
        if base_manifest["schedule"] or base_manifest.get("weights_sha256") != manifest.get("weights_sha256"):
            raise EvoExportError(f"--baseline {baseline} must be an unpruned (keep 1.0) build of the same weights")
        systems.update({f"unpruned ({b})": Runner(baseline, backend=b) for b in backends})
        extra = _other_precisions(manifest, precisions, backends, Path(tmp), progress)
        systems.update(extra["systems"])
        if hf:
            progress("loading transformers' PyTorch model with the same weights")
            if tower is None:  # --baseline given: nothing loaded the weights yet
                tower = tower_from_manifest(manifest)
            hf_run = tower.hf_forward()

            def hf_fp32(x, _run=hf_run):
                with torch.inference_mode():
                    return _run(torch.from_numpy(x))

            def hf_bf16(x, _run=hf_run):   # what a PyTorch user gets from one line
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                    return _run(torch.from_numpy(x))
            systems[HF_FP32] = hf_fp32
            systems[HF_BF16] = hf_bf16
        del tower  # transformers' model holds its own copy of the weights

        size = manifest["tower"]["image_size"]
        photos = sample_batch(size, manifest["preprocess"])
        rows = []
        for b in batches:
            x = np.ascontiguousarray(np.resize(photos, (b, *photos.shape[1:])))
            progress(f"batch {b}: {warmup} warm-up + {iters} timed iterations of each of {len(systems)} systems, "
                     "interleaved")
            timed = time_systems({name: (lambda fn=fn: fn(x)) for name, fn in systems.items()}, iters, warmup)
            for name, t in timed.items():
                rows.append({"batch": b, "system": name, **{k: v for k, v in t.items() if k != "times_ms"}})
    ideal = manifest["flops"]["ideal_speedup"]
    summary = [_summarize(b, [r for r in rows if r["batch"] == b], backends, ideal) for b in batches]
    import onnxruntime
    return {"build": str(build_dir), "model": manifest["model"], "keep": manifest["keep"],
            "weights": manifest["weights"], "threads": threads, "cpu": _cpu_name(), "precisions": computes_in,
            "build_precision": manifest.get("precision", "fp32"), "other_precisions": extra["computed"],
            "skipped": extra["skipped"],
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, **_openvino_version(backends)},
            "flops_per_image": manifest["flops"], "rows": rows, "summary": summary, "target": SPEEDUP_TARGET}


def _other_precisions(manifest: dict, precisions, backends, tmp: Path, progress: Progress) -> dict:
    """Builds of the same weights, schedule and parameters in other precisions, loaded on
    each backend that can run them: systems "pruned PREC (backend)"."""
    from ..export.build import build_variant

    systems, computed, skipped = {}, {}, []
    for prec in dict.fromkeys(precisions):
        if prec == manifest.get("precision", "fp32"):
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


def _cpu_name() -> str:
    from .timing import cpu_info
    return cpu_info()["cpu"]


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
