"""Qwen3-VL in vLLM with a build as its vision encoder: the Qwen2.5-VL plugin's mixins
(qwen2_5_vl.py: images resized to the build's size, K tokens per image at their kept units'
mRoPE positions, no vision tower) over vLLM's Qwen3-VL classes. The build's DeepStack taps
travel with its features on the hidden axis (common.encode), which vLLM's Qwen3-VL splits
off and adds after the first decoder layers, as its own encoder's output would be. Imported
by vLLM (plugin.py)."""
from __future__ import annotations

from vllm.model_executor.models.qwen3_vl import (Qwen3VLDummyInputsBuilder, Qwen3VLForConditionalGeneration,
                                                 Qwen3VLMultiModalProcessor, Qwen3VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .common import ProfilingImages
from .qwen2_5_vl import BuildAsEncoder, BuildInfo, BuildProcessor


class EvoExportQwen3ProcessingInfo(BuildInfo, Qwen3VLProcessingInfo):
    def get_supported_mm_processor_kwargs(self) -> dict[str, set[str]]:
        # vLLM's Qwen3-VL adds keys to the video scope, which this image-only info has not
        return super(Qwen3VLProcessingInfo, self).get_supported_mm_processor_kwargs()


class EvoExportQwen3Processor(BuildProcessor, Qwen3VLMultiModalProcessor):
    pass


class EvoExportQwen3DummyInputs(ProfilingImages, Qwen3VLDummyInputsBuilder):
    pass


@MULTIMODAL_REGISTRY.register_processor(EvoExportQwen3Processor, info=EvoExportQwen3ProcessingInfo,
                                        dummy_inputs=EvoExportQwen3DummyInputs)
class EvoExportQwen3VLForConditionalGeneration(BuildAsEncoder, Qwen3VLForConditionalGeneration):
    pass
