"""vLLM's OpenAI-compatible server with the evoexport plugin (integrations/vllm): the whole
VLM served, a build as its vision encoder. vLLM pins a transformers older than ours, so it
runs from its own environment (`scripts/setup-env --vllm` makes .venv-vllm on first use; a
GPU user points `--vllm-python` at the Python of their own vLLM, with evoexport installed
there). The server binds to loopback unless told otherwise and is stopped with its whole
process group on the way out."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from ..errors import EvoExportError
from ..integrations.vllm import hf_overrides

CHECKOUT = Path(__file__).resolve().parents[2]
VENV = CHECKOUT / ".venv-vllm"
STARTUP_TIMEOUT = 900      # seconds: a large checkpoint's load and vLLM's profiling run on 2 cores
RESTARTS, RESTART_WINDOW = 3, 600.0   # vLLM restarted after it dies, at most 3 times in 10 minutes
RESTART_PAUSE = 5.0                   # seconds, times the recent deaths: the dead engine's memory is freed


def vllm_python(python: str | None = None, say=lambda line: None) -> str:
    """The Python that runs vLLM: `python`, $EVOEXPORT_VLLM_PYTHON, or the checkout's
    .venv-vllm (made now by scripts/setup-env --vllm if it is missing or out of date)."""
    python = python or os.environ.get("EVOEXPORT_VLLM_PYTHON")
    if python:
        if not Path(python).is_file():
            raise EvoExportError(f"vLLM's Python {python} does not exist")
        return python
    setup = CHECKOUT / "scripts" / "setup-env"
    if setup.is_file():
        if not (VENV / ".evoexport-installed").is_file():
            say(f"setting up vLLM's own environment in {VENV} (first use: about 4 minutes, 3.5 GB) ...")
        done = subprocess.run([str(setup), "--vllm"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise EvoExportError(f"setting up vLLM's environment failed: {done.stderr.strip().splitlines()[-1:]}")
        return str(VENV / "bin" / "python")
    raise EvoExportError("vLLM is not installed here: pass --vllm-python (a Python whose environment has vLLM and "
                         "evoexport) or set EVOEXPORT_VLLM_PYTHON")


def server_env() -> dict:
    """The server's environment: offline; the KV cache sized for this machine unless the
    caller set it. The encoder runs in vLLM's frontend process (its runtime's own thread
    pool), the language model in the engine process (vLLM binds its OpenMP threads to the
    cores): they overlap only while one request is encoded as another is decoded."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    # vLLM kills its engine when one step takes over 300 s (its default); on a small CPU a
    # batch of long multimodal prompts takes longer (measured: 8 Qwen2.5-VL-3B prompts, 2 cores)
    env.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
    return env


@contextmanager
def serve_vllm(build_dir, checkpoint, *, host: str = "127.0.0.1", port: int = 8000, python: str | None = None,
               vllm_args: tuple = (), say=lambda line: None, encoder: dict | None = None):
    """vLLM's OpenAI server for `checkpoint` with `build_dir` as its vision encoder (None:
    stock vLLM, its own encoder, the baseline), up inside the `with` (its /health
    answered), stopped on the way out. `encoder`: hf_overrides' backend and threads."""
    # a bad build or checkpoint: one error line, no server
    overrides = (["--hf-overrides", json.dumps(hf_overrides(build_dir, checkpoint, **(encoder or {})))]
                 if build_dir else [])
    python = vllm_python(python, say)
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(Path(checkpoint).resolve()),
           "--host", host, "--port", str(port), *overrides, *vllm_args]
    log = tempfile.NamedTemporaryFile(prefix="evoexport-vllm-", suffix=".log", delete=False)
    say(f"starting vLLM ({python}); log: {log.name}")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True)
    url = f"http://{host}:{port}"
    try:
        _wait_ready(proc, url, Path(log.name), STARTUP_TIMEOUT)
        yield url, proc
    finally:
        say("stopping vLLM ...")
        _stop(proc)
        log.close()


def run_vllm(build_dir, checkpoint, *, say=lambda line: None, **options) -> None:
    """Serve until interrupted, restarting vLLM when it dies: its API server exits when its
    engine process does (killed for memory, or by its own step timeout), and nothing else
    would bring it back. While it restarts nothing listens, so /health is not ready. The
    first start-up's refusal (a build of other weights) is raised at once; a restart that
    fails to come up (the dead engine's memory not yet free, a busy machine) counts as one
    more death and is tried again after a pause. More than RESTARTS deaths within
    RESTART_WINDOW seconds are raised."""
    deaths: list[float] = []
    while True:
        try:
            with serve_vllm(build_dir, checkpoint, say=say, **options) as (url, proc):
                say(f"serving: POST {url}/v1/chat/completions (OpenAI API, images as image_url); Ctrl-C stops")
                why = f"vLLM exited (rc {proc.wait()})"
        except EvoExportError as e:
            if not deaths:
                raise
            why = str(e)
        now = time.monotonic()
        deaths = [t for t in deaths if now - t < RESTART_WINDOW] + [now]
        if len(deaths) > RESTARTS:
            raise EvoExportError(f"{why}; {len(deaths)} deaths within {RESTART_WINDOW:.0f} s, "
                                 "not restarting it again (its logs are named above)")
        say(f"[supervisor] {why}; restarting it in {RESTART_PAUSE * len(deaths):.0f} s")
        time.sleep(RESTART_PAUSE * len(deaths))


def _wait_ready(proc, url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EvoExportError(f"vLLM exited (rc {proc.returncode}) before it was ready: {_cause(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise EvoExportError(f"vLLM did not answer {url}/health within {timeout:.0f} s (log: {log})")


def _cause(log: Path) -> str:
    """The line of the log that says why (our own error first), else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    ours = [line.split("EvoExportError: ", 1)[1] for line in lines if "EvoExportError: " in line]
    return ours[-1] if ours else (lines[-1] if lines else "no output") + f" (log: {log})"


def _stop(proc) -> None:
    """The whole process group, also when its leader has died already: vLLM's engine and
    its workers must not outlive the server and hold its memory."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
