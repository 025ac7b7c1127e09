"""model.py of the first step of every evoexport ensemble (copied there as is): pixel values
holding NaN or infinity are refused with a client error (INVALID_ARG, HTTP 400), as the
library refuses them; the others pass through unchanged. Requests are judged one by one, so
a bad one batched with good ones fails alone.

It needs only numpy, which Triton's Python backend itself needs, so it runs in NVIDIA's
containers next to onnxruntime, openvino or tensorrt steps without evoexport installed.
Tensors go through DLPack both ways: the stub bundled with nvidia-pytriton was built for
numpy 1, and under numpy 2 its as_numpy() reads zeros (docs/serving.md).
"""
import json
import os
import sys


def _quiet_dlpack_hook():
    """The stub renames a consumed DLPack capsule, and numpy then reports a harmless
    ValueError per output tensor; only that report is dropped."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, ValueError) and unraisable.object is None
                and "PyCapsule_GetPointer called with incorrect name" in str(unraisable.exc_value)):
            previous(unraisable)
    sys.unraisablehook = hook


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        # the stub ignores PYTHONPATH: where numpy lives on the machine that wrote the repository
        paths = json.loads(config.get("parameters", {}).get("EVOEXPORT_SYS_PATH", {}).get("string_value", "[]"))
        for path in reversed(paths):
            if os.path.isdir(path) and path not in sys.path:
                sys.path.insert(0, path)
        self.input = config["input"][0]["name"]
        self.output = config["output"][0]["name"]
        _quiet_dlpack_hook()

    def execute(self, requests):
        import numpy as np
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, self.input)
            pixels = np.from_dlpack(tensor)
            if not np.isfinite(pixels).all():
                error = pb_utils.TritonError(f"{self.input} hold NaN or infinite values",
                                             pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            # a copy: the request's own buffer is not ours to hand on
            out = pb_utils.Tensor.from_dlpack(self.output, np.array(pixels, copy=True).__dlpack__())
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
