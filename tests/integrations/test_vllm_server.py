"""`evoexport serve BUILD --engine vllm`: vLLM's OpenAI server with the evoexport plugin, on
vLLM's CPU build, started as a user starts it. Answers equal attach() + transformers'
generate() token for token; concurrent requests equal single ones; bad input gets a client
error and the server goes on; a build of other weights is refused at start."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import CLI
from tests.integrations.conftest import photo
from tests.integrations.test_vllm import llava_transformers, qwen_transformers
from evoexport.measure.random_vlm import make_qwen_vlm


VIDEO_PAD = 306        # <|video_pad|> in make_qwen_vlm's tokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _chat(url: str, images: list[str], text: str = "what is in the image?",
          video: str | None = None) -> tuple[int, dict]:
    """A chat completion of images, text and optionally a video_url."""
    content = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": text}]
    if video:
        content.insert(0, {"type": "video_url", "video_url": {"url": video}})
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0,
            "return_token_ids": True}
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _wait_said(proc, prefix: str, count: int, timeout: float) -> bool:
    """Whether `serve` said a line starting with `prefix` `count` times before it exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(line.startswith(prefix) for line in proc.said) >= count:
            return True
        time.sleep(1)
    return False


def _collect(proc) -> None:
    for line in proc.stderr:
        proc.said.append(line)


@contextmanager
def vllm_server(python: str, build_dir: Path, ckpt: Path, limits: str = '{"image": 2}'):
    """`evoexport serve BUILD --engine vllm` as a user starts it, up until the block ends. Up
    means `serve` said "serving:", not merely that /health answered: the supervisor may not
    have seen that answer yet. What it says collects in proc.said."""
    port = _free_port()
    # 1 GiB of KV cache is plenty at --max-model-len 512 and leaves the other tests' memory alone
    env = {**os.environ, "EVOEXPORT_VLLM_PYTHON": python, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen([*CLI, "serve", str(build_dir), "--engine", "vllm", "--model", str(ckpt), "--port",
                             str(port), "--", "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
                             "--served-model-name", "m", "--limit-mm-per-prompt", limits],
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    proc.said = []
    threading.Thread(target=_collect, args=(proc,), daemon=True).start()
    ready = _wait_said(proc, "serving:", 1, 600)
    assert ready, "".join(proc.said)[-3000:]
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)


@pytest.fixture(scope="module")
def qwen_server(vllm_python, qwen):
    ckpt, builds, photo = qwen
    with vllm_server(vllm_python, builds[0.5], ckpt) as (url, proc):
        yield url, proc, photo


def test_server_answers_openai_requests_with_k_tokens_per_image(qwen_server, qwen, tmp_path):
    url, proc, photo = qwen_server
    ckpt, builds, _ = qwen
    ref = qwen_transformers(ckpt, builds[0.5], photo)
    status, body = _chat(url, [_data_url(photo)])
    assert status == 200, body
    assert body["choices"][0]["token_ids"] == ref["attach"]
    assert body["usage"]["prompt_tokens"] == ref["attach_prompt_tokens"]


def test_server_concurrent_requests_equal_single_ones(qwen_server, tmp_path):
    url, _, _ = qwen_server
    photos = [photo(tmp_path / f"p{i}.png", 224, seed=i + 1) for i in range(4)]
    requests = [[_data_url(photos[i % 4])] + ([_data_url(photos[(i + 1) % 4])] if i % 2 else []) for i in range(32)]
    single = {json.dumps(r): _chat(url, r)[1]["choices"][0]["token_ids"] for r in requests[:8]}
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda r: _chat(url, r), requests))
    assert all(status == 200 for status, _ in answers)
    for r, (_, body) in zip(requests, answers):
        assert body["choices"][0]["token_ids"] == single[json.dumps(r)]


def test_server_refuses_bad_input_with_a_client_error_and_keeps_serving(qwen_server):
    url, proc, photo = qwen_server
    status, body = _chat(url, ["data:image/png;base64,bm90IGFuIGltYWdl"])        # "not an image"
    assert 400 <= status < 500, body
    status, body = _chat(url, [_data_url(photo)] * 3)                            # over --limit-mm-per-prompt
    assert 400 <= status < 500, body
    status, body = _chat(url, [_data_url(photo)])
    assert status == 200 and proc.poll() is None


def test_llava_server_answers_as_attach(vllm_python, llava):
    ckpt, builds, photo = llava
    ref = llava_transformers(ckpt, builds[0.5], photo)
    with vllm_server(vllm_python, builds[0.5], ckpt) as (url, _):
        status, body = _chat(url, [_data_url(photo)])
    assert status == 200, body
    assert body["choices"][0]["token_ids"] == ref["attach"]
    assert body["usage"]["prompt_tokens"] == ref["attach_prompt_tokens"]


def test_onevision_server_answers_as_attach_and_refuses_what_the_build_cannot_pack(vllm_python, onevision,
                                                                                   onevision_answers, tmp_path):
    """A square photo of 224 px takes 4x4 tiles, whose grid needs the anyres_max_9 resize,
    undefined over a pruned grid: a client error that says what to do; the server goes on."""
    ckpt, builds, photos = onevision
    big = photo(tmp_path / "big.png", 224)
    with vllm_server(vllm_python, builds[0.5], ckpt) as (url, proc):
        answers = {p.stem: _chat(url, [_data_url(p)]) for p in photos}
        refused = _chat(url, [_data_url(big)])
        after = _chat(url, [_data_url(photos[0])])
        alive = proc.poll() is None
    for stem, (status, body) in answers.items():
        ref = onevision_answers[stem]["ref"]
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == ref["attach"], stem
        assert body["usage"]["prompt_tokens"] == ref["attach_prompt_tokens"], stem
    assert refused[0] == 400 and "keep-1.0 build" in json.dumps(refused[1]), refused
    assert after[0] == 200 and alive
    assert after[1]["choices"][0]["token_ids"] == answers[photos[0].stem][1]["choices"][0]["token_ids"]


def test_qwen_server_takes_video_urls_of_a_temporal_video_build(vllm_python, qwen_video_builds, tmp_path):
    """OpenAI's video_url through a temporal video build (groups of 2 temporal patches): an
    mp4 as a data URL, decoded and sampled by vLLM's and Qwen's own code, adds Ka + Kl video
    tokens per group of 2 temporal patches; 6 JPEG frames (vLLM's `video/jpeg` data URL: 3
    patches) are a client error that says why; the server goes on and answers the mp4
    again the same."""
    from evoexport.export.build import build
    from evoexport.inputs.video import sample_clip
    from evoexport.progress import Progress
    ckpt, _ = qwen_video_builds
    temporal = build("qwen2.5-vl", 0.5, checkpoint=str(ckpt), out=tmp_path / "temporal", validate=False,
                     image_size=224, video=True, temporal="2:0.25", progress=Progress(enabled=False))
    ka, kl = temporal.manifest.tokens_per_image, temporal.manifest.temporal["schedule"][-1]["tokens"]
    clip = "data:video/mp4;base64," + base64.b64encode(sample_clip("carphone_pristine").read_bytes()).decode()
    jpegs = []
    for seed in range(6):
        photo(tmp_path / f"f{seed}.png", 224, seed=seed)
        buf = io.BytesIO()
        Image.open(tmp_path / f"f{seed}.png").convert("RGB").save(buf, format="JPEG")
        jpegs.append(base64.b64encode(buf.getvalue()).decode())
    with vllm_server(vllm_python, temporal.path, ckpt, limits='{"video": 1}') as (url, proc):
        text = _chat(url, [], "what happens?")
        first = _chat(url, [], "what happens?", video=clip)
        refused = _chat(url, [], "what happens?", video="data:video/jpeg;base64," + ",".join(jpegs))
        again = _chat(url, [], "what happens?", video=clip)
        alive, said = proc.poll() is None, proc.said
    assert text[0] == 200 and first[0] == 200, (text, first, "".join(said)[-3000:])
    # the video adds <|vision_start|>, its Ka + Kl <|video_pad|>, <|vision_end|>
    pads = first[1]["prompt_token_ids"].count(VIDEO_PAD)
    assert first[1]["usage"]["prompt_tokens"] == text[1]["usage"]["prompt_tokens"] + 2 + pads
    assert pads > 0 and pads % (ka + kl) == 0
    assert refused[0] == 400 and "does not fill groups of 2" in json.dumps(refused[1]), refused
    assert again[0] == 200 and alive
    assert again[1]["choices"][0]["token_ids"] == first[1]["choices"][0]["token_ids"]


def test_a_build_of_other_weights_is_refused_at_start(vllm_python, qwen, tmp_path):
    """The plugin compares the checkpoint's vision weights with the build's sha256 before
    serving: one error line, no server."""
    ckpt, builds, _ = qwen
    other = make_qwen_vlm(tmp_path / "other", seed=1)
    env = {**os.environ, "EVOEXPORT_VLLM_PYTHON": vllm_python}
    done = subprocess.run([*CLI, "serve", str(builds[0.5]), "--engine", "vllm", "--model", str(other), "--port",
                           str(_free_port()), "--", "--dtype", "float32", "--max-model-len", "512", "--enforce-eager"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: vLLM exited"), done.stderr[-2000:]
    assert "built from other vision weights" in done.stderr


def test_serve_vllm_needs_its_checkpoint_and_passes_only_its_own_options(tiny_build):
    done = subprocess.run([*CLI, "serve", str(tiny_build), "--engine", "vllm"], capture_output=True, text=True)
    assert done.returncode == 2 and "needs --model CHECKPOINT_DIR" in done.stderr
    done = subprocess.run([*CLI, "serve", str(tiny_build), "--engine", "triton", "--", "--max-model-len", "9"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "only --engine vllm passes options on" in done.stderr


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _api_server(cli_pid: int) -> int:
    for pid in _children(cli_pid):
        if b"vllm.entrypoints.openai.api_server" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError("no vLLM API server under the CLI")


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def test_a_dead_engine_is_restarted_and_the_server_answers_again(vllm_python, llava):
    """vLLM's engine process killed (as the OOM killer did here once): its API server exits,
    `serve` starts vLLM again, /health is not ready meanwhile, and the same request gets the
    same answer afterwards."""
    ckpt, builds, image = llava
    with vllm_server(vllm_python, builds[0.5], ckpt) as (url, proc):
        code, before = _chat(url, [_data_url(image)])
        assert code == 200, before
        first = _api_server(proc.pid)
        for pid in _children(first):                   # the engine core (and its helpers)
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while _health(url) and time.monotonic() < deadline:
            time.sleep(1)
        assert not _health(url)
        assert _wait_said(proc, "serving:", 2, 600) and _health(url), "".join(proc.said)[-3000:]
        assert _api_server(proc.pid) != first
        code, after = _chat(url, [_data_url(image)])
        assert code == 200 and after["choices"][0]["message"]["content"] == before["choices"][0]["message"]["content"]
