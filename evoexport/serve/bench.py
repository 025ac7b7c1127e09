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
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import EvoExportError
from ..manifest import read_manifest
from ..measure.timing import cpu_info

SYSTEMS = ("pruned", "unpruned")


def _client_round(url: str, model: str, pixels: np.ndarray, concurrency: int, per_client: int) -> dict:
    import tritonclient.http as http

    latencies, errors = [], []
    lock = threading.Lock()

    def client(_):
        c = http.InferenceServerClient(url, connection_timeout=600, network_timeout=600)
        inp = http.InferInput("pixel_values", pixels.shape, "FP32")
        inp.set_data_from_numpy(pixels, binary_data=True)
        outs = [http.InferRequestedOutput("features", binary_data=True)]
        for _ in range(per_client):
            t = time.perf_counter()
            try:
                c.infer(model, [inp], outputs=outs)
            except Exception as e:   # counted, never hidden: a bench with failures is reported as such
                with lock:
                    errors.append(str(e)[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - t)
        c.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"latencies": latencies, "errors": errors, "wall_s": wall, "images": len(latencies) * pixels.shape[0]}


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
    import evoexport
    runner = evoexport.load(build_dir, backend=runtime)
    one, many = pixels[:1], np.repeat(pixels[:1], batch, axis=0)
    runner(one)
    runner(many)   # warm-up
    lat = []
    for _ in range(iters):
        t = time.perf_counter()
        runner(one)
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(max(1, iters // batch)):
        runner(many)
    thr = max(1, iters // batch) * batch / (time.perf_counter() - t)
    return {"batch1_p50_ms": float(np.median(lat) * 1e3), "images_per_s_at_batch": thr, "batch": batch}


def run_serve_bench(build_dir, *, baseline=None, concurrency=(1, 8, 32), rounds: int = 2, per_client=None,
                    runtime: str = "openvino", queue_delay_us: int = 2000, threads: int = 0, progress=None) -> dict:
    from ..export.build import build_variant
    from .repository import write_repository
    from .triton import TritonServer

    say = progress or (lambda *_: None)
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    if any(c < 1 for c in concurrency) or rounds < 1:
        raise EvoExportError("--concurrency and rounds must be >= 1")
    profile = manifest.get("batch_profile", {}).get("max", 32)
    with tempfile.TemporaryDirectory(prefix="evoexport-serve-bench-") as scratch:
        scratch = Path(scratch)
        if baseline is None:
            say("exporting the unpruned encoder (keep 1.0, same weights) as the baseline")
            baseline = build_variant(manifest, scratch / "unpruned-build", unpruned=True).path
        builds = {"pruned": build_dir, "unpruned": Path(baseline)}
        base = read_manifest(builds["unpruned"], verify=False)
        if base["schedule"]:
            raise EvoExportError(f"--baseline {baseline} is pruned (keep {base['keep']}); give a keep 1.0 build")
        repos = []
        for system, path in builds.items():
            repo = write_repository(path, scratch / f"repo-{system}", flavour="python", name=system, runtime=runtime,
                                    queue_delay_us=queue_delay_us, threads=threads, max_batch=profile)
            repos.append(repo.path)
        say(f"starting tritonserver with both ensembles ({runtime} inside the Python backend)")
        rng = np.random.default_rng(0)
        shape = [1] + manifest["inputs"][0]["shape"][1:]
        pixels = rng.standard_normal(shape, dtype=np.float32)
        results = {s: {} for s in SYSTEMS}
        with TritonServer(repos, startup_timeout=600) as server:
            url = server.url.removeprefix("http://")
            for system in SYSTEMS:                     # warm-up: first calls compile and allocate
                _client_round(url, system, pixels, 2, 2)
            for c in concurrency:
                n = per_client or max(2, 8 // c)   # requests per client and round: 8 at 1 client, 2 from 4 up
                per = {s: [] for s in SYSTEMS}
                for r in range(rounds):
                    order = SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]
                    for system in order:
                        say(f"concurrency {c}, round {r + 1}/{rounds}: {system} ({c} clients x {n} requests)")
                        per[system].append(_client_round(url, system, pixels, c, n))
                for system in SYSTEMS:
                    results[system][str(c)] = _summary(per[system])
            stats = _stats(server.url, [f"{s}_stage_0" for s in SYSTEMS])
        say(f"the library directly ({runtime}, this process)")
        library = {s: _library(builds[s], runtime, pixels, max(concurrency), 8) for s in SYSTEMS}
    ratio = {str(c): results["pruned"][str(c)]["images_per_s"] / results["unpruned"][str(c)]["images_per_s"]
             for c in concurrency if results["unpruned"][str(c)]["images_per_s"]}
    return {"build": str(build_dir), "baseline": str(baseline), "model": manifest["model"], "keep": manifest["keep"],
            "ideal_speedup": manifest["flops"]["ideal_speedup"], "runtime": runtime, "engine": "triton (python backend)",
            "queue_delay_us": queue_delay_us, "concurrency": list(concurrency), "rounds": rounds,
            "results": results, "throughput_ratio": ratio, "library": library, "batching": stats,
            "machine": cpu_info()}


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
