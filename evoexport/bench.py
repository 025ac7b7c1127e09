"""`evoexport bench`: latency of the pruned chain vs the unpruned export vs transformers.

All three run in one process on the same photos and threads, one after the other in
blocks (interleaving them lets one runtime's spinning worker threads steal the cores from
the next). Reported: median and p90 latency per batch size, measured speedups, and the
ideal speedup from FLOPs.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import EvoExportError
from .images import sample_batch
from .manifest import read_manifest
from .progress import Progress
from .runtime import Runner

SPEEDUP_TARGET = 0.95   # measured pruned/unpruned speedup must reach 95% of the FLOP ideal


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def run_bench(build_dir: str | Path, batches=(1, 4), iters: int = 10, warmup: int = 2, baseline: str | None = None,
              hf: bool = True, progress: Progress | None = None) -> dict:
    import torch

    from .build import build
    from .models import load_tower
    from .models.tower import hf_image_features

    if iters < 1 or warmup < 0 or any(b < 1 for b in batches):
        raise EvoExportError("--iters and --batch must be >= 1, --warmup >= 0")
    progress = progress or Progress()
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    systems = {"pruned (onnxruntime)": Runner(build_dir)}
    tower = None
    with tempfile.TemporaryDirectory(prefix="evoexport-bench-") as tmp:
        if baseline is None:
            progress("exporting the unpruned encoder (keep 1.0, same weights) for comparison")
            result = build(manifest["model"], 1.0, checkpoint=manifest.get("checkpoint"),
                           seed=manifest.get("weights_seed") or 0, out=Path(tmp) / "unpruned", validate=False,
                           progress=Progress(enabled=False))
            baseline, tower = result.path, result.tower
            del result
        base_manifest = read_manifest(baseline)
        if base_manifest["schedule"] or base_manifest.get("weights_sha256") != manifest.get("weights_sha256"):
            raise EvoExportError(f"--baseline {baseline} must be an unpruned (keep 1.0) build of the same weights")
        systems["unpruned (onnxruntime)"] = Runner(baseline)
        if hf:
            progress("loading transformers' PyTorch model with the same weights")
            if tower is None:  # --baseline given: nothing loaded the weights yet
                tower = load_tower(manifest["model"], manifest.get("checkpoint"),
                                   seed=manifest.get("weights_seed") or 0,
                                   expect_sha256=manifest.get("weights_sha256"), quiet=True)
            hf_run = hf_image_features(tower)

            def hf_call(x, _run=hf_run):
                with torch.inference_mode():
                    return _run(torch.from_numpy(x))
            systems["transformers (torch)"] = hf_call
        del tower  # transformers' model holds its own copy of the weights

        size = manifest["tower"]["image_size"]
        photos = sample_batch(size, manifest["preprocess"])
        rows = []
        for b in batches:
            x = np.ascontiguousarray(np.resize(photos, (b, *photos.shape[1:])))
            progress(f"batch {b}: {warmup} warm-up + {iters} timed iterations of each of {len(systems)} systems")
            for name, fn in systems.items():
                ts = []
                for i in range(warmup + iters):
                    t0 = time.perf_counter()
                    fn(x)
                    if i >= warmup:
                        ts.append((time.perf_counter() - t0) * 1e3)
                rows.append({"batch": b, "system": name, "median_ms": statistics.median(ts),
                             "p90_ms": _percentile(ts, 90), "min_ms": min(ts), "iters": len(ts)})
    ideal = manifest["flops"]["ideal_speedup"]
    summary = []
    for b in batches:
        by = {r["system"]: r for r in rows if r["batch"] == b}
        pruned, unpruned = by["pruned (onnxruntime)"]["median_ms"], by["unpruned (onnxruntime)"]["median_ms"]
        s = {"batch": b, "speedup_vs_unpruned": unpruned / pruned, "ideal_speedup": ideal,
             "fraction_of_ideal": unpruned / pruned / ideal}
        if "transformers (torch)" in by:
            s["unpruned_vs_transformers"] = by["transformers (torch)"]["median_ms"] / unpruned
            s["pruned_vs_transformers"] = by["transformers (torch)"]["median_ms"] / pruned
        s["meets_target"] = s["fraction_of_ideal"] >= SPEEDUP_TARGET
        summary.append(s)
    import onnxruntime
    return {"build": str(build_dir), "model": manifest["model"], "keep": manifest["keep"],
            "weights": manifest["weights"], "threads": threads, "cpu": _cpu_name(),
            "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
            "flops_per_image": manifest["flops"], "rows": rows, "summary": summary, "target": SPEEDUP_TARGET}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def format_bench(r: dict) -> str:
    lines = [f"bench {r['build']} ({r['model']}, keep {r['keep']}, {r['weights']} weights) on {r['cpu']}, "
             f"{r['threads']} threads",
             f"  {'batch':>5}  {'system':<24} {'median ms':>10} {'p90 ms':>10} {'ms/image':>9}"]
    for row in r["rows"]:
        lines.append(f"  {row['batch']:>5}  {row['system']:<24} {row['median_ms']:>10.1f} {row['p90_ms']:>10.1f} "
                     f"{row['median_ms'] / row['batch']:>9.1f}")
    for s in r["summary"]:
        extra = ""
        if "pruned_vs_transformers" in s:
            extra = (f"; vs transformers: pruned {s['pruned_vs_transformers']:.2f}x, "
                     f"unpruned export {s['unpruned_vs_transformers']:.2f}x")
        lines.append(f"  batch {s['batch']}: pruned vs unpruned {s['speedup_vs_unpruned']:.2f}x, FLOP ideal "
                     f"{s['ideal_speedup']:.2f}x -> {100 * s['fraction_of_ideal']:.0f}% of ideal "
                     f"({'meets' if s['meets_target'] else 'MISSES'} the {100 * r['target']:.0f}% target){extra}")
    return "\n".join(lines)
