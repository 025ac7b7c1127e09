"""Commands that serve: triton (write a Triton model repository) and serve (run a real server
with a build: Triton Inference Server or Ray Serve). docs/serving.md."""
from __future__ import annotations

import ipaddress
import time

import click

from ..errors import EvoExportError
from ..serve.repository import FLAVOURS, RUNTIMES
from .group import cli

KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}


def _warn_if_exposed(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        click.echo(f"warning: binding {host}: the server is reachable from other machines, without "
                   "authentication (your explicit choice; the default is 127.0.0.1)", err=True)


def _repo_options(f):
    f = click.option("--name", default="evoexport", show_default=True, help="name of the ensemble (and prefix of its steps)")(f)
    f = click.option("--max-batch", type=int, default=None,
                     help="max_batch_size of every model  [default: the build's batch profile max]")(f)
    f = click.option("--instances", type=int, default=1, show_default=True, help="instances of each step (instance_group count)")(f)
    f = click.option("--kind", type=click.Choice(sorted(KINDS)), default=None,
                     help="instance_group kind  [default: gpu for tensorrt, else cpu]")(f)
    f = click.option("--queue-delay-us", type=int, default=500, show_default=True,
                     help="dynamic batching: how long a step waits to fill a batch")(f)
    f = click.option("--runtime", type=click.Choice(RUNTIMES), default="onnxruntime",
                     show_default=True, help="--backend python: the runtime inside each Python model")(f)
    f = click.option("--threads", type=int, default=0, show_default=True,
                     help="--backend python: threads per graph's runtime (0: the runtime's default)")(f)
    return f


@cli.command()
@click.argument("build_dir", type=click.Path())
@click.option("--out", type=click.Path(), required=True, help="repository folder to write (replaced whole)")
@click.option("--backend", "flavour", type=click.Choice(FLAVOURS),
              default="onnxruntime", show_default=True,
              help="Triton backend of each graph: tensorrt takes the plans of `evoexport engines`; python runs "
                   "our runtime inside Triton's Python backend (the one the bundled server has)")
@_repo_options
@click.option("--for-trtllm", is_flag=True,
              help="also a `multimodal_encoders` ensemble shaped as TensorRT-LLM's multimodal Triton models expect")
def triton(build_dir, out, flavour, name, max_batch, instances, kind, queue_delay_us, runtime, threads, for_trtllm):
    """Write a Triton model repository: one model per graph, plus an ensemble that chains them."""
    from ..progress import mark_decided
    from ..serve.repository import describe, write_repository
    options = _repository_options(flavour, name, max_batch, instances, kind, queue_delay_us, runtime, threads,
                                  for_trtllm)
    click.echo(describe(write_repository(build_dir, out, options, on_commit=mark_decided)))


def _repository_options(flavour, name, max_batch, instances, kind, queue_delay_us, runtime, threads, for_trtllm=False):
    from ..serve.repository import RepositoryOptions
    return RepositoryOptions(flavour=flavour, name=name, max_batch=max_batch, instances=instances,
                             kind=KINDS.get(kind), queue_delay_us=queue_delay_us, runtime=runtime, threads=threads,
                             for_trtllm=for_trtllm)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("build_dir", type=click.Path())
@click.option("--engine", type=click.Choice(["triton", "ray", "vllm"]), default="triton", show_default=True,
              help="triton, ray: the encoder alone; vllm: the whole VLM (OpenAI API) with the build as its encoder")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (anything but loopback is your explicit choice)")
@click.option("--port", type=int, default=8000, show_default=True, help="HTTP port")
@click.option("--backend", "flavour", type=click.Choice(FLAVOURS), default=None,
              help="triton: repository flavour  [default: python with the bundled server, onnxruntime with one on PATH]")
@_repo_options
@click.option("--replicas", type=int, default=1, show_default=True, help="ray: replicas of the deployment")
@click.option("--gpus", type=float, default=0.0, show_default=True, help="ray: GPUs per replica (fractions allowed)")
@click.option("--address", default=None, help="ray: an existing Ray cluster (`auto`, or HEAD:6379)  [default: a local one]")
@click.option("--model", "checkpoint", type=click.Path(), default=None,
              help="vllm: the VLM's checkpoint directory (the one the build was made from)")
@click.option("--vllm-python", default=None,
              help="vllm: the Python of an environment with vLLM and evoexport  [default: .venv-vllm, made on first use]")
@click.pass_context
def serve(ctx, build_dir, engine, host, port, flavour, name, max_batch, instances, kind, queue_delay_us, runtime,
          threads, replicas, gpus, address, checkpoint, vllm_python):
    """Run a real server with a build: Triton Inference Server (KServe v2 over HTTP), Ray Serve,
    or vLLM (the whole VLM, OpenAI API; vLLM's own options follow, e.g. -- --max-model-len 4096)."""
    from ..serve.serving import serve_ray, serve_triton
    if not 1 <= port <= 65535:
        raise EvoExportError(f"--port {port} is not a TCP port")
    if ctx.args and engine != "vllm":
        raise EvoExportError(f"unknown option(s) {' '.join(ctx.args)} (only --engine vllm passes options on)")
    if engine == "vllm" and not checkpoint:
        raise EvoExportError("--engine vllm needs --model CHECKPOINT_DIR (the VLM the build was made from)")
    _warn_if_exposed(host)

    def say(line):
        click.echo(line, err=True)
    try:
        if engine == "vllm":
            from ..serve.vllm_server import run_vllm
            run_vllm(build_dir, checkpoint, host=host, port=port, python=vllm_python, vllm_args=tuple(ctx.args),
                     say=say)
        elif engine == "ray":
            from ..serve.ray_app import RayOptions
            options = RayOptions(backend=runtime, replicas=replicas, gpus=gpus, max_batch=max_batch)
            with serve_ray(build_dir, options, host=host, port=port, address=address, say=say) as served:
                say(f"serving: POST a .npy of float32 pixel values to {served.url} (an .npz comes back); Python: "
                    "serve.get_app_handle('evoexport').encode.remote(pixels); Ctrl-C stops")
                while True:
                    time.sleep(1)
        else:
            options = _repository_options(flavour, name, max_batch, instances, kind, queue_delay_us, runtime, threads)
            with serve_triton(build_dir, options, host=host, port=port, say=say) as served:
                from ..serve.supervisor import Supervisor
                say(f"serving: POST {served.url}/v2/models/{name}/infer (KServe v2); "
                    f"readiness: `evoexport health {served.url} --model {name}`; Ctrl-C stops")
                Supervisor(served.server, name, report=lambda line: say(f"[supervisor] {line}")).run()
    except KeyboardInterrupt:
        pass
    say("stopped")


@cli.command()
@click.argument("url", default="http://127.0.0.1:8000")
@click.option("--model", default="evoexport", show_default=True, help="the ensemble to ask")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="seconds to wait for the answer")
def health(url, model, timeout):
    """Readiness of a Triton server of an evoexport repository: exit 0 only if a request through
    every step of the ensemble is answered now (Triton's own /v2/health/ready stays 200 when a
    step's worker has died). For Kubernetes: an exec readiness probe."""
    from ..serve.supervisor import probe

    if not url.startswith(("http://", "https://")):
        raise EvoExportError(f"the URL must start with http:// or https://, got {url!r}")
    if timeout <= 0:
        raise EvoExportError(f"--timeout must be positive, got {timeout}")
    state = probe(url.rstrip("/"), model, timeout)
    if not state.ok:
        click.echo(f"not ready: {state.reason}", err=True)
        raise SystemExit(1)
    click.echo(f"ready: {model} answered through every step")
