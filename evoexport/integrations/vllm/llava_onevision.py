"""LLaVA-OneVision in vLLM with a build as its vision encoder: vLLM's own classes, where the
multimodal processor runs the build over each image's base view and anyres tiles (only the
image's own tiles, not the batch's padding) and counts the placeholders the kept tokens
pack to; the model packs them with its `image_newline` as `attach` does
(`integrations.hf_onevision`: base view, kept tile tokens at their places on the unpadded
grid, a newline closing every row). The model keeps no vision tower or projector. A video
becomes each frame's dense map (every patch answered by the build's token for it:
`integrations.hf_onevision_video`; a temporal build's groups included), then vLLM's own 2x2
pooling and newline, so the LLM sees vLLM's layout and count. Imported by vLLM (plugin.py)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from vllm.model_executor.models.llava_onevision import (LlavaOnevisionDummyInputsBuilder,
                                                        LlavaOnevisionForConditionalGeneration,
                                                        LlavaOnevisionMultiModalProcessor,
                                                        LlavaOnevisionProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageSize
from vllm.multimodal.processing import PromptReplacement

from ...errors import EvoExportError
from ..hf_onevision import pack_pruned, packed_length, tiles_per_image
from ..hf_onevision_video import dense_frames
from .common import (ONE_RUN, ProfilingImages, ProfilingVideos, VideoMarks, check_weights, encode, manifest_for,
                     profiling, runner_for)

VISION_PARTS = ("vision_tower", "multi_modal_projector")


def _aspect(config) -> str:
    return getattr(config, "vision_aspect_ratio", None) or "anyres_max_9"


def _keeps_all(config) -> bool:
    manifest = manifest_for(config)
    return manifest.tokens_per_image == manifest.num_patches


class EvoExportOnevisionProcessingInfo(LlavaOnevisionProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        # a temporal build takes clips only (its frames in groups)
        return {"image": 0 if manifest_for(self.get_hf_config()).temporal else None, "video": None}

    def get_image_size_with_most_features(self) -> ImageSize:
        """vLLM profiles memory with this size: for a pruned build, the tiling with the most
        tokens among those it can pack (no anyres_max resize)."""
        config = self.get_hf_config()
        if _keeps_all(config):
            return super().get_image_size_with_most_features()
        tile, limit = config.vision_config.image_size, int(_aspect(config).removeprefix("anyres_max_"))
        fits = [(h, w) for h, w in config.image_grid_pinpoints if (h // tile) * (w // tile) <= 1.21 * limit]
        h, w = max(fits, key=lambda hw: self.get_num_image_tokens(image_width=hw[1], image_height=hw[0]))
        return ImageSize(width=w, height=h)

    def image_tokens(self, indices: torch.Tensor, image_size) -> int:
        """The placeholders of one image whose tiles kept `indices` [T, K]."""
        config = self.get_hf_config()
        height, width = (int(v) for v in image_size)
        try:
            n = packed_length(config, indices, (height, width), _aspect(config), _keeps_all(config))
        except EvoExportError as e:       # a client error (vLLM answers 400), not an engine failure
            raise ValueError(str(e)) from None
        return self.get_num_image_tokens(image_width=width, image_height=height) if n is None else n


class EvoExportOnevisionProcessor(VideoMarks, LlavaOnevisionMultiModalProcessor):
    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        videos = processed_data.pop("pixel_values_videos", None)
        if videos is not None:
            processed_data["evo_video_dense"] = [self._dense(v, self.dummy_videos) for v in videos]
        pixels = processed_data.pop("pixel_values", None)
        if pixels is None:
            return processed_data
        config, sizes = self.info.get_hf_config(), processed_data["image_sizes"]
        tiles, counts = tiles_per_image(config, pixels, [tuple(s) for s in sizes.tolist()])
        features, indices = encode(config, tiles, dummy=profiling(mm_inputs))
        processed_data["evo_features"] = list(torch.from_numpy(features).split(counts))
        processed_data["evo_indices"] = list(torch.from_numpy(indices).split(counts))
        for kept, size in zip(processed_data["evo_indices"], sizes):
            self.info.image_tokens(kept, size)         # an image the build cannot take fails here, as a client error
        return processed_data

    def _dense(self, frames: torch.Tensor, dummy: bool) -> torch.Tensor:
        """One video's dense maps [F, N, D] (vLLM's profiling dummy: zeros of that shape)."""
        config = self.info.get_hf_config()
        manifest = manifest_for(config)
        if dummy:
            return torch.zeros(len(frames), manifest.num_patches, manifest.features["shape"][-1])
        try:
            with ONE_RUN:
                return torch.from_numpy(dense_frames(runner_for(config), frames))
        except EvoExportError as e:       # a clip that does not fill a temporal build's groups: a client error
            raise ValueError(str(e)) from None

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs: Mapping[str, object]):
        return dict(image_sizes=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
                    evo_features=MultiModalFieldConfig.batched("image"),
                    evo_indices=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
                    evo_video_dense=MultiModalFieldConfig.batched("video"))

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        token = self.info.get_hf_config().image_token_index

        def replacement(item_idx: int) -> list[int]:
            item = out_mm_kwargs["image"][item_idx]
            return [token] * self.info.image_tokens(item["evo_indices"].data, item["image_sizes"].data)

        # a video's placeholders are vLLM's own: its frames pooled, then one newline
        videos = [u for u in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
                  if u.modality == "video"]
        return [PromptReplacement(modality="image", target=[token], replacement=replacement), *videos]


class EvoExportOnevisionDummyInputs(ProfilingVideos, ProfilingImages, LlavaOnevisionDummyInputsBuilder):
    pass


@MULTIMODAL_REGISTRY.register_processor(EvoExportOnevisionProcessor, info=EvoExportOnevisionProcessingInfo,
                                        dummy_inputs=EvoExportOnevisionDummyInputs)
class EvoExportLlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        check_weights(self.config, vllm_config.model_config.model)
        self.embed_dtype = vllm_config.model_config.dtype
        self.keeps_all = _keeps_all(self.config)
        del self.vision_tower, self.multi_modal_projector     # the build is the encoder

    def embed_multimodal(self, **kwargs: object):
        out = []
        for key in kwargs:            # vLLM's order of modalities
            if key == "evo_features":
                out += [self._pack(f.to(self.image_newline.device, self.embed_dtype), i, size)
                        for f, i, size in zip(kwargs[key], kwargs["evo_indices"], kwargs["image_sizes"])]
            elif key == "evo_video_dense":
                out += [self._video(dense) for dense in kwargs[key]]
        return tuple(out)

    def _video(self, dense: torch.Tensor) -> torch.Tensor:
        """A video's dense maps [F, N, D] as vLLM's own video path ends: pooled, one newline."""
        pooled = self.apply_pooling(dense.to(self.image_newline.device, self.embed_dtype))
        return torch.cat([pooled.flatten(0, 1), self.image_newline[None].to(pooled.dtype)])

    def _pack(self, features: torch.Tensor, indices: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
        size = tuple(int(v) for v in image_size)
        packed = pack_pruned(self.config, self.image_newline, features, indices, size, _aspect(self.config),
                             self.keeps_all)
        if packed is None:      # keep 1.0 and the anyres_max resize: vLLM's own packing of the same features
            packed = self._merge_image_patch_embeddings(image_size, features, image_newline=self.image_newline,
                                                        strategy="spatial_unpad")
        return packed

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights((n, w) for n, w in weights if not any(p in n for p in VISION_PARTS))
