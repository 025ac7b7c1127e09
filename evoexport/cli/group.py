"""The `evoexport` command group that every command module adds to."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="evoexport")
def cli():
    """EvoPrune a multimodal LLM's vision encoder and export it as validated ONNX stage graphs."""
