"""The CLIP family (registered as "llava"): CLIP ViT vision tower + 2-layer GELU projector
(LLaVA-1.5), or a bare CLIP vision encoder without projector (clip-tiny, digits-vit).

The full-size preset is LLaVA-1.5's vision path: CLIP ViT-L/14 at 336 px, features from
the second-to-last layer with CLS dropped (576 tokens), projector 1024 -> 4096 -> 4096.
The tiny presets use the same code path at sizes a 2-core CPU test suite can afford.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..inputs.images import recipe_from_processor_config
from .base import BaseTower, Family, TowerSpec
from .llava_style import (CheckpointKinds, TransformersVisionLayers, _build_projector, _stub_text_config,
                          llava_style_spec, load_prefixed_weights)
from .registry import Preset, register, register_family

# The reference checkpoint's own preprocessor_config.json, as data: llava-hf/llava-1.5-7b-hf
# (CLIPImageProcessor; openai/clip-vit-large-patch14-336 ships the same). Tiny presets scale it.
CLIP_336_PROCESSOR = {
    "image_processor_type": "CLIPImageProcessor",
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
}
CLIP_PREPROCESS = recipe_from_processor_config(CLIP_336_PROCESSOR, "llava-hf/llava-1.5-7b-hf")

LLAVA = register(Preset(
    name="llava",
    family="llava",
    description="LLaVA-1.5 vision path: CLIP ViT-L/14-336 (24 layers, features from layer 23) + 2-layer GELU projector",
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    projector=dict(out_features=4096, act="gelu", bias=True),
    feature_layer=-2,
    preprocess=CLIP_PREPROCESS,
))

# test-size CLIP tower: 6 layers at 56 px, 7x7 patches of 8 px
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                   image_size=56, patch_size=8, hidden_act="quick_gelu", layer_norm_eps=1e-5)

register(Preset(
    name="llava-tiny",
    family="llava",
    description="test-size LLaVA path: 6-layer CLIP ViT at 56 px (7x7 patches of 8 px) + projector 64 -> 96 -> 96",
    vision=TINY_VISION,
    projector=dict(out_features=96, act="gelu", bias=True),
    feature_layer=-2,
    preprocess=CLIP_PREPROCESS,
))

register(Preset(
    name="clip-tiny",
    family="llava",
    description="test-size bare CLIP vision encoder (no projector): 6 layers at 56 px, last hidden state without CLS",
    vision=TINY_VISION,
    projector=None,
    feature_layer=-1,
    preprocess=CLIP_PREPROCESS,
))


def hf_image_features(tower: "CLIPTower", device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """transformers' own image-feature path carrying this tower's weights, for baselines
    (on `device`, with its weights cast to `dtype` if given: a user's `model.to(torch.bfloat16)`).

    LLaVA: `LlavaModel.get_image_features` with a full-depth CLIP tower (the layers past the
    feature layer run too, as they do in transformers) and a language model of zero layers
    (never called). Bare CLIP: `CLIPVisionModel(..., output_hidden_states=True)`.
    Returns fn(pixel_values) -> features [B, K, D_out].
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaConfig, LlavaModel

    spec = tower.spec
    vcfg = CLIPVisionConfig.from_dict(spec.vision)
    vcfg._attn_implementation = "sdpa"
    vision_state = {k.removeprefix("vision_model."): v for k, v in tower.vision.state_dict().items()}
    if spec.projector is None:
        model = CLIPVisionModel(vcfg).eval()
        missing = model.load_state_dict(vision_state, strict=False).missing_keys
        fl, drop = spec.feature_layer, tower.drop_cls

        def run(pixel_values):
            hs = model(pixel_values, output_hidden_states=True).hidden_states[fl]
            return hs[:, 1:] if drop else hs
    else:
        p = spec.projector
        cfg = LlavaConfig(vision_config=vcfg.to_dict(),
                          text_config=_stub_text_config(p["out_features"]),
                          projector_hidden_act=p["act"], multimodal_projector_bias=p["bias"],
                          vision_feature_layer=spec.feature_layer, vision_feature_select_strategy=spec.select_strategy)
        cfg._attn_implementation = "sdpa"
        model = LlavaModel(cfg).eval()
        missing = model.vision_tower.load_state_dict(vision_state, strict=False).missing_keys
        model.multi_modal_projector.load_state_dict(tower.projector.state_dict())

        def run(pixel_values):
            out = model.get_image_features(pixel_values, vision_feature_layer=spec.feature_layer,
                                           vision_feature_select_strategy=spec.select_strategy)
            return torch.stack(list(out.pooler_output))
    # only what LLaVA never reads may be left at init: the layers past the feature layer
    unused = tuple(f"encoder.layers.{i}." for i in range(tower.depth, vcfg.num_hidden_layers)) + ("post_layernorm.",)
    unexpected = [k for k in missing if not k.removeprefix("vision_model.").startswith(unused)]
    if unexpected:
        raise RuntimeError(f"transformers' model did not take the tower's weights: {unexpected[:3]}")
    model.to(device=device, dtype=dtype)
    return run


class CLIPTower(TransformersVisionLayers, BaseTower):
    """CLIP (LLaVA's vision tower)."""

    def __init__(self, spec: TowerSpec):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.spec = spec
        self.config = vcfg = self._config(CLIPVisionConfig, spec)
        self.vision = CLIPVisionModel(vcfg).eval()
        self.projector = _build_projector(vcfg, spec) if spec.projector else None
        if self.projector is not None:
            self.projector.eval()
        self._set_sizes(hidden=vcfg.hidden_size, heads=vcfg.num_attention_heads, mlp=vcfg.intermediate_size,
                        image_size=vcfg.image_size, patch=vcfg.patch_size,
                        out_features=spec.projector["out_features"] if spec.projector else vcfg.hidden_size,
                        drop_cls=spec.select_strategy == "default")

    def hf_forward(self, device="cpu", dtype=None):
        return hf_image_features(self, device, dtype)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self._vision_model
        return vm.pre_layrnorm(vm.embeddings(pixel_values))

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, 1+K, D] -> output features [B, K, D_out]."""
        feats = hidden[:, 1:] if (self.has_cls and self.drop_cls) else hidden
        return self.projector(feats) if self.projector is not None else feats


def spec_from_preset(preset: Preset) -> TowerSpec:
    from transformers import CLIPVisionConfig
    return TowerSpec(vision=CLIPVisionConfig(**preset.vision).to_dict(), projector=preset.projector,
                     feature_layer=preset.feature_layer, select_strategy=preset.select_strategy,
                     preprocess=dict(preset.preprocess))


def spec_from_checkpoint(preset: Preset, ckpt: Path) -> TowerSpec:
    from transformers import CLIPConfig, CLIPVisionConfig, LlavaConfig
    return llava_style_spec(preset, ckpt, CheckpointKinds("llava", LlavaConfig, "clip_vision_model", CLIPVisionConfig,
                                                          "clip", CLIPConfig, ("default", "full")))



register_family("llava", Family(CLIPTower, spec_from_preset, spec_from_checkpoint, load_prefixed_weights))
