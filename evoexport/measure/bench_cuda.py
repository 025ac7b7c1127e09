"""`evoexport bench --device cuda`: the pruned chain on an NVIDIA GPU against what users
run there instead.

Systems, per precision (bf16 by default): the pruned chain and the unpruned encoder
(the same stage code with no prune point), each eager and replayed as one CUDA graph per
batch size; transformers' own model cast to that precision (`model.to(torch.bfloat16)`,
SDPA attention), eager; and, when onnxruntime-gpu is installed, the build's ONNX graphs on
ONNX Runtime's CUDA provider with IO binding (and an unpruned `--baseline` build if given).
Latency is wall time from launch to a synchronized result, median and p90. The selection's
share of the chain is measured per graph, each graph replayed as its own CUDA graph and
timed with CUDA events, and eagerly. Graph replay is checked against eager execution on
the same photos (same decisions, feature difference).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from ..inputs.images import sample_batch
from ..manifest import TORCH_DTYPES, read_manifest
from ..names import GraphKind
from ..progress import Progress
from .timing import CUDA_BENCH, BenchOptions, cuda_graph_ms, time_systems

SPEEDUP_TARGET = 0.90   # pruned vs unpruned at batch 8, as a fraction of the FLOP ideal
SELECT_SHARE_TARGET = 0.05


def _graph_times(pipeline, x, modules: dict, reps: int = 20) -> dict:
    """ms per graph of the chain: each graph as its own CUDA graph (event-timed; on a GPU
    only), with `modules` (the compiled selections the chain runs) in place of the
    pipeline's own, and each graph's own module eagerly."""
    import torch

    on_gpu = x.is_cuda
    sync = torch.cuda.synchronize if on_gpu else None
    env = pipeline.run(x, modules=modules)
    out = {}
    for g in pipeline.graphs:
        args = [env[n] for n in g.inputs]
        module = modules.get(g.name, g.module)
        graph_ms = None
        with torch.inference_mode():
            if on_gpu:
                graph_ms = cuda_graph_ms(module, *args, reps=reps)
            # eager: the pipeline's own module, as runs 1 and 2 timed it (so runs compare)
            eager = time_systems({"eager": lambda: g.module(*args)}, reps if on_gpu else 3, 3 if on_gpu else 1,
                                 sync=sync)["eager"]
        out[g.name] = {"kind": g.kind, "graph_ms": graph_ms, "eager_ms": eager["median_ms"]}
    return out


def _share(times: dict, key: str) -> float | None:
    if any(t[key] is None for t in times.values()):
        return None
    total = sum(t[key] for t in times.values())
    return sum(t[key] for t in times.values() if t["kind"] == GraphKind.SELECT) / total


def run_cuda_bench(build_dir: str | Path, options: BenchOptions = CUDA_BENCH, progress: Progress | None = None,
                   **fields) -> dict:
    """`bench --device cuda`: the systems of bench_chains on a build's pipeline (its torch
    chains rebuilt from the manifest, weights checked against its sha256), plus ONNX
    Runtime's CUDA provider on the build's graphs where it is installed."""
    from ..runtime.backends.torch import resolve_device
    from ..pipeline.temporal import pipeline_from_manifest

    options = replace(options, **fields)
    options.check()
    device = resolve_device("cuda")
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir, verify=False, files=False)   # the graph files are hashed where read (ORT)
    photos = sample_batch(manifest.image_size, manifest.preprocess)
    result = bench_chains(pipeline_from_manifest(manifest), photos, manifest.ideal_speedup, device, options,
                          extra=_ort_systems(build_dir, options.baseline), progress=progress)
    return {"build": str(build_dir), "model": manifest.model, "keep": manifest.keep,
            "weights": manifest.weights, "flops_per_image": manifest.flops, **result}


def bench_chains(pruned_pipe, photos: np.ndarray, ideal: float, device, options: BenchOptions = CUDA_BENCH, *,
                 extra: dict | None = None, progress: Progress | None = None, reuse: dict | None = None) -> dict:
    """The systems of `bench --device cuda` on one pipeline, in one run: what the bench
    command and scripts/gpu-probe share. On a CPU device (the probe's `--device cpu` test)
    the same code runs without the CUDA-graph systems and CUDA-event timings. `reuse` maps
    system names to chains already made (the probe's; their selections already compiled)."""
    import torch

    on_gpu = device.type == "cuda"
    progress = progress or Progress()
    systems, pruned_chains = _chain_systems(pruned_pipe, device, options, progress, reuse or {})
    extra = extra or {}
    systems.update(extra)
    rows, per_graph, checks = [], {}, {}
    for b in options.batches:
        x_np = np.ascontiguousarray(np.resize(photos, (b, *photos.shape[1:])))
        x = torch.from_numpy(x_np).to(device)
        progress(f"batch {b}: {options.warmup} warm-up + {options.iters} timed runs of each of {len(systems)} systems")
        calls = {name: ((lambda fn=fn, arg=fn.backend.as_input(x_np): fn.run_native(arg)) if name in extra
                        else (lambda fn=fn: fn(x))) for name, fn in systems.items()}
        with torch.inference_mode():
            timed = time_systems(calls, options.iters, options.warmup, sync=torch.cuda.synchronize if on_gpu else None)
        rows += [{"batch": b, "system": name, **{k: v for k, v in t.items() if k != "times_ms"}}
                 for name, t in timed.items()]
        for prec, chain in pruned_chains.items():
            per_graph[f"{prec} batch {b}"], checks[f"{prec} batch {b}"] = _check_chain(systems, prec, chain, x)
    summary = [_summarize(b, [r for r in rows if r["batch"] == b], options.precisions, ideal) for b in options.batches]
    return {**_versions(device), "ort_cuda": bool(extra), "rows": rows, "summary": summary,
            "per_graph": per_graph, "graph_vs_eager": checks,
            "targets": {"fraction_of_ideal_at_batch_8": SPEEDUP_TARGET, "select_share_with_cuda_graphs": SELECT_SHARE_TARGET}}


def _chain_systems(pruned_pipe, device, options: BenchOptions, progress: Progress, reuse: dict) -> tuple[dict, dict]:
    """For each precision: transformers' model, the pruned and unpruned chains eager and as
    CUDA graphs, the pruned one with compiled selections (both forms). Returns the systems
    and each precision's default pruned chain."""
    import torch

    from ..pipeline.stages import Pipeline
    from ..runtime.backends.torch import TorchChain
    on_gpu = device.type == "cuda"
    tower, params = pruned_pipe.tower, pruned_pipe.params
    systems, pruned_chains = {}, {}
    for prec in options.precisions:
        def chain(name, pipe, **chain_options):
            return reuse[name] if name in reuse else TorchChain(pipe, device, prec, **chain_options)
        progress(f"preparing the {prec} chains on {torch.cuda.get_device_name(device) if on_gpu else 'the CPU'}")
        if options.hf:
            run = tower.hf_forward(device, getattr(torch, TORCH_DTYPES[prec]))
            systems[f"transformers {prec} (eager)"] = lambda x, _run=run: _run(x)
        for label, pipe in (("pruned", pruned_pipe), ("unpruned", Pipeline(tower, [], params))):
            eager = TorchChain(pipe, device, prec, cuda_graphs=False, compile_selections=False)
            systems[f"{label} {prec} (eager)"] = eager   # the others share eager's weights (no copy)
            if on_gpu:
                name = f"{label} {prec} (CUDA graph)"
                systems[name] = chain(name, eager.pipeline, cuda_graphs=True, compile_selections=False)
            if label != "pruned":
                continue
            progress(f"compiling the {prec} selections (torch.compile)")
            for name, form in ((f"pruned {prec} (compiled, CUDA graph)", "topk"),
                               # the TopK-free selections (same decisions), which inductor compiles whole
                               (f"pruned {prec} (compare-form selections compiled, CUDA graph)", "compare")):
                made = chain(name, eager.pipeline, selection_form=form)
                if made.compiled and on_gpu:
                    systems[name] = made
                if form == "topk":
                    pruned_chains[prec] = made
    return systems, pruned_chains


def _check_chain(systems: dict, prec: str, chain, x) -> tuple[dict, dict]:
    """Per-graph times of the default pruned chain, and whether it decides and computes as
    the eager chain does."""
    import torch
    with torch.inference_mode():
        times = _graph_times(chain.pipeline, x, chain.modules)
        a = systems[f"pruned {prec} (eager)"](x, outputs=None)
        g = chain(x, outputs=None)
    same = all(torch.equal(a[k], g[k]) for k in a if k.startswith(("picks_", "merge_")))
    diff = float((a["features"] - g["features"]).abs().max() / a["features"].abs().max().clamp_min(1e-30))
    return ({"graphs": times, "select_share_graph": _share(times, "graph_ms"),
             "select_share_eager": _share(times, "eager_ms")},
            {"same_decisions": same, "features_rel_diff": diff, "compiled": chain.compiled,
             "cuda_graph": chain.cuda_graphs})


def _versions(device) -> dict:
    import torch
    on_gpu = device.type == "cuda"
    try:
        import onnxruntime
        ort = {"onnxruntime": onnxruntime.__version__, "onnxruntime_providers": onnxruntime.get_available_providers()}
    except ImportError:
        ort = {"onnxruntime": None}
    return {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if on_gpu else None,
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, **ort}}


def _ort_systems(build_dir: Path, baseline) -> dict:
    import onnxruntime
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return {}
    from ..runtime.runner import Runner   # timed from device-resident inputs (IO binding), no host copy
    out = {"pruned (onnxruntime cuda)": Runner(build_dir, backend="onnxruntime", providers=["CUDAExecutionProvider"])}
    if baseline is not None:
        out["unpruned (onnxruntime cuda)"] = Runner(Path(baseline), backend="onnxruntime",
                                                    providers=["CUDAExecutionProvider"])
    return out


def _summarize(batch: int, rows: list[dict], precisions, ideal: float) -> dict:
    by = {r["system"]: r["median_ms"] for r in rows}
    per = []
    for prec in precisions:
        for mode, base in (("compiled, CUDA graph", "CUDA graph"), ("CUDA graph", "CUDA graph"), ("eager", "eager")):
            if f"pruned {prec} ({mode})" not in by or f"unpruned {prec} ({base})" not in by:
                continue   # torch.compile unavailable there, or no CUDA graphs (a CPU)
            speedup = by[f"unpruned {prec} ({base})"] / by[f"pruned {prec} ({mode})"]
            per.append({"precision": prec, "mode": mode, "speedup_vs_unpruned": speedup,
                        "fraction_of_ideal": speedup / ideal})
    pruned = min((n for n in by if n.startswith("pruned")), key=by.get)
    unpruned = min((n for n in by if not n.startswith("pruned")), key=by.get)
    return {"batch": batch, "ideal_speedup": ideal, "chains": per, "best_pruned": pruned, "best_unpruned": unpruned,
            "best_vs_best": by[unpruned] / by[pruned], "best_vs_best_fraction_of_ideal": by[unpruned] / by[pruned] / ideal}


def format_cuda_bench(r: dict) -> str:
    lines = [f"bench {r['build']} ({r['model']}, keep {r['keep']}, {r['weights']} weights) on {r['device']} "
             f"(sm {r['compute_capability']}), torch {r['versions']['torch']}, CUDA {r['versions']['cuda']}"
             + ("" if r["ort_cuda"] else "; ONNX Runtime's CUDA provider not installed: not timed"),
             f"  {'batch':>5}  {'system':<34} {'median ms':>10} {'p90 ms':>10} {'ms/image':>9}"]
    for row in r["rows"]:
        lines.append(f"  {row['batch']:>5}  {row['system']:<34} {row['median_ms']:>10.3f} {row['p90_ms']:>10.3f} "
                     f"{row['median_ms'] / row['batch']:>9.3f}")
    for s in r["summary"]:
        for c in s["chains"]:
            lines.append(f"  batch {s['batch']}, {c['precision']} {c['mode']}: pruned vs unpruned "
                         f"{c['speedup_vs_unpruned']:.2f}x = {100 * c['fraction_of_ideal']:.0f}% of the "
                         f"{s['ideal_speedup']:.2f}x FLOP ideal")
        lines.append(f"  batch {s['batch']}, best vs best: {s['best_pruned']} is {s['best_vs_best']:.2f}x faster than "
                     f"{s['best_unpruned']} ({100 * s['best_vs_best_fraction_of_ideal']:.0f}% of the FLOP ideal)")
    for key, p in r["per_graph"].items():
        graphed = ("" if p["select_share_graph"] is None else
                   f"{100 * p['select_share_graph']:.1f}% as CUDA graphs (selections as the default chain runs them), ")
        lines.append(f"  {key}: selection share of the chain {graphed}{100 * p['select_share_eager']:.1f}% eager")
    for key, c in r["graph_vs_eager"].items():
        what = " + ".join(w for w, on in (("compiled selections", c.get("compiled")),
                                          ("CUDA graph", c.get("cuda_graph", True))) if on) or "default chain"
        lines.append(f"  {key}: {what} vs eager: {'same' if c['same_decisions'] else 'different (near-tie?)'} decisions, "
                     f"features rel diff {c['features_rel_diff']:.1e}")
    return "\n".join(lines)
