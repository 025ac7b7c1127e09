"""The registry: model presets by name (timm-style: configs as data) and the families that
build them. Family modules register themselves here; nothing here imports a family.

A preset names a model *family* and its full-size configuration. Each family lives in
its own module and knows how to build its tower from the preset, or from a local Hugging
Face checkpoint of that family (whose config.json then wins over the preset's sizes).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..errors import EvoExportError


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    description: str
    vision: dict                     # transformers CLIPVisionConfig keyword arguments
    projector: dict | None = None    # {"out_features", "act", "bias"}; None: bare encoder
    feature_layer: int = -2          # transformers hidden_states index fed to the projector
    select_strategy: str = "default"  # "default": drop CLS from the features (LLaVA)
    preprocess: dict = field(default_factory=dict)
    # the reference checkpoint's preprocessor_config.json, as data (where a converter writes it)
    processor: dict | None = None
    input_size: int | None = None    # pixels fed to the tower where the config's image_size is another (DINOv2)
    prune_defaults: dict = field(default_factory=dict)   # PruneParams fields this model defaults differently
    unit: int = 1                    # patches per side of a prunable token (TowerSpec.unit)


_PRESETS: dict[str, Preset] = {}
_MODULES: set[str] = set()   # the modules that registered presets or families


def register(preset: Preset) -> Preset:
    if preset.name in _PRESETS:
        raise ValueError(f"preset {preset.name!r} registered twice")
    _PRESETS[preset.name] = preset
    _MODULES.add(sys._getframe(1).f_globals["__name__"])
    return preset


def family_modules() -> set[str]:
    """The modules that registered a preset or a family (the layering test keeps every other
    module from importing them)."""
    return set(_MODULES)


def get_preset(name: str) -> Preset:
    try:
        return _PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(_PRESETS))
        raise EvoExportError(f"unknown model {name!r}; known models: {known}") from None


def default_params(model: str):
    """EvoPrune's default parameters for a model: PruneParams' own, with the preset's overrides."""
    from ..prune.selection import PruneParams
    return PruneParams(**get_preset(model).prune_defaults)


def list_presets() -> list[Preset]:
    return [_PRESETS[k] for k in sorted(_PRESETS)]


_FAMILIES: dict = {}


def register_family(name: str, family) -> None:
    """A family module's tower class and loaders (models/base.py: Family), by family name."""
    if name in _FAMILIES:
        raise ValueError(f"family {name!r} registered twice")
    _FAMILIES[name] = family
    _MODULES.add(sys._getframe(1).f_globals["__name__"])


def family_api(preset: Preset):
    try:
        return _FAMILIES[preset.family]
    except KeyError:
        raise EvoExportError(f"model family {preset.family!r} of {preset.name!r} is not registered "
                             f"(known: {', '.join(sorted(_FAMILIES))})") from None
