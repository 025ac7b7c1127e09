"""vLLM's entry point (`vllm.general_plugins`, declared in pyproject.toml): registers the
model classes that run a build as the vision encoder. They are used only where a model's
config asks for them (`hf_overrides(BUILD, CHECKPOINT)` sets its architecture), so stock
vLLM in the same environment is untouched."""
from __future__ import annotations


def register() -> None:
    from vllm import ModelRegistry

    from . import ARCHITECTURES
    for module, arch in ARCHITECTURES.values():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"evoexport.integrations.vllm.{module}:{arch}")
