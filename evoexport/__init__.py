"""evoexport: EvoPrune visual-token pruning inside a multimodal LLM's vision encoder,
exported as static-shape ONNX stage graphs (and TensorRT engines) with a validated runtime.

The package reads as the data flow (docs/architecture.md):
models -> prune -> pipeline -> export -> tensorrt -> runtime -> validate / measure,
with inputs (images, video), show (pictures) and integrations (transformers) beside them.
"""
__version__ = "0.1.0"


def load(build_dir, backend: str = "onnxruntime", **options):
    """Load a build directory; returns a callable pixel_values -> Output(features, indices, ...).
    A bucketed build (`build --grids`) loads as a BucketRunner, which takes images:
    run_images([PIL images]) -> [ImageResult(features, indices, deepstack, grid, aspect_change)]."""
    from .manifest import is_bucketed
    if is_bucketed(build_dir):
        from .runtime.buckets import BucketRunner
        return BucketRunner(build_dir, backend=backend, **options)
    from .runtime.runner import load as _load
    return _load(build_dir, backend=backend, **options)


__all__ = ["load", "__version__"]
