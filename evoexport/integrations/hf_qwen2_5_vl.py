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

Image size: a one-grid build takes images of its grid; an image whose processor grid is
another (smart_resize keeps the aspect ratio) is refused with one error telling the size
to resize to. A bucketed build (`build --grids`) takes each image at the grid the processor
gave it, with that grid's K, its rows and columns in mRoPE and text resuming at
max(rows, cols); an image of a grid the build does not hold runs at the grid chosen for its
size, resized, with a warning (give the processor the build's max_pixels: `evoexport info`).

Videos need a video build (`build --model qwen2.5-vl --video`): a temporal patch holds two
different frames, so the 3-D patch convolution is unfolded (its input is the two frames on
the channel axis) instead of folded as for stills. Qwen2.5-VL's encoder attends within
one temporal patch, so each is run as one input of the batch and keeps its own K units.
`get_video_features` gives each video T x K features (temporal patch by temporal patch,
kept units in raster order), and `get_rope_index` puts a kept unit of temporal patch t at
(s + t * tokens_per_second * second_per_grid_t, s + row, s + col), transformers' own time
positions; text resumes at s + max(h, w) / 2, as transformers does. `shrink_image_tokens`
cuts each video's run to T x K. A video build takes stills as the frame twice, which is
what the image processor makes of them.

A temporal video build (`build --video --temporal G:KEEP`) takes a video's temporal patches
in groups of G: the first of each group keeps Ka units, the later ones Kl, so a video has
T/G x (Ka + (G-1) Kl) tokens, each at its own temporal patch's time position. T must be a
multiple of G (2G frames); such a build takes videos only.
"""
from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import numpy as np
import torch

from .. import names
from ..errors import EvoExportError
from ..manifest import Manifest
from .common import outputs_from_build


def _vision_sha256(model, manifest: Manifest) -> str:
    from ..models.loader import untrained_tower
    tower = untrained_tower(manifest)
    tower.visual.load_state_dict(_inner(model).visual.state_dict())
    return tower.state_sha256()


def _inner(model):
    return getattr(model, "model", model)


def images_from_patches(patches: torch.Tensor, grid_thw: torch.Tensor, patch: int, merge: int, temporal: int,
                        frames: int = 1):
    """The processor's flattened patches back to pixels (inverse of
    models.qwen_processor.flatten_patches): stills [N, 3, H, W] (the first of the repeated
    frames), or with `frames` = `temporal` (a video build) every temporal patch of every
    grid as its frames on the channel axis [sum of T, 3 * temporal, H, W]. Images of several
    sizes: use image_list_from_patches."""
    return torch.cat(image_list_from_patches(patches, grid_thw, patch, merge, temporal, frames))


def image_list_from_patches(patches: torch.Tensor, grid_thw: torch.Tensor, patch: int, merge: int, temporal: int,
                            frames: int = 1) -> list:
    """images_from_patches, one [T, C, H, W] per grid (each at its own size)."""
    images, start = [], 0
    for t, gh, gw in grid_thw.tolist():
        if t != 1 and frames == 1:
            raise EvoExportError("attach(): a multi-frame grid (a video) needs a video build (build --video)")
        n = gh * gw
        x = patches[start:start + t * n].reshape(t, gh // merge, gw // merge, merge, merge, 3, temporal, patch, patch)
        x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)            # [t, T, 3, gh/m, m, p, gw/m, m, p]
        x = x.reshape(t, temporal * 3, gh * patch, gw * patch)
        images.append(x if frames > 1 else x[:, :3])
        start += t * n
    return images


class Encoded(NamedTuple):
    """The build's outputs for a prompt's images (or temporal patches), image by image."""
    features: object    # [K_i, D] each ([N, K, D] from a one-grid build)
    kept: object        # [K_i] each: the kept units' positions in the image's grid
    grids: list         # the grid (merge units) each image ran at
    taps: list          # each DeepStack tap: [K_i, D] per image (Qwen3-VL; else none)
    patches: list = []  # videos: each token's temporal patch [n] per video


def video_tokens(manifest: Manifest, pairs: int) -> int:
    """A video's tokens from a video build: K per temporal patch, or Ka + (G-1) Kl per group
    of G patches of a temporal build (a last group that would not fill counts whole)."""
    if manifest.temporal:
        return -(-pairs // manifest.group) * manifest.features["shape"][1]
    return pairs * manifest.tokens_per_image


def video_units(runner, pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One video's temporal patches [T, 6, H, W] through a video build: (features [n, D],
    each token's unit in the grid [n], each token's temporal patch [n]), patch by patch; a
    temporal build's groups of G patches in order (T a multiple of G)."""
    m, t = runner.manifest, len(pairs)
    g, k = m.group, m.frames_per_input
    if t % g:
        raise EvoExportError(f"a video of {t} temporal patches ({k * t} frames) does not fill groups of {g}: this "
                             f"temporal build takes a multiple of {k * g} frames")
    x = pairs.detach().float()
    x = x if runner.backend.name == "torch" else np.ascontiguousarray(x.cpu().numpy())
    out = runner.arrays(x.reshape(t // g, g, *x.shape[1:]) if m.temporal else x)
    features, kept = out[names.FEATURES], out[names.INDICES]
    frames = out[names.FRAMES] if m.temporal else np.zeros_like(kept)
    patch = frames + g * np.arange(len(kept))[:, None]
    return features.reshape(-1, features.shape[-1]), kept.reshape(-1), patch.reshape(-1)


class _Encoder:
    """The build on a prompt's images or videos, each tensor run once (generate() asks for
    positions before features)."""

    def __init__(self, runner, vcfg, embed):
        self.runner, self.vcfg, self.embed = runner, vcfg, embed
        self.last: dict = {}

    def __call__(self, pixel_values, grid_thw, kind: str) -> Encoded:
        if self.last.get(kind, (None,))[0] is pixel_values:
            return self.last[kind][1]
        if grid_thw is None:
            raise EvoExportError(f"attach(): {kind}_grid_thw is needed with the {kind}'s pixel values")
        out = self.encode(pixel_values.float(), grid_thw, kind)
        self.last[kind] = (pixel_values, out)
        return out

    def encode(self, pixel_values, grid_thw, kind: str) -> Encoded:
        m, grid = self.vcfg.spatial_merge_size, self.runner.manifest.grid
        if kind == "image" and self.runner.manifest.temporal:
            raise EvoExportError("attach(): a temporal build takes videos only (its temporal patches in groups of "
                                 f"{self.runner.manifest.group}); give images to an image or video build")
        (rows, cols), (height, width) = grid, self.runner.manifest.image_hw
        for row in grid_thw.tolist():
            if row[1:] != [rows * m, cols * m]:
                raise EvoExportError(f"attach(): a{'n' * (kind == 'image')} {kind} has patch grid {row[1]}x{row[2]}, "
                                     f"the build takes {rows * m}x{cols * m} ({height}x{width} px); resize {kind}s "
                                     f"to {width}x{height} (width x height) before the processor, or build with "
                                     "--grids (aspect-ratio buckets)")
        v = self.vcfg
        if kind == "video":
            return self._videos(image_list_from_patches(pixel_values, grid_thw, v.patch_size, m,
                                                        v.temporal_patch_size, self.runner.manifest.frames_per_input))
        x = images_from_patches(pixel_values, grid_thw, v.patch_size, m, v.temporal_patch_size,
                                self.runner.manifest.frames_per_input)     # a still: the processor's frame twice
        features, kept, taps = outputs_from_build(self.runner, x, self.embed)
        return Encoded(features, kept, [grid] * len(x), taps)

    def _videos(self, videos: list) -> Encoded:
        """Each video's tokens, temporal patch by temporal patch (video_units)."""
        outs = [video_units(self.runner, x) for x in videos]
        device = self.embed.device
        return Encoded([torch.from_numpy(f).to(device, self.embed.dtype) for f, _, _ in outs],
                       [torch.from_numpy(k).to(device) for _, k, _ in outs],
                       [self.runner.manifest.grid] * len(outs), [], [torch.from_numpy(p) for _, _, p in outs])

    def kept(self, kind: str, pixel_values, grid_thw) -> list | None:
        """(kept indices, grid[, each token's temporal patch]) of each of the prompt's images or
        videos (None: none)."""
        if pixel_values is not None:
            out = self(pixel_values, grid_thw, kind)
        elif grid_thw is None:
            return None
        elif kind not in self.last:
            raise EvoExportError("attach(): mRoPE positions need the image and video features first")
        else:
            out = self.last[kind][1]
        return list(zip(out.kept, out.grids, *([out.patches] if kind == "video" else [])))


class _BucketEncoder(_Encoder):
    """A bucketed build (build --grids): each image at the grid the processor gave it where
    the build holds it; otherwise at the grid chosen for its size (runtime/buckets.py), its
    pixels resized to it, with a warning that says how much its aspect ratio moved."""

    def encode(self, pixel_values, grid_thw, kind: str) -> Encoded:
        import warnings
        if kind != "image":
            raise EvoExportError("attach(): bucketed builds take images; videos need a video build (build --video)")
        v = self.vcfg
        images = image_list_from_patches(pixel_values, grid_thw, v.patch_size, v.spatial_merge_size,
                                         v.temporal_patch_size)
        results = self.runner.run_arrays([x[0].cpu().numpy() for x in images])
        for n, r in enumerate(results):
            if not r.exact:
                warnings.warn(f"attach(): image {n} ({images[n].shape[-1]}x{images[n].shape[-2]} px) is not at a grid "
                              f"of the build; it ran resized to grid {r.grid} (aspect ratio moved "
                              f"{100 * r.aspect_change:.1f}%)", stacklevel=2)
        like = lambda a: torch.as_tensor(a).to(self.embed.device, self.embed.dtype)  # noqa: E731
        taps = [[like(r.deepstack[j]) for r in results] for j in range(len(results[0].deepstack))]
        return Encoded([like(r.features) for r in results],
                       [torch.as_tensor(r.indices).to(self.embed.device) for r in results],
                       [r.grid for r in results], taps)


def attach(model, build_dir, verify_weights: bool = True, **load_options):
    """Make `model` (Qwen2_5_VLForConditionalGeneration) take its image (and, with a video
    build, video) features and their mRoPE positions from a build of the qwen2.5-vl family."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    inner = _inner(model)
    runner = open_build(model, build_dir, "qwen2_5_vl", "qwen2.5-vl", verify_weights, load_options)
    vcfg = inner.config.vision_config
    encode = encoder(runner, vcfg, model.get_input_embeddings().weight)

    def get_image_features(pixel_values, image_grid_thw=None, **kwargs):
        return BaseModelOutputWithPooling(pooler_output=tuple(encode(pixel_values, image_grid_thw, "image").features))

    def get_video_features(pixel_values_videos, video_grid_thw=None, **kwargs):
        return BaseModelOutputWithPooling(pooler_output=tuple(encode(pixel_values_videos, video_grid_thw,
                                                                     "video").features))

    def get_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None, attention_mask=None, pixel_values=None, **kwargs):
        images = encode.kept("image", pixel_values, image_grid_thw)
        videos = _video_times(encode.kept("video", kwargs.get("pixel_values_videos"), video_grid_thw),
                              second_per_grid_ts, vcfg.tokens_per_second)
        return pruned_rope_index(input_ids, mm_token_type_ids, images, attention_mask, videos=videos)

    return install(model, runner, get_image_features, get_video_features, get_rope_index)


def encoder(runner, vcfg, embed) -> _Encoder:
    """The encoder wrapper of a build: one grid, or a bucketed build's grids."""
    return (_BucketEncoder if hasattr(runner, "buckets") else _Encoder)(runner, vcfg, embed)


def install(model, runner, get_image_features, get_video_features, get_rope_index):
    """`model` with these in place of its own, and the build recorded on it (shrink_image_tokens
    reads its K)."""
    inner = _inner(model)
    inner.get_image_features = get_image_features
    inner.get_video_features = get_video_features
    inner.get_rope_index = get_rope_index
    model.evoexport_runner = runner
    if hasattr(runner, "buckets"):    # K depends on the grid each image runs at
        patch = inner.config.vision_config.patch_size
        model.evoexport_image_tokens = lambda t, gh, gw: runner.tokens_for(gh * patch, gw * patch)
    else:
        model.evoexport_image_tokens = runner.manifest.tokens_per_image
        model.evoexport_video_tokens = functools.partial(video_tokens, runner.manifest)
    return model


def open_build(model, build_dir, model_type: str, family: str, verify_weights: bool, load_options: dict):
    """The build's runner, once `model` is a transformers Qwen model of `model_type` and the
    build an image or video build of `family` made from the model's own vision weights."""
    from .. import load

    inner = _inner(model)
    if getattr(inner.config, "model_type", None) != model_type or not hasattr(inner, "visual"):
        raise EvoExportError(f"attach() for {family} takes its ForConditionalGeneration model, got "
                             f"{type(model).__name__}")
    runner = load(build_dir, **load_options)     # a bucketed build: a BucketRunner
    manifest = runner.buckets.manifests[0] if hasattr(runner, "buckets") else runner.manifest
    # temporal builds: of frame pairs (a video build) only
    manifest.require_images(f"attach() for {family}", build_dir, clips=manifest.frames_per_input > 1, pairs=True)
    if manifest.family != family:
        raise EvoExportError(f"{build_dir} is a {manifest.family} build; this model needs a {family} build")
    if verify_weights and _vision_sha256(model, manifest) != manifest.weights_sha256:
        raise EvoExportError(f"{build_dir} was built from other vision weights than this model's "
                             "(sha256 differs); build it from this model's checkpoint")
    return runner


def _video_times(kept, second_per_grid_ts, tokens_per_second):
    """Each video's (kept indices [n], each token's time position [n], grid) as transformers
    times a temporal patch t: t * tokens_per_second * second_per_grid_t, rounded down.
    `kept`: each video's (kept indices, grid, each token's temporal patch)."""
    if kept is None:
        return []
    seconds = second_per_grid_ts.tolist() if second_per_grid_ts is not None else [1] * len(kept)
    return [(k, (patch * (tokens_per_second * s)).long(), grid) for (k, grid, patch), s in zip(kept, seconds)]


def pruned_rope_index(input_ids, mm_token_type_ids, images, attention_mask=None, videos=()):
    """transformers' get_rope_index for images that kept some of their units, and videos whose
    temporal patches kept some of theirs: (position_ids [3, B, L], rope_deltas [B, 1]).
    `images`: each image's (kept indices [K_i], Grid) in merge units; `videos`: each video's
    (kept [n], each token's time [n], Grid). Image i's tokens sit at (s, s + row, s + col) of
    its kept units, a video's at (s + time, s + row, s + col); text resumes at
    s + max(rows, cols), as in the unpruned prompt."""
    if mm_token_type_ids is None:
        raise EvoExportError("attach(): mm_token_type_ids (from the processor) are needed for mRoPE positions")
    b, n = input_ids.shape
    position_ids = torch.zeros(3, b, n, dtype=input_ids.dtype, device=input_ids.device)
    media = {1: iter([(k, torch.zeros_like(k), grid) for k, grid in (images or [])]),
             2: iter(videos)}
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
            kept, times, grid = next(media[kind], (None, None, None))
            if kept is None or kept.numel() != length:
                what = "an image" if kind == 1 else "a video"
                raise EvoExportError(f"attach(): {what} has {length} placeholder tokens but the build gives "
                                     f"{'none' if kept is None else kept.numel()}; call shrink_image_tokens(inputs, "
                                     "model) first")
            kept = kept.reshape(-1).to(input_ids.device)
            r, c = kept // grid.cols, kept % grid.cols
            pieces.append(torch.stack([times.reshape(-1).to(input_ids.device), r, c]) + pos)
            pos += max(grid)
        positions = torch.cat(pieces, dim=1)
        position_ids[:, row, keep] = positions
        deltas.append(int(positions.max()) + 1 - len(types))
    return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def shrink_image_tokens(inputs: dict, model, tokens: int | None = None) -> dict:
    """Processor output with each image's run of <|image_pad|> cut to the build's K, and each
    video's run of <|video_pad|> to K per temporal patch (`video_grid_thw`'s T, in order; a
    temporal build: Ka + (G-1) Kl per group of G) (input_ids, mm_token_type_ids,
    attention_mask; batches left-padded again)."""
    k = tokens or getattr(model, "evoexport_image_tokens", None)
    if not k:
        raise EvoExportError("shrink_image_tokens: attach() the build first, or give tokens=K")
    image_id, video_id = model.config.image_token_id, getattr(model.config, "video_token_id", None)
    pad = getattr(model.config, "pad_token_id", None) or 0
    grids = inputs.get("video_grid_thw")
    if callable(k) and grids is not None:
        raise EvoExportError("shrink_image_tokens: bucketed builds take images; videos need a video build")
    # a video of T temporal patches: the attached build's count (a temporal build's groups), else T x K
    per_video = getattr(model, "evoexport_video_tokens", None) if tokens is None else None
    video_limits = iter([per_video(t) if per_video else t * k for t in grids[:, 0].tolist()]
                        if grids is not None else [])
    # a bucketed build: each image's K is that of the grid it runs at (its image_grid_thw row)
    image_limits = (iter([k(*row) for row in inputs["image_grid_thw"].tolist()]) if callable(k)
                    else itertools.repeat(k))
    ids_rows, type_rows = [], []
    types_all = inputs.get("mm_token_type_ids", torch.zeros_like(inputs["input_ids"]))
    masks = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    for ids, types, mask in zip(inputs["input_ids"], types_all, masks):
        ids, types = ids[mask.bool()], types[mask.bool()]
        keep, run, prev, limit = [], 0, None, None
        for tok in ids.tolist():
            run = run + 1 if tok == prev else 1
            if tok in (image_id, video_id) and run == 1:
                limit = next(image_limits if tok == image_id else video_limits, None)
                if limit is None:
                    what = "images than image_grid_thw" if tok == image_id else "videos than video_grid_thw"
                    raise EvoExportError(f"shrink_image_tokens: the prompt has more {what}")
            keep.append(tok not in (image_id, video_id) or run <= limit)
            prev = tok
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
