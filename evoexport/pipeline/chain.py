"""The one way a chain of graphs is run in Python: in order, each graph's inputs read from
one table of named tensors and its outputs written back. The PyTorch reference
(Pipeline.run, over GraphSpecs), every backend's Runner (over the manifest's entries) and
the CUDA chain (TorchChain, through Pipeline.run) all go through run_chain."""
from __future__ import annotations

from typing import Callable, Iterable


def spec_names(graph) -> tuple[list[str], list[str]]:
    """Input and output names of a GraphSpec (pipeline/stages.py)."""
    return graph.inputs, graph.outputs


def entry_names(entry: dict) -> tuple[list[str], list[str]]:
    """Input and output names of a manifest graph entry."""
    return [t["name"] for t in entry["inputs"]], [t["name"] for t in entry["outputs"]]


def run_chain(graphs: Iterable, env: dict, run_graph: Callable, names: Callable = spec_names) -> dict:
    """Run `graphs` in order. `run_graph(graph, inputs)` gets the graph and its inputs as a
    list (in its input order) and returns its outputs as a sequence (in its output order)
    or as a dict by name. `env` holds the chain's inputs and gets every output; returned."""
    for g in graphs:
        inputs, outputs = names(g)
        result = run_graph(g, [env[n] for n in inputs])
        env.update(result if isinstance(result, dict) else zip(outputs, result))
    return env
