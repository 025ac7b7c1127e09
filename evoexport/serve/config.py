"""config.pbtxt for each model of a Triton repository, written through Triton's own
ModelConfig protobuf (tritonclient's model_config_pb2): a field Triton does not know is an
error here, not when the server loads the repository.

Rules Triton enforces at load time, followed here (docs/serving.md):
  - with max_batch_size N, dims leave out the batch axis;
  - an ensemble's max_batch_size is no larger than any of its steps';
  - dynamic_batching and instance_group go on the steps, never on an ensemble;
  - with max_batch_size 0 (a temporal build's steps: tensors of two batches, B groups and
    B*(G-1) later frames, which one batch axis cannot split), dims include the batch axis
    as -1 and there is no dynamic batcher.
"""
from __future__ import annotations

from typing import NamedTuple

from ..errors import EvoExportError

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16",
                 "int64": "TYPE_INT64", "int32": "TYPE_INT32", "bool": "TYPE_BOOL"}
NUMPY_DTYPES = {"TYPE_FP32": "float32", "TYPE_FP16": "float16", "TYPE_INT64": "int64", "TYPE_INT32": "int32",
                "TYPE_BOOL": "bool"}


def _pb():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise EvoExportError("writing a Triton repository needs tritonclient: pip install 'evoexport[serve]'") from None
    return model_config_pb2


def _add_tensors(field, tensors: list[dict], batched: bool) -> None:
    for t in tensors:
        io = field.add()
        io.name = t["name"]
        io.data_type = _pb().DataType.Value(TRITON_DTYPES[t["dtype"]])
        shape = t["shape"][1:] if batched else t["shape"]      # Triton's batch axis is left out
        io.dims.extend(-1 if isinstance(d, str) else int(d) for d in shape)


class Batching(NamedTuple):
    """How every step of a repository batches and is replicated."""
    max_batch: int
    instances: int
    kind: str              # KIND_CPU or KIND_GPU
    queue_delay_us: int


def step_config(name: str, entry: dict, batching: Batching, *, platform: str, model_file: str | None = None,
                cc_files: dict | None = None, parameters: dict | None = None):
    """One graph as a Triton model. `platform` is a backend name (onnxruntime, openvino,
    python) or tensorrt_plan."""
    pb = _pb()
    max_batch, instances, kind, queue_delay_us = batching
    cfg = pb.ModelConfig(name=name, max_batch_size=max_batch)
    if platform == "tensorrt_plan":
        cfg.platform = platform
    else:
        cfg.backend = platform
    _add_tensors(cfg.input, entry["inputs"], max_batch > 0)
    _add_tensors(cfg.output, entry["outputs"], max_batch > 0)
    if max_batch > 0:
        cfg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    group = cfg.instance_group.add()
    group.count = instances
    group.kind = pb.ModelInstanceGroup.Kind.Value(kind)
    if model_file:
        cfg.default_model_filename = model_file
    for cc, file in (cc_files or {}).items():
        cfg.cc_model_filenames[cc] = file
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = value
    return cfg


def ensemble_config(name: str, inputs: list[dict], outputs: list[dict], steps: list[tuple[str, dict, dict]],
                    max_batch: int):
    """steps: (model name, {input inside the step: ensemble tensor}, {output inside: ensemble tensor})."""
    pb = _pb()
    cfg = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch)
    _add_tensors(cfg.input, inputs, max_batch > 0)
    _add_tensors(cfg.output, outputs, max_batch > 0)
    for model, ins, outs in steps:
        step = cfg.ensemble_scheduling.step.add()
        step.model_name, step.model_version = model, -1
        step.input_map.update(ins)
        step.output_map.update(outs)
    return cfg


def to_text(cfg) -> str:
    from google.protobuf import text_format
    return text_format.MessageToString(cfg)


def read_config(path) -> object:
    """A config.pbtxt parsed strictly into Triton's ModelConfig (tests, `evoexport triton` checks)."""
    from google.protobuf import text_format
    cfg = _pb().ModelConfig()
    text_format.Parse(open(path).read(), cfg)
    return cfg


def check_ensemble(configs: dict) -> None:
    """What Triton checks when it loads an ensemble, checked before anything is written: every
    step exists, its batch limit is at least the ensemble's, and every tensor the ensemble
    wires has one dtype and shape on both sides."""
    for cfg in configs.values():
        if cfg.platform != "ensemble":
            continue
        tensors = {t.name: (t.data_type, list(t.dims)) for t in cfg.input}
        produced = dict(tensors)
        for step in cfg.ensemble_scheduling.step:
            model = configs.get(step.model_name)
            if model is None:
                raise EvoExportError(f"ensemble {cfg.name}: step {step.model_name} is not in the repository")
            if model.max_batch_size < cfg.max_batch_size:
                raise EvoExportError(f"ensemble {cfg.name}: step {step.model_name} takes batch <= "
                                     f"{model.max_batch_size}, the ensemble {cfg.max_batch_size}")
            for side, mapping in ((model.input, step.input_map), (model.output, step.output_map)):
                for t in side:
                    outer = mapping.get(t.name)
                    if outer is None:
                        if side is model.input and not t.optional:
                            raise EvoExportError(f"ensemble {cfg.name}: input {t.name} of {model.name} is not wired")
                        continue
                    have = produced.get(outer) if side is model.input else None
                    if side is model.input and have is None:
                        raise EvoExportError(f"ensemble {cfg.name}: {outer} is used by {model.name} before any step makes it")
                    if have is not None and have != (t.data_type, list(t.dims)):
                        raise EvoExportError(f"ensemble {cfg.name}: {outer} disagrees between steps ({model.name})")
                    if side is model.output:
                        produced[outer] = (t.data_type, list(t.dims))
        for t in cfg.output:
            if produced.get(t.name) != (t.data_type, list(t.dims)):
                raise EvoExportError(f"ensemble {cfg.name}: output {t.name} is not made with dtype and dims "
                                     "as declared")
