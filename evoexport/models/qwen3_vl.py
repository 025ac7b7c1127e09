"""Qwen3-VL family: the vision encoder of Qwen3-VL (2B/4B/8B/32B), pruned in 2x2 merge units.

What differs from Qwen2.5-VL (qwen2_5_vl.py, whose layout this tower shares: raster unit
order, a unit of four patches as the prunable token, rotary positions gathered by kept unit):

  - patches of 16 px (units of 32 px) and a patch convolution with a bias;
  - every block attends over the whole image (no windows);
  - a learned square position table, bilinearly interpolated to the grid as transformers
    does and added after the patch embedding: at a build's fixed grid it is one constant
    [4U, D], folded once when the weights are loaded (the table itself is not in the graphs);
  - DeepStack: the hidden states after blocks `deepstack_visual_indexes` (8, 16, 24 in the
    8B) each leave through their own merger. They are outputs of the build (names.deepstack),
    computed where their block runs and carried through every later selection with the same
    gathers and merges as the tokens (prune/carry.py), so each ends as K rows in the order of
    the final features.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import EvoExportError, OptionError, cause
from .base import Family, TowerSpec
from .checkpoint import vision_config
from .qwen2_5_vl import QwenVisionTower, load_weights as load_qwen_weights
from .qwen_processor import checked_size, qwen_recipe, recipe_from_checkpoint
from .registry import Preset, register, register_family

UNIT_PX = 32
# The reference checkpoint's own preprocessor_config.json, as data: Qwen/Qwen3-VL-8B-Instruct
# (its `size` is the pixel budget of smart_resize; a build has one grid, so it is replaced).
QWEN3_PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessorFast", "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
}
SOURCE = "Qwen/Qwen3-VL-8B-Instruct"

QWEN3_8B_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                       patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                       deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh", in_channels=3)

register(Preset(
    name="qwen3-vl",
    family="qwen3-vl",
    description="Qwen3-VL-8B vision encoder at 768 px (27 global blocks of 1152, 24x24 merge units of 2x2 "
                "patches, the position table's own 48x48 grid) + merger -> 4096, DeepStack taps after 8, 16, 24",
    vision=QWEN3_8B_VISION,
    projector=dict(out_features=4096, act="gelu", bias=True),
    feature_layer=-1,
    select_strategy="full",
    preprocess=qwen_recipe(768, QWEN3_PROCESSOR, SOURCE),
    input_size=768,
))

register(Preset(
    name="qwen3-vl-tiny",
    family="qwen3-vl",
    description="test-size Qwen3-VL encoder at 256 px: 6 blocks of 64, 8x8 units, an 8x8 position table "
                "interpolated to 16x16 patches, DeepStack taps after 0, 2, 4, merger -> 96",
    vision=dict(depth=6, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=96, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                deepstack_visual_indexes=[0, 2, 4], hidden_act="gelu_pytorch_tanh", in_channels=3),
    projector=dict(out_features=96, act="gelu", bias=True),
    feature_layer=-1,
    select_strategy="full",
    preprocess=qwen_recipe(256, QWEN3_PROCESSOR, SOURCE),
    input_size=256,
))


class Qwen3VisionTower(QwenVisionTower):
    """Qwen2.5-VL's tower with global blocks, an absolute position constant and DeepStack taps."""

    def __init__(self, spec: TowerSpec):
        if spec.frames > 1:
            raise OptionError("video", "qwen3-vl video builds are not supported yet (video builds are for "
                                       "qwen2.5-vl); send a clip's frames as images")
        super().__init__(spec)
        self.taps = tuple(self.config.deepstack_visual_indexes)
        self.fold_positions()

    @staticmethod
    def transformers_classes() -> tuple[type, type]:
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel
        return Qwen3VLVisionConfig, Qwen3VLVisionModel

    def global_blocks(self) -> list[int]:
        return list(range(self.config.depth))

    def window_units(self) -> None:
        return None     # no windows: every block global

    @torch.no_grad()
    def fold_positions(self) -> None:
        """The position table interpolated to this grid, [4U, D] in raster unit order, as
        transformers computes it per image (again after the weights are loaded)."""
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights

        visual, (rows, cols) = self.visual, self.grid
        indices, weights = get_vision_interpolation_indices_and_weights(
            torch.tensor([[1, 2 * rows, 2 * cols]]), visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=self.config.spatial_merge_size)
        table = visual.pos_embed.weight.float()
        self.register_buffer("position_constant", (table[indices] * weights[:, :, None].float()).sum(1), persistent=False)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = super().embed(pixel_values)
        return (hidden.float() + self.position_constant.float()).to(hidden.dtype)

    def tap_features(self, j: int, hidden: torch.Tensor) -> torch.Tensor:
        b, t, d = hidden.shape
        return self.visual.deepstack_merger_list[j](hidden.reshape(b * t // 4, 4 * d)).reshape(b, t // 4, -1)

    def hf_deepstack(self, device="cpu", dtype=None):
        """fn(pixel_values) -> (features [B, U, out], [each tap [B, U, out]]) from transformers'
        own encoder (parity checks)."""
        run = self.hf_outputs(device, dtype)

        def deepstack(pixel_values):
            out, b = run(pixel_values), pixel_values.shape[0]
            return (out.pooler_output.reshape(b, -1, self.out_features),
                    [t.reshape(b, -1, self.out_features) for t in out.deepstack_features])
        return deepstack


def _input_size(image_size, preset: Preset):
    return checked_size(image_size, preset, UNIT_PX, "one merge unit: 2x2 patches of 16 px")


def _spec(vcfg, size: int, preprocess: dict) -> TowerSpec:
    if vcfg.spatial_merge_size != 2 or vcfg.patch_size != 16:
        raise EvoExportError(f"qwen3-vl: only patch 16 and 2x2 merge units are supported "
                             f"(config: patch {vcfg.patch_size}, merge {vcfg.spatial_merge_size})")
    taps = list(vcfg.deepstack_visual_indexes)
    if any(not 0 <= t < vcfg.depth for t in taps) or taps != sorted(set(taps)):
        raise EvoExportError(f"qwen3-vl: deepstack_visual_indexes {taps} must be distinct blocks in ascending "
                             f"order below the depth {vcfg.depth}")
    if round(vcfg.num_position_embeddings ** 0.5) ** 2 != vcfg.num_position_embeddings:
        raise EvoExportError(f"qwen3-vl: num_position_embeddings {vcfg.num_position_embeddings} is not a square")
    vision = vcfg.to_dict()
    vision["image_size"] = size
    return TowerSpec(vision=vision, projector={"out_features": vcfg.out_hidden_size, "act": "gelu", "bias": True},
                     feature_layer=-1, select_strategy="full", preprocess=preprocess, input_size=size, unit=2)


def spec_from_preset(preset: Preset, image_size: int | None = None) -> TowerSpec:
    size = _input_size(image_size, preset)
    try:
        vcfg = Qwen3VisionTower.transformers_classes()[0].from_dict(preset.vision)
    except Exception as e:
        raise EvoExportError(f"preset {preset.name} is not a valid Qwen3-VL vision config: {cause(e)}") from None
    return _spec(vcfg, size, qwen_recipe(size, QWEN3_PROCESSOR, SOURCE))


def spec_from_checkpoint(preset: Preset, ckpt: Path, image_size: int | None = None) -> TowerSpec:
    """A Qwen3VLForConditionalGeneration checkpoint (only `vision_config` is read) or a bare
    vision encoder (model_type qwen3_vl_vision)."""
    vcfg = vision_config(ckpt, "qwen3_vl", "Qwen3-VL", Qwen3VisionTower.transformers_classes()[0])
    size = _input_size(image_size, preset)
    return _spec(vcfg, size, recipe_from_checkpoint(ckpt, size, QWEN3_PROCESSOR, SOURCE))


def load_weights(tower: Qwen3VisionTower, ckpt: Path) -> None:
    """The encoder's tensors from safetensors (never the language model's); then the position
    constant of the build's grid from the loaded table."""
    load_qwen_weights(tower, ckpt)
    tower.fold_positions()


register_family("qwen3-vl", Family(Qwen3VisionTower, spec_from_preset, spec_from_checkpoint, load_weights))
