"""scripts/gpu-probe: the GPU measurements of docs/gpu.md in one short run, prepared in advance.

    scripts/gpu-probe OUT                    # on the GPU machine: ~5 minutes, llava at full size
    scripts/gpu-probe OUT --device cpu       # the same code paths at test size (tests run this)
    scripts/gpu-probe --check OUT            # back on a CPU: the dumped decisions and features
                                             # against the fp32 reference, by the validator's rules

Nothing big travels: the pipeline is built on the machine from seeded weights (seed 0, the
same tower a CPU rebuilds for --check). OUT/probe.json is rewritten after every section,
so a run cut short still returns what it measured; a section that fails records its error
and the next one runs. OUT/bench-cuda.json is in `evoexport bench --device cuda`'s format.

Sections, in order (each is skipped, with the reason, when the time budget cannot fit it):
  env         machine, versions, the model, its schedule and FLOP ideal
  dump        batch-1 decisions and features of the default chain and of the compare form
  bench       pruned vs unpruned at batch 1, 8 and 32 in bf16 (eager, CUDA graphs, compiled
              selections of both forms, transformers), per-graph times, the selection's share
  ttft        image encoding + a 7B-shaped Llama's prefill (bf16, random weights), keep 0.5
              against unpruned, at batch 1 and 8
  selections  the old selection (TopK form, fp32 at the boundary) beside the new one
              (compare form, the chain's dtype, Gram matrix accumulated in fp32): ms per point
              and whether their decisions agree
  sdpa        attention alone at each stage's token count, with the proportional-attention
              bias (masked) and without: each SDPA backend and FlexAttention with a score_mod
  qkv         separate q, k, v projections against one fused projection
  budgets     the default budgets against budgets rounded to sequence lengths that are
              multiples of 8 and of 64 (`build --round-budgets`): what rounding buys
"""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

import numpy as np

from ..files import write_json
from .. import names
from ..names import GraphKind
from ..progress import Progress

# sdpa_counts: how many of the stages' token counts the attention section times (the CPU
# test times the largest only: each FlexAttention shape is a compile of ~10 s there)
SIZES = {"cuda": dict(model="llava", batches=(1, 8, 32), iters=30, warmup=5, llm="llama-7b", ttft_batches=(1, 8),
                      budget_s=330, focus_batches=(8, 32), sdpa_counts=None),
         "cpu": dict(model="llava-tiny", batches=(1, 2), iters=3, warmup=1, llm="tiny", ttft_batches=(1, 2),
                     budget_s=600, focus_batches=(2,), sdpa_counts=1)}
# what a section is expected to take on the H200, in seconds (a section starts only if it fits
# the budget left, so the run ends near the budget): estimates from run 2's log, where one
# form's selections compiled in ~50 s and a batch-1/8/32 bench of 6 systems took ~35 s
NEEDS_S = {"env": 0, "dump": 110, "bench": 80, "ttft": 50, "selections": 70, "sdpa": 45, "qkv": 5, "budgets": 110}
SEED, KEEP, PRECISION = 0, 0.5, "bf16"


class Probe:
    def __init__(self, out: Path, device: str, budget_s: float | None, progress: Progress):
        import torch

        from ..inputs.images import sample_batch
        from ..models.loader import load_tower
        from ..models.registry import default_params
        from ..pipeline.stages import Pipeline
        from ..prune.cost import tower_flops
        from ..prune.schedule import default_schedule
        from ..runtime.backends.torch import resolve_device

        self.t0, self.out, self.progress = time.perf_counter(), out, progress
        self.device = resolve_device(device)
        self.size = SIZES[self.device.type]
        self.budget_s = self.size["budget_s"] if budget_s is None else budget_s
        self.torch = torch
        tower = load_tower(self.size["model"], seed=SEED, quiet=True)   # made on the CPU: --check remakes it
        points = default_schedule(tower.depth, tower.num_patches, KEEP, tower.spec.prune_layers)
        params = default_params(self.size["model"])
        self.pipeline = Pipeline(tower, points, params)
        self.unpruned = Pipeline(tower, [], params)
        self.ideal = tower_flops(tower, [], params) / tower_flops(tower, points, params)
        self.photos = sample_batch(tower.image_size, tower.spec.preprocess)
        self.data = {"probe": {"device": device, "model": self.size["model"], "seed": SEED, "keep": KEEP,
                               "precision": PRECISION, "budget_s": self.budget_s, "sections": {}},
                     "errors": {}, "skipped": {}}
        self.chains = {}

    def x(self, batch: int):
        return self.torch.from_numpy(np.ascontiguousarray(np.resize(self.photos, (batch, *self.photos.shape[1:])))
                                     ).to(self.device)

    def sync(self):
        return self.torch.cuda.synchronize if self.device.type == "cuda" else None

    def chain(self, name: str, **options):
        """One TorchChain per configuration, made once and shared by the sections: compiling
        a form's selections costs ~50 s on the H200 (run 2). Named as `bench` names its systems."""
        from ..runtime.backends.torch import TorchChain
        if name not in self.chains:
            pipe = self.unpruned if name.startswith("unpruned") else options.pop("pipeline", self.pipeline)
            self.progress(f"preparing the {name} chain")
            self.chains[name] = TorchChain(pipe, self.device, PRECISION, **options)
        return self.chains[name]

    def default_chain(self):
        """The chain a user gets: compiled selections (TopK form), CUDA graphs on a GPU."""
        return self.chain(f"pruned {PRECISION} (compiled, CUDA graph)")

    def compare_chain(self):
        return self.chain(f"pruned {PRECISION} (compare-form selections compiled, CUDA graph)", selection_form="compare")

    def unpruned_chain(self):
        return self.chain(f"unpruned {PRECISION} (CUDA graph)", compile_selections=False)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def section(self, name: str, fn) -> None:
        left = self.budget_s - self.elapsed()
        need = NEEDS_S[name] if self.device.type == "cuda" else 0
        if left < need:
            self.data["skipped"][name] = f"{left:.0f} s of the {self.budget_s:.0f} s budget left, the section needs ~{need} s"
        else:
            self.progress(f"section {name} ({left:.0f} s of the budget left)")
            start = time.perf_counter()
            try:
                self.data[name] = fn(self)
            except Exception as e:   # recorded; the next section still runs
                self.data["errors"][name] = f"{type(e).__name__}: {e}".strip()[:2000]
                self.data["errors"][name + "_traceback"] = traceback.format_exc()[-4000:]
            self.data["probe"]["sections"][name] = round(time.perf_counter() - start, 2)
        self.data["probe"]["elapsed_s"] = round(self.elapsed(), 2)
        write_json(self.out / "probe.json", self.data)


def _env(p: Probe) -> dict:
    import os
    import platform

    torch = p.torch
    gpu = ({"gpu": torch.cuda.get_device_name(p.device),
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(p.device))),
            "memory_gib": round(torch.cuda.get_device_properties(p.device).total_memory / 2**30, 1)}
           if p.device.type == "cuda" else {"gpu": None})
    return {**gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(), "cpus": os.cpu_count(), "model": p.size["model"],
            "schedule": [{"after_layer": q.after_layer, "tokens": q.tokens} for q in p.pipeline.points],
            "num_patches": p.pipeline.tower.num_patches, "ideal_speedup": p.ideal}


def _dump(p: Probe) -> dict:
    """Batch-1 decisions and features of the default chain and the compare form: --check
    validates them on a CPU against the fp32 reference."""
    x = p.x(1)
    out = {}
    for form, chain in (("topk", p.default_chain()), ("compare", p.compare_chain())):
        env = chain(x, outputs=names.reported(len(p.pipeline.points)))
        arrays = {k: v.detach().float().cpu().numpy() if k == "features" else v.cpu().numpy() for k, v in env.items()}
        np.savez_compressed(p.out / f"dump-{form}.npz", pixel_values=x.cpu().numpy(), **arrays)
        out[form] = {"file": f"dump-{form}.npz", "compiled": chain.compiled, "cuda_graph": chain.cuda_graphs}
    return out


def _bench(p: Probe) -> dict:
    from .bench_cuda import bench_chains, format_cuda_bench
    from .timing import BenchOptions

    for make in (p.default_chain, p.compare_chain, p.unpruned_chain):
        make()
    # on a GPU these are bench's own systems, by name: made and compiled once for every section
    reuse = dict(p.chains) if p.device.type == "cuda" else {}
    options = BenchOptions(batches=p.size["batches"], iters=p.size["iters"], warmup=p.size["warmup"],
                           precisions=(PRECISION,))
    r = bench_chains(p.pipeline, p.photos, p.ideal, p.device, options, progress=p.progress, reuse=reuse)
    r = {"build": f"scripts/gpu-probe (seeded {p.size['model']}, built in memory)", "model": p.size["model"],
         "keep": KEEP, "weights": "random", "flops_per_image": {"ideal_speedup": p.ideal}, **r}
    write_json(p.out / "bench-cuda.json", r)
    (p.out / "bench-cuda.txt").write_text(format_cuda_bench(r) + "\n")
    return {"file": "bench-cuda.json", "summary": r["summary"],
            "select_share": {k: {"graph": v["select_share_graph"], "eager": v["select_share_eager"]}
                             for k, v in r["per_graph"].items()}}


def _selections(p: Probe) -> dict:
    """Old (TopK form, fp32 boundary) beside new (compare form, chain dtype): ms per point and decisions."""
    from .bench_cuda import _graph_times

    torch = p.torch
    old = p.chain("pruned old selection", keep_dtype=False, cuda_graphs=False)
    new = p.compare_chain()
    rows = []
    for b in p.size["focus_batches"]:
        x = p.x(b)
        with torch.inference_mode():
            times = {name: _graph_times(c.pipeline, x, c.modules) for name, c in (("old", old), ("new", new))}
            a, n = old(x, outputs=None), new(x, outputs=None)
        differ = {k: int((a[k] != n[k]).sum()) for k in a if k.startswith(("picks_", "merge_"))}
        for g, t in times["old"].items():
            if t["kind"] == GraphKind.SELECT:
                key = "graph_ms" if t["graph_ms"] is not None else "eager_ms"
                rows.append({"batch": b, "graph": g, "old_ms": t[key], "new_ms": times["new"][g][key], "timed_as": key,
                             "decisions_differ": {k: v for k, v in differ.items()
                                                  if k.split("_")[-1] == g.split("_")[-1]}})
        rows.append({"batch": b, "graph": "chain", "decisions_differ_total": sum(differ.values()),
                     "decisions_total": int(sum(a[k].numel() for k in differ)),
                     "features_rel_diff": float((a["features"] - n["features"]).abs().max()
                                                / a["features"].abs().max().clamp_min(1e-30))})
    return {"rows": rows, "compiled": {"old": old.compiled, "new": new.compiled}}


def _time_graphed(p: Probe, fn, reps: int = 20):
    """ms of fn() as a CUDA graph (events) on a GPU; median of eager calls on a CPU."""
    from .timing import cuda_graph_ms, time_systems
    if p.device.type != "cuda":
        return time_systems({"f": fn}, 3, 1)["f"]["median_ms"]
    return cuda_graph_ms(fn, reps=reps)


def _sdpa(p: Probe) -> dict:
    from ..runtime.backends.torch import SDPA_BACKENDS, sdpa_backends

    torch = p.torch
    F = torch.nn.functional
    tower = p.pipeline.tower
    heads, d = tower.num_heads, tower.hidden_size
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[PRECISION])
    counts = [g.tokens_in * tower.patches_per_token + int(tower.has_cls) for g in p.pipeline.graphs if g.kind == GraphKind.ENCODER]
    from torch.nn.attention import sdpa_kernel
    dynamo = torch._dynamo.config   # one FlexAttention compile per shape and bias below
    dynamo.recompile_limit = max(getattr(dynamo, "recompile_limit", 8), 64)
    try:
        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as e:   # noqa: BLE001 - older torch
        flex, flex_error = None, f"{type(e).__name__}: {e}"
    rows = []
    for b in p.size["focus_batches"]:
        for t in sorted(set(counts), reverse=True)[:p.size["sdpa_counts"]]:
            g = torch.Generator(device=p.device).manual_seed(0)
            q, k, v = (torch.randn(b, heads, t, d // heads, generator=g, device=p.device, dtype=dtype) for _ in range(3))
            bias = torch.log(torch.randint(1, 4, (b, t), generator=g, device=p.device).float())
            for masked in (False, True):
                mask = bias[:, None, None, :].to(dtype) if masked else None
                reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                           attn_mask=None if mask is None else mask.float())
                row = {"batch": b, "tokens": t, "masked": masked}
                for name in SDPA_BACKENDS:
                    def call(name=name):
                        with sdpa_kernel(sdpa_backends([name])):
                            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                    row[name] = _try_time(p, call, reference)
                # FlexAttention is the candidate for the masked layers only, timed at the first
                # batch: every shape is its own compile (~10 s)
                if masked and b == p.size["focus_batches"][0]:
                    if flex is not None:
                        def score_mod(score, bi, h, qi, ki):
                            return score + bias[bi, ki].to(score.dtype)
                        row["flex"] = _try_time(p, lambda: flex(q, k, v, score_mod=score_mod), reference)
                    else:
                        row["flex"] = {"error": flex_error}
                rows.append(row)
    return {"rows": rows, "note": "ms per attention call ([B, heads, T, head_dim], bf16); err: max abs vs fp32 math; "
            "flex: FlexAttention with score_mod adding log(size), masked rows at the first batch"}


def _try_time(p: Probe, call, reference) -> dict:
    try:
        with p.torch.inference_mode():
            err = float((call().float() - reference).abs().max())
            return {"ms": _time_graphed(p, call), "err": err}
    except Exception as e:   # a backend without a kernel for these inputs on this device
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def _qkv(p: Probe) -> dict:
    torch = p.torch
    d = p.pipeline.tower.hidden_size
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[PRECISION])
    counts = sorted({g.tokens_in + int(p.pipeline.tower.has_cls) for g in p.pipeline.graphs if g.kind == GraphKind.ENCODER})
    separate = [torch.nn.Linear(d, d, device=p.device, dtype=dtype) for _ in range(3)]
    fused = torch.nn.Linear(d, 3 * d, device=p.device, dtype=dtype)
    rows = []
    for b in p.size["focus_batches"]:
        for t in counts:
            x = torch.randn(b, t, d, device=p.device, dtype=dtype)
            with torch.inference_mode():
                rows.append({"batch": b, "tokens": t,
                             "separate_ms": _time_graphed(p, lambda: [lin(x) for lin in separate]),
                             "fused_ms": _time_graphed(p, lambda: fused(x).chunk(3, dim=-1))})
    return {"rows": rows}


def _ttft(p: Probe) -> dict:
    from .ttft import make_llm, ttft_torch

    torch = p.torch
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[PRECISION])
    p.progress(f"making a {p.size['llm']}-shaped language model ({PRECISION}, random weights) on {p.device}")
    llm = make_llm(p.size["llm"], None, p.device, dtype)
    encoders = {"pruned": p.default_chain(), "unpruned": p.unpruned_chain()}
    tokens = {"pruned": p.pipeline.points[-1].tokens, "unpruned": p.pipeline.tower.num_patches}
    rows = [ttft_torch(encoders, tokens, llm, p.x(b), p.size["iters"], p.size["warmup"], sync=p.sync())
            for b in p.size["ttft_batches"]]
    return {"llm": p.size["llm"], "rows": rows}


def _budgets(p: Probe) -> dict:
    """The default budgets against budgets rounded to tile-friendly sequence lengths
    (`build --round-budgets 8|64`), each as the default chain (compiled, CUDA graph), in one
    interleaved timing per batch."""
    from ..errors import EvoExportError
    from ..pipeline.stages import Pipeline
    from ..prune.cost import tower_flops
    from ..prune.schedule import round_budgets
    from .timing import time_systems

    tower, params = p.pipeline.tower, p.pipeline.params
    chains, schedules = {"default": p.default_chain()}, {"default": [q.tokens for q in p.pipeline.points]}
    ideal = {"default": p.ideal}
    for m in (8, 64):
        try:
            points = round_budgets(p.pipeline.points, m, tower.patches_per_token, int(tower.has_cls), tower.num_patches)
        except EvoExportError as e:   # the tiny test model has no room for a multiple of 64
            schedules[f"multiple of {m}"] = f"error: {e}"
            continue
        chains[f"multiple of {m}"] = p.chain(f"pruned {PRECISION} (compiled, CUDA graph, budgets x{m})",
                                             pipeline=Pipeline(tower, points, params))
        schedules[f"multiple of {m}"] = [q.tokens for q in points]
        ideal[f"multiple of {m}"] = tower_flops(tower, [], params) / tower_flops(tower, points, params)
    rows = []
    for b in p.size["focus_batches"]:
        x = p.x(b)
        with p.torch.inference_mode():
            timed = time_systems({k: (lambda c=c: c(x)) for k, c in chains.items()}, p.size["iters"], p.size["warmup"],
                                 sync=p.sync())
        rows.append({"batch": b, **{k: {"median_ms": t["median_ms"], "p90_ms": t["p90_ms"]} for k, t in timed.items()}})
    return {"budgets": schedules, "ideal_speedup": ideal, "rows": rows}


# in order of what the targets need first: a run cut short by the budget loses the last
SECTIONS = {"env": _env, "dump": _dump, "bench": _bench, "ttft": _ttft, "selections": _selections, "sdpa": _sdpa,
            "qkv": _qkv, "budgets": _budgets}


def run_probe(out: str | Path, device: str = "cuda", budget_s: float | None = None, sections=None,
              progress: Progress | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    probe = Probe(out, device, budget_s, progress or Progress())
    for name in sections or SECTIONS:
        probe.section(name, SECTIONS[name])
    return probe.data


def check_dump(out: str | Path) -> dict:
    """Back on a CPU: each dumped chain against the fp32 reference of the same seeded tower,
    decisions by the validator's near-tie rules, features by its bf16 tolerances."""

    from ..errors import EvoExportError
    from ..models.loader import load_tower
    from ..models.registry import default_params
    from ..pipeline.stages import Pipeline
    from ..prune.schedule import default_schedule
    from ..validate.report import check_recorded

    out = Path(out)
    try:
        info = json.loads((out / "probe.json").read_text())["probe"]
    except (OSError, ValueError, KeyError) as e:
        raise EvoExportError(f"{out} holds no probe.json of a gpu-probe run ({e})") from None
    if not isinstance(info, dict) or not all(isinstance(info.get(k), t) for k, t in
                                             (("model", str), ("seed", int), ("keep", float), ("precision", str))):
        raise EvoExportError(f"{out}/probe.json does not say which model, seed, keep and precision the probe ran")
    tower = load_tower(info["model"], seed=info["seed"], quiet=True)
    points = default_schedule(tower.depth, tower.num_patches, info["keep"], tower.spec.prune_layers)
    pipeline = Pipeline(tower, points, default_params(info["model"]))
    wanted = [names.PIXELS] + names.reported(len(points))
    result = {}
    for dump in sorted(out.glob("dump-*.npz")):
        try:
            with np.load(dump, allow_pickle=False) as z:   # arrays only: never unpickled
                env = {k: z[k] for k in z.files}
        except Exception as e:   # a truncated or foreign file: numpy and zipfile raise several kinds
            raise EvoExportError(f"{dump} is not a readable dump ({type(e).__name__}: {e})") from None
        missing = [k for k in wanted if k not in env]
        if missing:
            raise EvoExportError(f"{dump} lacks {', '.join(missing)}")
        x = env.pop(names.PIXELS)
        if x.dtype != np.float32 or x.shape[1:] != (3, tower.image_size, tower.image_size):
            raise EvoExportError(f"{dump}: pixel_values {list(x.shape)} {x.dtype} are not this model's input")
        result[dump.stem] = check_recorded(pipeline, x, env, info["precision"])
    if not result:
        raise EvoExportError(f"{out} holds no dump-*.npz (the probe's dump section did not run)")
    write_json(out / "check.json", result)
    return result
