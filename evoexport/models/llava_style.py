"""What the LLaVA-style families (CLIP and SigLIP towers) share: transformers' CLIP-layout
vision modules, the LLaVA projector, and one reader of LLaVA-style checkpoints (the
multimodal wrapper, or a bare vision encoder) that never touches the language model."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from torch import nn

from ..errors import EvoExportError, cause
from .base import BaseTower, TowerSpec
from .checkpoint import preprocess_from_checkpoint, read_config, read_prefixed
from .registry import Preset

# Checkpoint name prefixes under which each part of the tower is stored: transformers 5
# saves LLaVA as "vision_tower.embeddings...", released llava-1.5 checkpoints (transformers 4)
# as "vision_tower.vision_model.embeddings...", bare CLIP as "[vision_model.]embeddings...".
VISION_PREFIXES = ("model.vision_tower.vision_model.", "model.vision_tower.", "vision_tower.vision_model.",
                   "vision_tower.", "vision_model.", "")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


class TransformersVisionLayers:
    """Layers and probe of transformers' CLIP-layout vision models (CLIP, SigLIP): the tower
    holds the model as `self.vision`, its layers under `encoder.layers`, each with `self_attn`."""

    @property
    def _vision_model(self) -> nn.Module:
        # transformers < 5 wraps the modules in .vision_model
        return getattr(self.vision, "vision_model", self.vision)

    @property
    def layers(self) -> nn.ModuleList:
        return self._vision_model.encoder.layers

    def probe_attention(self, index: int) -> tuple[nn.Module, int, float]:
        attn = self.layers[index].self_attn
        return attn, attn.num_heads, attn.scale


def _build_projector(vcfg, spec: TowerSpec) -> nn.Module:
    from transformers import LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    p = spec.projector
    lcfg = LlavaConfig(vision_config=vcfg.to_dict(),
                       text_config=_stub_text_config(p["out_features"]),
                       projector_hidden_act=p["act"], multimodal_projector_bias=p["bias"],
                       vision_feature_layer=spec.feature_layer)
    return LlavaMultiModalProjector(lcfg)


def _stub_text_config(hidden_size: int) -> dict:
    """The language model LlavaConfig insists on: only its width matters (the projector's
    output); it has no layers and is never run."""
    return {"model_type": "llama", "hidden_size": hidden_size, "num_hidden_layers": 0, "vocab_size": 16,
            "intermediate_size": 16, "num_attention_heads": 1, "num_key_value_heads": 1}


class CheckpointKinds(NamedTuple):
    """The config.json kinds a LLaVA-style family loads: the multimodal wrapper, and the bare
    vision encoder (alone, or inside its dual-encoder config)."""
    wrapper: str            # model_type of the LLaVA-style model ("llava", "llava_onevision")
    wrapper_config: type    # its transformers config class
    vision: str             # model_type of its vision tower ("clip_vision_model", "siglip_vision_model")
    vision_config: type
    dual: str               # model_type of the dual encoder holding a vision_config ("clip", "siglip")
    dual_config: type
    strategies: tuple       # vision_feature_select_strategy values the family supports


def llava_style_spec(preset: Preset, ckpt: Path, kinds: CheckpointKinds) -> TowerSpec:
    """A tower spec from a LLaVA-style checkpoint (vision tower + projector; the language
    model is never looked at) or from a bare vision encoder checkpoint (no projector)."""
    raw = read_config(ckpt)
    kind = raw.get("model_type")
    try:
        if kind == kinds.wrapper:
            cfg = kinds.wrapper_config.from_dict(raw)
            vcfg = cfg.vision_config
            if vcfg.model_type != kinds.vision:
                raise EvoExportError(f"{ckpt}: {kind} checkpoint with a {vcfg.model_type!r} vision tower; "
                                     f"only {kinds.vision} is supported")
            fl = cfg.vision_feature_layer
            if not isinstance(fl, int):
                raise EvoExportError(f"{ckpt}: multi-layer vision_feature_layer {fl} is not supported")
            projector = {"out_features": cfg.text_config.hidden_size, "act": cfg.projector_hidden_act,
                         "bias": getattr(cfg, "multimodal_projector_bias", True)}
            strategy = cfg.vision_feature_select_strategy
        elif kind in (kinds.vision, kinds.dual):
            vcfg = (kinds.vision_config.from_dict(raw) if kind == kinds.vision
                    else kinds.dual_config.from_dict(raw).vision_config)
            projector, fl, strategy = None, preset.feature_layer, preset.select_strategy
        else:
            raise EvoExportError(f"{ckpt}: model_type {kind!r} is not a {preset.family} checkpoint "
                                 f"(expected {kinds.wrapper!r}, {kinds.vision!r} or {kinds.dual!r})")
    except EvoExportError:
        raise
    except Exception as e:
        raise EvoExportError(f"{ckpt}/config.json is not a valid {kind} config: {cause(e)}") from None
    if strategy not in kinds.strategies:
        raise EvoExportError(f"{ckpt}: vision_feature_select_strategy {strategy!r} is not supported "
                             f"(supported: {', '.join(kinds.strategies)})")
    return TowerSpec(vision=vcfg.to_dict(), projector=projector, feature_layer=fl,
                     select_strategy=strategy, preprocess=preprocess_from_checkpoint(ckpt, preset))


def load_prefixed_weights(tower: BaseTower, ckpt: Path) -> None:
    """`tower.vision` and `tower.projector` from a checkpoint stored under any of the known
    name prefixes (VISION_PREFIXES, PROJECTOR_PREFIXES); safetensors only."""
    def bare(name):
        return name.removeprefix("vision_model.")
    targets = [("vision.", VISION_PREFIXES, tower.vision.state_dict(), bare)]
    if tower.projector is not None:
        targets.append(("projector.", PROJECTOR_PREFIXES, tower.projector.state_dict(), bare))
    tower.load_state_dict(read_prefixed(ckpt, targets, "tower"), strict=False)
