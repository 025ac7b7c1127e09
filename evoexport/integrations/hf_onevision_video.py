"""LLaVA-OneVision videos with a build: what a pruned frame becomes.

transformers' `LlavaOnevisionModel.get_video_features` runs every frame through the tower and
projector, pools each frame's g x g grid to ceil(g/2) x ceil(g/2) (bilinear `apply_pooling`)
and ends the whole video with one `image_newline` (transformers 5.25; not one per frame).
Pooling needs a full grid. So a pruned frame becomes its dense map first: every patch takes
the feature of the token that answers for it (the kept token it was merged into; in a
temporal build also the anchor's token where the patch was reused, the `owners` output),
then transformers' own pooling and newline. The LLM sees transformers' layout and token
count; the encoder did the pruned work. At keep 1.0 every patch answers for itself and the
features are transformers' own (tested token for token).

A temporal build takes the frames in its groups: a video's frame count must be a multiple
of its group.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import names
from ..errors import EvoExportError
from ..runtime.runner import final_owners


def dense_frames(runner, frames: torch.Tensor) -> np.ndarray:
    """[F, N, D]: every patch of every frame answered by the build's token for it."""
    m = runner.manifest
    x = np.ascontiguousarray(frames.detach().float().cpu().numpy())
    if m.group > 1:
        if x.shape[0] % m.group:
            raise EvoExportError(f"a video of {x.shape[0]} frames does not fill groups of {m.group}; this temporal "
                                 f"build takes a multiple of {m.group} frames")
        out = runner.arrays(x.reshape(-1, m.group, *x.shape[1:]))
        owner = out[names.OWNERS].reshape(out[names.OWNERS].shape[0], -1)                 # [B, G*N]
        dense = np.take_along_axis(out[names.FEATURES], owner[..., None], axis=1)
        return dense.reshape(x.shape[0], m.num_patches, -1)
    out = runner.arrays(x)
    if not m.prune_points:     # keep 1.0: every patch answers for itself
        return out[names.FEATURES]
    owner = final_owners([out[names.merge(i)] for i in range(m.prune_points)])
    if (owner < 0).any():
        raise EvoExportError("a video frame's dense map follows the merges; this build drops tokens without "
                             "merging (--no-merge): build it with merging")
    return np.take_along_axis(out[names.FEATURES], owner[..., None], axis=1)


def attach_onevision_video(model, inner, runner) -> None:
    """Replace `inner.get_video_features` with the build's dense maps, pooled and closed as
    transformers does."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    embed = model.get_input_embeddings().weight

    def get_video_features(pixel_values_videos, vision_feature_layer=None, vision_feature_select_strategy=None,
                           **kwargs):
        b, f = pixel_values_videos.shape[:2]
        dense = torch.as_tensor(dense_frames(runner, pixel_values_videos.flatten(0, 1))).to(embed.device, embed.dtype)
        pooled = inner.apply_pooling(dense)
        video = pooled.reshape(b, f * pooled.shape[1], -1)
        newline = inner.image_newline[None, None, :].repeat(b, 1, 1).to(video.device, video.dtype)
        return BaseModelOutputWithPooling(pooler_output=torch.cat((video, newline), dim=1))

    inner.get_video_features = get_video_features
