"""A small CLIP-architecture ViT trained on scikit-learn's digits: proof that EvoPrune's
scoring keeps the informative tokens of a *trained* model (random weights cannot show it).

Same tower code path as the LLaVA presets (transformers' CLIPVisionModel, CLS kept in the
features so a linear head can classify from it). 8x8 digits are upsampled 4x to 32x32, so
each 4x4 patch is one original pixel: 64 patch tokens, many of them blank background.
Weights: shipped with the package, in data/digits-vit (made by measure/digits_train.py).
"""
from __future__ import annotations

from .registry import Preset, register

# digits arrays go through digits_pixels; an image file is resized whole to 32x32
DIGITS_PREPROCESS = {"processor": "digits", "pad_to_square": False, "resize": {"height": 32, "width": 32},
                     "crop": None, "resample": "bilinear", "rescale": 1 / 255, "mean": [0.5, 0.5, 0.5],
                     "std": [0.5, 0.5, 0.5]}

DIGITS_VIT = register(Preset(
    name="digits-vit",
    family="llava",
    description="8-layer CLIP ViT for scikit-learn digits (32 px, 8x8 patches of 4 px, CLS kept for a linear head)",
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                image_size=32, patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    projector=None,
    feature_layer=-1,
    select_strategy="full",
    preprocess=DIGITS_PREPROCESS,
    # The spatial term was tuned on real photos (docs/evoprune.md). On these 8x8-pixel digits
    # it moved keep-0.5 accuracy by one to three digits of 450 either way (fp32 +1, int8 on
    # OpenVINO -3): noise, so this model keeps the scoring its results were measured with.
    prune_defaults={"spatial_weight": 0.0},
))
