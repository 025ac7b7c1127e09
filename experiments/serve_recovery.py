#!/usr/bin/env python3
"""How long `evoexport serve BUILD --engine triton` takes to answer again after a failure,
under load, and whether any answer was wrong. Backs the recovery table of docs/serving.md.

    .venv/bin/python experiments/serve_recovery.py graphs/llava-keep0.5 --json out.json

For each step's worker in turn (SIGKILL of its Python-backend stub), then for tritonserver
itself: `--clients` threads send requests of batch 1 continuously and check every answer
against `evoexport.load(BUILD)`; recovery is the time from the kill to the first request,
sent after the last failure, that succeeded. Prints a table; --json writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class Load:
    """Clients sending requests and checking every answer; results as (sent, status)."""

    def __init__(self, port: int, runner, clients: int):
        import tritonclient.http as http
        self.http, self.port, self.runner = http, port, runner
        self.results, self.lock, self.stop = [], threading.Lock(), threading.Event()
        rng = np.random.default_rng(0)
        shape = runner.input_shape[1:]
        self.inputs = [rng.standard_normal((1, *shape), dtype=np.float32) for _ in range(8)]
        self.expected = [runner(x) for x in self.inputs]
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self, seed: int) -> None:
        c = self.http.InferenceServerClient(f"127.0.0.1:{self.port}", network_timeout=120)
        k = seed
        while not self.stop.is_set():
            i, k = k % len(self.inputs), k + 1
            inp = self.http.InferInput("pixel_values", list(self.inputs[i].shape), "FP32")
            inp.set_data_from_numpy(self.inputs[i], binary_data=True)
            sent = time.monotonic()
            try:
                r = c.infer("evoexport", [inp])
                want = self.expected[i]
                ok = (np.abs(r.as_numpy("features") - want.features).max() <= 1e-4
                      and np.array_equal(r.as_numpy("indices"), want.indices))
                status = "ok" if ok else "wrong"
            except Exception:
                status = "error"
            with self.lock:
                self.results.append((sent, status))

    def since(self, t: float) -> list:
        with self.lock:
            return [r for r in self.results if r[0] >= t]

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def recovery(load: Load, kill, settle: float) -> dict:
    killed = time.monotonic()
    kill()
    time.sleep(settle)
    seen = load.since(killed)
    errors = [t for t, s in seen if s == "error"]
    last_error = max(errors) if errors else killed
    ok_after = [t for t, s in seen if s == "ok" and t > last_error]
    return {"requests": len(seen), "errors": len(errors), "wrong": sum(s == "wrong" for _, s in seen),
            "recovered_s": round(min(ok_after) - killed, 3) if ok_after else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("build")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--settle", type=float, default=8.0, help="seconds of load after each kill")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import evoexport
    from evoexport.serve.supervisor import probe

    runner = evoexport.load(args.build)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve = subprocess.Popen([sys.executable, "-m", "evoexport.cli", "serve", args.build, "--port", str(port)],
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(serve.stderr), daemon=True).start()
    rows = {}
    try:
        started = time.monotonic()
        while not probe(url).ok:
            if serve.poll() is not None:
                raise SystemExit("evoexport serve exited:\n" + "".join(log[-10:]))
            time.sleep(0.5)
        startup = time.monotonic() - started
        load = Load(port, runner, args.clients)
        time.sleep(3)
        steps = ["pixels"] + [g["name"] for g in runner.manifest.graphs] + ["indices"]
        for step in steps:
            stubs = _pids(f"/evoexport_{step}/1/model.py")
            rows[f"stub of evoexport_{step}"] = recovery(load, lambda: os.kill(stubs[0], signal.SIGKILL), args.settle)
            print(f"stub of evoexport_{step:<10} {rows[f'stub of evoexport_{step}']}", flush=True)
        server = _pids(f"http-port={port}")[0]
        rows["tritonserver"] = recovery(load, lambda: os.kill(server, signal.SIGKILL), args.settle + 20)
        print(f"tritonserver              {rows['tritonserver']}", flush=True)
        load.close()
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        serve.wait(120)
    report = {"build": str(args.build), "model": runner.manifest.model, "clients": args.clients,
              "startup_s": round(startup, 2), "cpu": platform.processor() or platform.machine(),
              "kills": rows, "supervisor_log": [line.rstrip() for line in log if "[supervisor]" in line]}
    try:
        from evoexport.measure.timing import cpu_info
        report["cpu"] = cpu_info()
    except Exception:
        pass
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    wrong = sum(r["wrong"] for r in rows.values())
    print(f"wrong answers: {wrong}; slowest recovery: {max(r['recovered_s'] or 1e9 for r in rows.values()):.2f} s")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
