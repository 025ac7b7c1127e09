"""The one timing helper every benchmark and script uses: systems timed in interleaved
rounds, so that a machine's drift (another process, clock changes, thermal) lands on all of
them alike and their ratios, measured in one run, stay fair; medians and p90 reported."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import EvoExportError


@dataclass(frozen=True)
class BenchOptions:
    """What a library bench times; `bench` fills it from its flags over the device's defaults
    (CPU_BENCH, CUDA_BENCH)."""
    batches: tuple = (1, 4)
    iters: int = 10
    warmup: int = 2
    precisions: tuple = ()              # also builds of these precisions (CPU), or the chains' (CUDA)
    hf: bool = True                     # also transformers' own model
    baseline: str | Path | None = None  # an unpruned build; None: exported now
    backends: tuple = ("onnxruntime",)  # CPU: each system on each of these runtimes

    def check(self) -> None:
        if self.iters < 1 or self.warmup < 0 or not self.batches or any(b < 1 for b in self.batches):
            raise EvoExportError("iters and batches must be >= 1, warmup >= 0")


CPU_BENCH = BenchOptions()
CUDA_BENCH = BenchOptions(batches=(1, 8, 32), iters=50, warmup=10, precisions=("bf16",))


def stats(times_ms: list[float]) -> dict:
    """median, p90 and min of a list of milliseconds, and how many."""
    return {"median_ms": statistics.median(times_ms), "p90_ms": float(np.percentile(np.asarray(times_ms), 90)),
            "min_ms": min(times_ms), "iters": len(times_ms)}


def time_systems(systems: dict[str, Callable[[], object]], iters: int, warmup: int, rounds: int | None = None,
                 sync: Callable[[], None] | None = None, progress=None) -> dict[str, dict]:
    """Each system (a callable of no arguments) warmed up `warmup` times, then timed `iters`
    times in total, in `rounds` interleaved rounds (default: one call per system per round,
    the systems in turn). `sync` (e.g. torch.cuda.synchronize) is called before a clock is
    read. Returns {name: stats(...) | {"times_ms": [...]}}."""
    sync = sync or (lambda: None)
    rounds = rounds or iters
    per_round = [iters // rounds + (1 if r < iters % rounds else 0) for r in range(rounds)]
    for name, fn in systems.items():
        for _ in range(warmup):
            fn()
    sync()
    times = {name: [] for name in systems}
    for r, n in enumerate(per_round):
        if progress and rounds > 1:
            progress(f"round {r + 1}/{rounds}")
        for name, fn in systems.items():
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {**stats(ts), "times_ms": ts} for name, ts in times.items()}


def time_clients(make_client: Callable[[], tuple[Callable[[], object], Callable[[], None]]], clients: int,
                 per_client: int) -> dict:
    """`clients` threads at once, each with its own (call, close) from `make_client`, calling
    `per_client` times: every call's seconds, the errors (counted, never hidden: a bench with
    failures is reported as such) and the wall time of the whole round."""
    import threading
    latencies, errors = [], []
    lock = threading.Lock()

    def client():
        call, close = make_client()
        try:
            for _ in range(per_client):
                t = time.perf_counter()
                try:
                    call()
                except Exception as e:
                    with lock:
                        errors.append(str(e)[:200])
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t)
        finally:
            close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "errors": errors, "wall_s": time.perf_counter() - start}


def cuda_graph_ms(fn, *args, reps: int = 20) -> float:
    """ms of one replay of fn(*args) captured as a CUDA graph, timed with CUDA events over
    `reps` back-to-back replays (no host launch cost: what the GPU itself spends)."""
    import torch

    from ..runtime.cuda_graphs import GraphedCall

    graphed = GraphedCall(fn, *args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graphed.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def cpu_info() -> dict:
    """The CPU a measurement ran on: its name, cores, and the instruction sets that change
    kernels and rounding (AVX2, AVX-512 VNNI and BF16, AMX), from /proc/cpuinfo."""
    import os
    import platform
    name, flags = None, ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name is None:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = f" {line.split(':', 1)[1].strip()} "
    except OSError:
        pass
    name = name or platform.processor() or "unknown"
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f" {f} " in flags]
    return {"cpu": name, "cores": os.cpu_count(), "isa": isa, "python": platform.python_version()}
