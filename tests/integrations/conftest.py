"""What the engine tests share: vLLM's and OpenVINO GenAI's environments (made by the
project's own set-up), the tiny checkpoints with their builds at keep 1.0 and 0.5, photos,
and the drivers that run `vllm.LLM` and `openvino_genai.VLMPipeline` in those environments."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evoexport.export.build import build
from evoexport.progress import Progress
from tests.helpers import ROOT
from evoexport.measure.random_vlm import make_llava_vlm, make_onevision_vlm, make_qwen3_vlm, make_qwen_vlm

DRIVER = Path(__file__).with_name("vllm_driver.py")
GENAI_DRIVER = Path(__file__).with_name("genai_driver.py")
QUIET = Progress(enabled=False)


@pytest.fixture(scope="session")
def vllm_python(tmp_path_factory) -> str:
    done = subprocess.run([str(ROOT / "scripts" / "setup-env"), "--vllm"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    # vLLM leaves its engines' IPC sockets in VLLM_RPC_BASE_PATH (default: /tmp) when they
    # exit; the test run's own folder goes with the run
    os.environ["VLLM_RPC_BASE_PATH"] = str(tmp_path_factory.mktemp("vllm-ipc"))
    return str(ROOT / ".venv-vllm" / "bin" / "python")


@pytest.fixture(scope="session")
def genai_python() -> str:
    done = subprocess.run([str(ROOT / "scripts" / "setup-env"), "--genai"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return str(ROOT / ".venv-genai" / "bin" / "python")


def optimum_export(genai_python: str, ckpt: Path, out: Path, weights: str = "fp32") -> Path:
    """`optimum-cli export openvino --task image-text-to-text`, as a user runs it (offline)."""
    cmd = [str(Path(genai_python).parent / "optimum-cli"), "export", "openvino", "--model", str(ckpt), "--task",
           "image-text-to-text", "--weight-format", weights, str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def genai_drive(python: str, tmp: Path, runs: list[dict], prompts: list[dict]) -> dict:
    """genai_driver.py's results for these VLMPipeline folders (runs) and prompts."""
    spec = tmp / "genai-spec.json"
    spec.write_text(json.dumps({"runs": runs, "prompts": prompts}))
    done = subprocess.run([python, str(GENAI_DRIVER), str(spec)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def photo(path: Path, height: int, width: int | None = None, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).random((height, width or height, 3)) * 255
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def drive(python: str, tmp: Path, model: Path, runs: list[dict], prompts: list[dict], **extra) -> dict:
    """vllm_driver.py's results for these engines (runs) and prompts."""
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"model": str(model), "runs": runs, "prompts": prompts, **extra}))
    done = subprocess.run([python, str(DRIVER), str(spec)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _builds(ckpt: Path, model: str, root: Path, **options) -> dict:
    return {keep: build(model, keep, checkpoint=str(ckpt), out=root / f"keep{keep}", validate=False, progress=QUIET,
                        **options).path for keep in (1.0, 0.5)}


@pytest.fixture(scope="session")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-llava")
    ckpt = make_llava_vlm(root / "llava-vlm")
    return ckpt, _builds(ckpt, "llava", root), photo(root / "photo.png", 32)


@pytest.fixture(scope="session")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-qwen")
    ckpt = make_qwen_vlm(root / "qwen-vlm")
    return ckpt, _builds(ckpt, "qwen2.5-vl", root, image_size=224), photo(root / "photo.png", 224)


@pytest.fixture(scope="session")
def qwen_video_builds(qwen, tmp_path_factory):
    """Video builds (`build --video`, frame pairs) of the qwen fixture's checkpoint at keep 1.0 and 0.5."""
    ckpt = qwen[0]
    return ckpt, _builds(ckpt, "qwen2.5-vl", tmp_path_factory.mktemp("vllm-qwen-video"), image_size=224, video=True)


@pytest.fixture(scope="session")
def qwen3(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-qwen3")
    ckpt = make_qwen3_vlm(root / "qwen3-vlm")
    return ckpt, _builds(ckpt, "qwen3-vl", root, image_size=256), photo(root / "photo.png", 256)


@pytest.fixture(scope="session")
def onevision(tmp_path_factory):
    """The checkpoint, its builds, and two photos of other aspect ratios (other tilings and
    unpadding): 100x60 (2 tiles, 175 tokens unpruned) and 50x150 (3 tiles, 203)."""
    root = tmp_path_factory.mktemp("vllm-onevision")
    ckpt = make_onevision_vlm(root / "onevision-vlm")
    photos = [photo(root / "tall.png", 100, 60), photo(root / "wide.png", 50, 150, seed=1)]
    return ckpt, _builds(ckpt, "llava-onevision", root), photos


ONEVISION_PROMPT = "<|im_start|>user\n<image>\nwhat is in the image?<|im_end|>\n<|im_start|>assistant\n"


def generate(model, **inputs) -> list[int]:
    import torch
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def onevision_transformers(ckpt: Path, build_dir: Path, pixels: Path) -> dict:
    """transformers' generate() and attach() + generate() on one image's pixel values as vLLM
    made them (their resize differs from the PIL one of this environment, and pruning keeps
    other tokens of other pixels)."""
    import torch
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    from evoexport.integrations.hf_llava import attach, shrink_image_tokens
    arrays = np.load(pixels)
    px, sizes = torch.from_numpy(arrays["pixel_values"]), torch.from_numpy(arrays["image_sizes"])
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt).eval()
    with torch.inference_mode():
        n = len(model.model.get_image_features(px, sizes).pooler_output[0])
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ids = tokenizer(ONEVISION_PROMPT.replace("<image>", "<image>" * n), return_tensors="pt").input_ids
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": px, "image_sizes": sizes}
    out = {"transformers": generate(model, **inputs), "full_prompt_tokens": ids.shape[1]}
    attach(model, build_dir)
    small = shrink_image_tokens(inputs, model)
    return {**out, "attach": generate(model, **small), "attach_prompt_tokens": small["input_ids"].shape[1]}


@pytest.fixture(scope="session")
def onevision_answers(vllm_python, onevision, tmp_path_factory):
    """vLLM's answers (stock, plugin keep 1.0 and 0.5) for both photos, and transformers'
    on the pixels vLLM made: {photo stem: {"vllm": {run: answer}, "ref": {...}}}."""
    ckpt, builds, photos = onevision
    tmp = tmp_path_factory.mktemp("onevision-answers")
    got = drive(vllm_python, tmp, ckpt, [{"name": "stock"}, {"name": "keep1", "build": str(builds[1.0])},
                                         {"name": "keep0.5", "build": str(builds[0.5])}],
                [{"prompt": ONEVISION_PROMPT, "images": [str(p)]} for p in photos], pixels_dir=str(tmp))
    return {p.stem: {"vllm": {run: answers[i] for run, answers in got.items()},
                     "ref": onevision_transformers(ckpt, builds[0.5], tmp / f"{p.stem}.npz")}
            for i, p in enumerate(photos)}


@pytest.fixture(scope="session")
def qwen_buckets(tmp_path_factory):
    """A Qwen2.5-VL checkpoint whose processor keeps each image's aspect ratio (min_pixels
    3136, max 224x224), its bucketed builds at keep 1.0 and 0.5 (grids 8x8, 6x9, 9x6) and two
    photos: 168x252 (grid 6x9) and 224x224 (8x8)."""
    import shutil
    root = tmp_path_factory.mktemp("vllm-qwen-buckets")
    ckpt = root / "qwen-vlm"
    shutil.copytree(make_qwen_vlm(root / "made"), ckpt)
    config = json.loads((ckpt / "preprocessor_config.json").read_text())
    config["size"]["shortest_edge"] = 3136
    (ckpt / "preprocessor_config.json").write_text(json.dumps(config))
    builds = {keep: build("qwen2.5-vl", keep, checkpoint=str(ckpt), out=root / f"keep{keep}", validate=False,
                          progress=QUIET, image_size=224, grids="8x8,6x9,9x6").path for keep in (1.0, 0.5)}
    return ckpt, builds, [photo(root / "wide.png", 168, 252), photo(root / "square.png", 224, seed=1)]
