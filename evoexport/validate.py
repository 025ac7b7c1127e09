"""Check a build against the PyTorch model, per graph and end to end, on real photos.

Per graph ("identical inputs"): every graph gets the reference's own inputs, so errors do
not compound; floats are compared by max abs error, relative error and cosine, kept-token
indices by set overlap. End to end ("free running"): the backend's chain runs from the
pixels on its own, and its kept positions and features are compared with the reference.
A batch-of-1 run of the first photo must match its row of the batch run (dynamic batch).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .images import SAMPLE_PHOTOS, sample_batch
from .manifest import graph_entries, read_manifest
from .runtime import Runner, TorchBackend

# fp32 ONNX Runtime vs fp32 PyTorch. Kept sets may differ where two tokens' scores are
# within rounding of each other, so index agreement is a fraction, not all-or-nothing.
TOLERANCES = {
    "graph_cosine_min": 0.9999,
    "graph_rel_err_max": 1e-3,
    "graph_overlap_min": 0.99,
    "e2e_overlap_min": 0.98,
    "e2e_cosine_min": 0.999,
    "batch_rel_err_max": 1e-3,
}
REPORT = "validation.json"


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest per-sample cosine similarity."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)))


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of kept positions that both sides kept."""
    return float(np.mean([len(np.intersect1d(x, y)) / max(len(y), 1) for x, y in zip(a, b)]))


def compare(name: str, got: np.ndarray, ref: np.ndarray, kind: str) -> dict:
    if got.shape != ref.shape:
        return {"tensor": name, "ok": False, "error": f"shape {list(got.shape)} != reference {list(ref.shape)}"}
    if np.issubdtype(ref.dtype, np.integer):
        overlap = _overlap(got, ref)
        need = TOLERANCES["graph_overlap_min" if kind == "graph" else "e2e_overlap_min"]
        return {"tensor": name, "overlap": overlap, "ok": overlap >= need}
    err = float(np.max(np.abs(got.astype(np.float64) - ref))) if got.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = err / scale if scale > 0 else err
    cos = _cosine(got, ref)
    finite = bool(np.isfinite(got).all())
    if kind == "graph":
        ok = finite and cos >= TOLERANCES["graph_cosine_min"] and rel <= TOLERANCES["graph_rel_err_max"]
    else:
        ok = finite and cos >= TOLERANCES["e2e_cosine_min"]
    return {"tensor": name, "max_abs": err, "rel_err": rel, "cosine": cos, "ok": ok}


def validate(build_dir: str | Path, backend: str = "onnxruntime", pipeline=None, runner: Runner | None = None,
             images=SAMPLE_PHOTOS, write: bool = True) -> dict:
    import torch

    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    runner = runner or Runner(build_dir, backend=backend, **({"low_memory": True} if backend == "onnxruntime" else {}))
    reference = TorchBackend(build_dir, manifest, pipeline=pipeline)
    tower = manifest["tower"]
    x = sample_batch(tower["image_size"], manifest["preprocess"], images)
    ref_env = {k: v.numpy() for k, v in reference.pipeline.run(torch.from_numpy(x)).items()}
    be = runner.backend

    graphs = []
    for g in graph_entries(manifest):
        feeds = {i["name"]: be.as_input(ref_env[i["name"]]) for i in g["inputs"]}
        outs = be.run_graph(g, feeds)
        rows = [compare(name, be.to_numpy(v), ref_env[name], "graph") for name, v in outs.items()]
        graphs.append({"graph": g["name"], "outputs": rows, "ok": all(r["ok"] for r in rows)})

    env = {k: be.to_numpy(v) for k, v in runner.run_all(x).items()}
    e2e = [compare(n, env[n], ref_env[n], "e2e")
           for n in ["features"] + [f"indices_{i}" for i in range(len(manifest["schedule"]))]]
    single = be.to_numpy(runner.run_all(x[:1])["features"])
    batch_err = float(np.max(np.abs(single - env["features"][:1])) / max(np.max(np.abs(env["features"][:1])), 1e-30))
    batch = {"tensor": "features[0] batch 1 vs batch", "rel_err": batch_err,
             "ok": batch_err <= TOLERANCES["batch_rel_err_max"]}

    report = {
        "passed": all(g["ok"] for g in graphs) and all(r["ok"] for r in e2e) and batch["ok"],
        "backend": runner.backend.name,
        "reference": f"torch {torch.__version__} (cpu)",
        "images": list(images),
        "batch": int(x.shape[0]),
        "weights": manifest["weights"],
        "tolerances": TOLERANCES,
        "graphs": graphs,
        "end_to_end": e2e,
        "batch_consistency": batch,
    }
    if write:
        (build_dir / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict) -> str:
    def fmt(r):
        if "error" in r:
            return r["error"]
        if "overlap" in r:
            return f"kept-position overlap {r['overlap']:.4f}"
        parts = [f"max|err| {r['max_abs']:.2e}"] if "max_abs" in r else []
        parts.append(f"rel {r['rel_err']:.2e}")
        if "cosine" in r:
            parts.append(f"cos {r['cosine']:.6f}")
        return "  ".join(parts)

    lines = [f"validation: {report['backend']} vs {report['reference']} on {report['batch']} photos "
             f"({', '.join(report['images'])}); weights: {report['weights']}",
             f"  {'graph':<10} {'tensor':<20} {'result':<58} ok"]
    for g in report["graphs"]:
        for r in g["outputs"]:
            lines.append(f"  {g['graph']:<10} {r['tensor']:<20} {fmt(r):<58} {'yes' if r['ok'] else 'NO'}")
    for r in report["end_to_end"]:
        lines.append(f"  {'chain':<10} {r['tensor']:<20} {fmt(r):<58} {'yes' if r['ok'] else 'NO'}")
    b = report["batch_consistency"]
    lines.append(f"  {'chain':<10} {'batch 1 vs 3':<20} {fmt(b):<58} {'yes' if b['ok'] else 'NO'}")
    lines.append("validation PASSED" if report["passed"] else "validation FAILED (beyond tolerances above)")
    return "\n".join(lines)


def print_report(report: dict, file=sys.stdout) -> None:
    print(format_report(report), file=file)
