"""model.py of every Python-backend step of an evoexport repository (copied there as is).

Triton's Python backend runs this file in its own stub process, whose embedded Python
ignores PYTHONPATH: the paths evoexport and its dependencies live in come from the model's
config (EVOEXPORT_SYS_PATH). Two kinds of step (the config's EVOEXPORT_STEP):

  graph   one graph of the build, run by evoexport.serve.python_step (our runtime);
  pixels  the ensemble's first step in every flavour: pixel values holding NaN or infinity
          get a client error (INVALID_ARG, HTTP 400), as the library refuses them; the
          others pass through. Requests are judged one by one, so a bad one batched with good
          ones fails alone. It needs only numpy (which the Python backend itself needs), so it
          runs in NVIDIA's containers beside onnxruntime, openvino or tensorrt steps without
          evoexport installed.

Tensors go through DLPack both ways: the stub bundled with nvidia-pytriton was built for
numpy 1, and under numpy 2 its as_numpy() reads zeros (docs/serving.md).
"""
import json
import os
import sys


def quiet_dlpack_hook():
    """The stub renames a consumed DLPack capsule to a name numpy's capsule destructor does
    not know, so numpy reports a ValueError for every output tensor (no memory is lost: the
    stub frees it; resident memory stayed flat over thousands of requests here). Only that
    report is dropped; every other unraisable error still reaches the default hook."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, ValueError) and unraisable.object is None
                and "PyCapsule_GetPointer called with incorrect name" in str(unraisable.exc_value)):
            previous(unraisable)
    sys.unraisablehook = hook


class PixelCheck:
    def __init__(self, config: dict):
        self.input = config["input"][0]["name"]
        self.output = config["output"][0]["name"]

    def execute(self, requests: list, pb_utils) -> list:
        import numpy as np

        responses = []
        for request in requests:
            pixels = np.from_dlpack(pb_utils.get_input_tensor_by_name(request, self.input))
            if not np.isfinite(pixels).all():
                error = pb_utils.TritonError(f"{self.input} hold NaN or infinite values", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            # a copy: the request's own buffer is not ours to hand on
            out = pb_utils.Tensor.from_dlpack(self.output, np.array(pixels, copy=True).__dlpack__())
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        paths = json.loads(parameters.get("EVOEXPORT_SYS_PATH", {}).get("string_value", "[]"))
        for path in reversed(paths):
            if os.path.isdir(path) and path not in sys.path:
                sys.path.insert(0, path)
        quiet_dlpack_hook()
        if parameters.get("EVOEXPORT_STEP", {}).get("string_value") == "pixels":
            self.step = PixelCheck(config)
        else:
            from evoexport.serve.python_step import GraphStep
            self.step = GraphStep(os.path.join(args["model_repository"], args["model_version"]), config)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils
        return self.step.execute(requests, pb_utils)

    def finalize(self):
        self.step = None
