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
says.

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


def images_from_patches(patches: torch.Tensor, grid_thw: torch.Tensor, patch: int, merge: int, temporal: int,
                        frames: int = 1):
    """The processor's flattened patches back to pixels (inverse of
    models.qwen_processor.flatten_patches): stills [N, 3, H, W] (the first of the repeated
    frames), or with `frames` = `temporal` (a video build) every temporal patch of every
    grid as its frames on the channel axis [sum of T, 3 * temporal, H, W]."""
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
    return torch.cat(images)


class _Encoder:
    """The build on a prompt's images or videos, each tensor run once (generate() asks for
    positions before features): (features [N, K, D], kept unit indices [N, K]), N images
    or temporal patches."""

    def __init__(self, runner, vcfg, embed):
        m = runner.manifest
        self.runner, self.vcfg, self.embed, self.frames = runner, vcfg, embed, m.frames_per_input
        self.size, self.grid = m.image_size, m.tower["grid"]
        self.last: dict = {}

    def __call__(self, pixel_values, grid_thw, kind: str):
        if self.last.get(kind, (None,))[0] is pixel_values:
            return self.last[kind][1]
        if grid_thw is None:
            raise EvoExportError(f"attach(): {kind}_grid_thw is needed with the {kind}'s pixel values")
        side = self.grid * self.vcfg.spatial_merge_size
        for row in grid_thw.tolist():
            if row[1:] != [side, side]:
                raise EvoExportError(f"attach(): a{'n' * (kind == 'image')} {kind} has patch grid {row[1]}x{row[2]}, "
                                     f"the build takes {side}x{side} ({self.size}x{self.size} px); resize "
                                     f"{kind}s to {self.size}x{self.size} before the processor")
        v = self.vcfg
        x = images_from_patches(pixel_values.float(), grid_thw, v.patch_size, v.spatial_merge_size,
                                v.temporal_patch_size, self.frames)     # a still: the processor's frame twice
        out = self.run(x)
        self.last[kind] = (pixel_values, out)
        return out

    def run(self, x):
        """(features, kept indices) of images x (a family with more outputs adds them after)."""
        return features_from_build(self.runner, x, self.embed)

    def kept(self, kind: str, pixel_values, grid_thw):
        """The kept indices of the prompt's images or videos (empty when it has none)."""
        if pixel_values is not None:
            return self(pixel_values, grid_thw, kind)[1]
        if grid_thw is None:
            return None
        if kind not in self.last:
            raise EvoExportError("attach(): mRoPE positions need the image and video features first")
        return self.last[kind][1][1]


def attach(model, build_dir, verify_weights: bool = True, **load_options):
    """Make `model` (Qwen2_5_VLForConditionalGeneration) take its image (and, with a video
    build, video) features and their mRoPE positions from a build of the qwen2.5-vl family."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    inner = _inner(model)
    runner = open_build(model, build_dir, "qwen2_5_vl", "qwen2.5-vl", verify_weights, load_options)
    vcfg = inner.config.vision_config
    encode = _Encoder(runner, vcfg, model.get_input_embeddings().weight)

    def get_image_features(pixel_values, image_grid_thw=None, **kwargs):
        features, _ = encode(pixel_values, image_grid_thw, "image")
        return BaseModelOutputWithPooling(pooler_output=tuple(features))

    def get_video_features(pixel_values_videos, video_grid_thw=None, **kwargs):
        features, _ = encode(pixel_values_videos, video_grid_thw, "video")
        counts = video_grid_thw[:, 0].tolist()            # temporal patches per video
        return BaseModelOutputWithPooling(pooler_output=tuple(f.flatten(0, 1) for f in features.split(counts)))

    def get_rope_index(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None, attention_mask=None, pixel_values=None, **kwargs):
        kept = {1: encode.kept("image", pixel_values, image_grid_thw),
                2: encode.kept("video", kwargs.get("pixel_values_videos"), video_grid_thw)}
        videos = _video_times(kept[2], video_grid_thw, second_per_grid_ts, vcfg.tokens_per_second)
        return pruned_rope_index(input_ids, mm_token_type_ids, kept[1], encode.grid,
                                 encode.grid * vcfg.spatial_merge_size, vcfg.spatial_merge_size, attention_mask,
                                 videos=videos)

    return install(model, runner, get_image_features, get_video_features, get_rope_index)


def install(model, runner, get_image_features, get_video_features, get_rope_index):
    """`model` with these in place of its own, and the build recorded on it (shrink_image_tokens
    reads its K)."""
    inner = _inner(model)
    inner.get_image_features = get_image_features
    inner.get_video_features = get_video_features
    inner.get_rope_index = get_rope_index
    model.evoexport_runner = runner
    model.evoexport_image_tokens = runner.manifest.tokens_per_image
    return model


def open_build(model, build_dir, model_type: str, family: str, verify_weights: bool, load_options: dict):
    """The build's runner, once `model` is a transformers Qwen model of `model_type` and the
    build an image or video build of `family` made from the model's own vision weights."""
    from ..runtime.runner import load

    inner = _inner(model)
    if getattr(inner.config, "model_type", None) != model_type or not hasattr(inner, "visual"):
        raise EvoExportError(f"attach() for {family} takes its ForConditionalGeneration model, got "
                             f"{type(model).__name__}")
    runner = load(build_dir, **load_options)
    manifest = runner.manifest
    if manifest.temporal:
        manifest.require_images(f"attach() for {family}", build_dir)
    if manifest.family != family:
        raise EvoExportError(f"{build_dir} is a {manifest.family} build; this model needs a {family} build")
    if verify_weights and _vision_sha256(model, manifest) != manifest.weights_sha256:
        raise EvoExportError(f"{build_dir} was built from other vision weights than this model's "
                             "(sha256 differs); build it from this model's checkpoint")
    return runner


def _video_times(kept, video_grid_thw, second_per_grid_ts, tokens_per_second):
    """Each video's (kept indices [T, K], the temporal patches' time positions [T]) as
    transformers gives them: t * tokens_per_second * second_per_grid_t, rounded down."""
    if kept is None:
        return []
    counts = video_grid_thw[:, 0].tolist()
    seconds = second_per_grid_ts.tolist() if second_per_grid_ts is not None else [1] * len(counts)
    return [(k, (torch.arange(t) * (tokens_per_second * s)).long())
            for k, t, s in zip(kept.split(counts), counts, seconds)]


def pruned_rope_index(input_ids, mm_token_type_ids, indices, unit_grid: int, patch_grid: int, merge: int,
                      attention_mask=None, videos=()):
    """transformers' get_rope_index for images that kept K units, and videos whose temporal
    patches each kept K: (position_ids [3, B, L], rope_deltas [B, 1]). Image i's tokens sit
    at (s, s + row, s + col) of its kept units, a video's at (s + time, s + row, s + col);
    text resumes at s + patch_grid / merge, as in the unpruned prompt."""
    if mm_token_type_ids is None:
        raise EvoExportError("attach(): mm_token_type_ids (from the processor) are needed for mRoPE positions")
    b, n = input_ids.shape
    position_ids = torch.zeros(3, b, n, dtype=input_ids.dtype, device=input_ids.device)
    media = {1: iter([(k, torch.zeros(1, dtype=torch.long)) for k in (indices if indices is not None else [])]),
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
            kept, times = next(media[kind], (None, None))
            if kept is None or kept.numel() != length:
                what = "an image" if kind == 1 else "a video"
                raise EvoExportError(f"attach(): {what} has {length} placeholder tokens but the build gives "
                                     f"{'none' if kept is None else kept.numel()}; call shrink_image_tokens(inputs, "
                                     "model) first")
            kept = kept.reshape(len(times), -1).to(input_ids.device)
            r, c = kept // unit_grid, kept % unit_grid
            t = times.to(input_ids.device)[:, None].expand_as(kept)
            pieces.append(torch.stack([t, r, c]).flatten(1) + pos)
            pos += patch_grid // merge
        positions = torch.cat(pieces, dim=1)
        position_ids[:, row, keep] = positions
        deltas.append(int(positions.max()) + 1 - len(types))
    return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def shrink_image_tokens(inputs: dict, model, tokens: int | None = None) -> dict:
    """Processor output with each image's run of <|image_pad|> cut to the build's K, and each
    video's run of <|video_pad|> to K per temporal patch (`video_grid_thw`'s T, in order)
    (input_ids, mm_token_type_ids, attention_mask; batches left-padded again)."""
    k = tokens or getattr(model, "evoexport_image_tokens", None)
    if not k:
        raise EvoExportError("shrink_image_tokens: attach() the build first, or give tokens=K")
    image_id, video_id = model.config.image_token_id, getattr(model.config, "video_token_id", None)
    pad = getattr(model.config, "pad_token_id", None) or 0
    grids = inputs.get("video_grid_thw")
    video_limits = iter([t * k for t in grids[:, 0].tolist()] if grids is not None else [])
    ids_rows, type_rows = [], []
    types_all = inputs.get("mm_token_type_ids", torch.zeros_like(inputs["input_ids"]))
    masks = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    for ids, types, mask in zip(inputs["input_ids"], types_all, masks):
        ids, types = ids[mask.bool()], types[mask.bool()]
        keep, run, prev, limit = [], 0, None, k
        for tok in ids.tolist():
            run = run + 1 if tok == prev else 1
            if tok == video_id and run == 1:
                limit = next(video_limits, None)
                if limit is None:
                    raise EvoExportError("shrink_image_tokens: the prompt has more videos than video_grid_thw")
            keep.append(tok not in (image_id, video_id) or run <= (k if tok == image_id else limit))
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
