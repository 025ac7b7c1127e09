"""The exported graphs compute what the PyTorch modules do: selections exactly, and a
reduced-precision twin never writes into the fp32 stages."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import hostile_importance


# The configurations builds ship: the spatial term on (the default), first and later prune
# points (a later one takes sizes and the kept tokens' original positions), with and
# without CLS, several grids and budgets. (grid, tokens entering, budget, has_cls)
SELECT_CONFIGS = [(7, 49, 35, True), (7, 35, 24, True), (5, 25, 12, False), (6, 20, 9, False), (4, 16, 5, True)]


@pytest.fixture(scope="module")
def select_sessions(tmp_path_factory):
    """One exported selection graph per configuration, exported on first use."""
    import onnxruntime as ort

    from evoexport.export.onnx import export_graph
    from evoexport.prune.selection import PruneParams, SelectGraph
    from evoexport.pipeline.stages import GraphSpec

    d, sessions = tmp_path_factory.mktemp("sel"), {}
    params = PruneParams()
    assert params.spatial_weight > 0   # the shipped default scoring

    def get(config):
        if config not in sessions:
            grid, n, k, cls = config
            later = n < grid * grid
            name = f"select_{grid}_{n}_{k}_{int(cls)}"
            inputs = ["h", "imp", "sizes", "pos"] if later else ["h", "imp"]
            graph = GraphSpec(name, "select", SelectGraph(k, params, cls, grid), inputs,
                              ["h_out", "sizes_out", "pos_out", "merge_out", "picks_out"], None, n, k)
            example = {"h": torch.randn(2, n + cls, 6), "imp": torch.rand(2, n)}
            if later:
                example |= {"sizes": torch.ones(2, n), "pos": torch.arange(n).expand(2, n).contiguous()}
            export_graph(graph, example, d)
            sessions[config] = ort.InferenceSession(str(d / f"{name}.onnx"), providers=["CPUExecutionProvider"]), \
                graph.module, inputs
        return sessions[config]
    return get


@settings(max_examples=60, deadline=None)
@given(config=st.sampled_from(SELECT_CONFIGS), b=st.integers(1, 4), seed=st.integers(0, 2**16),
       pattern=st.sampled_from(["random", "ties", "nan", "inf", "equal", "duplicate_tokens", "zero_features"]))
def test_exported_selection_matches_torch_exactly(select_sessions, config, b, seed, pattern):
    sess, module, inputs = select_sessions(config)
    grid, n, k, cls = config
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, n + cls, 6, generator=g)
    imp = torch.rand(b, n, generator=g)
    sizes = torch.randint(1, 4, (b, n), generator=g).float()
    pos = torch.stack([torch.randperm(grid * grid, generator=g)[:n].sort().values for _ in range(b)])
    imp = hostile_importance(imp, pattern, g)
    if pattern == "duplicate_tokens":
        h[:, cls:] = h[:, cls:cls + 1]
    elif pattern == "zero_features":
        h[:, cls:] = 0
    feeds = {"h": h, "imp": imp, "sizes": sizes, "pos": pos}
    ref = module(*(feeds[i] for i in inputs))
    got = sess.run(None, {i: feeds[i].numpy() for i in inputs})
    np.testing.assert_array_equal(got[2], ref[2].numpy())                 # the same tokens, in the same order
    np.testing.assert_array_equal(got[3], ref[3].numpy())                 # merged into the same kept tokens
    np.testing.assert_array_equal(got[4], ref[4].numpy())                 # picked at the same steps
    np.testing.assert_array_equal(got[1], ref[1].numpy())
    np.testing.assert_allclose(got[0], ref[0].numpy(), rtol=1e-5, atol=1e-5)
    assert got[2].shape == (b, k)
    for row in got[2]:
        assert list(row) == sorted(set(row))


def test_reduced_precision_twin_does_not_write_into_the_fp32_stages():
    """The fp16 twin is a deepcopy of the tower; the capture hooks of the fp32 pipeline's
    stages must not come with it."""
    import torch

    from evoexport.models import load_tower
    from evoexport.prune.selection import PruneParams
    from evoexport.prune.schedule import default_schedule
    from evoexport.pipeline.stages import Pipeline

    tower = load_tower("llava-tiny", quiet=True)
    pipe = Pipeline(tower, default_schedule(tower.depth, tower.num_patches, 0.5), PruneParams())
    x = torch.randn(1, 3, 56, 56)
    pipe.run(x)
    probes = [g.module for g in pipe.graphs if g.kind == "encoder" and g.module.probe]
    before = [{k: v.clone() for k, v in s._captured.items()} for s in probes]
    twin = tower.reduced_precision_copy(torch.bfloat16)
    Pipeline(twin, pipe.points, PruneParams()).run(x)
    for stage, was in zip(probes, before):
        assert stage._captured.keys() == was.keys()
        for k in was:
            assert stage._captured[k].dtype == torch.float32 and torch.equal(stage._captured[k], was[k])
