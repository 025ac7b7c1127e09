"""EvoPrune selection, schedule and cost model, checked against independent brute-force code."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evoexport.errors import EvoExportError
from evoexport.prune.cost import layer_flops, tower_flops
from evoexport.prune.selection import PruneParams, SelectRule, select
from evoexport.prune.schedule import PrunePoint, default_schedule, parse_schedule
from tests.helpers import hostile_importance


def brute_force_select(hidden, importance, budget, alpha, beta, has_cls=True, rounds=4, gamma=0.0, grid=None,
                       positions=None):
    """Straight-line NumPy/Python version of the definitions in prune.py's docstring."""
    c = int(has_cls)
    x = hidden[c:].astype(np.float64)
    n = x.shape[0]
    f = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)
    cos = f @ f.T
    red = np.array([max(cos[i, j] for j in range(n) if j != i) for i in range(n)]) if n > 1 else np.zeros(n)
    s = cos.copy()
    if grid:   # decision similarity: cosine minus gamma per grid width between the original patches
        pos = np.arange(n) if positions is None else positions
        rows, cols = pos // grid, pos % grid
        for i in range(n):
            for j in range(n):
                s[i, j] -= gamma * np.hypot(rows[i] - rows[j], cols[i] - cols[j]) / grid
    u = importance / max(importance.max(), 1e-12) - beta * red
    k_imp = min(budget, max(1, round(alpha * budget)))
    order = sorted(range(n), key=lambda i: (-u[i], i))
    picked = set(order[:k_imp])
    step = {i: 0 for i in picked}
    remaining = budget - k_imp
    rounds = min(rounds, remaining)
    for r in range(rounds):
        take = -(-remaining // (rounds - r))
        nov = {i: -max(s[i, j] for j in picked) for i in range(n) if i not in picked}
        new = set(sorted(nov, key=lambda i: (-nov[i], i))[:take])
        step.update({i: r + 1 for i in new})
        picked |= new
        remaining -= take
    kept = sorted(picked)
    # merge: each token to its most similar kept token (self for kept), size-weighted mean
    owner = [i if i in picked else kept[int(np.argmax([s[i, k] for k in kept]))] for i in range(n)]
    merged = np.stack([x[[i for i in range(n) if owner[i] == k]].mean(0) for k in kept])
    sizes = np.array([sum(1 for i in range(n) if owner[i] == k) for k in kept], dtype=np.float64)
    slots = [kept.index(o) for o in owner]                       # the merge map: kept slot of each token
    picks = [step.get(i, -1) for i in range(n)]                  # the step that kept each token
    return kept, merged, sizes, slots, picks


@pytest.mark.parametrize("alpha,beta,rounds", [(0.5, 0.3, 4), (1.0, 0.0, 4), (0.25, 1.0, 1), (0.0, 0.3, 3)])
def test_select_matches_brute_force(alpha, beta, rounds):
    g = torch.Generator().manual_seed(1)
    b, n, d, k = 3, 30, 16, 11
    hidden = torch.randn(b, 1 + n, d, generator=g)
    importance = torch.rand(b, n, generator=g)
    params = PruneParams(importance_ratio=alpha, redundancy_weight=beta, diversity_rounds=rounds)
    out, sizes, pos, merge, picks = select(hidden, importance, SelectRule(k, params))
    for i in range(b):
        kept, merged, ref_sizes, slots, steps = brute_force_select(hidden[i].numpy(), importance[i].numpy(), k,
                                                                   alpha, beta, rounds=rounds)
        assert pos[i].tolist() == kept
        assert merge[i].tolist() == slots and picks[i].tolist() == steps
        np.testing.assert_allclose(out[i, 1:].numpy(), merged, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sizes[i].numpy(), ref_sizes)
        assert torch.equal(out[i, 0], hidden[i, 0])  # CLS untouched


@pytest.mark.parametrize("gamma", [0.3, 2.0])
def test_spatial_term_matches_brute_force(gamma):
    """The decision similarity discounts distance on the patch grid, at the first point
    (positions 0..N-1) and at a later one (positions = the previous point's indices)."""
    g = torch.Generator().manual_seed(5)
    b, n, d, k, grid = 2, 24, 8, 9, 7
    hidden = torch.randn(b, 1 + n, d, generator=g)
    importance = torch.rand(b, n, generator=g)
    later = torch.stack([torch.randperm(grid * grid, generator=g)[:n].sort().values for _ in range(b)])
    params = PruneParams(spatial_weight=gamma)
    for positions in (None, later):
        out, sizes, pos, merge, picks = select(hidden, importance, SelectRule(k, params, grid=grid), positions=positions)
        if gamma >= 1:   # a strong spatial term changes decisions that cosine alone makes
            plain = select(hidden, importance, SelectRule(k, params), positions=positions)      # no grid: cosine alone
            assert not (torch.equal(plain.merge, merge) and torch.equal(plain.picks, picks))
        for i in range(b):
            p = None if positions is None else positions[i].numpy()
            kept, merged, ref_sizes, slots, steps = brute_force_select(
                hidden[i].numpy(), importance[i].numpy(), k, 0.5, 0.3, gamma=gamma, grid=grid, positions=p)
            assert merge[i].tolist() == slots and picks[i].tolist() == steps
            assert pos[i].tolist() == (kept if p is None else p[kept].tolist())
            np.testing.assert_allclose(out[i, 1:].numpy(), merged, rtol=1e-5, atol=1e-5)


def test_builds_made_before_the_spatial_term_keep_cosine_alone():
    old = {"importance_ratio": 0.5, "redundancy_weight": 0.3, "merge": True, "proportional_attention": True,
           "diversity_rounds": 4}
    assert PruneParams.from_manifest(old).spatial_weight == 0.0
    assert PruneParams.from_manifest({**old, "spatial_weight": 0.7}).spatial_weight == 0.7
    with pytest.raises(EvoExportError, match="spatial weight"):
        PruneParams(spatial_weight=-1.0)


def test_no_merge_gathers_kept_tokens_and_carries_sizes_and_positions():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 1 + 20, 8, generator=g)
    sizes = torch.rand(2, 20, generator=g) + 1
    positions = torch.arange(100, 120).expand(2, 20)
    out, new_sizes, pos, merge, picks = select(hidden, torch.rand(2, 20, generator=g), SelectRule(7, PruneParams(merge=False)), sizes=sizes, positions=positions)
    local = pos - 100
    assert torch.equal(out[:, 1:], torch.gather(hidden[:, 1:], 1, local[..., None].expand(2, 7, 8)))
    assert torch.equal(new_sizes, torch.gather(sizes, 1, local))
    for row in range(2):  # the merge map: kept tokens map to their own slot, dropped ones nowhere
        expect = [local[row].tolist().index(t) if t in local[row] else -1 for t in range(20)]
        assert merge[row].tolist() == expect
        assert ((picks[row] >= 0) == (merge[row] >= 0)).all()


def test_merge_conserves_total_size_and_mass():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 1 + 40, 8, generator=g)
    sizes = torch.randint(1, 5, (4, 40), generator=g).float()
    out, new_sizes, _, *_ = select(hidden, torch.rand(4, 40, generator=g), SelectRule(9, PruneParams()), sizes=sizes)
    torch.testing.assert_close(new_sizes.sum(1), sizes.sum(1))
    # size-weighted sum of features is conserved by a size-weighted mean merge
    torch.testing.assert_close((out[:, 1:] * new_sizes[..., None]).sum(1), (hidden[:, 1:] * sizes[..., None]).sum(1),
                               rtol=1e-4, atol=1e-4)


def test_importance_only_keeps_the_top_attended_tokens():
    hidden = torch.randn(1, 1 + 10, 4)
    importance = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.0, 0.6, 0.5, 0.4]])
    _, _, pos, *_ = select(hidden, importance, SelectRule(4, PruneParams(importance_ratio=1.0, redundancy_weight=0.0)))
    assert pos.tolist() == [[1, 3, 5, 7]]


def test_diversity_covers_distinct_clusters():
    # 3 clusters of near-identical tokens; importance says cluster A everywhere.
    a, b_, c = torch.eye(3)
    tokens = torch.stack([a] * 6 + [b_] * 3 + [c] * 3) + 1e-3 * torch.randn(12, 3)
    hidden = torch.cat([torch.zeros(1, 3), tokens])[None]
    importance = torch.tensor([[1.0] * 6 + [0.1] * 6])
    _, _, only_imp, *_ = select(hidden, importance, SelectRule(3, PruneParams(importance_ratio=1.0, redundancy_weight=0.0, merge=False)))
    assert set(only_imp[0].tolist()) <= set(range(6))
    _, _, mixed, *_ = select(hidden, importance, SelectRule(3, PruneParams(importance_ratio=0.34, redundancy_weight=0.0, merge=False)))
    clusters = {0 if i < 6 else 1 if i < 9 else 2 for i in mixed[0].tolist()}
    assert clusters == {0, 1, 2}


def test_ties_break_to_the_lower_index():
    hidden = torch.ones(2, 1 + 12, 4)          # all tokens identical
    importance = torch.full((2, 12), 0.5)      # all scores equal
    _, _, pos, *_ = select(hidden, importance, SelectRule(5, PruneParams()))
    assert pos.tolist() == [[0, 1, 2, 3, 4]] * 2


def test_nan_and_neg_inf_scores_rank_last():
    hidden = torch.randn(1, 1 + 8, 4, generator=torch.Generator().manual_seed(0))
    importance = torch.tensor([[float("nan"), 0.5, -float("inf"), 0.4, 0.3, 0.2, 0.1, 0.05]])
    _, _, pos, *_ = select(hidden, importance, SelectRule(3, PruneParams(importance_ratio=1.0, redundancy_weight=0.0)))
    assert pos.tolist() == [[1, 3, 4]]


def test_encoder_without_cls():
    hidden = torch.randn(2, 16, 8)
    out, sizes, pos, *_ = select(hidden, torch.rand(2, 16), SelectRule(6, PruneParams(), has_cls=False))
    assert out.shape == (2, 6, 8) and sizes.sum(1).tolist() == [16.0, 16.0]


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(1, 24), d=st.integers(1, 6), data=st.data(),
       pattern=st.sampled_from(["random", "ties", "nan", "inf", "equal", "zero_features"]))
def test_selection_is_always_valid_and_deterministic(b, n, d, data, pattern):
    k = data.draw(st.integers(1, n))
    alpha = data.draw(st.floats(0, 1))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, 1 + n, d, generator=g)
    imp = torch.rand(b, n, generator=g)
    imp = hostile_importance(imp, pattern, g)
    if pattern == "zero_features":
        hidden[:, 1:] = 0
    params = PruneParams(importance_ratio=alpha)
    out, sizes, pos, *_ = select(hidden, imp, SelectRule(k, params))
    again = select(hidden, imp, SelectRule(k, params))
    assert torch.equal(pos, again[2]) and torch.equal(sizes, again[1])
    assert pos.shape == (b, k) and out.shape == (b, 1 + k, d)
    for row in pos.tolist():
        assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < n  # unique, raster order, in range
    torch.testing.assert_close(sizes.sum(1), torch.full((b,), float(n)))
    assert torch.isfinite(out).all()


def test_select_rejects_bad_budgets():
    with pytest.raises(EvoExportError):
        select(torch.randn(1, 5, 2), torch.rand(1, 4), SelectRule(0, PruneParams()))
    with pytest.raises(EvoExportError):
        select(torch.randn(1, 5, 2), torch.rand(1, 4), SelectRule(5, PruneParams()))


def test_default_llava_schedule():
    points = default_schedule(23, 576, 0.5)
    assert [p.after_layer for p in points] == [5, 7, 9]
    assert [p.tokens for p in points] == [457, 363, 288]
    assert default_schedule(23, 576, 1.0) == []


@pytest.mark.parametrize("text,msg", [("3:0.5,2:0.25", "increasing"), ("30:0.5", "does not fit"),
                                      ("3:0.5,5:0.7", "decrease"), ("3:x", "LAYER:KEEP"), ("3:1.5", "fraction"),
                                      ("21:100", "does not fit")])
def test_parse_schedule_errors(text, msg):
    with pytest.raises(EvoExportError, match=msg):
        parse_schedule(text, 22, 576)


def test_parse_schedule_fractions_and_counts():
    assert parse_schedule("4:0.75, 8:288", 23, 576) == [PrunePoint(4, 432), PrunePoint(8, 288)]


def test_layer_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_attention_heads=4)
    cfg._attn_implementation = "eager"
    layer = CLIPEncoderLayer(cfg).eval()
    x = torch.randn(1, 50, 64)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x, None)
    assert counter.get_total_flops() == layer_flops(50, 64, 256)


def test_tower_flops_match_torch_flop_counter_on_the_pipeline():
    from torch.utils.flop_counter import FlopCounterMode

    from evoexport.models import load_tower
    from evoexport.pipeline.stages import Pipeline

    tower = load_tower("llava-tiny", quiet=True)
    tower.config._attn_implementation = "eager"  # FlopCounterMode does not see CPU SDPA kernels
    x = torch.randn(1, 3, tower.image_size, tower.image_size)
    for points in ([], default_schedule(tower.depth, tower.num_patches, 0.5)):
        with FlopCounterMode(display=False) as counter:
            Pipeline(tower, points, PruneParams()).run(x)
        counted, modeled = counter.get_total_flops(), tower_flops(tower, points)
        # the model leaves out the tiny size-sum matmul of a merge; everything else is exact
        assert abs(counted - modeled) / counted < 0.005, (points, counted, modeled)
        if not points:
            assert counted == modeled


def test_presets_default_the_spatial_term_as_measured(tiny_build):
    """0.3 (tuned on real photos) everywhere but the digits ViT, whose results were measured at 0
    (docs/evoprune.md); a build records what it used (the session's llava-tiny build, made
    with the defaults)."""
    from evoexport.models import default_params

    assert default_params("digits-vit").spatial_weight == 0.0
    assert {default_params(m).spatial_weight for m in ("llava", "dinov2", "llava-onevision")} == {0.3}
    assert default_params("digits-vit").redundancy_weight == PruneParams().redundancy_weight
    with pytest.raises(EvoExportError, match="unknown model"):
        default_params("nope")
    import json
    assert json.loads((tiny_build / "manifest.json").read_text())["prune_params"]["spatial_weight"] == 0.3


def _pairwise_top_mask(key, k):
    """The definition: a token is in when fewer than k tokens beat it (higher key, or equal key
    and lower index). N^2 compares: the former implementation, kept as the reference."""
    n = key.shape[-1]
    ar = torch.arange(n)
    ki, kj = key.unsqueeze(-1), key.unsqueeze(-2)
    beats = (kj > ki) | ((kj == ki) & (ar.view(1, n) < ar.view(n, 1)))
    return beats.sum(dim=-1) < k


@settings(max_examples=200, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(1, 40), data=st.data(),
       pattern=st.sampled_from(["random", "few_values", "all_equal", "infinities"]))
def test_top_mask_equals_the_pairwise_definition(b, n, data, pattern):
    """The O(N log N) top-k (TopK threshold + running count of ties) decides exactly what the
    pairwise rank decides, ties to the lower index, for every k."""
    from evoexport.prune.selection import _rank_key, _top_mask

    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    key = torch.randn(b, n, generator=g)
    if pattern == "few_values":
        key = torch.randint(0, 3, (b, n), generator=g).float()
    elif pattern == "all_equal":
        key = torch.full((b, n), 0.5)
    elif pattern == "infinities":
        key[torch.rand(b, n, generator=g) < 0.3] = float("inf")
        key[torch.rand(b, n, generator=g) < 0.3] = -float("inf")
        key[torch.rand(b, n, generator=g) < 0.2] = float("nan")
    key = _rank_key(key)
    for k in range(1, n + 1):
        mask = _top_mask(key, k)
        assert torch.equal(mask, _pairwise_top_mask(key, k)), (key, k)
        assert torch.equal(_top_mask(key, k, "compare"), mask), (key, k)     # the TopK-free form
        assert (mask.sum(dim=-1) == k).all()


@settings(max_examples=100, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(2, 40), data=st.data())
def test_ascending_indices_by_compare_and_sum_equal_the_topk_form(b, n, data):
    from evoexport.prune.selection import _ascending_indices

    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    k = data.draw(st.integers(1, n))
    mask = torch.zeros(b, n, dtype=torch.bool)
    for row in range(b):
        mask[row, torch.randperm(n, generator=g)[:k]] = True
    topk = _ascending_indices(mask, k)
    assert torch.equal(_ascending_indices(mask, k, "compare"), topk)
    assert torch.equal(topk, mask.nonzero()[:, 1].view(b, k))     # ascending, every True entry


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(2, 30), data=st.data(), has_cls=st.booleans(),
       ties=st.sampled_from(["none", "duplicated tokens", "flat importance"]), merge=st.booleans())
def test_compare_form_selection_decides_and_outputs_exactly_as_the_topk_form(b, n, data, has_cls, ties, merge):
    """The GPU-oriented form (no TopK: pairwise compare top-k, masked-max novelty, indices by
    compare and sum) against the default form on the same inputs: identical picks, merge
    owners, indices and sizes, and bit-identical hidden states, ties included."""
    from evoexport.prune.selection import SelectRule, select

    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    k = data.draw(st.integers(1, n - 1))
    d = 8
    patches = torch.randn(b, n, d, generator=g)
    importance = torch.rand(b, n, generator=g)
    if ties == "duplicated tokens":
        patches[:, n // 2:] = patches[:, : n - n // 2].clone()
        importance[:, n // 2:] = importance[:, : n - n // 2].clone()
    elif ties == "flat importance":
        importance = torch.full((b, n), 0.25)
    hidden = torch.cat([torch.randn(b, 1, d, generator=g), patches], dim=1) if has_cls else patches
    sizes = torch.randint(1, 4, (b, n), generator=g).float()
    positions = torch.stack([torch.randperm(4 * n, generator=g)[:n].sort().values for _ in range(b)])
    params = PruneParams(merge=merge)
    ref = select(hidden, importance, SelectRule(k, params, has_cls=has_cls, grid=2 * n), sizes=sizes, positions=positions)
    out = select(hidden, importance, SelectRule(k, params, has_cls=has_cls, grid=2 * n, form="compare"), sizes=sizes, positions=positions)
    for name in ("picks", "merge", "positions", "sizes", "hidden"):
        assert torch.equal(getattr(out, name), getattr(ref, name)), name


def test_compare_form_exports_without_topk_and_runs_the_same_on_onnxruntime(tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    from evoexport.prune.selection import SelectGraph

    n, k, d = 49, 24, 16
    g = torch.Generator().manual_seed(0)
    hidden, importance = torch.randn(2, 1 + n, d, generator=g), torch.rand(2, n, generator=g)
    graph = SelectGraph(k, PruneParams(), has_cls=True, grid=7, form="compare")
    path = tmp_path / "select.onnx"
    torch.onnx.export(graph, (hidden, importance), str(path), dynamo=True, input_names=["hidden", "importance"],
                      output_names=["pruned", "sizes", "indices", "merge", "picks"], opset_version=20)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "TopK" not in ops and "ArgMax" not in ops
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"hidden": hidden.numpy(), "importance": importance.numpy()})
    want = SelectGraph(k, PruneParams(), has_cls=True, grid=7)(hidden, importance)
    for a, b in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(a, b.numpy())
    np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-6)
    with pytest.raises(EvoExportError, match="selection form 'fast' is not one of topk, compare"):
        SelectGraph(k, PruneParams(), has_cls=True, form="fast")


@settings(max_examples=100, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(2, 30), data=st.data(), few_values=st.booleans())
def test_dropped_tokens_merge_owner_is_merge_affinity_argmax(b, n, data, few_values):
    """The chain decides merge owners from the dropped rows alone (_dropped_affinity, [B,N-K,K]);
    validation and eval read the full merge_affinity ([B,N,K]). Same owners, ties included."""
    from evoexport.prune.selection import _ascending_indices, _dropped_affinity, first_max_index, merge_affinity

    k = data.draw(st.integers(1, n - 1))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    sim = torch.randint(0, 3, (b, n, n), generator=g).float() if few_values else torch.randn(b, n, n, generator=g)
    kept_mask = torch.zeros(b, n, dtype=torch.bool)
    for row in range(b):
        kept_mask[row, torch.randperm(n, generator=g)[:k]] = True
    kept = _ascending_indices(kept_mask, k)
    dropped = _ascending_indices(~kept_mask, n - k)
    full = first_max_index(merge_affinity(sim, kept))                      # [B, N]
    assert torch.equal(first_max_index(_dropped_affinity(sim, kept, dropped)), torch.gather(full, 1, dropped))
    # and a kept token's own slot wins its row in the full definition
    assert torch.equal(torch.gather(full, 1, kept), torch.arange(k).expand(b, k))


def test_torch_chain_runs_the_compare_form_with_the_same_decisions(tiny_build):
    """`evoexport.load(..., backend="torch", selection_form="compare")`: the chain's selections
    are the TopK-free form and every output equals the default chain's."""
    import evoexport
    from evoexport.inputs.images import sample_batch
    from evoexport.prune.selection import SelectGraph

    default = evoexport.load(tiny_build, backend="torch")
    compare = evoexport.load(tiny_build, backend="torch", selection_form="compare")
    selections = [m for name, m in compare.backend.modules.items() if name.startswith("select")]
    assert selections and all(isinstance(m, SelectGraph) and m.form == "compare" for m in selections)
    x = sample_batch(default.manifest.data["tower"]["image_size"], default.manifest.data["preprocess"])
    a, b = default.arrays(x), compare.arrays(x)
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def test_round_budgets_moves_each_budget_to_a_tile_friendly_sequence_length():
    from evoexport.prune.schedule import round_budgets

    llava = default_schedule(23, 576, 0.5)                 # 457, 363, 288 tokens + CLS
    rounded = round_budgets(llava, 8, per_token=1, extra=1, num_tokens=576)
    assert [p.tokens for p in rounded] == [455, 359, 287]  # T = 456, 360 (a tie: down), 288
    assert [p.after_layer for p in rounded] == [p.after_layer for p in llava]
    qwen = [PrunePoint(7, 181), PrunePoint(15, 128)]       # units of 4 positions, no CLS
    assert [p.tokens for p in round_budgets(qwen, 64, per_token=4)] == [176, 128]
    # budgets stay strictly decreasing when two round to the same count
    assert [p.tokens for p in round_budgets([PrunePoint(2, 41), PrunePoint(4, 38)], 8, 1, 1)] == [39, 31]
    with pytest.raises(EvoExportError, match="round_budgets 64: no token count below 49 after layer 2"):
        round_budgets([PrunePoint(2, 24)], 64, 1, 1, num_tokens=49)      # llava-tiny: 49 patches + CLS


def test_cli_build_with_round_budgets_records_them_and_validates(tmp_path):
    import json

    from evoexport.cli import main

    out = tmp_path / "b"
    assert main(["build", "--model", "llava-tiny", "--keep", "0.5", "--round-budgets", "8", "--out", str(out),
                 "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["budget_multiple"] == 8 and m["schedule"]
    assert all((p["tokens"] + 1) % 8 == 0 for p in m["schedule"])          # + CLS
    assert json.loads((out / "validation.json").read_text())["passed"]
