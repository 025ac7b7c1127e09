"""model.py of every graph in a `--backend python` Triton repository (copied there as is).

Triton's Python backend runs this file in its own stub process, whose embedded Python
ignores PYTHONPATH: the paths evoexport and its dependencies live in come from the model's
config (EVOEXPORT_SYS_PATH), then the work is done by evoexport.serve.python_step.
"""
import json
import os
import sys


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        paths = json.loads(config.get("parameters", {}).get("EVOEXPORT_SYS_PATH", {}).get("string_value", "[]"))
        for path in reversed(paths):
            if os.path.isdir(path) and path not in sys.path:
                sys.path.insert(0, path)
        from evoexport.serve.python_step import GraphStep
        self.step = GraphStep(os.path.join(args["model_repository"], args["model_version"]), config)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils
        return self.step.execute(requests, pb_utils)

    def finalize(self):
        self.step = None
