"""Qwen2.5-VL family: the vision encoder of Qwen2.5-VL (3B/7B/72B), pruned in 2x2 merge units.

transformers' encoder takes flattened patches of any image size, packs several images into
one sequence, runs window attention through `cu_seqlens` and restores raster order after
the patch merger. A build takes `pixel_values [B, 3, S, S]` at one fixed size instead (S a
multiple of 112, default 448; images and video frames of that size are the batch) and
computes the same numbers with static shapes:

  - the 3-D patch convolution folded into a 2-D one (a still image is its own second
    frame, so the kernel's two time slices add up);
  - hidden states in raster *unit* order: the four patches of each 2x2 merge unit
    contiguous, units row by row (what the processor lays out and the merger reads);
  - before the first prune point (stage 0, and the whole unpruned encoder) window layers
    run as a plain reshape into 4x4-unit windows: the stage permutes to window-major order
    once, full-attention blocks do not care about order, and it permutes back at its end;
  - after a prune point the kept units stay in raster order and window layers keep the
    original windows through a block mask (a unit attends to kept units of its own
    window; every unit sees at least itself, so no row is empty); full-attention blocks
    see every kept unit;
  - 2D rotary positions come from one constant table, gathered by the kept unit indices,
    so a kept patch keeps its original (row, col).

A prunable token is a unit: the stage hands the selection [B, U, 4*D] (the merger's own
input layout), so similarity, merging (sub-position by sub-position) and the spatial term
(on the unit grid) all act on units. Importance is the sum of the unit's four patches'
shares of the probe's mean-query attention. transformers' own modules do qkv, the output
projection, the norms, the MLPs and the merger; this file only arranges tensors.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..errors import EvoExportError
from .base import BaseTower, Family, TowerSpec
from .checkpoint import read_prefixed, vision_config
from .qwen_processor import QWEN_PROCESSOR, checked_size, flatten_patches, qwen_recipe, recipe_from_checkpoint
from .registry import Preset, register, register_family

WINDOW_PX = 112   # 4x4 merge units of 28 px
UNIT_PX = 28

QWEN25_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                        fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3)

register(Preset(
    name="qwen2.5-vl",
    family="qwen2.5-vl",
    description="Qwen2.5-VL-7B vision encoder at 448 px (32 blocks of 1280, window attention, "
                "16x16 merge units of 2x2 patches) + patch merger -> 3584",
    vision=QWEN25_7B_VISION,
    projector=dict(out_features=3584, act="gelu", bias=True),
    feature_layer=-1,
    select_strategy="full",
    preprocess=qwen_recipe(448),
    input_size=448,
))

register(Preset(
    name="qwen2.5-vl-tiny",
    family="qwen2.5-vl",
    description="test-size Qwen2.5-VL encoder at 224 px: 8 blocks of 64 (full attention in 3 and 7), "
                "8x8 units in 2x2 windows, merger -> 96",
    vision=dict(depth=8, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=96, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[3, 7],
                hidden_act="silu", in_channels=3),
    projector=dict(out_features=96, act="gelu", bias=True),
    feature_layer=-1,
    select_strategy="full",
    preprocess=qwen_recipe(224),
    input_size=224,
))


class _Probe(nn.Module):
    """Where the stage's probe hooks read a block's rotated q and k ([B, T, D], raster order)."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Identity(), nn.Identity()


class QwenVisionTower(BaseTower):
    resizable = True
    any_grid = True
    importance_query = "mean"     # no CLS: the mean patch query
    positional = True
    patches_per_token = 4
    mlp_matrices = 3

    def __init__(self, spec: TowerSpec):
        super().__init__()
        config_class, model_class = self.transformers_classes()
        self.spec = spec
        cfg = config_class.from_dict(spec.vision)
        cfg._attn_implementation = "sdpa"
        self.config = cfg
        self.visual = model_class(cfg).eval()
        merge = cfg.spatial_merge_size
        self._set_sizes(hidden=cfg.hidden_size, heads=cfg.num_heads, mlp=cfg.intermediate_size,
                        image_size=spec.input_size, patch=cfg.patch_size * merge,
                        out_features=cfg.out_hidden_size, drop_cls=False)
        self.has_cls = False
        self.projector = self.visual.merger
        self.full_blocks = frozenset(self.global_blocks())
        self.window = self.window_units()                                  # units per window side
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.probes = nn.ModuleList(_Probe() for _ in range(cfg.depth))
        self._tables()

    # -- what a later Qwen family overrides (models/qwen3_vl.py) --
    @staticmethod
    def transformers_classes() -> tuple[type, type]:
        """transformers' vision config and encoder classes of the family."""
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
        return Qwen2_5_VLVisionConfig, Qwen2_5_VisionTransformerPretrainedModel

    def global_blocks(self) -> list[int]:
        """Blocks that attend over the whole image (the others within windows)."""
        return self.config.fullatt_block_indexes

    def window_units(self) -> int | None:
        """Units per window side (None: no windows, every block global)."""
        cfg = self.config
        return cfg.window_size // (cfg.patch_size * cfg.spatial_merge_size)

    @property
    def windows_by_reshape(self) -> bool:
        """Whole windows tile the grid, so stage 0 runs them as a reshape. Otherwise (a grid
        that is not a multiple of the window, as the processor's grids often are: transformers
        pads the edge windows) stage 0 runs window layers as a masked dense attention."""
        w = self.window
        return w is None or (self.grid.rows % w == 0 and self.grid.cols % w == 0)

    @torch.no_grad()
    def _tables(self) -> None:
        """The rotary cos/sin of every patch: [U, 4, hd] in raster unit order (gathered by
        kept indices) and [4U, hd] in window-major order (stage 0); each unit's window."""
        r, c = self.grid
        unit = torch.arange(r * c)
        sub = torch.arange(4)
        rows = (2 * (unit // c))[:, None] + (sub // 2)[None]                # [U, 4]
        cols = (2 * (unit % c))[:, None] + (sub % 2)[None]
        position_ids = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1)   # [4U, 2] (row, col)
        inv = self.visual.rotary_pos_emb.inv_freq.float()
        cos, sin = self.visual.rotary_pos_emb(inv, position_ids)           # [4U, hd], fp32
        self.register_buffer("cos_units", cos.reshape(r * c, 4, -1), persistent=False)
        self.register_buffer("sin_units", sin.reshape(r * c, 4, -1), persistent=False)
        if self.windows_by_reshape:
            self.register_buffer("cos_windows", self._to_windows(cos[None])[0], persistent=False)
            self.register_buffer("sin_windows", self._to_windows(sin[None])[0], persistent=False)
        w = self.window or max(r, c)
        # windows from the top left, the edge ones cut short (transformers' get_window_index)
        window_of = (unit // c // w) * (-(-c // w)) + (unit % c) // w
        self.register_buffer("window_of_unit", window_of, persistent=False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.visual.blocks

    def probe_attention(self, index: int) -> tuple[nn.Module, int, float]:
        return self.probes[index], self.num_heads, self.head_dim ** -0.5

    # -- layout: raster unit order <-> window-major order (static reshapes, no gathers) --
    def _to_windows(self, x: torch.Tensor) -> torch.Tensor:
        if self.window is None:
            return x
        b, t, d = x.shape
        (r, c), w = self.grid, self.window
        x = x.reshape(b, r // w, w, c // w, w, 4, d).permute(0, 1, 3, 2, 4, 5, 6)
        return x.reshape(b, t, d)

    def _from_windows(self, x: torch.Tensor) -> torch.Tensor:
        if self.window is None:
            return x
        b, t, d = x.shape
        (r, c), w = self.grid, self.window
        x = x.reshape(b, r // w, c // w, w, w, 4, d).permute(0, 1, 3, 2, 4, 5, 6)
        return x.reshape(b, t, d)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, S, S] (a video build: [B, 6, S, S], a temporal patch's two frames)
        -> patch embeddings [B, 4U, D] in raster unit order."""
        dtype = self.compute_dtype
        conv = self.visual.patch_embed.proj
        w = conv.weight.float()                          # [D, 3, T, p, p]: the 3-D kernel's time slices
        # a still image is its own second frame, so its slices add up; a video build's
        # frames meet their own slices (channels frame by frame, as the input stacks them)
        weight = w.sum(dim=2) if self.spec.frames == 1 else w.permute(0, 2, 1, 3, 4).flatten(1, 2)
        bias = conv.bias.float() if conv.bias is not None else None
        x = nn.functional.conv2d(pixel_values.float(), weight, bias, stride=conv.stride[1:])   # [B, D, 2g, 2g]
        (b, d), (r, c) = x.shape[:2], self.grid
        x = x.reshape(b, d, r, 2, c, 2).permute(0, 2, 4, 3, 5, 1)            # [B, r, c, 2, 2, D]
        return x.reshape(b, 4 * r * c, d).to(dtype)

    def to_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        b, t, d = hidden.shape
        return hidden.reshape(b, t // 4, 4 * d)

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        b, k, d4 = tokens.shape
        return tokens.reshape(b, 4 * k, d4 // 4)

    def token_importance(self, importance: torch.Tensor) -> torch.Tensor:
        b, t = importance.shape
        return importance.reshape(b, t // 4, 4).sum(dim=-1)

    def key_bias(self, log_sizes: torch.Tensor) -> torch.Tensor:
        b, k = log_sizes.shape
        return log_sizes.unsqueeze(-1).expand(b, k, 4).reshape(b, 4 * k)

    def run_layers(self, hidden, first, last, key_bias, positions, probe, square_mask=False):
        b, t, d = hidden.shape
        if positions is None and not self.windows_by_reshape:   # every unit, windows by mask
            positions = torch.arange(t // 4, device=hidden.device).expand(b, t // 4)
        windowed = positions is None       # every unit present, in place: windows by reshape
        if windowed:
            if key_bias is not None:
                raise EvoExportError("internal: a stage over every unit has no token sizes")
            hidden = self._to_windows(hidden)
            cos, sin = self.cos_windows[None], self.sin_windows[None]
            full_mask = window_mask = None
        else:
            cos = self.cos_units[positions].reshape(b, t, -1)
            sin = self.sin_units[positions].reshape(b, t, -1)
            window_mask = full_mask = None
            if any(i not in self.full_blocks for i in range(first, last)):   # Qwen3-VL: never
                windows = self.window_of_unit[positions]                                # [B, K]
                windows = windows.unsqueeze(-1).expand(b, t // 4, 4).reshape(b, t)
                same = windows.unsqueeze(-1) == windows.unsqueeze(-2)                   # [B, T, T]
                window_mask = torch.where(same, 0.0, -math.inf)[:, None].to(hidden.dtype)
            if key_bias is not None:
                bias = key_bias[:, None, None, :].to(hidden.dtype)
                full_mask = bias.expand(-1, -1, t, -1) if square_mask else bias
                window_mask = window_mask + bias if window_mask is not None else None
        for index in range(first, last):
            full = index in self.full_blocks
            mask = full_mask if full else window_mask
            capture = probe and index == last - 1
            hidden = self._block(index, hidden, cos, sin, mask, windowed and not full, windowed, capture)
        return self._from_windows(hidden) if windowed else hidden

    def _block(self, index, hidden, cos, sin, mask, by_window: bool, window_order: bool, capture: bool):
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

        block = self.visual.blocks[index]
        b, t, d = hidden.shape
        h, hd = self.num_heads, self.head_dim
        q, k, v = block.attn.qkv(block.norm1(hidden)).reshape(b, t, 3, h, hd).unbind(2)     # [B, T, H, hd]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        if capture:   # the probe reads raster order
            order = self._from_windows if window_order else (lambda x: x)
            self.probes[index].q_proj(order(q.reshape(b, t, d)))
            self.probes[index].k_proj(order(k.reshape(b, t, d)))
        rows = b
        if by_window:   # [B, T] -> [B * windows, 64]: window attention as a reshape
            per = 4 * self.window * self.window
            rows, t_att = b * (t // per), per
            q, k, v = (x.reshape(rows, t_att, h, hd) for x in (q, k, v))
        out = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         attn_mask=mask, scale=hd ** -0.5)
        hidden = hidden + block.attn.proj(out.transpose(1, 2).reshape(b, t, d))
        return hidden + block.mlp(block.norm2(hidden))

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, 4K, D] -> merged features [B, K, out] (the patch merger)."""
        b, t, d = hidden.shape
        return self.visual.merger(hidden.reshape(b * t, d)).reshape(b, t // 4, -1)

    def attention_keys(self, layer: int, positions: int, pruned: bool) -> int:
        if layer in self.full_blocks or pruned or not self.windows_by_reshape:   # masked dense attention
            return positions
        return 4 * self.window * self.window

    def projector_flops(self, tokens: int) -> int:
        d4 = 4 * self.hidden_size
        return 2 * tokens * (d4 * d4 + d4 * self.out_features)

    def hf_forward(self, device="cpu", dtype=None):
        """transformers' own encoder with this tower's weights on the processor's flattened
        patches: fn(pixel_values [B, 3 or 6, S, S]) -> merged features [B, U, out]."""
        run = self.hf_outputs(device, dtype)
        return lambda pixel_values: run(pixel_values).pooler_output.reshape(pixel_values.shape[0], -1,
                                                                            self.out_features)

    def hf_outputs(self, device="cpu", dtype=None):
        """fn(pixel_values) -> transformers' encoder output (its DeepStack features too, where
        the family has them; rows of all the batch's images one after another)."""
        model = self.transformers_classes()[1](self.config).eval()
        model.load_state_dict(self.visual.state_dict())
        model.to(device=device, dtype=dtype)
        cfg = self.config

        def run(pixel_values):
            patches, grid = flatten_patches(pixel_values, cfg.patch_size, cfg.spatial_merge_size,
                                            cfg.temporal_patch_size)
            return model(patches.to(next(model.parameters()).dtype), grid_thw=grid.to(pixel_values.device))
        return run


def _spec(vcfg, preset: Preset, size: int, preprocess: dict) -> TowerSpec:
    if vcfg.spatial_merge_size != 2 or vcfg.window_size != WINDOW_PX or vcfg.patch_size != 14:
        raise EvoExportError(f"{preset.name}: only patch 14, 2x2 merge units and 112 px windows are supported "
                             f"(config: patch {vcfg.patch_size}, merge {vcfg.spatial_merge_size}, "
                             f"window {vcfg.window_size})")
    vision = vcfg.to_dict()
    vision["image_size"] = size
    full = [i for i in vcfg.fullatt_block_indexes if i < vcfg.depth - 1]
    return TowerSpec(vision=vision, projector={"out_features": vcfg.out_hidden_size, "act": "gelu", "bias": True},
                     feature_layer=-1, select_strategy="full", preprocess=preprocess, input_size=size, unit=2,
                     prune_layers=tuple(full[:2]))


def spec_from_preset(preset: Preset, image_size: int | None = None) -> TowerSpec:
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    size = checked_size(image_size, preset, UNIT_PX, "one merge unit: 2x2 patches of 14 px")
    return _spec(Qwen2_5_VLVisionConfig(**preset.vision), preset, size, qwen_recipe(size))


def spec_from_checkpoint(preset: Preset, ckpt: Path, image_size: int | None = None) -> TowerSpec:
    """A Qwen2_5_VLForConditionalGeneration checkpoint (only `vision_config` is read) or a
    bare vision encoder (model_type qwen2_5_vl_vision)."""
    vcfg = vision_config(ckpt, "qwen2_5_vl", "Qwen2.5-VL", QwenVisionTower.transformers_classes()[0])
    size = checked_size(image_size, preset, UNIT_PX, "one merge unit: 2x2 patches of 14 px")
    return _spec(vcfg, preset, size, recipe_from_checkpoint(ckpt, size, QWEN_PROCESSOR, "Qwen/Qwen2.5-VL-7B-Instruct"))


VISION_PREFIXES = ("model.visual.", "visual.", "")


def load_weights(tower: QwenVisionTower, ckpt: Path) -> None:
    """The encoder's tensors (under model.visual., visual. or bare names) from safetensors;
    the language model's tensors are never read."""
    targets = [("", VISION_PREFIXES, tower.visual.state_dict(), lambda name: name)]
    tower.visual.load_state_dict(read_prefixed(ckpt, targets, "vision"))


register_family("qwen2.5-vl", Family(QwenVisionTower, spec_from_preset, spec_from_checkpoint, load_weights))
