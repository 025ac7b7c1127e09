"""`evoexport bench BUILD --serve triton`: the pruned build against the unpruned one (keep
1.0, same weights) on one Triton server, at several client concurrencies, in one run.

Both builds are written as repositories (the Python-backend flavour, our runtime inside)
and served side by side by one server. At each concurrency C, C client threads send
one-image requests over HTTP with binary tensors (tritonclient), for the pruned and the
unpruned ensemble in alternating rounds, so drift on the machine falls on both. Reported:
throughput (images/s over the round's wall time), latency p50 and p99 per request, and
what the server adds: the library called directly in this process (`evoexport.load` on the
same runtime) at batch 1 (latency) and at the largest concurrency's batch (throughput).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import EvoExportError, OptionError
from ..manifest import read_manifest
from ..measure.timing import cpu_info, time_clients, time_systems

SYSTEMS = ("pruned", "unpruned")


def _client_round(url: str, model: str, pixels: np.ndarray, concurrency: int, per_client: int) -> dict:
    """`concurrency` clients, each sending `per_client` one-image requests with binary tensors."""
    import tritonclient.http as http

    def make_client():
        c = http.InferenceServerClient(url, connection_timeout=600, network_timeout=600)
        inp = http.InferInput("pixel_values", pixels.shape, "FP32")
        inp.set_data_from_numpy(pixels, binary_data=True)
        outs = [http.InferRequestedOutput("features", binary_data=True)]
        return (lambda: c.infer(model, [inp], outputs=outs)), c.close

    round_ = time_clients(make_client, concurrency, per_client)
    return {**round_, "images": len(round_["latencies"]) * pixels.shape[0]}


def _summary(rounds: list[dict]) -> dict:
    lat = np.array([x for r in rounds for x in r["latencies"]]) * 1e3
    images = sum(r["images"] for r in rounds)
    wall = sum(r["wall_s"] for r in rounds)
    return {"images": images, "errors": sum(len(r["errors"]) for r in rounds),
            "error_samples": [e for r in rounds for e in r["errors"]][:3],
            "images_per_s": images / wall if wall else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None}


def _library(build_dir: Path, runtime: str, pixels: np.ndarray, batch: int, iters: int) -> dict:
    """The same runtime called directly in this process: batch-1 latency, and throughput at `batch`."""
    import evoexport
    runner = evoexport.load(build_dir, backend=runtime)
    one, many = pixels[:1], np.repeat(pixels[:1], batch, axis=0)
    one_ms = time_systems({"one": lambda: runner(one)}, iters, warmup=1)["one"]["median_ms"]
    many_ms = time_systems({"many": lambda: runner(many)}, max(1, iters // batch), warmup=1)["many"]["median_ms"]
    return {"batch1_p50_ms": one_ms, "images_per_s_at_batch": batch / (many_ms / 1e3), "batch": batch}


@dataclass(frozen=True)
class ServeBenchOptions:
    concurrency: tuple = (1, 8, 32)   # clients at once, one round set per value
    rounds: int = 2                   # rounds per concurrency, the systems alternating
    per_client: int | None = None     # requests per client and round; None: 8 at 1 client, 2 from 4 up
    runtime: str = "openvino"         # what runs the graphs inside Triton's Python backend
    queue_delay_us: int = 2000
    threads: int = 0


def run_serve_bench(build_dir, options: ServeBenchOptions = ServeBenchOptions(), *, baseline=None, progress=None,
                    **fields) -> dict:
    """The pruned build and the unpruned one (exported now when no baseline is given) served
    side by side by one Triton server; `fields` override `options`."""
    from ..export.build import build_variant
    from .triton import TritonServer

    o = replace(options, **fields)
    say = progress or (lambda *_: None)
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    if not o.concurrency or any(c < 1 for c in o.concurrency) or o.rounds < 1:
        raise EvoExportError("concurrency and rounds must be >= 1")
    with tempfile.TemporaryDirectory(prefix="evoexport-serve-bench-") as scratch:
        scratch = Path(scratch)
        if baseline is None:
            say("exporting the unpruned encoder (keep 1.0, same weights) as the baseline")
            baseline = build_variant(manifest, scratch / "unpruned-build", unpruned=True).path
        builds = {"pruned": build_dir, "unpruned": Path(baseline)}
        repos = _repositories(builds, scratch, o, manifest.max_batch)
        say(f"starting tritonserver with both ensembles ({o.runtime} inside the Python backend)")
        pixels = np.random.default_rng(0).standard_normal([1] + manifest.pixels["shape"][1:], dtype=np.float32)
        with TritonServer(repos, startup_timeout=600) as server:
            results = _serve_rounds(server.url.removeprefix("http://"), pixels, o, say)
            stats = _stats(server.url, [f"{s}_stage_0" for s in SYSTEMS])
        say(f"the library directly ({o.runtime}, this process)")
        library = {s: _library(builds[s], o.runtime, pixels, max(o.concurrency), 8) for s in SYSTEMS}
    ratio = {str(c): results["pruned"][str(c)]["images_per_s"] / results["unpruned"][str(c)]["images_per_s"]
             for c in o.concurrency if results["unpruned"][str(c)]["images_per_s"]}
    return {"build": str(build_dir), "baseline": str(baseline), "model": manifest.model, "keep": manifest.keep,
            "ideal_speedup": manifest.ideal_speedup, "runtime": o.runtime, "engine": "triton (python backend)",
            "queue_delay_us": o.queue_delay_us, "concurrency": list(o.concurrency), "rounds": o.rounds,
            "results": results, "throughput_ratio": ratio, "library": library, "batching": stats,
            "machine": cpu_info()}


def _repositories(builds: dict, scratch: Path, o: ServeBenchOptions, max_batch: int) -> list[Path]:
    """Each build as a Python-backend repository whose ensemble is named after its system."""
    from .repository import write_repository
    base = read_manifest(builds["unpruned"], verify=False)
    if base.prune_points:
        raise OptionError("baseline", f"{builds['unpruned']} is pruned (keep {base.keep}); give a keep 1.0 build")
    return [write_repository(path, scratch / f"repo-{system}", flavour="python", name=system, runtime=o.runtime,
                             queue_delay_us=o.queue_delay_us, threads=o.threads, max_batch=max_batch).path
            for system, path in builds.items()]


def _serve_rounds(url: str, pixels: np.ndarray, o: ServeBenchOptions, say) -> dict:
    """{system: {concurrency: summary}}, the systems alternating round by round."""
    results = {s: {} for s in SYSTEMS}
    for system in SYSTEMS:                     # warm-up: first calls compile and allocate
        _client_round(url, system, pixels, 2, 2)
    for c in o.concurrency:
        n = o.per_client or max(2, 8 // c)
        per = {s: [] for s in SYSTEMS}
        for r in range(o.rounds):
            for system in (SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]):
                say(f"concurrency {c}, round {r + 1}/{o.rounds}: {system} ({c} clients x {n} requests)")
                per[system].append(_client_round(url, system, pixels, c, n))
        for system in SYSTEMS:
            results[system][str(c)] = _summary(per[system])
    return results


def _stats(url: str, models: list[str]) -> dict:
    import json
    import urllib.request
    out = {}
    for m in models:
        with urllib.request.urlopen(f"{url}/v2/models/{m}/stats", timeout=10) as r:
            s = json.loads(r.read())["model_stats"][0]
        out[m] = {"inference_count": int(s["inference_count"]), "execution_count": int(s["execution_count"])}
    return out


def format_serve_bench(r: dict) -> str:
    lines = [f"Triton ({r['engine']}, {r['runtime']} inside) on {r['machine']['cpu']} "
             f"({r['machine']['cores']} cores; {' '.join(r['machine']['isa'])}): {r['model']} keep {r['keep']} vs keep 1.0",
             f"{'clients':>7}  {'system':<9} {'images/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'errors':>6}"]
    for c in r["concurrency"]:
        for s in SYSTEMS:
            x = r["results"][s][str(c)]
            lines.append(f"{c:>7}  {s:<9} {x['images_per_s']:>9.2f} {x['p50_ms']:>9.1f} {x['p99_ms']:>9.1f} {x['errors']:>6}")
        lines.append(f"{'':>7}  pruned/unpruned throughput {r['throughput_ratio'].get(str(c), float('nan')):.2f}x "
                     f"(FLOP ideal {r['ideal_speedup']:.2f}x)")
    for s in SYSTEMS:
        lib = r["library"][s]
        server = r["results"][s][str(r["concurrency"][0])]["p50_ms"]
        lines.append(f"library ({s}): batch 1 p50 {lib['batch1_p50_ms']:.1f} ms (server at {r['concurrency'][0]} "
                     f"client(s): {server:.1f} ms, +{server - lib['batch1_p50_ms']:.1f} ms); batch {lib['batch']}: "
                     f"{lib['images_per_s_at_batch']:.2f} images/s")
    for m, s in r["batching"].items():
        lines.append(f"{m}: {s['inference_count']} images in {s['execution_count']} executions")
    return "\n".join(lines)
