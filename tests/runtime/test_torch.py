"""What the GPU chain does differently from the CPU reference, proven on the CPU: hidden
states handed across stage boundaries in the chain's own dtype, the similarity as an
fp32-accumulated Gram matrix of those states, only the asked-for outputs returned, and a
chosen SDPA backend. Each must leave the decisions as they were (issue 23)."""
from __future__ import annotations

import pytest
import torch

from evoexport.errors import EvoExportError
from evoexport.models.loader import load_tower
from evoexport.pipeline.stages import Pipeline
from evoexport.prune.schedule import default_schedule
from evoexport.prune.selection import PruneParams, SelectRule, cosine_similarity, select
from evoexport.runtime.backends.torch import TorchChain


def _pipeline(model):
    tower = load_tower(model, quiet=True)
    points = default_schedule(tower.depth, tower.num_patches, 0.5, tower.spec.prune_layers)
    x = torch.randn(3, 3, tower.image_size, tower.image_size, generator=torch.Generator().manual_seed(1))
    return Pipeline(tower, points, PruneParams()), x


@pytest.mark.parametrize("model", ["llava-tiny", "qwen2.5-vl-tiny"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_keeping_the_chain_dtype_across_boundaries_changes_no_number(model, precision):
    pipe, x = _pipeline(model)
    through_fp32 = TorchChain(pipe, "cpu", precision, keep_dtype=False)(x, outputs=None)
    kept = TorchChain(pipe, "cpu", precision, keep_dtype=True)(x, outputs=None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    hidden = [k for k in kept if k.startswith(("stage", "pruned")) and k.endswith("_hidden")]
    assert hidden and all(kept[k].dtype == dtype for k in hidden)           # no fp32 round trip
    assert all(through_fp32[k].dtype == torch.float32 for k in hidden)
    assert sorted(kept) == sorted(through_fp32)
    for name in kept:   # the selection's fp32 merge, cast once, is the cast the next stage made
        assert torch.equal(through_fp32[name].to(kept[name].dtype), kept[name]), name
    assert kept["features"].dtype == torch.float32


@pytest.mark.parametrize("has_cls", [True, False])
def test_gram_similarity_of_reduced_precision_states_is_the_fp32_cosine(has_cls):
    g = torch.Generator().manual_seed(3)
    hidden = (torch.randn(2, 1 + 40, 64, generator=g) * torch.linspace(0.1, 30, 64)).to(torch.bfloat16)
    hidden[0, 5] = 0   # a zero vector: its similarities are 0, as with F.normalize's eps
    upcast = hidden.float()
    reference = torch.nn.functional.normalize(upcast, dim=-1, eps=1e-6)
    reference = reference @ reference.transpose(1, 2)
    sim = cosine_similarity(hidden)
    assert sim.dtype == torch.float32
    torch.testing.assert_close(sim, reference, rtol=0, atol=2e-6)
    # the selection decides the same on the bf16 states as on their fp32 values, and hands back
    # in bf16 exactly what the fp32 path computes
    importance = torch.rand(2, 40 + (0 if has_cls else 1), generator=g)
    low = select(hidden, importance, SelectRule(12, PruneParams(), has_cls=has_cls, grid=None))
    high = select(upcast, importance, SelectRule(12, PruneParams(), has_cls=has_cls, grid=None))
    assert torch.equal(low.picks, high.picks) and torch.equal(low.merge, high.merge)
    assert low.hidden.dtype == torch.bfloat16 and torch.equal(low.hidden, high.hidden.to(torch.bfloat16))
    assert low.sizes.dtype == torch.float32 and torch.equal(low.sizes, high.sizes)


def test_the_chain_returns_what_was_asked_for():
    pipe, x = _pipeline("llava-tiny")
    chain = TorchChain(pipe, "cpu")
    assert list(chain(x)) == ["features"]                           # features by default
    asked = chain(x, outputs=["features", "picks_0", "merge_1"])
    assert list(asked) == ["features", "picks_0", "merge_1"]
    everything = chain(x, outputs=None)
    assert {"stage0_hidden", "pruned0_hidden", "indices_1"} <= set(everything)
    assert torch.equal(everything["picks_0"], asked["picks_0"])


def test_a_chosen_sdpa_backend_keeps_the_decisions():
    pipe, x = _pipeline("llava-tiny")
    names = ["features"] + [f"picks_{i}" for i in range(len(pipe.points))] + [f"merge_{i}" for i in range(len(pipe.points))]
    default = TorchChain(pipe, "cpu")(x, outputs=names)
    math_only = TorchChain(pipe, "cpu", sdpa=("math",))(x, outputs=names)
    for name in names[1:]:
        assert torch.equal(default[name], math_only[name]), name
    torch.testing.assert_close(default["features"], math_only["features"], rtol=1e-4, atol=1e-4)
    with pytest.raises(EvoExportError, match="SDPA backends must be some of cudnn, flash, efficient, math"):
        TorchChain(pipe, "cpu", sdpa=("cudnn", "fastest"))


def test_a_runner_on_the_torch_chain_still_gives_every_tensor_where_asked(tiny_build, tmp_path):
    """Runner calls ask the chain for features and decisions only; run_all (what `show` reads:
    the importances) still gets every tensor."""
    import evoexport
    from evoexport.cli import main
    from evoexport.inputs.images import sample_batch

    runner = evoexport.load(tiny_build, backend="torch")
    x = sample_batch(runner.manifest.data["tower"]["image_size"], runner.manifest.data["preprocess"])
    assert {"stage0_importance", "pruned0_hidden"} <= set(runner.run_all(x))
    out = runner(x)
    assert len(out.picks_per_point) == len(runner.manifest.data["schedule"]) and out.features.shape[0] == x.shape[0]
    assert main(["show", str(tiny_build), "--backend", "torch", "--output", str(tmp_path / "keep.png")]) == 0
