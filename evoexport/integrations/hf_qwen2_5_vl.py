"""Feed a build's pruned image features to a transformers Qwen2.5-VL model.

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(CKPT)
    evoexport.integrations.hf_llava.attach(model, "graphs/qwen2.5-vl-keep0.5")   # or this module's attach
    image = image.resize((S, S), Image.BICUBIC)       # the build's size (below)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    inputs = shrink_image_tokens(inputs, model)       # grid/4 <|image_pad|> -> the build's K
    out = model.generate(**inputs, max_new_tokens=64)

What attach() changes, and nothing else (the scatter of features into the prompt, the
language model and generate() stay transformers' own):
  - `get_image_features` runs the build on the processor's patches (turned back into the
    S x S images they came from) and returns K features per image;
  - `get_rope_index` gives the image's K tokens their mRoPE positions at the kept units'
    original (row, col): (s, s + row, s + col) for an image starting at position s, and
    text after the image resumes at s + max(h, w) / 2, exactly where the unpruned prompt
    resumes. rope_deltas (max position + 1 - sequence length) then carry decoding on.

Image size: a build has one grid. An image whose processor grid is not the build's
(another size or aspect ratio: smart_resize keeps the aspect ratio) is refused with one
error telling the size to resize to; `evoexport.inputs.images` resizes as the manifest
says. Videos are not routed through a build yet (their two-frame temporal patches and
time positions differ); a prompt with video placeholders is refused.
"""
from __future__ import annotations

import itertools

import torch

from ..errors import EvoExportError
from ..manifest import Manifest
from .common import features_from_build


def _vision_sha256(model, manifest: Manifest) -> str:
    from ..models.loader import untrained_tower
    tower = untrained_tower(manifest)
    tower.visual.load_state_dict(_inner(model).visual.state_dict())
    return tower.state_sha256()


def _inner(model):
    return getattr(model, "model", model)


def images_from_patches(patches: torch.Tensor, grid_thw: torch.Tensor, patch: int, merge: int, temporal: int):
    """The processor's flattened patches of still images back to [N, 3, H, W] (inverse of
    models.qwen2_5_vl.flatten_patches; the first of the repeated frames)."""
    images, start = [], 0
    for t, gh, gw in grid_thw.tolist():
        if t != 1:
            raise EvoExportError("attach(): a multi-frame image grid (a video) is not supported by a build yet")
        n = gh * gw
        x = patches[start:start + n].reshape(gh // merge, gw // merge, merge, merge, 3, temporal, patch, patch)
        x = x[:, :, :, :, :, 0].permute(4, 0, 2, 5, 1, 3, 6)        # [3, gh/m, m, p, gw/m, m, p]
        images.append(x.reshape(3, gh * patch, gw * patch))
        start += n
    return torch.stack(images)


def attach(model, build_dir, verify_weights: bool = True, **load_options):
    """Make `model` (Qwen2_5_VLForConditionalGeneration) take its image features and their
    mRoPE positions from a build of the qwen2.5-vl family."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from ..runtime.runner import load

    inner = _inner(model)
    if getattr(inner.config, "model_type", None) != "qwen2_5_vl" or not hasattr(inner, "visual"):
        raise EvoExportError(f"attach() for Qwen2.5-VL takes Qwen2_5_VLForConditionalGeneration, got {type(model).__name__}")
    runner = load(build_dir, **load_options)
    manifest = runner.manifest.require_images("attach()", build_dir)
    if manifest.family != "qwen2.5-vl":
        raise EvoExportError(f"{build_dir} is a {manifest.family} build; this model needs a qwen2.5-vl build")
    if verify_weights and _vision_sha256(model, manifest) != manifest.weights_sha256:
        raise EvoExportError(f"{build_dir} was built from other vision weights than this model's "
                             "(sha256 differs); build it from this model's checkpoint")
    vcfg = inner.config.vision_config
    size, grid = manifest.image_size, manifest.tower["grid"]
    embed = model.get_input_embeddings().weight
    last: dict = {}

    def run_build(pixel_values, image_grid_thw):
        """(features [N, K, D], indices [N, K]) of the prompt's images; the same tensor of
        patches is run once (generate() asks for positions before features)."""
        if last.get("key") is pixel_values:
            return last["out"]
        if image_grid_thw is None:
            raise EvoExportError("attach(): image_grid_thw is needed with pixel_values")
        want = [1, grid * vcfg.spatial_merge_size, grid * vcfg.spatial_merge_size]
        for row in image_grid_thw.tolist():
            if row != want:
                raise EvoExportError(f"attach(): an image has patch grid {row[1]}x{row[2]}, the build takes "
                                     f"{want[1]}x{want[2]} ({size}x{size} px); resize images to {size}x{size} "
                                     "before the processor")
        images = images_from_patches(pixel_values.float(), image_grid_thw, vcfg.patch_size,
                                     vcfg.spatial_merge_size, vcfg.temporal_patch_size)
        out = features_from_build(runner, images, embed)
        last.update(key=pixel_values, out=out)
        return out

    def get_image_features(pixel_values, image_grid_thw=None, **kwargs):
        features, _ = run_build(pixel_values, image_grid_thw)
        return BaseModelOutputWithPooling(pooler_output=tuple(features))

    def get_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None, attention_mask=None, pixel_values=None, **kwargs):
        if video_grid_thw is not None:
            raise EvoExportError("attach(): videos are not routed through a build yet; pass images")
        if pixel_values is None and last.get("out") is None:
            raise EvoExportError("attach(): mRoPE positions need the image features first")
        _, indices = run_build(pixel_values, image_grid_thw) if pixel_values is not None else last["out"]
        return pruned_rope_index(input_ids, mm_token_type_ids, indices, grid,
                                 grid * vcfg.spatial_merge_size, vcfg.spatial_merge_size, attention_mask)

    inner.get_image_features = get_image_features
    inner.get_rope_index = get_rope_index
    model.evoexport_runner = runner
    model.evoexport_image_tokens = manifest.tokens_per_image
    return model


def pruned_rope_index(input_ids, mm_token_type_ids, indices, unit_grid: int, patch_grid: int, merge: int,
                      attention_mask=None):
    """transformers' get_rope_index for images that kept K units: (position_ids [3, B, L],
    rope_deltas [B, 1]). Image i's tokens sit at (s, s + row, s + col) of its kept units;
    text resumes at s + patch_grid / merge, as in the unpruned prompt."""
    if mm_token_type_ids is None:
        raise EvoExportError("attach(): mm_token_type_ids (from the processor) are needed for mRoPE positions")
    b, n = input_ids.shape
    position_ids = torch.zeros(3, b, n, dtype=input_ids.dtype, device=input_ids.device)
    images = iter(indices.to(input_ids.device))
    deltas = []
    for row in range(b):
        types = mm_token_type_ids[row]
        keep = attention_mask[row].bool() if attention_mask is not None else torch.ones_like(types, dtype=torch.bool)
        types = types[keep]
        pieces, pos = [], 0
        for kind, group in itertools.groupby(types.tolist()):
            length = len(list(group))
            if kind == 0:
                pieces.append(torch.arange(length, device=input_ids.device).expand(3, -1) + pos)
                pos += length
                continue
            if kind != 1:
                raise EvoExportError("attach(): videos are not routed through a build yet; pass images")
            kept = next(images, None)
            if kept is None or len(kept) != length:
                raise EvoExportError(f"attach(): an image has {length} placeholder tokens but the build gives "
                                     f"{indices.shape[1]}; call shrink_image_tokens(inputs, model) first")
            r, c = kept // unit_grid, kept % unit_grid
            pieces.append(torch.stack([torch.zeros_like(r), r, c]) + pos)
            pos += patch_grid // merge
        positions = torch.cat(pieces, dim=1)
        position_ids[:, row, keep] = positions
        deltas.append(int(positions.max()) + 1 - len(types))
    return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def shrink_image_tokens(inputs: dict, model, tokens: int | None = None) -> dict:
    """Processor output with each image's run of <|image_pad|> cut to the build's K
    (input_ids, mm_token_type_ids, attention_mask; batches left-padded again)."""
    k = tokens or getattr(model, "evoexport_image_tokens", None)
    if not k:
        raise EvoExportError("shrink_image_tokens: attach() the build first, or give tokens=K")
    image_id = model.config.image_token_id
    pad = getattr(model.config, "pad_token_id", None) or 0
    ids_rows, type_rows = [], []
    types_all = inputs.get("mm_token_type_ids", torch.zeros_like(inputs["input_ids"]))
    masks = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    for ids, types, mask in zip(inputs["input_ids"], types_all, masks):
        ids, types = ids[mask.bool()], types[mask.bool()]
        keep, run = [], 0
        for tok in ids.tolist():
            run = run + 1 if tok == image_id else 0
            keep.append(tok != image_id or run <= k)
        keep = torch.tensor(keep, dtype=torch.bool)
        ids_rows.append(ids[keep])
        type_rows.append(types[keep])
    width = max(len(r) for r in ids_rows)

    def left_pad(rows, value):
        return torch.stack([torch.cat([torch.full((width - len(r),), value, dtype=r.dtype), r]) for r in rows])
    out = dict(inputs)
    out["input_ids"] = left_pad(ids_rows, pad)
    out["mm_token_type_ids"] = left_pad(type_rows, 0)
    out["attention_mask"] = left_pad([torch.ones(len(r), dtype=torch.long) for r in ids_rows], 0)
    return out
