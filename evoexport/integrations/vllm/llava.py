"""LLaVA-1.5 in vLLM with a build as its vision encoder: vLLM's own classes, where the
multimodal processor turns vLLM's pixel values into the build's features (K per image,
the placeholder count) and the model takes them as its image embeddings. The model keeps
no vision tower or projector of its own. Imported by vLLM (plugin.py)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig

from .common import ProfilingImages, check_weights, encode, manifest_for, profiling

VISION_PARTS = ("vision_tower", "multi_modal_projector")


class EvoExportLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return manifest_for(self.get_hf_config()).tokens_per_image


class EvoExportLlavaProcessor(LlavaMultiModalProcessor):
    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        pixels = processed_data.pop("pixel_values", None)
        if pixels is not None:
            features, indices = encode(self.info.get_hf_config(), pixels, dummy=profiling(mm_inputs))
            processed_data["evo_features"] = torch.from_numpy(features)
            processed_data["evo_indices"] = torch.from_numpy(indices)
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs: Mapping[str, object]):
        return dict(evo_features=MultiModalFieldConfig.batched("image"),
                    evo_indices=MultiModalFieldConfig.batched("image"),
                    image_embeds=MultiModalFieldConfig.batched("image"))


class EvoExportLlavaDummyInputs(ProfilingImages, LlavaDummyInputsBuilder):
    pass


@MULTIMODAL_REGISTRY.register_processor(EvoExportLlavaProcessor, info=EvoExportLlavaProcessingInfo,
                                        dummy_inputs=EvoExportLlavaDummyInputs)
class EvoExportLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        check_weights(self.config, vllm_config.model_config.model)
        self.embed_dtype = vllm_config.model_config.dtype
        del self.vision_tower, self.multi_modal_projector     # the build is the encoder

    def embed_multimodal(self, **kwargs: object):
        features = kwargs.get("evo_features")
        if features is None:
            return super().embed_multimodal(**kwargs)      # image_embeds given by the client
        return tuple(f.to(self.embed_dtype) for f in features)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights((n, w) for n, w in weights if not any(p in n for p in VISION_PARTS))
