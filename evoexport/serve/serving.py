"""A build served, as context managers: the server is up inside the `with` and stopped,
with its scratch files removed, on the way out (Ctrl-C included). `evoexport serve` only
parses its flags, enters one of these and prints.

    with serve_triton("graphs/llava-keep0.5", RepositoryOptions(flavour=None)) as served:
        ...   # served.url, served.repository, served.server
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import EvoExportError
from ..manifest import read_manifest
from .repository import Repository, RepositoryOptions


@dataclass
class Served:
    url: str
    server: object                   # TritonServer, or None for Ray Serve
    repository: Repository | None = None
    install: object = None           # the tritonserver found (binary, bundled, flavours)


def _quiet(_line: str) -> None:
    pass


@contextmanager
def serve_triton(build_dir, options: RepositoryOptions, *, host: str = "127.0.0.1", port: int = 8000, say=_quiet):
    """tritonserver with a repository written from the build into a scratch folder.
    options.flavour None: the Python backend with the bundled server, onnxruntime with one on
    PATH. `say` gets one line per step (what was written, what starts, what stops)."""
    from .repository import describe, write_repository
    from .triton import TritonServer, find_tritonserver

    # a bad build is one error line, before any server starts
    read_manifest(build_dir)
    scratch = Path(tempfile.mkdtemp(prefix="evoexport-serve-"))
    server = None
    try:
        install = find_tritonserver(scratch / "probe")
        flavour = options.flavour or ("python" if install.bundled else "onnxruntime")
        if flavour not in install.flavours:
            raise EvoExportError(f"this tritonserver ({install.binary}) has only the {', '.join(install.flavours)} "
                                 "backend; use the python flavour")
        repo = write_repository(build_dir, scratch / "repository", replace(options, flavour=flavour))
        say(describe(repo))
        say(f"starting {install.binary}{' (bundled with nvidia-pytriton)' if install.bundled else ''} ...")
        server = TritonServer(repo.path, host=host, port=port).start()
        yield Served(server.url, server, repo, install)
    finally:
        if server is not None:
            say("stopping tritonserver ...")
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def serve_ray(build_dir, options, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
              say=_quiet):
    """Ray Serve with the build's deployment (ray_app.RayOptions) at /evoexport, on a local
    Ray (or the cluster at `address`)."""
    from .ray_app import encoder_app   # first: one error line if Ray is not installed

    import ray
    from ray import serve

    read_manifest(build_dir)
    app = encoder_app(str(Path(build_dir).resolve()), options)
    ray.init(address=address, include_dashboard=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="evoexport", route_prefix="/evoexport")
        yield Served(f"http://{host}:{port}/evoexport", None)
    finally:
        say("stopping Ray Serve ...")
        serve.shutdown()
        ray.shutdown()
