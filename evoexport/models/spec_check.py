"""A tower spec checked before any weight is touched: a checkpoint's config.json is input.

transformers' config classes check types, not meaning: a zero `patch_size` divides by
zero later, a negative `num_hidden_layers` or an unknown activation is accepted, and a
`hidden_size` of 10^12 asks for more memory than any machine has. Every family's spec goes
through `check_spec` (models/loader.spec_for), which names the key and the value.
"""
from __future__ import annotations

import math
import os

from ..errors import EvoExportError
from .base import TowerSpec

# sizes any family's vision config may carry, each a positive integer where present
_SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_heads", "num_hidden_layers", "depth",
          "image_size", "patch_size", "spatial_merge_size", "temporal_patch_size", "window_size", "out_hidden_size")
_CHANNELS = ("num_channels", "in_channels", "in_chans")
_EPS = ("layer_norm_eps", "rms_norm_eps")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_spec(spec: TowerSpec, where: str) -> None:
    """Refuse a spec whose sizes, epsilons, activations, feature layer or memory make no sense."""
    from transformers.activations import ACT2FN

    v = spec.vision
    for key in _SIZES:
        value = v.get(key)
        if key == "image_size" and isinstance(value, (list, tuple)) and len(value) == 2:   # (height, width)
            value = min(value) if all(_positive_int(s) for s in value) else None
        if key in v and not _positive_int(value):
            raise EvoExportError(f"{where}: {key} {v[key]!r} must be a positive integer")
    for key in _CHANNELS:
        if key in v and v[key] != 3:
            raise EvoExportError(f"{where}: {key} {v[key]!r}: builds take RGB images (3 channels)")
    for key in _EPS:
        if key in v and not (isinstance(v[key], (int, float)) and not isinstance(v[key], bool)
                             and math.isfinite(v[key]) and 0 < v[key] < 1):
            raise EvoExportError(f"{where}: {key} {v[key]!r} must be a small positive number")
    acts = [("hidden_act", v.get("hidden_act"))] + ([("projector act", spec.projector["act"])] if spec.projector else [])
    for key, act in acts:
        if act is not None and act not in ACT2FN:
            raise EvoExportError(f"{where}: {key} {act!r} is not an activation transformers knows")
    if spec.projector is not None and not _positive_int(spec.projector.get("out_features")):
        raise EvoExportError(f"{where}: the language model's hidden_size {spec.projector.get('out_features')!r} "
                             "must be a positive integer")
    hidden = v.get("hidden_size") or v.get("embed_dim")
    heads = v.get("num_attention_heads") or v.get("num_heads")
    if hidden and heads and hidden % heads:
        raise EvoExportError(f"{where}: hidden_size {hidden} is not divisible by {heads} attention heads")
    if min(spec.token_grid) < 1:
        raise EvoExportError(f"{where}: an image of {spec.input_size or v['image_size']} px has no "
                             f"{v['patch_size'] * spec.unit} px patch")
    try:
        spec.depth   # the feature layer inside the encoder
    except EvoExportError as e:
        raise EvoExportError(f"{where}: {e}") from None
    _check_memory(spec, where)


def _check_memory(spec: TowerSpec, where: str) -> None:
    """The tower must fit in this machine's memory: its fp32 weights (a rough count of the
    transformer layers' matrices) and one image's attention scores. An absurd config is
    refused before anything is allocated."""
    v = spec.vision
    hidden = v.get("hidden_size") or v.get("embed_dim") or 0
    inner = v.get("intermediate_size") or 4 * hidden
    layers = v.get("num_hidden_layers") or v.get("depth") or 0
    heads = v.get("num_attention_heads") or v.get("num_heads") or 1
    params = layers * (4 * hidden * hidden + 2 * hidden * inner)
    height, width = spec.input_hw
    patches = (height // v["patch_size"]) * (width // v["patch_size"])
    need = 4 * (params + heads * patches * patches)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return
    if need > memory:
        raise EvoExportError(f"{where} describes a vision tower of about {params / 1e9:.3g} billion parameters on "
                             f"{patches:,} patches per image, {need / 1e9:.3g} GB in fp32 at batch 1: more than this "
                             f"machine's {memory / 1e9:.3g} GB")
