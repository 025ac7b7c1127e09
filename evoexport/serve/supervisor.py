"""Keep a Triton server of an evoexport repository answering: notice a dead or unhealthy
step, recover it by itself, and say whether the ensemble can answer right now.

Why this exists: when a Python-backend stub dies (killed, out of memory), Triton 2.51 (and
2.64, triton-inference-server/server#8604) neither restarts it nor reports it: every request through that step
gets HTTP 500 ("Stub process ... is not healthy") while /v2/health/ready keeps answering 200.

How it recovers (measured in docs/serving.md):
  - a stub that is gone is seen from the process table (the server's children) within one
    check interval; a stub that is alive but broken, or any other failure, by a canary
    request through the whole ensemble every `canary_interval`;
  - the step is reloaded through Triton's model-control API with its own config plus a
    generation counter: a config that differs makes Triton build new instances (new stubs)
    and swap them in. A plain reload of an unchanged config does nothing, and an unload
    waits forever on the dead stub (both seen here);
  - if that fails, or the server itself died, the server is restarted on the same address.
Requests that reach a dead step before it is reloaded get an error (never a wrong answer);
clients retry. The readiness to give an orchestrator is `probe()` (`evoexport health`): a
real request through every step, not Triton's own flag.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from ..errors import EvoExportError
from .triton import TritonServer

STUB = "triton_python_backend_stub"
_UNHEALTHY = re.compile(r"Stub process '([\w.-]+?)_\d+_\d+' is not healthy")


@dataclass
class Health:
    ok: bool
    reason: str = ""
    steps: list = field(default_factory=list)     # the steps the failure names, where it names them


def _request(url: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def probe(url: str, model: str = "evoexport", timeout: float = 60.0) -> Health:
    """Can the ensemble `model` at `url` answer now? One request of batch 1 (zeros of the
    model's input shape) through every step; ok only on an answer with every output."""
    try:
        status, body = _request(f"{url}/v2/models/{model}", timeout=timeout)
        if status != 200:
            return Health(False, f"model {model} is not available (HTTP {status}: {body[:200].decode(errors='replace')})")
        meta = json.loads(body)
        spec = meta["inputs"][0]
        shape = [1 if d < 0 else d for d in spec["shape"]]
        pixels = {"name": spec["name"], "shape": shape, "datatype": spec["datatype"],
                  "data": [0] * math.prod(shape)}
        status, body = _request(f"{url}/v2/models/{model}/infer", {"inputs": [pixels]}, timeout)
    except (OSError, ValueError, KeyError, IndexError) as e:
        return Health(False, f"no answer from {url}: {e}")
    if status != 200:
        text = body[:300].decode(errors="replace")
        return Health(False, f"HTTP {status}: {text}", sorted(set(_UNHEALTHY.findall(text))))
    outputs = {o["name"] for o in json.loads(body).get("outputs", [])}
    wanted = {o["name"] for o in meta.get("outputs", [])}
    if not wanted <= outputs:
        return Health(False, f"the answer lacks {', '.join(sorted(wanted - outputs))}")
    return Health(True)


class Supervisor:
    """Watches `server` (started) and recovers it: `run()` loops until interrupted;
    `check()` does one round (tests, other loops)."""

    def __init__(self, server: TritonServer, model: str = "evoexport", *, check_interval: float = 0.5,
                 canary_interval: float = 10.0, report=print):
        self.server, self.model = server, model
        self.check_interval, self.canary_interval, self.report = check_interval, canary_interval, report
        self.generation = 0
        self._last_canary = time.monotonic()
        self._failures, self._backoff = 0, 0.0
        self.python_steps = self._python_steps()

    def _python_steps(self) -> dict:
        """Python-backend models and how many stubs each runs (its instance count)."""
        status, body = _request(f"{self.server.url}/v2/repository/index", {})
        if status != 200:
            raise EvoExportError(f"tritonserver's model index is unavailable (HTTP {status})")
        steps = {}
        for entry in json.loads(body):
            status, config = _request(f"{self.server.url}/v2/models/{entry['name']}/config")
            config = json.loads(config) if status == 200 else {}
            if config.get("backend") == "python":
                steps[entry["name"]] = sum(int(g.get("count", 1)) for g in config.get("instance_group", [{}]))
        return steps

    def live_stubs(self) -> dict:
        """Live stub processes of the server, per model (zombies are not alive)."""
        server_pid, counts = str(self.server.process.pid), {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read().rsplit(")", 1)[1].split()
                if stat[1] != server_pid or stat[0] == "Z":
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(STUB.encode()) and len(argv) > 1:
                model = os.path.basename(os.path.dirname(os.path.dirname(argv[1].decode(errors="replace"))))
                counts[model] = counts.get(model, 0) + 1
        return counts

    def check(self) -> str | None:
        """One round: what was wrong and done about it, or None when all was well."""
        if self.server.process.poll() is not None:
            return self._restart(f"tritonserver exited (rc {self.server.process.returncode})")
        live = self.live_stubs()
        dead = sorted(m for m, n in self.python_steps.items() if live.get(m, 0) < n)
        if dead:
            return self._reload(dead, "its worker process is gone")
        if time.monotonic() - self._last_canary < self.canary_interval:
            return None
        self._last_canary = time.monotonic()
        health = probe(self.server.url, self.model)
        if health.ok:
            self._failures = 0
            return None
        if health.steps:
            return self._reload(health.steps, f"a canary request failed ({health.reason})")
        self._failures += 1
        if self._failures >= 2:
            return self._restart(f"two canary requests in a row failed ({health.reason})")
        return None

    def _reload(self, models: list, why: str) -> str:
        t0 = time.monotonic()
        self.report(f"step(s) {', '.join(models)}: {why}; reloading")
        for model in models:
            self.generation += 1
            status, body = _request(f"{self.server.url}/v2/models/{model}/config")
            if status != 200:
                return self._restart(f"the config of {model} is unavailable (HTTP {status})")
            config = json.loads(body)
            config.setdefault("parameters", {})["EVOEXPORT_GENERATION"] = {"string_value": str(self.generation)}
            status, body = _request(f"{self.server.url}/v2/repository/models/{model}/load",
                                    {"parameters": {"config": json.dumps(config)}}, timeout=120)
            if status != 200:
                return self._restart(f"reloading {model} failed (HTTP {status}: {body[:200].decode(errors='replace')})")
        done = f"step(s) {', '.join(models)} reloaded in {time.monotonic() - t0:.2f} s"
        self.report(done)
        return done

    def _restart(self, why: str) -> str:
        t0 = time.monotonic()
        self.report(f"{why}; restarting tritonserver")
        try:
            self.server.restart()
        except EvoExportError as e:   # tried again at the next check, after a pause that grows
            self._backoff = min(2 * self._backoff or 1.0, 30.0)
            self.report(f"the restart failed ({str(e).splitlines()[0]}); next try in {self._backoff:.0f} s")
            time.sleep(self._backoff)
            return "restart failed"
        self.python_steps = self._python_steps()
        self._failures, self._backoff = 0, 0.0
        done = f"tritonserver restarted and ready in {time.monotonic() - t0:.1f} s"
        self.report(done)
        return done

    def run(self) -> None:
        """Check every `check_interval` until interrupted (KeyboardInterrupt)."""
        while True:
            self.check()
            time.sleep(self.check_interval)
