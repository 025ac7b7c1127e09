"""Feed a build's pruned image features and DeepStack taps to a transformers Qwen3-VL model.

    model = Qwen3VLForConditionalGeneration.from_pretrained(CKPT)
    evoexport.integrations.hf_llava.attach(model, "graphs/qwen3-vl-keep0.5")   # or this module's attach
    image = image.resize((S, S), Image.BICUBIC)       # the build's size
    inputs = shrink_image_tokens(processor(images=image, text=prompt, return_tensors="pt"), model)
    out = model.generate(**inputs, max_new_tokens=64)

As for Qwen2.5-VL (hf_qwen2_5_vl.py, whose encoder wrapper, mRoPE rule and token shrinking
this module uses): `get_image_features` runs the build and returns each image's K features,
and now also its K rows of every DeepStack tap, which transformers adds to the language
model's hidden states at the image's K placeholder positions after its first decoder layers;
`get_rope_index` gives the K tokens the kept units' (s, s + row, s + col) and text resumes
where the unpruned prompt does. Videos are refused (no Qwen3-VL video builds yet).
"""
from __future__ import annotations

from ..errors import EvoExportError
from .hf_qwen2_5_vl import _inner, encoder, install, open_build, pruned_rope_index


def attach(model, build_dir, verify_weights: bool = True, **load_options):
    """Make `model` (Qwen3VLForConditionalGeneration) take its image features, DeepStack taps
    and mRoPE positions from a build of the qwen3-vl family."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    inner = _inner(model)
    runner = open_build(model, build_dir, "qwen3_vl", "qwen3-vl", verify_weights, load_options)
    manifest = runner.buckets.manifests[0] if hasattr(runner, "buckets") else runner.manifest
    vcfg = inner.config.vision_config
    if len(manifest.deepstack) != len(vcfg.deepstack_visual_indexes):
        raise EvoExportError(f"{build_dir} has {len(manifest.deepstack)} DeepStack taps; this model takes "
                             f"{len(vcfg.deepstack_visual_indexes)}")
    encode = encoder(runner, vcfg, model.get_input_embeddings().weight)

    def get_image_features(pixel_values, image_grid_thw=None, **kwargs):
        out = encode(pixel_values, image_grid_thw, "image")
        return BaseModelOutputWithDeepstackFeatures(pooler_output=tuple(out.features),
                                                     deepstack_features=[tuple(t) for t in out.taps])

    def get_video_features(*args, **kwargs):
        raise EvoExportError("attach(): Qwen3-VL videos are not supported by evoexport builds yet; "
                             "send the frames as images")

    def get_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                       attention_mask=None, **kwargs):
        if video_grid_thw is not None:
            get_video_features()
        images = encode.kept("image", kwargs.get("pixel_values"), image_grid_thw)
        return pruned_rope_index(input_ids, mm_token_type_ids, images, attention_mask)

    return install(model, runner, get_image_features, get_video_features, get_rope_index)
