"""LLaVA family: CLIP ViT vision tower + 2-layer GELU projector (LLaVA-1.5).

The full-size preset is LLaVA-1.5's vision path: CLIP ViT-L/14 at 336 px, features from
the second-to-last layer with CLS dropped (576 tokens), projector 1024 -> 4096 -> 4096.
The tiny presets use the same code path at sizes a 2-core CPU test suite can afford.
"""
from . import Preset, register

# CLIP's preprocessing (openai/clip-vit-large-patch14-336, llava-1.5-7b-hf)
CLIP_PREPROCESS = {
    "resize_shortest_edge": True,
    "resample": "bicubic",
    "center_crop": True,
    "rescale": 1 / 255,
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
}

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
