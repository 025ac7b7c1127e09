"""The vision tower: transformers' CLIP vision modules + LLaVA projector, truncated at the feature layer.

`VisionTower` holds transformers' own modules (CLIPVisionModel, LlavaMultiModalProjector),
never re-typed copies, and exposes the pieces the stage builder needs: `embed`, `layers`,
`project`. Layers after the feature layer are never built: LLaVA reads hidden_states[-2],
so the last CLIP layer would be wasted work (and wasted weights).
"""
from __future__ import annotations

import copy
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..errors import EvoExportError
from . import Preset, get_preset
from .checkpoint import read_config, read_tensors, weight_index

# Checkpoint name prefixes under which each part of the tower is stored: transformers 5
# saves LLaVA as "vision_tower.embeddings...", released llava-1.5 checkpoints (transformers 4)
# as "vision_tower.vision_model.embeddings...", bare CLIP as "[vision_model.]embeddings...".
VISION_PREFIXES = ("model.vision_tower.vision_model.", "model.vision_tower.", "vision_tower.vision_model.",
                   "vision_tower.", "vision_model.", "")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


@dataclass
class TowerSpec:
    """Everything that sizes a tower; recorded in the manifest."""
    vision: dict            # CLIPVisionConfig.to_dict() (full depth, as in the checkpoint)
    projector: dict | None  # {"out_features", "act", "bias"}
    feature_layer: int
    select_strategy: str
    preprocess: dict
    input_size: int | None = None   # pixels fed to the tower, where the config's image_size differs (DINOv2)

    @property
    def depth(self) -> int:
        """Number of encoder layers actually run (up to the feature layer)."""
        n = self.vision["num_hidden_layers"]
        fl = self.feature_layer
        run = fl if fl >= 0 else n + 1 + fl
        if not 1 <= run <= n:
            raise EvoExportError(f"feature layer {fl} is outside a {n}-layer encoder")
        return run


class BaseTower(nn.Module):
    """What every family's tower shares. A family supplies `embed`, `layers`, `project`,
    `probe_attention` and its sizes; the stage builder, the selections and the exporters
    see only this interface."""

    spec: TowerSpec
    has_cls: bool
    weights_info: dict
    resizable = False   # takes --image-size (position embeddings interpolated at build time)
    # the probe's query: "cls" (CLS's row, towers with CLS) or "mean" (mean patch query: towers
    # without CLS always; `evoexport eval` also sets it on DINOv2 to measure that rule)
    importance_query = "cls"

    def _set_sizes(self, *, hidden: int, heads: int, mlp: int, image_size: int, patch: int, out_features: int,
                   drop_cls: bool) -> None:
        """The sizes the stage builder, the cost model and the manifest read."""
        # the patch convolution drops a remainder (SigLIP-384: 27 patches of 14 px, 6 px unused)
        self.has_cls = True   # CLIP and DINOv2; SigLIP sets False (the selection handles both)
        self.hidden_size, self.num_heads, self.mlp_size = hidden, heads, mlp
        self.image_size, self.grid = image_size, image_size // patch
        self.num_patches = self.grid * self.grid
        self.out_features, self.drop_cls = out_features, drop_cls
        self.weights_info = {}

    def hf_features(self, device="cpu", dtype=None):
        """transformers' own model carrying this tower's weights: fn(pixel_values) -> features
        (baselines and parity checks)."""
        raise NotImplementedError

    @staticmethod
    def _config(config_cls, spec: TowerSpec):
        """transformers' config for the layers actually run (up to the feature layer), SDPA attention."""
        cfg = config_cls.from_dict({**spec.vision, "num_hidden_layers": spec.depth})
        cfg._attn_implementation = "sdpa"
        return cfg

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(p.dtype for n, p in self.layers[0].named_parameters() if n.endswith("weight") and p.dim() == 2)

    def probe_attention(self, index: int) -> tuple[nn.Module, int, float]:
        """(attention module with q_proj and k_proj, heads, logit scale) of layer `index`."""
        raise NotImplementedError

    def reduced_precision_copy(self, dtype: torch.dtype, fp32_norms: bool = True) -> "BaseTower":
        """A copy whose weights and math are in `dtype` (fp16/bf16 builds), except LayerNorm,
        which keeps fp32 weights and statistics: CLIP's activation outliers would otherwise
        lose their mean and variance to rounding. `fp32_norms=False` leaves LayerNorm in
        `dtype` (the GPU chain: PyTorch's CUDA kernel accumulates its statistics in fp32
        anyway, and the casts around an fp32 island cost ~10% of a layer there)."""
        twin = copy.deepcopy(self).to(dtype)
        for module in twin.modules():
            # deepcopy copies hooks too: the stages' q/k capture hooks would write the
            # twin's activations into the fp32 pipeline's stages. The twin's own pipeline
            # registers its own.
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
        for module in list(twin.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.LayerNorm) and fp32_norms:
                    setattr(module, name, Float32LayerNorm.from_layer_norm(child))
                elif isinstance(child, nn.Conv2d):   # ONNX Conv has no bf16; pixels keep full precision
                    setattr(module, name, Float32Conv2d.from_conv(child, dtype))
        return twin

    def state_sha256(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.state_dict().items()):
            t = t.detach().contiguous().cpu()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()


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


class VisionTower(TransformersVisionLayers, BaseTower):
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

    def hf_features(self, device="cpu", dtype=None):
        from .llava import hf_image_features
        return hf_image_features(self, device, dtype)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self._vision_model
        return vm.pre_layrnorm(vm.embeddings(pixel_values))

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, 1+K, D] -> output features [B, K, D_out]."""
        feats = hidden[:, 1:] if (self.has_cls and self.drop_cls) else hidden
        return self.projector(feats) if self.projector is not None else feats


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 inside a reduced-precision tower (a Cast island in the ONNX)."""

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm) -> "Float32LayerNorm":
        out = cls(ln.normalized_shape, eps=ln.eps, elementwise_affine=ln.elementwise_affine)
        out.load_state_dict({k: v.float() for k, v in ln.state_dict().items()})
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class Float32Conv2d(nn.Conv2d):
    """The patch embedding of a reduced-precision tower, computed in fp32 on the fp32 pixels;
    its output joins the tower's dtype."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, out_dtype: torch.dtype) -> "Float32Conv2d":
        out = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None)
        out.load_state_dict({k: v.float() for k, v in conv.state_dict().items()})
        out.out_dtype = out_dtype
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(self.out_dtype)


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


def spec_from_preset(preset: Preset) -> TowerSpec:
    from transformers import CLIPVisionConfig
    return TowerSpec(vision=CLIPVisionConfig(**preset.vision).to_dict(), projector=preset.projector,
                     feature_layer=preset.feature_layer, select_strategy=preset.select_strategy,
                     preprocess=dict(preset.preprocess))


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
        raise EvoExportError(f"{ckpt}/config.json is not a valid {kind} config: {e}") from None
    if strategy not in kinds.strategies:
        raise EvoExportError(f"{ckpt}: vision_feature_select_strategy {strategy!r} is not supported "
                             f"(supported: {', '.join(kinds.strategies)})")
    return TowerSpec(vision=vcfg.to_dict(), projector=projector, feature_layer=fl,
                     select_strategy=strategy, preprocess=preprocess_from_checkpoint(ckpt, preset))


def spec_from_checkpoint(preset: Preset, ckpt: Path) -> TowerSpec:
    from transformers import CLIPConfig, CLIPVisionConfig, LlavaConfig
    return llava_style_spec(preset, ckpt, CheckpointKinds("llava", LlavaConfig, "clip_vision_model", CLIPVisionConfig,
                                                          "clip", CLIPConfig, ("default", "full")))


def preprocess_from_checkpoint(ckpt: Path, preset: Preset) -> dict:
    """The checkpoint's own image processor recipe (preprocessor_config.json: resize mode,
    sizes, crop, resample, rescale, mean, std); the preset's reference recipe where the
    checkpoint ships none."""
    import json

    from ..images import recipe_from_processor_config
    p = ckpt / "preprocessor_config.json"
    if not p.is_file():
        return dict(preset.preprocess)
    try:
        raw = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvoExportError(f"{p} is not valid JSON: {e}") from None
    return recipe_from_processor_config(raw, str(p))


class Family(NamedTuple):
    """What a model family module supplies to the generic loader."""
    tower: type
    spec_from_preset: Callable
    spec_from_checkpoint: Callable
    load_weights: Callable


def family_api(preset: Preset) -> Family:
    if preset.family == "dinov2":
        from . import dinov2
        return dinov2.FAMILY
    if preset.family == "siglip":
        from . import siglip
        return siglip.FAMILY
    return Family(VisionTower, spec_from_preset, spec_from_checkpoint, load_prefixed_weights)


def spec_for(model: str, checkpoint: str | Path | None = None, image_size: int | None = None,
             pad_to_square: bool | None = None) -> TowerSpec:
    """The tower's spec, checked before any weight is touched. `image_size` (families whose
    tower is resizable): the input size, a multiple of the patch size. The preprocessing
    recipe is fitted to the input size (scaled where the processor's crop is another size);
    `pad_to_square` overrides the recipe's (LLaVA-1.5's original `image_aspect_ratio: pad`)."""
    from dataclasses import replace

    from ..images import fit_recipe
    preset = get_preset(model)
    family = family_api(preset)
    ckpt = Path(checkpoint).expanduser().resolve() if checkpoint else None
    if image_size is not None and not family.tower.resizable:
        spec = family.spec_from_checkpoint(preset, ckpt) if ckpt else family.spec_from_preset(preset)
        if image_size != spec.vision["image_size"]:
            raise EvoExportError(f"--image-size: {model} runs at its own {spec.vision['image_size']} px "
                                 "(other input sizes: --model dinov2)")
    else:
        kwargs = {"image_size": image_size} if image_size is not None else {}
        spec = (family.spec_from_checkpoint(preset, ckpt, **kwargs) if ckpt
                else family.spec_from_preset(preset, **kwargs))
    size = spec.input_size or spec.vision["image_size"]
    return replace(spec, preprocess=fit_recipe(spec.preprocess, size, pad_to_square))


def load_tower(model: str, checkpoint: str | Path | None = None, seed: int = 0,
               expect_sha256: str | None = None, quiet: bool = False, image_size: int | None = None,
               pad_to_square: bool | None = None) -> BaseTower:
    """Build the tower of preset `model`, with weights from `checkpoint` or seeded random ones."""
    family = family_api(get_preset(model))
    if checkpoint is None:
        spec = spec_for(model, None, image_size, pad_to_square)
        torch.manual_seed(seed)
        tower = family.tower(spec)
        tower.weights_info = {"weights": "random", "weights_seed": seed, "checkpoint": None}
        if not quiet:
            print(f"WARNING: no --checkpoint given: {model} uses seeded RANDOM weights (seed {seed}). "
                  "Shapes and speed are real; the features mean nothing.", file=sys.stderr)
    else:
        ckpt = Path(checkpoint).expanduser().resolve()
        spec = spec_for(model, ckpt, image_size, pad_to_square)
        tower = family.tower(spec)
        family.load_weights(tower, ckpt)
        tower.weights_info = {"weights": "checkpoint", "weights_seed": None, "checkpoint": str(ckpt)}
    tower.weights_info["weights_sha256"] = tower.state_sha256()
    if expect_sha256 and tower.weights_info["weights_sha256"] != expect_sha256:
        raise EvoExportError("the weights loaded now differ from the ones the build was made from "
                             f"(sha256 {tower.weights_info['weights_sha256'][:12]} != {expect_sha256[:12]})")
    return tower


def tower_from_manifest(manifest: dict) -> BaseTower:
    """A build's tower in PyTorch: its model, weights (checked against the manifest's sha256)
    and input size."""
    return load_tower(manifest["model"], manifest.get("checkpoint"), seed=manifest.get("weights_seed") or 0,
                      image_size=manifest["tower"]["image_size"], expect_sha256=manifest.get("weights_sha256"),
                      quiet=True, pad_to_square=manifest.get("preprocess", {}).get("pad_to_square"))


def load_prefixed_weights(tower: BaseTower, ckpt: Path) -> None:
    """`tower.vision` and `tower.projector` from a checkpoint stored under any of the known
    name prefixes (VISION_PREFIXES, PROJECTOR_PREFIXES); safetensors only."""
    index = weight_index(ckpt)
    wanted: dict[str, str] = {}
    missing: list[str] = []
    targets = [("vision.", VISION_PREFIXES, tower.vision.state_dict())]
    if tower.projector is not None:
        targets.append(("projector.", PROJECTOR_PREFIXES, tower.projector.state_dict()))
    for ours_prefix, prefixes, state in targets:
        for name in state:
            base = name.removeprefix("vision_model.")
            for pre in prefixes:
                if pre + base in index:
                    wanted[pre + base] = ours_prefix + name
                    break
            else:
                missing.append(name)
    if missing:
        raise EvoExportError(f"checkpoint {ckpt} lacks {len(missing)} tower tensors (e.g. {missing[0]})")
    tensors = read_tensors(index, wanted)
    own = tower.state_dict()
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise EvoExportError(f"checkpoint tensor for {name} has shape {tuple(t.shape)}, "
                                 f"config.json implies {tuple(own[name].shape)}")
        tensors[name] = t.to(own[name].dtype)
    tower.load_state_dict(tensors, strict=False)
