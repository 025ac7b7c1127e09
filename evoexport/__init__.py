"""evoexport: EvoPrune visual-token pruning inside a multimodal LLM's vision encoder,
exported as static-shape ONNX stage graphs (and TensorRT engines) with a validated runtime.

The package reads as the data flow (docs/architecture.md):
models -> prune -> pipeline -> export -> tensorrt -> runtime -> validate / measure,
with inputs (images, video), show (pictures) and integrations (transformers) beside them.
"""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"


def load(build_dir, backend: str = "onnxruntime", **options):
    """Load a build directory; returns a callable pixel_values -> Output(features, indices, ...)."""
    from .runtime.runner import load as _load
    return _load(build_dir, backend=backend, **options)


# Modules that moved when the package was grouped by pipeline step. The old names still
# import, with a DeprecationWarning, for one release.
MOVED_MODULES = {
    "evoexport.accuracy": "evoexport.measure.digits",
    "evoexport.bench": "evoexport.measure.bench",
    "evoexport.bench_cuda": "evoexport.measure.bench_cuda",
    "evoexport.build": "evoexport.export.build",
    "evoexport.calib_photos": "evoexport.export.calibration",
    "evoexport.cost": "evoexport.prune.cost",
    "evoexport.cuda_graphs": "evoexport.runtime.cuda_graphs",
    "evoexport.decisions": "evoexport.validate.decisions",
    "evoexport.engines": "evoexport.tensorrt.engines",
    "evoexport.eval_data": "evoexport.measure.eval_data",
    "evoexport.evaluate": "evoexport.measure.eval",
    "evoexport.images": "evoexport.inputs.images",
    "evoexport.plot": "evoexport.measure.plot",
    "evoexport.quantize": "evoexport.export.quantize",
    "evoexport.schedule": "evoexport.prune.schedule",
    "evoexport.stages": "evoexport.pipeline.stages",
    "evoexport.tolerances": "evoexport.validate.tolerances",
    "evoexport.trt_check": "evoexport.tensorrt.check",
    "evoexport.video": "evoexport.inputs.video",
    "evoexport.backends": "evoexport.runtime.backends",
    "evoexport.backends.onnxruntime": "evoexport.runtime.backends.onnxruntime",
    "evoexport.backends.openvino": "evoexport.runtime.backends.openvino",
    "evoexport.backends.tensorrt": "evoexport.runtime.backends.tensorrt",
    "evoexport.backends.torch": "evoexport.runtime.backends.torch",
    "evoexport.integrations.transformers": "evoexport.integrations.hf_llava",
    "evoexport.integrations.onevision": "evoexport.integrations.hf_onevision",
    "evoexport.models.llava": "evoexport.models.clip",
    "evoexport.models.tower": "evoexport.models.loader",
}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name as the module that replaced it."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        new = MOVED_MODULES[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old name will be removed in the next release",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


if not any(isinstance(f, _MovedModule) for f in sys.meta_path):
    # first: a moved package (evoexport.backends) aliases the new one, whose __path__ would
    # otherwise let the path finder load its submodules a second time under the old names
    sys.meta_path.insert(0, _MovedModule())

__all__ = ["load", "__version__", "MOVED_MODULES"]
