"""A stand-in `tensorrt` module shaped like TensorRT 10.x or 11.x: the slice of its Python
API that the real Polygraphy loaders (network_from_onnx_path, CreateConfig,
engine_bytes_from_network) touch when evoexport builds engines, recording every call that
reaches it. TensorRT cannot be installed on this project's machines; this pins what we ask
of it through Polygraphy and does NOT claim TensorRT ran. The parser reads the ONNX file's
real inputs (with the onnx package), so Polygraphy's profile matching runs on real names."""
from __future__ import annotations

import enum
import types


def standin_tensorrt(version: str) -> types.ModuleType:
    major = int(version.split(".")[0])
    calls: list[tuple] = []
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = calls
    members = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if major == 10 else {"STRONGLY_TYPED": 1}
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", members)
    # 11.x has no weak-typing flags: touching BuilderFlag.FP16 there raises AttributeError
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", {"FP16": 0, "INT8": 1, "BF16": 2, "TF32": 7} if major == 10
                                   else {"DEBUG": 0})
    trt.OnnxParserFlag = enum.IntEnum("OnnxParserFlag", {"NATIVE_INSTANCENORM": 0})
    trt.DeviceType = enum.IntEnum("DeviceType", {"GPU": 0, "DLA": 1})
    trt.ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "DETAILED": 2})
    trt.LayerType = enum.IntEnum("LayerType", {"SHAPE": 0, "QUANTIZE": 1, "DEQUANTIZE": 2})
    trt.init_libnvinfer_plugins = lambda logger, namespace: True

    class ILogger:
        def __init__(self):
            pass

    class Logger(ILogger):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    class Tensor:
        is_shape_tensor = False

        def __init__(self, name, shape):
            self.name, self.shape, self.dtype = name, tuple(shape), "float32"

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs = flags, []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, index):
            return self.inputs[index]

        def get_flag(self, flag):
            return bool(self.flags & (1 << int(flag)))

        def __iter__(self):
            return iter(())

    class HostMemory(bytes):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Cache:
        def __init__(self, data):
            self.loaded = bytes(data)
            self.data = self.loaded + b"+timed"   # what a build adds to the cache

        def combine(self, other, ignore_mismatch):
            calls.append(("combine_timing_cache", other.data))
            return True

        def serialize(self):
            return HostMemory(self.data)

    class Config:
        DLA_core = -1
        default_device_type = trt.DeviceType.GPU
        int8_calibrator = None
        profiling_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY

        def __init__(self):
            self.flags = {trt.BuilderFlag.TF32} if hasattr(trt.BuilderFlag, "TF32") else set()
            self.profiles, self.cache = [], None

        def set_flag(self, flag):
            calls.append(("set_flag", flag))
            self.flags.add(flag)

        def clear_flag(self, flag):
            calls.append(("clear_flag", flag))
            self.flags.discard(flag)

        def get_flag(self, flag):
            return flag in self.flags

        @property
        def num_optimization_profiles(self):
            return len(self.profiles)

        def add_optimization_profile(self, profile):
            calls.append(("add_optimization_profile", dict(profile.shapes)))
            self.profiles.append(profile)

        def create_timing_cache(self, data):
            calls.append(("create_timing_cache", bytes(data)))
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            calls.append(("set_timing_cache", cache.loaded, ignore_mismatch))
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        def __bool__(self):
            return bool(self.shapes)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network", sorted(f.name for f in config.flags)))
            return HostMemory(b"PLAN")

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            import onnx
            calls.append(("parse_from_file", path))
            model = onnx.load(path, load_external_data=False)
            for value in model.graph.input:
                dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
                self.network.inputs.append(Tensor(value.name, dims))
            return True

    trt.ILogger, trt.Logger, trt.Builder, trt.OnnxParser = ILogger, Logger, Builder, OnnxParser
    return trt



def forget_tensorrt() -> None:
    """Polygraphy imports TensorRT lazily and keeps the module (and a logger class made from
    it) once imported: reset, so the next use imports whatever `tensorrt` is then."""
    import sys

    for name, module in list(sys.modules.items()):
        if name.startswith("polygraphy") and module is not None:
            for value in list(vars(module).values()):
                if type(value).__name__ == "LazyModule":
                    object.__setattr__(value, "module", None)
    trt_util = sys.modules.get("polygraphy.backend.trt.util")
    if trt_util is not None:
        trt_util.TRT_LOGGER = None
