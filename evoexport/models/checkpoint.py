"""Safe, selective reading of local Hugging Face checkpoints.

Only safetensors are read: a pickle (.bin/.pt/.pth) can run code when unpickled, so a
checkpoint that has nothing else is refused. Only the tensors asked for are read, so a
LLaVA checkpoint's language-model shards are never touched.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import EvoExportError, cause
from ..files import read_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def read_config(ckpt: Path) -> dict:
    if not ckpt.exists():
        raise EvoExportError(f"checkpoint {ckpt} does not exist")
    if not ckpt.is_dir():
        if ckpt.suffix in PICKLE_SUFFIXES:
            raise EvoExportError(f"checkpoint {ckpt} is a pickle file; weights load only from safetensors")
        raise EvoExportError(f"checkpoint {ckpt} is not a directory (expected a Hugging Face checkpoint directory)")
    cfg_path = ckpt / "config.json"
    if not cfg_path.is_file():
        raise EvoExportError(f"{ckpt} is not a Hugging Face checkpoint: no config.json")
    return read_json(cfg_path)


def weight_index(ckpt: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise EvoExportError(f"{index} is not a valid safetensors index: {e}") from None
        return {name: ckpt / fname for name, fname in weight_map.items()}
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in ckpt.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise EvoExportError(
                f"checkpoint {ckpt} has only pickle weights ({', '.join(pickles[:3])}); "
                "weights load only from safetensors (convert them with transformers' save_pretrained)")
        raise EvoExportError(f"checkpoint {ckpt} has no *.safetensors weights")
    names: dict[str, Path] = {}
    for f in files:
        with _open(f) as st:
            for k in st.keys():
                names[k] = f
    return names


def _open(path: Path):
    if not path.is_file():
        raise EvoExportError(f"checkpoint shard {path} is missing")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own types for bad headers
        raise EvoExportError(f"checkpoint shard {path} is truncated or corrupt: not a readable safetensors file ({e})") from None


def read_tensors(index: dict[str, Path], wanted: dict[str, str]) -> dict[str, torch.Tensor]:
    """Read `wanted` = {checkpoint name: our name}, one shard at a time."""
    by_file: dict[Path, list[str]] = {}
    for ck_name in wanted:
        by_file.setdefault(index[ck_name], []).append(ck_name)
    out: dict[str, torch.Tensor] = {}
    for path, ck_names in sorted(by_file.items()):
        with _open(path) as st:
            present = set(st.keys())
            for ck_name in ck_names:
                if ck_name not in present:
                    raise EvoExportError(f"checkpoint index names {ck_name} in {path.name}, but the file lacks it")
                try:
                    out[wanted[ck_name]] = st.get_tensor(ck_name)
                except Exception as e:
                    raise EvoExportError(f"checkpoint shard {path} is truncated or corrupt ({e})") from None
    return out


def read_prefixed(ckpt: Path, targets, what: str) -> dict[str, torch.Tensor]:
    """A module's tensors from a checkpoint that stores them under any of several name
    prefixes (checkpoints of one model differ by transformers version and wrapper). Each
    target is (our name prefix, the checkpoint's prefixes in order of preference, our state
    dict, our name -> the checkpoint's name after its prefix). Returns {our prefix + name:
    tensor} in our dtypes; a missing tensor or a shape unlike config.json's is one error."""
    index = weight_index(ckpt)
    wanted: dict[str, str] = {}
    own: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for ours, prefixes, state, base in targets:
        for name, t in state.items():
            own[ours + name] = t
            for pre in prefixes:
                if pre + base(name) in index:
                    wanted[pre + base(name)] = ours + name
                    break
            else:
                missing.append(base(name))
    if missing:
        raise EvoExportError(f"checkpoint {ckpt} lacks {len(missing)} {what} tensors (e.g. {missing[0]})")
    tensors = read_tensors(index, wanted)
    checkpoint_name = {ours: theirs for theirs, ours in wanted.items()}
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise EvoExportError(f"checkpoint tensor for {name} has shape {tuple(t.shape)}, "
                                 f"config.json implies {tuple(own[name].shape)}")
        check_weight(checkpoint_name[name], t)
        tensors[name] = t.to(own[name].dtype)
    return tensors


# what a trained float weight can be stored as; an integer or bool tensor of the right shape
# would be cast to float without a word, and every feature would be wrong
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_weight(name: str, t: torch.Tensor) -> None:
    """Refuse a weight that is not stored as fp32, fp16 or bf16, or holds NaN or infinity."""
    if t.dtype not in WEIGHT_DTYPES:
        raise EvoExportError(f"checkpoint tensor {name} is stored as {str(t.dtype).removeprefix('torch.')}; "
                             "vision weights must be float32, float16 or bfloat16")
    if not bool(torch.isfinite(t).all()):
        raise EvoExportError(f"checkpoint tensor {name} holds NaN or infinite values")


def preprocess_from_checkpoint(ckpt: Path, preset) -> dict:
    """The checkpoint's own image processor recipe (preprocessor_config.json: resize mode,
    sizes, crop, resample, rescale, mean, std); the preset's reference recipe where the
    checkpoint ships none."""
    from ..inputs.images import recipe_from_processor_config
    p = ckpt / "preprocessor_config.json"
    if not p.is_file():
        return dict(preset.preprocess)
    return recipe_from_processor_config(read_json(p), str(p))


def vision_config(ckpt: Path, model_type: str, title: str, config_class):
    """The vision config of a VLM checkpoint: a whole model's (model_type `model_type`, its
    `vision_config`) or a bare encoder's (`model_type`_vision), with one error for anything
    else (Qwen2.5-VL, Qwen3-VL)."""
    raw = read_config(ckpt)
    kind = raw.get("model_type")
    if kind == model_type:
        vision = raw.get("vision_config")
        if not isinstance(vision, dict):
            raise EvoExportError(f"{ckpt}/config.json: a {model_type} config without a vision_config")
    elif kind == f"{model_type}_vision":
        vision = raw
    else:
        raise EvoExportError(f"{ckpt}: model_type {kind!r} is not a {title} checkpoint "
                             f"(expected '{model_type}' or '{model_type}_vision')")
    try:
        return config_class.from_dict(vision)
    except Exception as e:
        raise EvoExportError(f"{ckpt}/config.json is not a valid {title} vision config: {cause(e)}") from None
