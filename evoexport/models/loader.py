"""Make a tower by preset name: the spec checked before any weight is touched, then the
family's tower with seeded random weights or a checkpoint's. Families are found through the
registry; this module imports none of them."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..errors import EvoExportError, OptionError
from ..manifest import Manifest
from ..names import plain_size, size_hw, valid_size
from .base import BaseTower, TowerSpec
from .registry import family_api, get_preset


def spec_for(model: str, checkpoint: str | Path | None = None, image_size: int | None = None,
             pad_to_square: bool | None = None, video: bool = False) -> TowerSpec:
    """The tower's spec, checked before any weight is touched. `image_size` (families whose
    tower is resizable): the input size, a multiple of the patch size. The preprocessing
    recipe is fitted to the input size (scaled where the processor's crop is another size);
    `pad_to_square` overrides the recipe's (LLaVA-1.5's original `image_aspect_ratio: pad`)."""
    from dataclasses import replace

    from ..inputs.images import fit_recipe
    from .spec_check import check_spec
    preset = get_preset(model)
    family = family_api(preset)
    if image_size is not None and not valid_size(image_size):
        raise OptionError("image_size", f"must be a positive number of pixels, got {image_size!r}")
    if image_size is not None:
        height, width = size_hw(image_size)
        if height != width and not family.tower.any_grid:
            raise OptionError("image_size", f"{height}x{width}: {model} takes square images (non-square grids: "
                                            "the qwen models and dinov2)")
        image_size = plain_size(height, width)
    ckpt = Path(checkpoint).expanduser().resolve() if checkpoint else None
    if image_size is not None and not family.tower.resizable:
        spec = family.spec_from_checkpoint(preset, ckpt) if ckpt else family.spec_from_preset(preset)
        if image_size != spec.vision["image_size"]:
            raise OptionError("image_size", f"is fixed: {model} runs at its own {spec.vision['image_size']} px "
                                            "(other input sizes: the dinov2 model)")
    else:
        kwargs = {"image_size": image_size} if image_size is not None else {}
        spec = (family.spec_from_checkpoint(preset, ckpt, **kwargs) if ckpt
                else family.spec_from_preset(preset, **kwargs))
    where = f"{ckpt}/config.json" if ckpt else f"preset {model}"
    check_spec(spec, where + (f" at {image_size} px" if image_size is not None else ""))
    size = spec.input_size or spec.vision["image_size"]
    frames = 1
    if video:   # a tower whose patch convolution spans frames takes them as one input
        frames = spec.vision.get("temporal_patch_size", 1)
        if frames < 2:
            raise OptionError("video", f"{model} encodes one frame at a time: its video frames are images, so "
                                       "build it without --video (video builds are for qwen2.5-vl)")
    return replace(spec, preprocess=fit_recipe(spec.preprocess, size, pad_to_square), frames=frames)


def load_tower(model: str, checkpoint: str | Path | None = None, seed: int = 0,
               expect_sha256: str | None = None, quiet: bool = False, image_size: int | None = None,
               pad_to_square: bool | None = None, video: bool = False) -> BaseTower:
    """Build the tower of preset `model`, with weights from `checkpoint` or seeded random ones."""
    family = family_api(get_preset(model))
    if checkpoint is None:
        spec = spec_for(model, None, image_size, pad_to_square, video)
        torch.manual_seed(seed)
        tower = family.tower(spec)
        tower.weights_info = {"weights": "random", "weights_seed": seed, "checkpoint": None}
        if not quiet:
            print(f"WARNING: no --checkpoint given: {model} uses seeded RANDOM weights (seed {seed}). "
                  "Shapes and speed are real; the features mean nothing.", file=sys.stderr)
    else:
        ckpt = Path(checkpoint).expanduser().resolve()
        spec = spec_for(model, ckpt, image_size, pad_to_square, video)
        tower = family.tower(spec)
        family.load_weights(tower, ckpt)
        tower.weights_info = {"weights": "checkpoint", "weights_seed": None, "checkpoint": str(ckpt)}
    tower.weights_info["weights_sha256"] = tower.state_sha256()
    if expect_sha256 and tower.weights_info["weights_sha256"] != expect_sha256:
        raise EvoExportError("the weights loaded now differ from the ones the build was made from "
                             f"(sha256 {tower.weights_info['weights_sha256'][:12]} != {expect_sha256[:12]})")
    return tower


def tower_from_manifest(manifest: Manifest) -> BaseTower:
    """A build's tower in PyTorch: its model, weights (checked against the manifest's sha256)
    and input size."""
    return load_tower(manifest.model, manifest.checkpoint, seed=manifest.weights_seed, image_size=manifest.image_size,
                      expect_sha256=manifest.weights_sha256, quiet=True, pad_to_square=manifest.pad_to_square,
                      video=manifest.frames_per_input > 1)


def untrained_tower(manifest: Manifest) -> BaseTower:
    """A build's tower architecture with no weights loaded (a model's own weights go in
    next, to compare their sha256 with the build's)."""
    from .base import TowerSpec
    t = manifest.tower
    spec = TowerSpec(vision=t["vision"], projector=t["projector"], feature_layer=t["feature_layer"],
                     select_strategy=t["select_strategy"], preprocess=manifest.preprocess,
                     input_size=t["image_size"], unit=t.get("unit", 1), frames=manifest.frames_per_input)
    return family_api(get_preset(manifest.model)).tower(spec)
