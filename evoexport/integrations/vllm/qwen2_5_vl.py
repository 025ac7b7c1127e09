"""Qwen2.5-VL in vLLM with a build as its vision encoder: vLLM's own classes, where the
multimodal processor resizes each image to the build's input size, turns vLLM's pixel
values into the build's features and kept units (K per image, the placeholder count), and
the model places those tokens at their units' mRoPE positions (positions.py). The model
keeps no vision tower of its own; videos are not routed through a build. Imported by vLLM
(plugin.py)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.parse import ImageSize

from ...errors import EvoExportError
from ..hf_qwen2_5_vl import images_from_patches
from .common import ProfilingImages, check_weights, encode, manifest_for, profiling
from .positions import pruned_mrope_positions


_manifest = manifest_for


class BuildInfo:
    """What vLLM's Qwen processing info says of images: the build's count and size (a mixin
    over Qwen2.5-VL's and Qwen3-VL's classes)."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self, **kwargs) -> int:
        return _manifest(self.get_hf_config()).tokens_per_image

    def get_image_size_with_most_features(self, max_pixels: int | None = None) -> ImageSize:
        size = _manifest(self.get_hf_config()).image_size
        return ImageSize(width=size, height=size)


class EvoExportQwenProcessingInfo(BuildInfo, Qwen2_5_VLProcessingInfo):
    pass


class BuildProcessor:
    """vLLM's Qwen processor with the build as the encoder: images resized to the build's
    size, its features and kept units in the processor's output (a mixin)."""

    def _get_hf_mm_inputs(self, mm_items, hf_kwargs):
        """Every image resized to the build's input size first (as `attach` asks of its
        callers), so the processor's grid is the build's."""
        from PIL import Image
        inputs = super()._get_hf_mm_inputs(mm_items, hf_kwargs)
        if "videos" in inputs.hf_data:
            raise ValueError("this server's vision encoder is an evoexport build of images; send video frames as images")
        size = _manifest(self.info.get_hf_config()).image_size
        images = inputs.hf_data.get("images")
        if images:
            inputs.hf_data["images"] = [_resized(image, size, Image) for image in images]
        return inputs

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        patches = processed_data.pop("pixel_values", None)
        if patches is None:
            return processed_data
        config = self.info.get_hf_config()
        vision, manifest = config.vision_config, _manifest(config)
        grid = processed_data["image_grid_thw"]
        want = manifest.tower["grid"] * vision.spatial_merge_size
        if any(row != [1, want, want] for row in grid.tolist()):
            raise ValueError(f"the image processor made patch grids {grid.tolist()}; the build takes {want}x{want} "
                             f"patches ({manifest.image_size}x{manifest.image_size} px): allow that size in the "
                             "checkpoint's preprocessor_config.json (min_pixels <= size^2 <= max_pixels)")
        images = images_from_patches(patches.float(), grid, vision.patch_size, vision.spatial_merge_size,
                                     vision.temporal_patch_size)
        features, indices = encode(config, images, dummy=profiling(mm_inputs))
        processed_data["evo_features"] = torch.from_numpy(features)
        processed_data["evo_indices"] = torch.from_numpy(indices)
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs: Mapping[str, object]):
        return dict(image_grid_thw=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
                    evo_features=MultiModalFieldConfig.batched("image"),
                    evo_indices=MultiModalFieldConfig.batched("image", keep_on_cpu=True))

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        image_token = self.info.get_hf_config().image_token_id
        k = _manifest(self.info.get_hf_config()).tokens_per_image
        return [PromptReplacement(modality="image", target=[image_token], replacement=lambda item_idx: [image_token] * k)]


class EvoExportQwenProcessor(BuildProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


def _resized(image, size: int, Image):
    if getattr(image, "size", None) == (size, size):
        return image
    return image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


class EvoExportQwenDummyInputs(ProfilingImages, Qwen2_5_VLDummyInputsBuilder):
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
        self.unit_grid = _manifest(self.config).tower["grid"]
        del self.visual                                    # the build is the encoder

    def embed_multimodal(self, **kwargs: object):
        features = kwargs.get("evo_features")
        if features is None:
            return []
        return tuple(f.to(self.embed_dtype) for f in features)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        images = []
        for feature in mm_features:
            if feature.modality != "image":
                raise EvoExportError("videos are not routed through an evoexport build")
            kept = feature.data["evo_indices"].data
            images.append((feature.mm_position.offset, kept.cpu().numpy().reshape(-1), self.unit_grid))
        positions, delta = pruned_mrope_positions(len(input_tokens), images)
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
