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
from ..hf_qwen2_5_vl import image_list_from_patches
from .common import ProfilingImages, check_weights, encode_each, grids_for, profiling
from .positions import pruned_mrope_positions


class BuildInfo:
    """What vLLM's Qwen processing info says of images: the build's count and sizes (a mixin
    over Qwen2.5-VL's and Qwen3-VL's classes). A bucketed build gives each image the K of
    the grid chosen for its size."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_num_image_tokens(self, *, image_width: int, image_height: int, **kwargs) -> int:
        grids = grids_for(self.get_hf_config())
        return grids.manifests[grids.index_for(image_height, image_width)].tokens_per_image

    def get_image_size_with_most_features(self, max_pixels: int | None = None) -> ImageSize:
        height, width = grids_for(self.get_hf_config()).most_tokens().image_hw
        return ImageSize(width=width, height=height)


class EvoExportQwenProcessingInfo(BuildInfo, Qwen2_5_VLProcessingInfo):
    pass


class BuildProcessor:
    """vLLM's Qwen processor with the build as the encoder: each image resized to the size of
    its grid, its features and kept units in the processor's output (a mixin)."""

    def _get_hf_mm_inputs(self, mm_items, hf_kwargs):
        """Every image resized to its grid's size first (as `attach` asks of its callers), so
        the processor's grid is one the build holds."""
        from PIL import Image
        inputs = super()._get_hf_mm_inputs(mm_items, hf_kwargs)
        if "videos" in inputs.hf_data:
            raise ValueError("this server's vision encoder is an evoexport build of images; send video frames as images")
        grids = grids_for(self.info.get_hf_config())
        images = inputs.hf_data.get("images")
        if images:
            inputs.hf_data["images"] = [
                _resized(image, grids.manifests[grids.index_for(image.height, image.width)].image_hw, Image)
                for image in images]
        return inputs

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        patches = processed_data.pop("pixel_values", None)
        if patches is None:
            return processed_data
        config = self.info.get_hf_config()
        vision, grids = config.vision_config, grids_for(config)
        grid_thw, merge = processed_data["image_grid_thw"], vision.spatial_merge_size
        units = [(h // merge, w // merge) for _, h, w in grid_thw.tolist()]
        index = [grids.index_of(u) for u in units]
        if None in index:
            raise ValueError(f"the image processor made patch grids {grid_thw.tolist()}; the build takes "
                             f"{grids.describe()}: allow those sizes in the checkpoint's preprocessor_config.json "
                             "(min_pixels <= height x width <= max_pixels)")
        images = image_list_from_patches(patches.float(), grid_thw, vision.patch_size, merge,
                                         vision.temporal_patch_size)
        outs = encode_each(config, [x[0] for x in images], index, dummy=profiling(mm_inputs))
        processed_data["evo_features"] = torch.cat([torch.from_numpy(f) for f, _ in outs])
        processed_data["evo_indices"] = torch.cat([torch.from_numpy(k) for _, k in outs])
        processed_data["evo_tokens"] = torch.tensor([len(k) for _, k in outs])
        processed_data["evo_grid"] = torch.tensor(units)
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs: Mapping[str, object]):
        # each image's K rows (K differs between a bucketed build's grids), its K and grid
        tokens = hf_inputs.get("evo_tokens", torch.empty(0, dtype=torch.long))
        return dict(image_grid_thw=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
                    evo_features=MultiModalFieldConfig.flat_from_sizes("image", tokens),
                    evo_indices=MultiModalFieldConfig.flat_from_sizes("image", tokens, keep_on_cpu=True),
                    evo_tokens=MultiModalFieldConfig.batched("image", keep_on_cpu=True),
                    evo_grid=MultiModalFieldConfig.batched("image", keep_on_cpu=True))

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        image_token = self.info.get_hf_config().image_token_id

        def replacement(item_idx: int):
            return [image_token] * int(out_mm_kwargs["image"][item_idx]["evo_tokens"].data)
        return [PromptReplacement(modality="image", target=[image_token], replacement=replacement)]


class EvoExportQwenProcessor(BuildProcessor, Qwen2_5_VLMultiModalProcessor):
    pass


def _resized(image, size: tuple[int, int], Image):
    height, width = size
    if getattr(image, "size", None) == (width, height):
        return image
    return image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)


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
        del self.visual                                    # the build is the encoder

    def embed_multimodal(self, **kwargs: object):
        features = kwargs.get("evo_features")
        if features is None:
            return []
        if isinstance(features, torch.Tensor):   # the batch's images' rows one after another
            features = features.split([int(k) for k in torch.as_tensor(kwargs["evo_tokens"]).reshape(-1)])
        return tuple(f.to(self.embed_dtype) for f in features)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        images = []
        for feature in mm_features:
            if feature.modality != "image":
                raise EvoExportError("videos are not routed through an evoexport build")
            kept, grid = feature.data["evo_indices"].data, feature.data["evo_grid"].data
            images.append((feature.mm_position.offset, kept.cpu().numpy().reshape(-1), tuple(grid.tolist())))
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
