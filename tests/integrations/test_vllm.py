"""vLLM with a build as its vision encoder: the evoexport plugin (integrations/vllm) on vLLM's
CPU build, in its own environment (scripts/setup-env --vllm), on tiny checkpoints with
tokenizers made here. Greedy tokens are compared with vLLM's own pipeline and transformers
at keep 1.0, and with attach() + transformers' generate() at keep 0.5."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evoexport.export.build import build
from evoexport.progress import Progress
from tests.helpers import CLI, ROOT
from tests.integrations.vlm_checkpoints import make_llava_vlm, make_qwen_vlm

DRIVER = Path(__file__).with_name("vllm_driver.py")
QUIET = Progress(enabled=False)
LLAVA_PROMPT = "USER: <image>\nwhat is in the image? ASSISTANT:"
QWEN_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what is in the image?<|im_end|>\n"
               "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def vllm_python() -> str:
    done = subprocess.run([str(ROOT / "scripts" / "setup-env"), "--vllm"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return str(ROOT / ".venv-vllm" / "bin" / "python")


def _photo(path: Path, side: int, seed: int = 0) -> Path:
    Image.fromarray((np.random.default_rng(seed).random((side, side, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _drive(python: str, tmp: Path, model: Path, runs: list[dict], prompts: list[dict]) -> dict:
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"model": str(model), "runs": runs, "prompts": prompts}))
    done = subprocess.run([python, str(DRIVER), str(spec)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _generate(model, **inputs) -> list[int]:
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-llava")
    ckpt = make_llava_vlm(root / "llava-vlm")
    builds = {keep: build("llava", keep, checkpoint=str(ckpt), out=root / f"keep{keep}", validate=False,
                          progress=QUIET).path for keep in (1.0, 0.5)}
    return ckpt, builds, _photo(root / "photo.png", 32)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-qwen")
    ckpt = make_qwen_vlm(root / "qwen-vlm")
    builds = {keep: build("qwen2.5-vl", keep, checkpoint=str(ckpt), image_size=224, out=root / f"keep{keep}",
                          validate=False, progress=QUIET).path for keep in (1.0, 0.5)}
    return ckpt, builds, _photo(root / "photo.png", 224)


def _llava_transformers(ckpt: Path, build_dir: Path, photo: Path) -> dict:
    """transformers' own generate() and attach() + generate() on the build, same prompt and image."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

    from evoexport.integrations.hf_llava import attach, shrink_image_tokens
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    pixels = CLIPImageProcessor.from_pretrained(ckpt)(images=[Image.open(photo)], return_tensors="pt")["pixel_values"]
    model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    ids = tokenizer(LLAVA_PROMPT.replace("<image>", "<image>" * 16), return_tensors="pt").input_ids
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    out = {"transformers": _generate(model, **inputs)}
    attach(model, build_dir)
    small = shrink_image_tokens(inputs, model)
    return {**out, "attach": _generate(model, **small), "attach_prompt_tokens": small["input_ids"].shape[1],
            "text_tokens": ids.shape[1] - 16}


def _qwen_transformers(ckpt: Path, build_dir: Path, photo: Path) -> dict:
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    from evoexport.integrations.hf_qwen2_5_vl import attach, shrink_image_tokens
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    px = Qwen2VLImageProcessor.from_pretrained(ckpt)(images=[Image.open(photo)], return_tensors="pt")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt).eval()
    n = int(px["image_grid_thw"].prod()) // 4
    ids = tokenizer(QWEN_PROMPT.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt").input_ids
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": px["pixel_values"],
              "image_grid_thw": px["image_grid_thw"], "mm_token_type_ids": (ids == model.config.image_token_id).long()}
    out = {"transformers": _generate(model, **inputs)}
    attach(model, build_dir)
    small = shrink_image_tokens(inputs, model)
    return {**out, "attach": _generate(model, **small), "attach_prompt_tokens": small["input_ids"].shape[1],
            "text_tokens": ids.shape[1] - n}


def test_llava_plugin_equals_vllm_transformers_and_attach(vllm_python, llava, tmp_path):
    ckpt, builds, photo = llava
    ref = _llava_transformers(ckpt, builds[0.5], photo)
    got = _drive(vllm_python, tmp_path, ckpt,
                 [{"name": "stock"}, {"name": "keep1", "build": str(builds[1.0])},
                  {"name": "keep0.5", "build": str(builds[0.5])},
                  {"name": "stock+embeds", "embeds_build": str(builds[0.5])}],
                 [{"prompt": LLAVA_PROMPT, "images": [str(photo)]}])
    assert got["stock"][0]["tokens"] == ref["transformers"]
    assert got["keep1"][0]["tokens"] == ref["transformers"]
    assert got["keep0.5"][0]["tokens"] == ref["attach"]
    assert got["keep0.5"][0]["prompt_tokens"] == ref["attach_prompt_tokens"] == ref["text_tokens"] + 8
    # without the plugin: the build's features as stock vLLM's image_embeds
    assert got["stock+embeds"][0] == got["keep0.5"][0]


def test_qwen_plugin_keeps_the_kept_units_mrope_positions(vllm_python, qwen, tmp_path):
    """keep 0.5 equals attach(), whose positions put each kept unit at its own (row, col):
    a dense grid of 32 would give other tokens (checked below), so equality checks them."""
    ckpt, builds, photo = qwen
    ref = _qwen_transformers(ckpt, builds[0.5], photo)
    got = _drive(vllm_python, tmp_path, ckpt,
                 [{"name": "stock"}, {"name": "keep1", "build": str(builds[1.0])},
                  {"name": "keep0.5", "build": str(builds[0.5])}],
                 [{"prompt": QWEN_PROMPT, "images": [str(photo)]}])
    assert got["stock"][0]["tokens"] == ref["transformers"]
    assert got["keep1"][0]["tokens"] == ref["transformers"]
    assert got["keep0.5"][0]["tokens"] == ref["attach"]
    assert got["keep0.5"][0]["prompt_tokens"] == ref["attach_prompt_tokens"] == ref["text_tokens"] + 32


def test_positions_match_transformers_side():
    """positions.py and hf_qwen2_5_vl.pruned_rope_index agree on a prompt of two images."""
    from evoexport.integrations.hf_qwen2_5_vl import pruned_rope_index
    from evoexport.integrations.vllm.positions import pruned_mrope_positions
    rng = np.random.default_rng(0)
    kept = [np.sort(rng.choice(64, 20, replace=False)) for _ in range(2)]
    types = [0] * 5 + [1] * 20 + [0] * 3 + [1] * 20 + [0] * 4
    ids = torch.zeros(1, len(types), dtype=torch.long)
    ref, ref_delta = pruned_rope_index(ids, torch.tensor([types]), torch.from_numpy(np.stack(kept)), 8, 16, 2)
    ours, delta = pruned_mrope_positions(len(types), [(28, kept[1], 8), (5, kept[0], 8)])
    assert np.array_equal(ours, ref[:, 0].numpy()) and delta == int(ref_delta)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _chat(url: str, images: list[str], text: str = "what is in the image?") -> tuple[int, dict]:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": text}]
    body = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0,
            "return_token_ids": True}
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def qwen_server(vllm_python, qwen):
    ckpt, builds, photo = qwen
    port = _free_port()
    env = {**os.environ, "EVOEXPORT_VLLM_PYTHON": vllm_python}
    proc = subprocess.Popen([*CLI, "serve", str(builds[0.5]), "--engine", "vllm", "--model", str(ckpt), "--port",
                             str(port), "--", "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
                             "--served-model-name", "m", "--limit-mm-per-prompt", '{"image": 2}'],
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                break
        except OSError:
            time.sleep(2)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    yield url, proc, photo
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)


def test_server_answers_openai_requests_with_k_tokens_per_image(qwen_server, qwen, tmp_path):
    url, proc, photo = qwen_server
    ckpt, builds, _ = qwen
    ref = _qwen_transformers(ckpt, builds[0.5], photo)
    status, body = _chat(url, [_data_url(photo)])
    assert status == 200, body
    assert body["choices"][0]["token_ids"] == ref["attach"]
    assert body["usage"]["prompt_tokens"] == ref["attach_prompt_tokens"]


def test_server_concurrent_requests_equal_single_ones(qwen_server, tmp_path):
    url, proc, photo = qwen_server
    photos = [_photo(tmp_path / f"p{i}.png", 224, seed=i + 1) for i in range(4)]
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


def test_image_embeds_part_for_a_stock_server():
    from evoexport.errors import EvoExportError
    from evoexport.integrations.vllm import image_embeds_part
    part = image_embeds_part(np.ones((8, 16), np.float32))
    tensor = torch.load(io.BytesIO(base64.b64decode(part["image_embeds"])), weights_only=True)
    assert part["type"] == "image_embeds" and tensor.shape == (1, 8, 16)
    with pytest.raises(EvoExportError, match="one image's features"):
        image_embeds_part(np.ones((2, 8, 16), np.float32))
