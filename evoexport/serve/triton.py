"""Triton Inference Server as a process: found, started on loopback, waited for, stopped.

Which `tritonserver`:
  1. one on PATH (NVIDIA's container: every backend: onnxruntime, openvino, tensorrt, python);
  2. else the one bundled in the nvidia-pytriton wheel (installed by scripts/setup-env, --no-deps
     because of its numpy<2 pin). It ships only the Python backend, so the repository is the
     `python` flavour. Its backend folder is assembled in a temporary folder, as PyTriton
     does: the Python backend plus the stub built for this interpreter's version.

Gotchas handled here (checked on this project's machines, ../shared/notes/serving.md):
  - the stub embeds libpython; on a pyenv or other non-system Python it would load the
    system's libpython of another patch release and crash, so LD_LIBRARY_PATH leads with
    this interpreter's own lib folder;
  - SIGINT with a short exit timeout ends with rc 1: the server gets time, then a kill.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import EvoExportError

LOOPBACK = "127.0.0.1"


@dataclass
class TritonInstall:
    binary: Path
    backend_dir: Path | None      # None: the server's own (NVIDIA's container)
    library_path: list            # folders LD_LIBRARY_PATH must lead with
    bundled: bool                 # the nvidia-pytriton wheel's server: Python backend only

    @property
    def flavours(self) -> tuple:
        return ("python",) if self.bundled else ("onnxruntime", "openvino", "tensorrt", "python")


def find_tritonserver(scratch: Path) -> TritonInstall:
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), None, [], bundled=False)
    spec = importlib.util.find_spec("pytriton")     # found without importing it (it needs more than we install)
    if spec is None or not spec.submodule_search_locations:
        raise EvoExportError("no tritonserver: none on PATH and the nvidia-pytriton wheel is not installed "
                             "(scripts/setup-env installs it; or run inside NVIDIA's Triton container)")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise EvoExportError(f"the nvidia-pytriton wheel has no Python backend stub for Python {version}")
    backends = scratch / "backends"
    python = backends / "python"
    python.mkdir(parents=True)
    for f in (root / "backends" / "python").iterdir():
        if f.is_file():
            os.symlink(f, python / f.name)
    shutil.copy2(stub, python / "triton_python_backend_stub")
    libs = root.parent.parent / "nvidia_pytriton.libs"
    own_lib = sysconfig.get_config_var("LIBDIR")
    return TritonInstall(root / "bin" / "tritonserver", backends, [p for p in (own_lib, str(libs)) if p], bundled=True)


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TritonServer:
    """`with TritonServer(repo, port=8000) as server:` a running, ready server; stopped on exit.
    HTTP only (KServe v2), on loopback unless `host` says otherwise; gRPC and metrics off."""

    def __init__(self, repository: str | Path | list, *, host: str = LOOPBACK, port: int | None = None,
                 log_verbose: int = 0, startup_timeout: float = 120.0, exit_timeout: int = 15,
                 log_path: str | Path | None = None):
        """log_path: where the server's own log goes (kept); by default a temporary file,
        whose last lines come with any error."""
        # one repository, or several served side by side (bench: the pruned and unpruned builds)
        self.repositories = [Path(r) for r in (repository if isinstance(repository, (list, tuple)) else [repository])]
        self.host, self.port = host, port or free_port(host)
        self.log_verbose, self.startup_timeout, self.exit_timeout = log_verbose, startup_timeout, exit_timeout
        self.process: subprocess.Popen | None = None
        self._scratch: Path | None = None
        self.log_path: Path | None = Path(log_path) if log_path else None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "TritonServer":
        self._scratch = Path(tempfile.mkdtemp(prefix="evoexport-triton-"))
        install = find_tritonserver(self._scratch)
        for repository in self.repositories:
            flavour = _repository_flavour(repository)
            if flavour and flavour not in install.flavours:
                raise EvoExportError(f"{repository} is a '{flavour}' repository, but this tritonserver "
                                     f"({install.binary}) has only the {', '.join(install.flavours)} backend; "
                                     "write it with `evoexport triton --backend python`")
        # explicit model control, every model loaded at start: a step can then be reloaded by
        # itself when its worker dies (serve/supervisor.py)
        cmd = [str(install.binary), *(f"--model-repository={r}" for r in self.repositories), "--allow-http=true",
               f"--http-address={self.host}", f"--http-port={self.port}", "--allow-grpc=false",
               "--allow-metrics=false", "--strict-readiness=true", f"--exit-timeout-secs={self.exit_timeout}",
               f"--log-verbose={self.log_verbose}", "--disable-auto-complete-config",
               "--model-control-mode=explicit", "--load-model=*"]
        if install.backend_dir:
            cmd.append(f"--backend-directory={install.backend_dir}")
        env = dict(os.environ)
        if install.library_path:
            env["LD_LIBRARY_PATH"] = ":".join(install.library_path + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        self.log_path = self.log_path or self._scratch / "tritonserver.log"
        log = open(self.log_path, "ab")   # a restart adds to the same log
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise EvoExportError(f"tritonserver exited (rc {self.process.returncode}) before it was ready:\n{tail}")
            if self.ready():
                return
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        raise EvoExportError(f"tritonserver was not ready after {self.startup_timeout:.0f} s:\n{tail}")

    def restart(self) -> "TritonServer":
        """Stop the server and its stubs (however they are), then start it again on the same
        address: the recovery of last resort (serve/supervisor.py)."""
        self.stop()
        if self.log_path is not None and not self.log_path.parent.exists():
            self.log_path = None   # the default log lived in the scratch folder stop() removed
        return self.start()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AttributeError):
            return ""

    def stop(self) -> int | None:
        """SIGINT, time to finish in-flight requests, then SIGKILL to the whole process group
        (the Python backend's stubs included)."""
        rc = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                try:
                    self.process.wait(self.exit_timeout + 10)
                except subprocess.TimeoutExpired:
                    pass
            rc = self.process.wait()
            _kill_group(self.process.pid)   # stubs the server left behind
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
        return rc

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _kill_group(pgid: int, timeout: float = 10.0) -> None:
    """SIGKILL a process group and wait until none of it is left (a killed process takes a
    moment to go, and the stubs were the server's children)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.05)


def _repository_flavour(repository: Path) -> str | None:
    for marker in repository.glob("*/evoexport_repository.json"):
        try:
            return json.loads(marker.read_text()).get("flavour")
        except (OSError, json.JSONDecodeError):
            return None
    return None
