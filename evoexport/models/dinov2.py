"""DINOv2 family: transformers' Dinov2Model (the vision encoder of OpenVLA, Prismatic, Cambrian).

The preset is ViT-S/14 at 224 px (16x16 patches + CLS). Features are Dinov2Model's
last_hidden_state (after the final LayerNorm) for CLS and the kept patches, CLS first.
Position embeddings are stored for a 37x37 grid (518 px) and interpolated, as
transformers does, once at load time for the input size: the exported graphs hold the
interpolated table as a constant, so they stay static and free of bicubic Resize ops,
which TensorRT does not import.

Only what differs from the other families lives here: the embedding, the layers, the
probe's attention module and the output head. Everything runs transformers' own modules.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..errors import EvoExportError, OptionError, cause
from ..inputs.images import recipe_from_processor_config
from ..names import plain_size, size_hw, valid_size
from .base import BaseTower, Family, TowerSpec
from .checkpoint import check_weight, preprocess_from_checkpoint, read_tensors, weight_index
from .registry import Preset, register, register_family

# The reference checkpoint's own preprocessor_config.json, as data: facebook/dinov2-small
# (BitImageProcessor: shortest edge 256, centre crop 224). Other --image-size values scale it.
DINOV2_PROCESSOR = {
    "image_processor_type": "BitImageProcessor",
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256},
}
IMAGENET_PREPROCESS = recipe_from_processor_config(DINOV2_PROCESSOR, "facebook/dinov2-small")

DINOV2_S14 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                  image_size=518, layer_norm_eps=1e-6, hidden_act="gelu", layerscale_value=1.0, use_swiglu_ffn=False)

DINOV2 = register(Preset(
    name="dinov2",
    family="dinov2",
    description="DINOv2 ViT-S/14 at 224 px (12 layers, 256 patches + CLS), features = last_hidden_state, CLS first",
    vision=DINOV2_S14,
    projector=None,
    feature_layer=-1,
    select_strategy="full",
    preprocess=IMAGENET_PREPROCESS,
    processor=DINOV2_PROCESSOR,
    input_size=224,
))


register(replace(
    DINOV2,
    name="dinov2-units",
    description="DINOv2 ViT-S/14 at 224 px pruned in 2x2 units of patches, as Qwen2.5-VL prunes its merge units "
                "(measures what unit-level pruning costs: experiments/unit_eval.py)",
    unit=2,
))


class DinoTower(BaseTower):
    """DINOv2; with spec.unit = u > 1 a prunable token is a u x u block of patches: the
    patches are laid out unit by unit after the position embedding (DINOv2's positions are
    absolute and added once, so order is free after it) and a unit is their concatenation."""
    resizable = True
    any_grid = True      # non-square sizes too (the grid-shape measurement, docs/qwen.md)

    def __init__(self, spec: TowerSpec):
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        self.spec = spec
        self.config = cfg = self._config(Dinov2Config, spec)
        self.model = Dinov2Model(cfg).eval()
        self.unit = u = spec.unit
        self._set_sizes(hidden=cfg.hidden_size, heads=cfg.num_attention_heads, mlp=int(cfg.hidden_size * cfg.mlp_ratio),
                        image_size=spec.input_size or cfg.image_size, patch=cfg.patch_size * u,
                        out_features=cfg.hidden_size, drop_cls=False)
        self.patches_per_token = u * u
        self.projector = None
        self.register_buffer("positions", torch.zeros(1, 1 + self.num_patches * u * u, cfg.hidden_size),
                             persistent=False)
        self.freeze_positions()

    @torch.no_grad()
    def freeze_positions(self) -> None:
        """Interpolate the position table to the input size with transformers' own code (call
        after loading weights)."""
        emb = self.model.embeddings
        dummy = torch.zeros(1, self.positions.shape[1], self.hidden_size, dtype=emb.position_embeddings.dtype)
        self.positions.copy_(emb.interpolate_pos_encoding(dummy, *self.image_hw))

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layer

    def probe_attention(self, index: int) -> tuple[nn.Module, int, float]:
        attn = self.layers[index].attention
        return attn, attn.num_attention_heads, attn.scaling

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        emb = self.model.embeddings
        patches = emb.patch_embeddings(pixel_values)
        cls = emb.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype)
        x = torch.cat([cls, patches], dim=1) + self.positions.to(patches.dtype)
        if self.unit == 1:
            return x
        (b, d), (r, c), u = (x.shape[0], x.shape[-1]), self.grid, self.unit   # raster -> unit by unit
        units = x[:, 1:].reshape(b, r, u, c, u, d).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, d)
        return torch.cat([x[:, :1], units], dim=1)

    # unit tokens (spec.unit > 1): CLS rides along zero-padded to a unit's width, never pruned
    def to_tokens(self, hidden):
        if self.unit == 1:
            return hidden
        b, t, d = hidden.shape
        cls = torch.cat([hidden[:, :1], hidden.new_zeros(b, 1, (self.patches_per_token - 1) * d)], dim=-1)
        return torch.cat([cls, hidden[:, 1:].reshape(b, -1, self.patches_per_token * d)], dim=1)

    def from_tokens(self, tokens):
        if self.unit == 1:
            return tokens
        b, d = tokens.shape[0], tokens.shape[-1] // self.patches_per_token
        return torch.cat([tokens[:, :1, :d], tokens[:, 1:].reshape(b, -1, d)], dim=1)

    def token_importance(self, importance):
        b = importance.shape[0]
        return importance.reshape(b, -1, self.patches_per_token).sum(dim=-1)

    def key_bias(self, log_sizes):
        b, k = log_sizes.shape
        per = log_sizes.unsqueeze(-1).expand(b, k, self.patches_per_token).reshape(b, -1)
        return torch.cat([torch.zeros_like(per[:, :1]), per], dim=1)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.layernorm(hidden)

    def hf_forward(self, device="cpu", dtype=None):
        """transformers' Dinov2Model with the tower's weights: last_hidden_state."""
        from transformers import Dinov2Model

        model = Dinov2Model(self.config).eval()
        model.load_state_dict(self.model.state_dict())
        model.to(device=device, dtype=dtype)

        def run(pixel_values):
            return model(pixel_values).last_hidden_state
        return run


def _input_size(image_size, preset: Preset, patch: int):
    """An int (a square) or (height, width), each a multiple of the patch size (or unit)."""
    size, step = image_size or preset.input_size, patch * preset.unit
    if not valid_size(size, step):
        raise OptionError("image_size", f"must be a multiple of the patch size {step} (e.g. 224, 280, 518), "
                                        f"got {size}")
    return plain_size(*size_hw(size))


def spec_from_preset(preset: Preset, image_size: int | None = None) -> TowerSpec:
    from transformers import Dinov2Config
    cfg = Dinov2Config(**preset.vision)
    return TowerSpec(vision=cfg.to_dict(), projector=None, feature_layer=-1, select_strategy="full",
                     preprocess=dict(preset.preprocess), input_size=_input_size(image_size, preset, cfg.patch_size),
                     unit=preset.unit)


def spec_from_checkpoint(preset: Preset, ckpt: Path, image_size: int | None = None) -> TowerSpec:
    from transformers import Dinov2Config
    from .checkpoint import read_config

    raw = read_config(ckpt)
    if raw.get("model_type") != "dinov2":
        raise EvoExportError(f"{ckpt}: model_type {raw.get('model_type')!r} is not a dinov2 checkpoint")
    try:
        cfg = Dinov2Config.from_dict(raw)
    except Exception as e:
        raise EvoExportError(f"{ckpt}/config.json is not a valid dinov2 config: {e}") from None
    return TowerSpec(vision=cfg.to_dict(), projector=None, feature_layer=-1, select_strategy="full",
                     preprocess=preprocess_from_checkpoint(ckpt, preset),
                     input_size=_input_size(image_size, preset, cfg.patch_size), unit=preset.unit)


def load_weights(tower: DinoTower, ckpt: Path) -> None:
    """Weights through transformers' own loader (it maps facebook/dinov2's tensor names),
    safetensors only: pickled weights are refused."""
    from transformers import Dinov2Model

    if not any(ckpt.glob("*.safetensors")):
        raise EvoExportError(f"checkpoint {ckpt} has no .safetensors weights (pickled weights are refused)")
    index = weight_index(ckpt)
    stored = read_tensors(index, {name: name for name in index})   # as stored, before any cast
    for name, t in stored.items():
        check_weight(name, t)
    del stored
    try:
        loaded = Dinov2Model.from_pretrained(ckpt, use_safetensors=True, config=tower.config)
    except Exception as e:
        raise EvoExportError(f"cannot load the dinov2 checkpoint {ckpt}: {cause(e)}") from None
    tower.model.load_state_dict(loaded.state_dict())
    tower.freeze_positions()


FAMILY = Family(DinoTower, spec_from_preset, spec_from_checkpoint, load_weights)
register_family("dinov2", FAMILY)
