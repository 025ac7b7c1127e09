"""Qwen2.5-VL in vLLM with a build as its vision encoder: vLLM's own classes, where the
multimodal processor resizes each image to the build's input size, turns vLLM's pixel
values into the build's features and kept units (K per image, the placeholder count), and
the model places those tokens at their units' mRoPE positions (positions.py). The model
keeps no vision tower of its own. Videos need a video build (`build --video`): their frames
are resized to its size, each temporal patch (two frames) runs as one input and keeps its
own K units, so a video has T x K placeholders, at vLLM's own time positions. A temporal
video build (`--video --temporal G:KEEP`) takes videos only, their temporal patches in
groups of G (Ka + (G-1) Kl placeholders per group, each token at its own patch's time); a
video that does not fill its groups is a client error. Imported by vLLM (plugin.py)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.parse import ImageSize

from ...errors import EvoExportError
from ..hf_qwen2_5_vl import image_list_from_patches, video_tokens, video_units
from .common import (ONE_RUN, ProfilingImages, ProfilingVideos, VideoMarks, check_weights, encode_each, grids_for,
                     manifest_for, profiling, runner_for)
from .positions import pruned_mrope_positions


class BuildInfo:
    """What vLLM's Qwen processing info says of images: the build's count and sizes (a mixin
    over Qwen2.5-VL's and Qwen3-VL's classes). A bucketed build gives each image the K of
    the grid chosen for its size."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        manifest = grids_for(self.get_hf_config()).manifest     # a temporal build takes videos only
        return {"image": 0 if manifest.temporal else None, "video": None if manifest.frames_per_input > 1 else 0}

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int, **kwargs) -> int:
        """K per temporal patch (Ka + (G-1) Kl per group of a temporal build): the frames
        padded to pairs, as Qwen's video processor pads them."""
        config = self.get_hf_config()
        pairs = -(-num_frames // config.vision_config.temporal_patch_size)
        return video_tokens(grids_for(config).manifest, pairs)

    def get_num_image_tokens(self, *, image_width: int, image_height: int, **kwargs) -> int:
        grids = grids_for(self.get_hf_config())
        return grids.manifests[grids.index_for(image_height, image_width)].tokens_per_image

    def get_image_size_with_most_features(self, max_pixels: int | None = None) -> ImageSize:
        height, width = grids_for(self.get_hf_config()).most_tokens().image_hw
        return ImageSize(width=width, height=height)


class EvoExportQwenProcessingInfo(BuildInfo, Qwen2_5_VLProcessingInfo):
    pass


class BuildProcessor(VideoMarks):
    """vLLM's Qwen processor with the build as the encoder: each image resized to the size of
    its grid, its features and kept units in the processor's output (a mixin)."""

    def _get_hf_mm_inputs(self, mm_items, hf_kwargs):
        """Every image resized to its grid's size first (as `attach` asks of its callers), so
        the processor's grid is one the build holds."""
        from PIL import Image
        inputs = super()._get_hf_mm_inputs(mm_items, hf_kwargs)
        grids = grids_for(self.info.get_hf_config())
        images = inputs.hf_data.get("images")
        if images:
            inputs.hf_data["images"] = [
                _resized(image, grids.manifests[grids.index_for(image.height, image.width)].image_hw, Image)
                for image in images]
        if inputs.hf_data.get("videos"):     # a video build (the limits let no video reach another)
            size = grids.manifest.image_hw
            inputs.hf_data["videos"] = [_resized_frames(video, size, Image) for video in inputs.hf_data["videos"]]
            for metadata in inputs.hf_data.get("video_metadata") or []:
                metadata.height, metadata.width = size
        return inputs

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        for kind in ("image", "video"):
            patches = processed_data.pop("pixel_values" if kind == "image" else "pixel_values_videos", None)
            if patches is not None:
                dummy = profiling(mm_inputs) if kind == "image" else self.dummy_videos
                processed_data.update(self._encoded(kind, patches, processed_data[f"{kind}_grid_thw"], dummy))
        return processed_data

    def _encoded(self, kind: str, patches, grid_thw, dummy: bool) -> dict:
        """The build's outputs for the processor's images (K rows each) or videos (T x K rows
        each: every temporal patch as one input), under the evo_ fields of that kind."""
        config = self.info.get_hf_config()
        vision, grids = config.vision_config, grids_for(config)
        merge, frames = vision.spatial_merge_size, grids.manifest.frames_per_input
        units = [(h // merge, w // merge) for _, h, w in grid_thw.tolist()]
        index = [grids.index_of(u) for u in units]
        if None in index:
            raise ValueError(f"the {kind} processor made patch grids {grid_thw.tolist()}; the build takes "
                             f"{grids.describe()}: allow those sizes in the checkpoint's preprocessor config "
                             "(min_pixels <= height x width <= max_pixels)")
        items = image_list_from_patches(patches.float(), grid_thw, vision.patch_size, merge,
                                        vision.temporal_patch_size, frames)   # a video build: stills as pairs
        if kind == "image":
            outs = encode_each(config, [x[0] for x in items], index, dummy=dummy)
        else:      # (features, kept units, each token's temporal patch) of each video
            outs = [_video_outputs(config, x, dummy) for x in items]
        prefix = "evo_" if kind == "image" else "evo_video_"
        fields = {f"{prefix}features": torch.cat([torch.from_numpy(out[0]) for out in outs]),
                  f"{prefix}indices": torch.cat([torch.from_numpy(out[1]) for out in outs]),
                  f"{prefix}tokens": torch.tensor([len(out[1]) for out in outs]),
                  f"{prefix}grid": torch.tensor(units)}
        if kind == "video":
            fields["evo_video_patches"] = torch.cat([torch.from_numpy(out[2]) for out in outs])
        return fields

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs: Mapping[str, object]):
        # each item's rows (K differs between a bucketed build's grids; T x K for a video), their count and grid
        fields = {}
        for kind, prefix in (("image", "evo_"), ("video", "evo_video_")):
            tokens = hf_inputs.get(f"{prefix}tokens", torch.empty(0, dtype=torch.long))
            fields.update({f"{kind}_grid_thw": MultiModalFieldConfig.batched(kind, keep_on_cpu=True),
                           f"{prefix}features": MultiModalFieldConfig.flat_from_sizes(kind, tokens),
                           f"{prefix}indices": MultiModalFieldConfig.flat_from_sizes(kind, tokens, keep_on_cpu=True),
                           f"{prefix}tokens": MultiModalFieldConfig.batched(kind, keep_on_cpu=True),
                           f"{prefix}grid": MultiModalFieldConfig.batched(kind, keep_on_cpu=True)})
        per_video = hf_inputs.get("evo_video_tokens", torch.empty(0, dtype=torch.long))
        fields["evo_video_patches"] = MultiModalFieldConfig.flat_from_sizes("video", per_video, keep_on_cpu=True)
        fields["second_per_grid_ts"] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        config = self.info.get_hf_config()
        tokens = {"image": (config.image_token_id, "evo_tokens"), "video": (config.video_token_id, "evo_video_tokens")}

        def replacement(item_idx: int, kind: str):
            token, field = tokens[kind]
            return [token] * int(out_mm_kwargs[kind][item_idx][field].data)
        return [PromptReplacement(modality=kind, target=[tokens[kind][0]],
                                  replacement=lambda i, kind=kind: replacement(i, kind)) for kind in tokens]


class EvoExportQwenProcessor(BuildProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


def _video_outputs(config, pairs: torch.Tensor, dummy: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One video's (features [n, D], kept units [n], each token's temporal patch [n]) from its
    temporal patches [T, 6, H, W]; vLLM's profiling dummy: zeros, laid out as the build lays
    out its tokens."""
    if dummy:
        return _dummy_video(manifest_for(config), len(pairs))
    try:
        with ONE_RUN:
            features, kept, patches = video_units(runner_for(config), pairs)
    except EvoExportError as e:       # a clip that does not fill a temporal build's groups: a client error
        raise ValueError(str(e)) from None
    return (features.astype(np.float32, copy=False), kept.astype(np.int64, copy=False),
            patches.astype(np.int64, copy=False))


def _dummy_video(manifest, pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """video_units' layout for `pairs` temporal patches (whole groups), with zero features."""
    g = manifest.group
    later = [manifest.temporal["schedule"][-1]["tokens"]] * (g - 1) if manifest.temporal else []
    counts = [manifest.tokens_per_image] + later        # each patch's tokens in a group
    groups = -(-pairs // g)
    kept = np.tile(np.concatenate([np.arange(k) for k in counts]), groups)
    patches = (np.repeat(np.arange(g), counts) + g * np.arange(groups)[:, None]).reshape(-1)
    return np.zeros((len(kept), manifest.features["shape"][-1]), np.float32), kept, patches


def _resized(image, size: tuple[int, int], Image):
    height, width = size
    if getattr(image, "size", None) == (width, height):
        return image
    return image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)


def _resized_frames(video, size: tuple[int, int], Image):
    """A video's frames [T, H, W, 3] (uint8, as vLLM's loaders give them) at the build's size."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"a video must be frames [T, H, W, 3], got shape {list(video.shape)}")
    if tuple(video.shape[1:3]) == tuple(size):
        return video
    return np.stack([np.asarray(_resized(Image.fromarray(frame), size, Image)) for frame in video])


class EvoExportQwenDummyInputs(ProfilingVideos, ProfilingImages, Qwen2_5_VLDummyInputsBuilder):
    pass


class BuildAsEncoder:
    """vLLM's Qwen model with the build as its vision encoder (a mixin): features from the
    processor, kept units at their mRoPE positions, no vision tower loaded."""
    # the processor hands the build normalized pixel values (vLLM would otherwise leave the
    # normalization to the model's own tower, on the device)
    supports_mm_device_do_normalize = False

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        check_weights(self.config, vllm_config.model_config.model)
        self.embed_dtype = vllm_config.model_config.dtype
        del self.visual                                    # the build is the encoder

    def embed_multimodal(self, **kwargs: object):
        out = []
        for key in kwargs:            # vLLM's order of modalities (one group per call)
            if key not in ("evo_features", "evo_video_features"):
                continue
            features = kwargs[key]
            if isinstance(features, torch.Tensor):   # the batch's items' rows one after another
                counts = kwargs[key.replace("features", "tokens")]
                features = features.split([int(k) for k in torch.as_tensor(counts).reshape(-1)])
            out += [f.to(self.embed_dtype) for f in features]
        return tuple(out)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        items, per_second = [], getattr(self.config.vision_config, "tokens_per_second", 1.0)
        for feature in mm_features:
            data, offset = feature.data, feature.mm_position.offset
            if feature.modality == "image":
                kept, grid = data["evo_indices"].data, data["evo_grid"].data
                items.append((offset, kept.cpu().numpy().reshape(-1), tuple(grid.tolist())))
                continue
            if feature.modality != "video":
                raise EvoExportError(f"the evoexport plugin takes images and videos, not {feature.modality}")
            kept, grid = data["evo_video_indices"].data, data["evo_video_grid"].data
            seconds = data.get("second_per_grid_ts")
            factor = (float(seconds.data) if seconds is not None else 1.0) * per_second
            # each token at its temporal patch's time, vLLM's own: t * tokens_per_second * second_per_grid_t
            times = (data["evo_video_patches"].data.cpu().numpy() * factor).astype(np.int64)
            items.append((offset, kept.cpu().numpy().reshape(-1), tuple(grid.tolist()), times))
        positions, delta = pruned_mrope_positions(len(input_tokens), items)
        return torch.from_numpy(positions), delta

    def get_encoder_cudagraph_config(self):
        from vllm.v1.worker.encoder_cudagraph_defs import EncoderCudaGraphConfig
        return EncoderCudaGraphConfig(modalities=[], buffer_keys=[], out_hidden_size=self.config.text_config.hidden_size)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights((n, w) for n, w in weights if "visual." not in n)


@MULTIMODAL_REGISTRY.register_processor(EvoExportQwenProcessor, info=EvoExportQwenProcessingInfo,
                                        dummy_inputs=EvoExportQwenDummyInputs)
class EvoExportQwen2_5_VLForConditionalGeneration(BuildAsEncoder, Qwen2_5_VLForConditionalGeneration):
    pass
