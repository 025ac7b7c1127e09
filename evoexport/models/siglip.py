"""SigLIP family: LLaVA-OneVision's vision path (SigLIP so400m + 2-layer GELU projector).

SigLIP has no CLS token: every one of the 27x27 = 729 patch tokens is a feature
(vision_feature_layer -1, strategy "full"), and the importance probe uses the mean query
instead of CLS's (docs/evoprune.md). Features are
`multi_modal_projector(vision_tower(x).hidden_states[vision_feature_layer])`: the last
layer's output *before* SigLIP's post_layernorm, exactly what LLaVA-OneVision reads.

Depth: SigLIP so400m has 27 layers. The llava-hf LLaVA-OneVision checkpoints keep 26 and
read the last of them (the original reads layer -2 of 27), and transformers' own
LlavaOnevisionConfig defaults to 26. The preset follows them: 26 layers run either way.

Checkpoints: `LlavaOnevisionForConditionalGeneration` directories (only the vision tower's
and the projector's tensors are read, never the language model's) and bare SigLIP vision
checkpoints (model_type siglip_vision_model, or siglip with a vision_config). Everything
runs transformers' own modules; this file supplies only what differs: embedding, layers,
probe, head.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..inputs.images import recipe_from_processor_config
from .base import BaseTower, Family, TowerSpec
from .llava_style import (CheckpointKinds, TransformersVisionLayers, _stub_text_config, llava_style_spec,
                          load_prefixed_weights)
from .registry import Preset, register, register_family

# The reference checkpoint's own preprocessor_config.json, as data:
# llava-hf/llava-onevision-qwen2-7b-ov-hf (LlavaOnevisionImageProcessor). A build takes its
# base view: the whole image resized to 384x384, no crop (anyres tiles are that view's size).
ONEVISION_PROCESSOR = {
    "image_processor_type": "LlavaOnevisionImageProcessor",
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384},
}
SIGLIP_PREPROCESS = recipe_from_processor_config(ONEVISION_PROCESSOR, "llava-hf/llava-onevision-qwen2-7b-ov-hf")

register(Preset(
    name="llava-onevision",
    family="siglip",
    description="LLaVA-OneVision-7B vision path: SigLIP so400m/14-384 (26 layers run, 729 patches, no CLS) "
                "+ projector 1152 -> 3584 -> 3584",
    vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                vision_use_head=False),
    projector=dict(out_features=3584, act="gelu", bias=True),
    feature_layer=-1,
    select_strategy="full",
    preprocess=SIGLIP_PREPROCESS,
))

register(Preset(
    name="onevision-tiny",
    family="siglip",
    description="test-size LLaVA-OneVision path: 4-layer SigLIP at 56 px (7x7 patches of 8 px, no CLS) "
                "+ projector 64 -> 96 -> 96",
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                image_size=56, patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                vision_use_head=False),
    projector=dict(out_features=96, act="gelu", bias=True),
    feature_layer=-1,
    select_strategy="full",
    preprocess=SIGLIP_PREPROCESS,
))


def _onevision_config(vision: dict, projector: dict, feature_layer: int):
    from transformers import LlavaOnevisionConfig
    return LlavaOnevisionConfig(vision_config=vision, text_config=_stub_text_config(projector["out_features"]),
                                projector_hidden_act=projector["act"], multimodal_projector_bias=projector["bias"],
                                vision_feature_layer=feature_layer, vision_feature_select_strategy="full")


class SiglipTower(TransformersVisionLayers, BaseTower):
    def __init__(self, spec: TowerSpec):
        super().__init__()
        from transformers import SiglipVisionConfig, SiglipVisionModel

        self.spec = spec
        self.config = cfg = self._config(SiglipVisionConfig, spec)
        cfg.vision_use_head = False          # the pooling head is never read by LLaVA-OneVision
        self.vision = SiglipVisionModel(cfg).eval()
        self.projector = None
        if spec.projector:
            from transformers.models.llava_onevision.modeling_llava_onevision import (
                LlavaOnevisionMultiModalProjector)
            self.projector = LlavaOnevisionMultiModalProjector(
                _onevision_config(cfg.to_dict(), spec.projector, spec.feature_layer)).eval()
        self._set_sizes(hidden=cfg.hidden_size, heads=cfg.num_attention_heads, mlp=cfg.intermediate_size,
                        image_size=cfg.image_size, patch=cfg.patch_size,
                        out_features=spec.projector["out_features"] if spec.projector else cfg.hidden_size,
                        drop_cls=False)
        self.has_cls = False

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._vision_model.embeddings(pixel_values)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.projector(hidden) if self.projector is not None else hidden

    def hf_forward(self, device="cpu", dtype=None):
        """transformers' SiglipVisionModel at full depth with this tower's weights, then
        LLaVA-OneVision's projector: projector(vision_tower(x).hidden_states[feature_layer])."""
        from transformers import SiglipVisionConfig, SiglipVisionModel

        cfg = SiglipVisionConfig.from_dict({**self.spec.vision, "vision_use_head": False})
        cfg._attn_implementation = "sdpa"
        model = SiglipVisionModel(cfg).eval()
        missing = model.load_state_dict(self.vision.state_dict(), strict=False).missing_keys
        unused = tuple(f"encoder.layers.{i}." for i in range(self.depth, cfg.num_hidden_layers))
        if [k for k in missing if not k.removeprefix("vision_model.").startswith(unused)]:
            raise RuntimeError(f"transformers' SigLIP did not take the tower's weights: {missing[:3]}")
        model.to(device=device, dtype=dtype)
        projector, layer = self.projector, self.spec.feature_layer

        def run(pixel_values):
            hidden = model(pixel_values, output_hidden_states=True).hidden_states[layer]
            return projector.to(device=device, dtype=dtype)(hidden) if projector is not None else hidden
        return run


def spec_from_preset(preset: Preset) -> TowerSpec:
    from transformers import SiglipVisionConfig
    return TowerSpec(vision=SiglipVisionConfig(**preset.vision).to_dict(), projector=preset.projector,
                     feature_layer=preset.feature_layer, select_strategy="full", preprocess=dict(preset.preprocess))


def spec_from_checkpoint(preset: Preset, ckpt: Path) -> TowerSpec:
    from transformers import LlavaOnevisionConfig, SiglipConfig, SiglipVisionConfig
    # "full" only: with strategy "default" transformers drops the first token, which for
    # SigLIP (no CLS) is a patch
    return llava_style_spec(preset, ckpt, CheckpointKinds("llava_onevision", LlavaOnevisionConfig,
                                                          "siglip_vision_model", SiglipVisionConfig,
                                                          "siglip", SiglipConfig, ("full",)))


FAMILY = Family(SiglipTower, spec_from_preset, spec_from_checkpoint, load_prefixed_weights)
register_family("siglip", FAMILY)
