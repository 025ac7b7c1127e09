"""Vision towers by preset name: the registry (registry.py), the interface every family
implements (base.py), one module per family (clip, siglip, dinov2, qwen2_5_vl, qwen3_vl, vit_digits), which
register themselves on import, and the loader (loader.py), which finds them through the
registry."""
from .registry import Preset, default_params, get_preset, list_presets, register  # noqa: F401

from . import clip, dinov2, qwen2_5_vl, qwen3_vl, siglip, vit_digits  # noqa: E402,F401  (each registers its family and presets)
from .clip import CLIPTower  # noqa: E402,F401
from .loader import load_tower, spec_for, tower_from_manifest  # noqa: E402,F401
