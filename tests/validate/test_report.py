"""Validation compares decisions as decisions: near-ties pass, wrong graphs fail (exit 1)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from evoexport.cli import main
from evoexport.validate.decisions import check_decisions, make_ties
from evoexport.manifest import Manifest, sha256_file
from evoexport.prune.selection import PruneParams, SelectRule, select
from evoexport.validate.text import describe as report_words
from evoexport.validate.report import validate


def resign(build: Path) -> None:
    """Recompute every sha256 in the manifest, so only validation can tell what changed."""
    m = json.loads((build / "manifest.json").read_text())
    for g in Manifest(m).graphs:
        g["sha256"] = sha256_file(build / g["file"])
        if g.get("data_file"):
            g["data_sha256"] = sha256_file(build / g["data_file"])
    (build / "manifest.json").write_text(json.dumps(m, indent=2))


def edit_weights(build: Path, graph: str, edit) -> None:
    """Apply `edit(name, array) -> array | None` to every float initializer of one graph, in place."""
    path = build / f"{graph}.onnx"
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32:
            new = edit(init.name, w.copy())
            if new is not None:
                init.CopyFrom(numpy_helper.from_array(new.astype(np.float32), init.name))
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, location=data.name)


def copy_build(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_passes_with_another_machines_rounding(tiny_build, tmp_path, capsys):
    """Every stage weight carries 1e-6 relative noise: what another CPU's rounding looks like."""
    build = copy_build(tiny_build, tmp_path / "noisy")
    rng = np.random.default_rng(0)
    for g in Manifest(json.loads((build / "manifest.json").read_text())).graphs:
        if g["kind"] == "encoder":
            edit_weights(build, g["name"], lambda name, w: w * (1 + 1e-6 * rng.standard_normal(w.shape)))
    resign(build)
    assert sha256_file(build / "stage_0.onnx.data") != sha256_file(tiny_build / "stage_0.onnx.data")
    assert main(["validate", str(build)]) == 0
    report = json.loads((build / "validation.json").read_text())
    s = report["summary"]
    assert report["passed"] and s["not_near_ties"] == 0 and s["near_ties"] == s["flips"]
    assert report["end_to_end"]["features"]["max_abs"] > 0   # the noise was really there
    assert "validation PASSED" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--optimization", "disable"], ["--threads", "1"]])
def test_passes_with_other_onnxruntime_settings(tiny_build, tmp_path, flags):
    build = copy_build(tiny_build, tmp_path / "b")
    assert main(["validate", str(build), *flags]) == 0
    assert json.loads((build / "validation.json").read_text())["passed"]


def test_library_validation_takes_backend_options(tiny_build):
    report = validate(tiny_build, write=False, optimization="basic", threads=2)
    assert report["passed"] and report["precision"] == "fp32"
    words = " ".join(report_words(report))
    s = report["summary"]
    assert f"Decisions: {s['decisions']} checked" in words and f"{s['close_calls']} were close calls" in words
    assert ("none differed" if s["flips"] == 0 else f"{s['flips']} differed from the reference's, all near-ties") in words


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fails_when_a_stage_weight_matrix_is_negated(tiny_build, tmp_path, capsys, backend):
    build = copy_build(tiny_build, tmp_path / "negated")
    biggest = max((w.size, name) for name, w in _initializers(build, "stage_1"))[1]
    edit_weights(build, "stage_1", lambda name, w: -w if name == biggest else None)
    resign(build)
    assert main(["validate", str(build), "--backend", backend]) == 1   # a validation failure, not an integrity error (2)
    out = capsys.readouterr().out
    assert "validation FAILED" in out
    rows = json.loads((build / "validation.json").read_text())["graphs"]
    assert not next(g for g in rows if g["graph"] == "stage_1")["ok"]


# one changed parameter is enough to show the check (each case is a full build; CI time)
@pytest.mark.parametrize("flags", [["--redundancy-weight", "2.0"]])
def test_fails_when_a_selection_graph_has_other_prune_parameters(tiny_build, tmp_path, flags, capsys):
    from evoexport.export.build import build as run_build
    from evoexport.progress import Progress
    from evoexport.prune.selection import PruneParams as P

    kw = {"redundancy_weight": 2.0} if flags[0] == "--redundancy-weight" else {"importance_ratio": 0.9}
    other = run_build("llava-tiny", 0.5, params=P(**kw), out=tmp_path / "other", validate=False,
                      progress=Progress(enabled=False)).path
    build = copy_build(tiny_build, tmp_path / "swapped")
    shutil.copy(other / "select_0.onnx", build / "select_0.onnx")
    resign(build)
    assert main(["validate", str(build)]) == 1
    assert "validation FAILED" in capsys.readouterr().out
    report = json.loads((build / "validation.json").read_text())
    select_0 = [g for g in report["graphs"] if g["graph"] == "select_0"]
    decisions = [r["decisions"] for g in select_0 for r in g["outputs"] if "decisions" in r]
    assert any(not d["ok"] for d in decisions)
    assert report["summary"]["not_near_ties"] > 0


def _initializers(build: Path, graph: str):
    model = onnx.load(str(build / f"{graph}.onnx"))
    return [(t.name, numpy_helper.to_array(t)) for t in model.graph.initializer]


# ---------------------------------------------------------------- the decision checker itself

def _tied_inputs(seed=0, b=2, n=24, d=16):
    g = torch.Generator().manual_seed(seed)
    hidden, importance = torch.randn(b, 1 + n, d, generator=g), torch.rand(b, n, generator=g)
    hidden, importance, _ = make_ties(hidden, importance, None, has_cls=True)
    return hidden, importance


def _swap(picks: torch.Tensor, merge: torch.Tensor, row: int, kept: int, dropped: int):
    """Another executor's decisions: `dropped` takes `kept`'s place (same step, same slot)."""
    picks, merge = picks.clone(), merge.clone()
    picks[row, dropped], picks[row, kept] = picks[row, kept], -1
    slot = merge[row, kept].item()
    merge[row, merge[row] == slot] = slot
    merge[row, dropped] = slot
    return picks, merge


@pytest.mark.parametrize("merge_on", [True, False])
def test_a_different_split_of_exact_ties_is_a_near_tie(merge_on):
    params = PruneParams(merge=merge_on)
    hidden, importance = _tied_inputs()
    sel = select(hidden, importance, SelectRule(9, params))
    ref = check_decisions(hidden, importance, SelectRule(9, params), picks=sel.picks, merge=sel.merge, tolerance=1e-4)
    assert ref["ok"] and ref["flips"] == 0 and ref["close_calls"] > 0   # twins are close calls
    # lowest index wins: of each twin pair (2j, 2j+1) the reference never keeps 2j+1 alone
    kept_odd = [i for i in range(1, 24, 2) if sel.picks[0, i] >= 0 and sel.picks[0, i - 1] < 0]
    assert kept_odd == []
    kept_even = next(i for i in range(0, 24, 2) if sel.picks[0, i] >= 0 and sel.picks[0, i + 1] < 0)
    picks, merge = _swap(sel.picks, sel.merge, 0, kept_even, kept_even + 1)
    if not merge_on:
        merge[0] = torch.where(picks[0] >= 0, merge[0], -1)
    other = check_decisions(hidden, importance, SelectRule(9, params), picks=picks, merge=merge, tolerance=1e-4)
    assert other["ok"] and other["flips"] >= 1 and other["near_ties"] == other["flips"]
    assert other["worst_margin"] <= 1e-6


def test_a_flip_that_is_not_a_near_tie_fails_and_says_by_how_much():
    g = torch.Generator().manual_seed(3)
    hidden, importance = torch.randn(1, 1 + 30, 16, generator=g), torch.rand(1, 30, generator=g)
    params = PruneParams(importance_ratio=1.0, redundancy_weight=0.0)   # one step: top-10 by importance
    sel = select(hidden, importance, SelectRule(10, params))
    best = int(importance[0].argmax())
    worst_dropped = int(torch.where(sel.picks[0] < 0, importance[0], 2.0).argmin())
    picks, merge = _swap(sel.picks, sel.merge, 0, best, worst_dropped)
    merge[0] = torch.where(picks[0] >= 0, merge[0], merge[0])   # owners of others unchanged
    res = check_decisions(hidden, importance, SelectRule(10, params), picks=picks, merge=merge, tolerance=1e-4)
    assert not res["ok"] and res["near_ties"] is None
    expected = float((importance[0, best] - importance[0, worst_dropped]) / importance[0].max())
    assert res["worst_margin"] >= expected - 1e-6


def test_a_merge_into_the_wrong_kept_token_fails_and_a_tied_one_passes():
    params = PruneParams()
    hidden, importance = _tied_inputs(seed=5, b=1)
    sel = select(hidden, importance, SelectRule(8, params))
    merge = sel.merge.clone()
    dropped = [i for i in range(24) if sel.picks[0, i] < 0]
    # a dropped token whose twin is dropped too has no tie among kept tokens: move it to its worst kept token
    feats = torch.nn.functional.normalize(hidden[0, 1:], dim=-1)
    kept = sel.positions[0]
    n = dropped[0]
    merge[0, n] = int((feats[n] @ feats[kept].T).argmin())
    res = check_decisions(hidden, importance, SelectRule(8, params), picks=sel.picks, merge=merge, tolerance=1e-4)
    assert not res["ok"] and res["worst_margin"] > 1e-2


def test_structurally_impossible_decisions_are_invalid():
    hidden, importance = _tied_inputs(seed=1, b=1)
    params = PruneParams()
    sel = select(hidden, importance, SelectRule(9, params))
    picks = sel.picks.clone()
    picks[0, picks[0] == 1] = 0                  # every round-1 pick claimed by step 0: wrong counts
    res = check_decisions(hidden, importance, SelectRule(9, params), picks=picks, merge=sel.merge, tolerance=1e-4)
    assert not res["ok"] and "picks per step" in res["invalid"]
    merge = sel.merge.clone()
    kept0 = int(sel.positions[0, 0])
    merge[0, kept0] = 1                          # a kept token merged into another kept token
    res = check_decisions(hidden, importance, SelectRule(9, params), picks=sel.picks, merge=merge, tolerance=1e-4)
    assert not res["ok"] and "merged into itself" in res["invalid"]


def test_the_reference_forced_with_its_own_decisions_reproduces_itself():
    g = torch.Generator().manual_seed(4)
    hidden, importance = torch.randn(2, 1 + 40, 8, generator=g), torch.rand(2, 40, generator=g)
    sizes = torch.randint(1, 4, (2, 40), generator=g).float()
    free = select(hidden, importance, SelectRule(13, PruneParams()), sizes=sizes)
    forced = select(hidden, importance, SelectRule(13, PruneParams()), sizes=sizes, forced=(free.picks, free.merge))
    for a, b in zip(free, forced):
        assert torch.equal(a, b)
    # and forced decisions really are applied: another valid split gives other outputs
    picks, merge = _swap(free.picks, free.merge, 0, int(free.positions[0, 0]),
                         int(torch.nonzero(free.picks[0] < 0)[0]))
    other = select(hidden, importance, SelectRule(13, PruneParams()), sizes=sizes, forced=(picks, merge))
    assert not torch.equal(other.positions, free.positions)
    torch.testing.assert_close(other.sizes.sum(1), sizes.sum(1))
