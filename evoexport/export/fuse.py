"""A build's whole chain as one graph: the stages and selections merged into a single ONNX
graph with the chain's input and outputs (features, then every prune point's decisions),
written as a build of its own whose manifest lists that one graph.

Why a build and not a bare .onnx file: the manifest is the contract every tool reads, so a
fused build is validated, checked for TensorRT, served, benchmarked and dropped into other
engines (OpenVINO GenAI, TensorRT-LLM's one visual engine) by the same commands as any
build, and its sha256 and recipe travel with it.

The merge is by name: the chain's wiring tensors (stage0_hidden, pruned0_hidden, sizes_0,
...) are unique across a build by the contract (names.py), so they connect the graphs as
they stand; every other name of a graph (its nodes, weights and intermediate values) gets
the graph's name as a prefix, so two graphs' internals never collide.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import EvoExportError
from ..files import atomic_dir, write_json
from ..manifest import build_root, read_manifest, sha256_file
from .. import names
from ..names import GraphKind

FUSED = "fused"                       # the one graph's name (fused.onnx, fused.onnx.data)
EXTERNAL_DATA_OVER = 1 << 30          # bytes of weights above which they go to fused.onnx.data


def fuse(build_dir, out, progress=None, on_commit=None) -> Path:
    """Write `out`: `build_dir` with its chain as one graph, swapped in whole (files.atomic_dir;
    `on_commit` runs the moment it is in place). Returns `out`."""
    import onnx
    say = progress or (lambda line: None)
    manifest = read_manifest(build_dir)
    build_dir = build_root(build_dir)     # a bucketed build's grid: the folder of its GRID.json
    if len(manifest.graphs) == 1:
        raise EvoExportError(f"{build_dir} is one graph already")
    say(f"merging {len(manifest.graphs)} graphs of {build_dir}")
    model = merged_model(build_dir, manifest)
    with atomic_dir(out, on_commit) as tmp:
        weights = sum(t.ByteSize() for t in model.graph.initializer)
        external = weights > EXTERNAL_DATA_OVER
        onnx.save_model(model, str(tmp / f"{FUSED}.onnx"), save_as_external_data=external,
                        location=f"{FUSED}.onnx.data" if external else None, all_tensors_to_one_file=True)
        onnx.checker.check_model(str(tmp / f"{FUSED}.onnx"), full_check=False)
        write_json(tmp / "manifest.json", fused_manifest(manifest, tmp, external))
        for extra in ("calibration.npz",):        # what a build carries beside its graphs
            if (build_dir / extra).is_file():
                (tmp / extra).write_bytes((build_dir / extra).read_bytes())
    say(f"wrote {out}")
    return Path(out)


def merged_model(build_dir: Path, manifest):
    """The chain's graphs as one ModelProto (weights loaded in memory)."""
    import onnx
    wires = {t["name"] for g in manifest.graphs for t in [*g["inputs"], *g["outputs"]]}
    nodes, initializers, values, opsets = [], [], [], {}
    for entry in manifest.graphs:
        model = onnx.load(str(build_dir / entry["file"]), load_external_data=True)
        graph = _prefixed(model.graph, f"{entry['name']}/", wires)
        if names.is_later(entry["name"]):   # batch B*(G-1), not the input's B: its own symbol
            _rename_batch(graph, f"{entry['name']}_batch")
        nodes += graph.node
        initializers += graph.initializer
        values += graph.value_info
        for imp in model.opset_import:
            opsets[imp.domain] = max(opsets.get(imp.domain, 0), imp.version)
        ir_version = model.ir_version
    first = onnx.load(str(build_dir / manifest.graphs[0]["file"]), load_external_data=False)
    outputs = [_value_info(build_dir, manifest, t["name"]) for t in manifest.outputs]
    for value, producer in zip(outputs, [_producer(manifest, t["name"]) for t in manifest.outputs]):
        if names.is_later(producer):
            _rename_batch_of(value, f"{producer}_batch")
    nodes, initializers = _shared_weights(nodes, initializers)
    graph = onnx.helper.make_graph(nodes, FUSED, [first.graph.input[0]], outputs, initializers, value_info=values)
    opset_imports = [onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items()]
    return onnx.helper.make_model(graph, opset_imports=opset_imports, ir_version=ir_version,
                                  producer_name="evoexport fuse")


def _rename_batch(graph, symbol: str) -> None:
    """Every value's batch axis in `graph` under its own symbol (ORT plans memory by symbol)."""
    for value in [*graph.input, *graph.output, *graph.value_info]:
        _rename_batch_of(value, symbol)


def _rename_batch_of(value, symbol: str) -> None:
    dims = value.type.tensor_type.shape.dim
    if dims and dims[0].dim_param:
        dims[0].dim_param = symbol


def _producer(manifest, tensor: str) -> str:
    return next(g["name"] for g in manifest.graphs if any(t["name"] == tensor for t in g["outputs"]))


def _shared_weights(nodes: list, initializers: list) -> tuple[list, list]:
    """One copy of each weight that several graphs hold (a temporal build's anchor and
    later-frame stages run the same layers): later copies renamed to the first."""
    import hashlib

    from onnx import numpy_helper
    first, alias, kept = {}, {}, []
    for t in initializers:
        key = (t.data_type, tuple(t.dims), hashlib.sha256(numpy_helper.to_array(t).tobytes()).hexdigest())
        if key in first:
            alias[t.name] = first[key]
        else:
            first[key] = t.name
            kept.append(t)
    if alias:
        for node in nodes:   # weights are read by top-level nodes (the exporter inlines them)
            node.input[:] = [alias.get(n, n) for n in node.input]
    return nodes, kept


def _prefixed(graph, prefix: str, keep: set[str]):
    """`graph` with every name not in `keep` (and not empty: an omitted optional input)
    prefixed; subgraphs (If, Loop, Scan) are renamed through the same table."""
    import onnx
    renamed = onnx.GraphProto()
    renamed.CopyFrom(graph)
    table = {}

    def name(n: str) -> str:
        if not n or n in keep:
            return n
        return table.setdefault(n, prefix + n)

    _rename(renamed, name, prefix)
    return renamed


def _rename(graph, name, prefix: str) -> None:
    import onnx
    for t in [*graph.initializer, *graph.sparse_initializer]:
        t.name = name(t.name)
    for v in [*graph.input, *graph.output, *graph.value_info]:
        v.name = name(v.name)
    for node in graph.node:
        node.name = prefix + node.name if node.name else node.name
        node.input[:] = [name(n) for n in node.input]
        node.output[:] = [name(n) for n in node.output]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename(attr.g, name, prefix)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _rename(g, name, prefix)


def _value_info(build_dir: Path, manifest, tensor: str):
    """The ValueInfo of a chain output, as the graph that makes it declares it."""
    import onnx
    for entry in manifest.graphs:
        if any(t["name"] == tensor for t in entry["outputs"]):
            model = onnx.load(str(build_dir / entry["file"]), load_external_data=False)
            return next(v for v in model.graph.output if v.name == tensor)
    raise EvoExportError(f"no graph of the build makes its output {tensor}")


def fused_manifest(manifest, out_dir: Path, external: bool) -> dict:
    """The build's manifest with one stage: the fused graph, from the chain's input to all
    its outputs, over the chain's layers and tokens."""
    first, last = manifest.stages[0], manifest.stages[-1]
    entry = {"name": FUSED, "kind": GraphKind.ENCODER, "file": f"{FUSED}.onnx",
             "sha256": sha256_file(out_dir / f"{FUSED}.onnx"), "tokens_in": first["tokens_in"],
             "tokens_out": last["tokens_out"], "inputs": manifest.inputs, "outputs": manifest.outputs,
             "opset": max(g["opset"] for g in manifest.graphs),
             "layers": [first["layers"][0], last["layers"][1]], "fused_from": [g["name"] for g in manifest.graphs]}
    if external:
        entry["data_file"] = f"{FUSED}.onnx.data"
        entry["data_sha256"] = sha256_file(out_dir / entry["data_file"])
    for key in ("proportional_attention",):
        if key in first:
            entry[key] = first[key]
    fused = {**manifest.data, "stages": [entry]}
    if manifest.temporal:   # the group and budgets stay; every graph is inside the one
        fused["temporal"] = {**manifest.temporal, "graphs": []}
    return fused
