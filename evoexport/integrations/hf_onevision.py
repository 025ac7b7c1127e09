"""LLaVA-OneVision with a pruned build: transformers' anyres packing, for tiles that kept
only some of their tokens.

transformers' `LlavaOnevisionModel.pack_image_features` lays each image out as: the base
view's tokens, then the tiles' tokens on one big grid (rows x cols tiles of g x g
patches), unpadded to the image's aspect ratio, with `image_newline` closing every grid
row. A pruned tile has K tokens whose positions on its own g x g grid are the build's
`indices`, so every kept token still has a place on the big grid:
  - the base view keeps its K tokens in raster order;
  - a tile token goes to (tile_row*g + r, tile_col*g + c), with (r, c) = divmod(index, g);
  - unpadding keeps the same rows and columns as transformers (its own `unpad_image`,
    applied to the grid's coordinates), and the kept tokens on them;
  - tokens follow row by row, left to right, and every row that survives unpadding ends in
    a newline, even if pruning left it empty, so the layout stays the same at every keep.
At keep 1.0 this is transformers' packing exactly (tested). The `anyres_max_N` resize is
bilinear interpolation of a full grid, undefined with holes: a pruned build that would need
it is refused with one error (a keep-1.0 build takes transformers' own path).
"""
from __future__ import annotations

import math

import torch

from ..errors import EvoExportError


def tiles_per_image(config, pixel_values, image_sizes, batch_num_images=None) -> tuple[torch.Tensor, list[int]]:
    """The tiles of every image as one batch, and how many belong to each (transformers'
    rule; padding tiles are dropped)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    if batch_num_images is None:
        patching = [True] * len(image_sizes)
    else:
        patching = [n == 1 for n in batch_num_images for _ in range(n)]
    counts = [image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                        patch_size=config.vision_config.image_size) if p else 1
              for size, p in zip(image_sizes, patching)]
    if isinstance(pixel_values, (list, tuple)) or pixel_values.dim() == 5:
        pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, counts)], dim=0)
    return pixel_values, counts


def _tile_layout(config, indices: torch.Tensor, image_size, vision_aspect_ratio: str, full: bool):
    """Where the kept tile tokens go: (which of them survive unpadding [T-1, K], their and
    the newlines' order, the grid's rows, its width), or None where transformers' own path
    must pack (keep 1.0 and the anyres_max resize)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

    g = config.vision_config.image_size // config.vision_config.patch_size
    rows, cols = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
    coords = torch.stack(torch.meshgrid(torch.arange(rows * g), torch.arange(cols * g), indexing="ij"))
    kept = unpad_image(coords, image_size)                        # [2, H', W']: the rows and columns that stay
    height, width = kept.shape[1:]
    top, left = int(kept[0, 0, 0]), int(kept[1, 0, 0])
    limit = int(vision_aspect_ratio.removeprefix("anyres_max_"))
    if math.sqrt(height * width / (limit * g * g)) > 1.1:
        if full:
            return None
        raise EvoExportError(f"this image needs LLaVA-OneVision's {vision_aspect_ratio} resize of its tile grid, "
                             "which a pruned build cannot do (bilinear over a grid with holes); "
                             "use fewer tiles (image_grid_pinpoints) or a keep-1.0 build")
    tile = torch.arange(indices.shape[0] - 1).unsqueeze(1)
    r, c = indices[1:] // g, indices[1:] % g
    grid_row, grid_col = (tile // cols) * g + r - top, (tile % cols) * g + c - left
    inside = (grid_row >= 0) & (grid_row < height) & (grid_col >= 0) & (grid_col < width)
    # order key: row by row, the newline last in its row (column `width`)
    token_keys = (grid_row * (width + 1) + grid_col)[inside]
    newline_keys = torch.arange(height) * (width + 1) + width
    return inside, torch.cat([token_keys, newline_keys]).argsort(stable=True), height


def packed_length(config, indices: torch.Tensor, image_size, vision_aspect_ratio: str, full: bool) -> int | None:
    """How many placeholder tokens one image packs to (indices [T, K] of its base view and
    tiles); None where transformers' own count holds (keep 1.0 and the anyres_max resize)."""
    if indices.shape[0] == 1:
        return indices.shape[1] + 1
    layout = _tile_layout(config, indices, image_size, vision_aspect_ratio, full)
    if layout is None:
        return None
    inside, _, height = layout
    return indices.shape[1] + int(inside.sum()) + height


def pack_pruned(config, image_newline, features: torch.Tensor, indices: torch.Tensor, image_size,
                vision_aspect_ratio: str, full: bool) -> torch.Tensor | None:
    """One image: features [T, K, D] and indices [T, K] of its base view and tiles -> the
    packed sequence [L, D] that its placeholder tokens take (None as in `packed_length`)."""
    newline = image_newline.to(features.dtype)
    if features.shape[0] == 1:
        return torch.cat([features[0], newline[None]], dim=0)
    layout = _tile_layout(config, indices, image_size, vision_aspect_ratio, full)
    if layout is None:
        return None
    inside, order, height = layout
    tokens = torch.cat([features[1:][inside], newline.expand(height, -1)], dim=0)
    return torch.cat([features[0], tokens[order]], dim=0)


def _same(a, b) -> bool:
    """Tensors by identity (their version counters are compared beside them), the rest by value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return a == b


def attach_onevision(model, inner, runner) -> None:
    """Replace `inner.get_image_features` with the build's features, packed as above."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from .common import features_from_build

    full = runner.manifest.tokens_per_image == runner.manifest.num_patches
    last = {}   # the latest call: shrink_image_tokens counts with it, generate() then reuses it

    def get_image_features(pixel_values, image_sizes, vision_feature_layer=None, vision_feature_select_strategy=None,
                           vision_aspect_ratio=None, batch_num_images=None, **kwargs):
        aspect = vision_aspect_ratio or getattr(inner.config, "vision_aspect_ratio", "anyres_max_9")
        # the same tensors, unmodified since (version counters), with the same options: same answer
        key = (pixel_values, pixel_values._version, image_sizes, getattr(image_sizes, "_version", None), aspect,
               batch_num_images)
        if "key" in last and all(_same(a, b) for a, b in zip(last["key"], key)):
            return BaseModelOutputWithPooling(pooler_output=last["packed"])
        tiles, counts = tiles_per_image(inner.config, pixel_values, image_sizes, batch_num_images)
        features, indices = features_from_build(runner, tiles, model.get_input_embeddings().weight)
        packed = []
        for f, i, size in zip(features.split(counts), indices.split(counts), image_sizes):
            one = pack_pruned(inner.config, inner.image_newline, f, i, size, aspect, full)
            if one is None:    # keep 1.0 and the anyres resize: transformers' packing of the same features
                one = inner.pack_image_features([f], size[None], image_newline=inner.image_newline,
                                                vision_aspect_ratio=aspect)[0][0]
            packed.append(one)
        last.update(key=key, packed=packed)
        return BaseModelOutputWithPooling(pooler_output=packed)

    inner.get_image_features = get_image_features
