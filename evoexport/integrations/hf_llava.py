"""Feed a build's pruned image features to a transformers LLaVA model.

    model = LlavaForConditionalGeneration.from_pretrained(CKPT)
    evoexport.integrations.hf_llava.attach(model, "graphs/llava-keep0.5")   # any backend
    image = load_image(path)      # evoexport.inputs.image_files (or transformers'): upright by EXIF
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    inputs = shrink_image_tokens(inputs, model)          # 576 placeholders -> the build's K
    out = model.generate(**inputs, max_new_tokens=64)

attach() replaces the model's get_image_features with the build (its runtime, on the
backend you name); everything after it (placeholder scatter, the language model,
generate()) is transformers' own code. The build must hold this model's vision weights:
their sha256 is compared with the manifest's, and a mismatch is one clear error.
"""
from __future__ import annotations

import torch

from ..errors import EvoExportError
from ..manifest import Manifest
from .common import features_from_build


def _vision_sha256(model, manifest: Manifest) -> str:
    """The sha256 evoexport's tower would give this model's vision tower and projector."""
    from ..models.loader import untrained_tower
    tower = untrained_tower(manifest)
    inner = getattr(model, "model", model)
    tower.vision.load_state_dict(inner.vision_tower.state_dict(), strict=False)   # layers past the feature layer unused
    if tower.projector is not None:
        tower.projector.load_state_dict(inner.multi_modal_projector.state_dict())
    return tower.state_sha256()


def attach(model, build_dir, verify_weights: bool = True, **load_options):
    """Make `model` (LlavaForConditionalGeneration, or LlavaOnevisionForConditionalGeneration
    for images: pruned tiles packed as in integrations/hf_onevision.py, or
    Qwen2_5_VLForConditionalGeneration: integrations/hf_qwen2_5_vl.py, Qwen3VLForConditionalGeneration:
    integrations/hf_qwen3_vl.py) take its image
    features from a build."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from ..runtime.runner import load

    inner = getattr(model, "model", model)
    if getattr(inner.config, "model_type", None) == "qwen2_5_vl":   # one attach() for every family
        from .hf_qwen2_5_vl import attach as attach_qwen
        return attach_qwen(model, build_dir, verify_weights, **load_options)
    if getattr(inner.config, "model_type", None) == "qwen3_vl":
        from .hf_qwen3_vl import attach as attach_qwen3
        return attach_qwen3(model, build_dir, verify_weights, **load_options)
    if not hasattr(inner, "get_image_features") or not hasattr(inner, "multi_modal_projector"):
        raise EvoExportError(f"attach() takes a transformers LLaVA model, got {type(model).__name__}")
    onevision = getattr(inner.config, "model_type", None) == "llava_onevision"
    if hasattr(inner, "image_newline") and not onevision:
        # LLaVA-NeXT packs tiles like OneVision but with its own rules; not written yet (docs/llm.md)
        raise EvoExportError(f"attach() does not support {type(model).__name__} yet: its anyres packing of "
                             "pruned tiles is not written; see docs/llm.md (tiles)")
    runner = load(build_dir, **load_options)
    manifest = runner.manifest
    if not onevision:   # LLaVA-OneVision takes temporal builds for its videos
        manifest.require_images("attach() for LLaVA-1.5", build_dir)
    if verify_weights and _vision_sha256(model, manifest) != manifest.weights_sha256:
        raise EvoExportError(f"{build_dir} was built from other vision weights than this model's "
                             "(sha256 differs); build it from this model's checkpoint")
    model.evoexport_runner = runner
    if onevision:   # tiles, unpadding and newlines: transformers' packing over the kept tokens
        from .hf_onevision import attach_onevision
        from .hf_onevision_video import attach_onevision_video
        if manifest.temporal:
            inner.get_image_features = _temporal_refuses_images(build_dir, manifest)
        else:
            attach_onevision(model, inner, runner)
        attach_onevision_video(model, inner, runner)     # videos: dense maps, transformers' pooling
        model.evoexport_image_tokens = None      # depends on each image's size and tiling
        return model
    embed = model.get_input_embeddings().weight

    def get_image_features(pixel_values, *args, **kwargs):
        return BaseModelOutputWithPooling(pooler_output=list(features_from_build(runner, pixel_values, embed)[0]))

    inner.get_image_features = get_image_features
    model.evoexport_image_tokens = manifest.tokens_per_image
    return model


def _temporal_refuses_images(build_dir, manifest):
    def get_image_features(*args, **kwargs):
        raise EvoExportError(f"{build_dir} is a temporal build (groups of {manifest.group} frames): it takes videos; "
                             "attach an image build for images")
    return get_image_features


def _image_token_counts(inputs: dict, model, tokens: int | None):
    """How many placeholders each image keeps, in order: the build's K for LLaVA; for
    LLaVA-OneVision the length of its packed sequence, which depends on the image's size
    and tiling and on how many kept tokens fall inside the unpadded grid (so the build runs)."""
    import itertools

    if tokens:
        return itertools.repeat(tokens)
    if getattr(model, "evoexport_runner", None) is not None and getattr(model, "evoexport_image_tokens", 0) is None:
        inner = getattr(model, "model", model)
        with torch.inference_mode():
            packed = inner.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        return iter([len(p) for p in packed])
    k = getattr(model, "evoexport_image_tokens", None)
    if k is None:
        raise EvoExportError("shrink_image_tokens: attach() the build first, or give tokens=K")
    return itertools.repeat(k)


def shrink_image_tokens(inputs: dict, model, tokens: int | None = None) -> dict:
    """Processor output with each image's run of placeholder tokens cut to what the build
    gives it: K for LLaVA, the packed length for LLaVA-OneVision (left-padded again for
    batches; attention masks follow). Qwen2.5-VL: its own (mm_token_type_ids follow too)."""
    if getattr(model.config, "model_type", None) in ("qwen2_5_vl", "qwen3_vl"):
        from .hf_qwen2_5_vl import shrink_image_tokens as shrink_qwen
        return shrink_qwen(inputs, model, tokens)
    image_id = model.config.image_token_id
    counts = _image_token_counts(inputs, model, tokens)
    pad = getattr(model.config, "pad_token_id", None) or 0
    rows = []
    for ids, mask in zip(inputs["input_ids"], inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))):
        ids = ids[mask.bool()]
        keep, run, limit = [], 0, 0
        for tok in ids.tolist():
            if tok == image_id:
                limit = next(counts) if run == 0 else limit
                run += 1
            else:
                run = 0
            if tok != image_id or run <= limit:
                keep.append(tok)
        rows.append(torch.tensor(keep, dtype=ids.dtype))
    width = max(len(r) for r in rows)
    out = dict(inputs)
    out["input_ids"] = torch.stack([torch.cat([torch.full((width - len(r),), pad, dtype=r.dtype), r]) for r in rows])
    out["attention_mask"] = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long),
                                                    torch.ones(len(r), dtype=torch.long)]) for r in rows])
    return out
