"""A real tiny build: its manifest contract, its graphs, its runtimes and its CLI."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import evoexport
from evoexport.cli import main
from evoexport.errors import EvoExportError
from evoexport.inputs.images import sample_batch
from evoexport.manifest import Manifest, read_manifest, sha256_file


def test_manifest_contract(tiny_build):
    m = json.loads((tiny_build / "manifest.json").read_text())
    for key in ("schema_version", "model", "keep", "weights", "stages"):
        assert key in m
    assert m["model"] == "llava-tiny" and m["keep"] == 0.5 and m["weights"] == "random"
    stages = m["stages"]
    assert stages[0]["layers"][0] == 0 and stages[-1]["layers"][1] == m["tower"]["depth"]
    for a, b in zip(stages, stages[1:]):
        assert a["layers"][1] == b["layers"][0]                  # contiguous layer ranges
        assert a["tokens_out"] == b["tokens_in"] == a["select"]["tokens_out"]
        assert a["layers"][1] - 1 == a["select"]["after_layer"]
    assert stages[-1]["tokens_out"] == round(0.5 * m["tower"]["num_patches"])
    assert m["precision"] == "fp32"
    outputs = {t["name"]: t for t in m["outputs"]}
    assert list(outputs) == ["features", "indices_0", "merge_0", "picks_0", "indices_1", "merge_1", "picks_1"]
    for i, stage in enumerate(stages[:-1]):   # decisions: one entry per token entering the prune point
        assert outputs[f"merge_{i}"]["shape"] == outputs[f"picks_{i}"]["shape"] == ["batch", stage["select"]["tokens_in"]]
        assert outputs[f"merge_{i}"]["dtype"] == "int64"
    for g in Manifest(m).graphs:
        assert sha256_file(tiny_build / g["file"]) == g["sha256"]
        onnx.checker.check_model(str(tiny_build / g["file"]))
        model = onnx.load(str(tiny_build / g["file"]), load_external_data=False)
        assert [i.name for i in model.graph.input] == [t["name"] for t in g["inputs"]]
        for t in g["inputs"] + g["outputs"]:
            assert t["shape"][0] == "batch" and all(isinstance(d, int) for d in t["shape"][1:])  # only batch is dynamic
    assert json.loads((tiny_build / "validation.json").read_text())["passed"] is True


def test_onnxruntime_chain_matches_torch_reference_on_photos(tiny_build):
    x = sample_batch(56, read_manifest(tiny_build).data["preprocess"])
    ort_out = evoexport.load(tiny_build)(x)
    ref_runner = evoexport.load(tiny_build, backend="torch")
    ref = ref_runner(x)
    np.testing.assert_allclose(ort_out.features, ref.features.numpy(), rtol=1e-4, atol=1e-5)
    for a, b in zip(ort_out.indices_per_point, ref.indices_per_point):
        np.testing.assert_array_equal(a, b.numpy())
    assert ort_out.features.shape == (3, 24, 96) and ort_out.indices.shape == (3, 24)


def test_every_batch_size_gives_the_same_rows(tiny_build):
    runner = evoexport.load(tiny_build)
    x = sample_batch(56, read_manifest(tiny_build).data["preprocess"])
    batch = runner(np.concatenate([x, x[::-1]]))
    for i in range(3):
        single = runner(x[i:i + 1])
        np.testing.assert_allclose(single.features[0], batch.features[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(single.indices[0], batch.indices[5 - i])


def test_cli_run_on_an_image_and_on_npy(tiny_build, tmp_path):
    from PIL import Image
    from skimage import data

    img = tmp_path / "cat.png"
    Image.fromarray(data.chelsea()).save(img)
    out = tmp_path / "out.npz"
    assert main(["run", str(tiny_build), "--input", str(img), "--output", str(out)]) == 0
    r = np.load(out)
    assert r["features"].shape == (1, 24, 96)
    np.testing.assert_array_equal(r["indices"], r["indices_1"])
    assert set(r.files) == {"features", "indices", "indices_0", "indices_1", "merge_0", "merge_1", "picks_0", "picks_1"}
    assert set(r["indices_1"][0]) <= set(r["indices_0"][0])   # later kept sets come from earlier ones
    # the merge map: one entry per entering token (49, then 35), each naming a kept slot;
    # a kept token is its own slot, and the picks say which tokens were kept
    for i, (n_in, k) in enumerate([(49, 35), (35, 24)]):
        merge, picks = r[f"merge_{i}"][0], r[f"picks_{i}"][0]
        assert merge.shape == picks.shape == (n_in,) and ((merge >= 0) & (merge < k)).all()
        kept = np.flatnonzero(picks >= 0)
        assert len(kept) == k and (merge[kept] == np.arange(k)).all()
    entering = r["indices_0"][0]                                # positions of the tokens entering point 1
    np.testing.assert_array_equal(entering[np.flatnonzero(r["picks_1"][0] >= 0)], r["indices_1"][0])

    x = sample_batch(56, read_manifest(tiny_build).data["preprocess"])[:2]
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(tiny_build), "--input", str(tmp_path / "x.npy"), "--output", str(out)]) == 0
    r2 = np.load(out)
    np.testing.assert_allclose(r2["features"], evoexport.load(tiny_build)(x).features, rtol=1e-6)


@pytest.mark.parametrize("array,msg", [(np.zeros((3, 56, 56), np.float32), "rank"),
                                      (np.zeros((1, 3, 64, 64), np.float32), "shape"),
                                      (np.zeros((1, 3, 56, 56), np.float64), "float32")])
def test_runner_rejects_bad_inputs(tiny_build, array, msg):
    with pytest.raises(EvoExportError, match=msg):
        evoexport.load(tiny_build)(array)


def test_validate_fails_on_a_numerically_wrong_graph(tiny_build, tmp_path, capsys):
    """Corrupt one weight (and re-sign the file): validation must catch it and exit non-zero."""
    import shutil
    d = tmp_path / "b"
    shutil.copytree(tiny_build, d)
    path = d / "stage_2.onnx"
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    w = numpy_helper.to_array(init).copy()
    w *= 1.05
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path), save_as_external_data=True, location="stage_2.onnx.data")
    m = json.loads((d / "manifest.json").read_text())
    m["stages"][2]["sha256"] = sha256_file(path)
    m["stages"][2]["data_sha256"] = sha256_file(d / "stage_2.onnx.data")
    (d / "manifest.json").write_text(json.dumps(m))
    assert main(["validate", str(d)]) == 1
    assert "validation FAILED" in capsys.readouterr().out
    assert main(["validate", str(tiny_build)]) == 0


def test_failed_build_keeps_the_previous_good_one(tiny_build, tmp_path):
    import shutil
    d = tmp_path / "out"
    shutil.copytree(tiny_build, d)
    before = (d / "manifest.json").read_bytes()
    code = main(["build", "--model", "llava-tiny", "--keep", "0.5", "--checkpoint", str(tmp_path), "--out", str(d)])
    assert code == 2 and (d / "manifest.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_keep_one_has_no_prune_points_and_all_indices(tmp_path):
    from evoexport.export.build import build
    from evoexport.progress import Progress
    r = build("clip-tiny", 1.0, out=tmp_path / "b", progress=Progress(enabled=False))
    assert r.manifest.data["schedule"] == [] and len(r.manifest.data["stages"]) == 1
    out = evoexport.load(r.path)(np.zeros((2, 3, 56, 56), np.float32))
    assert out.features.shape == (2, 49, 64)
    np.testing.assert_array_equal(out.indices, np.tile(np.arange(49), (2, 1)))


def test_bench_reports_consistent_ratios(tiny_build):
    from evoexport.measure.bench import HF_BF16, HF_FP32, run_bench
    from evoexport.progress import Progress
    r = run_bench(tiny_build, batches=(1, 2), iters=3, warmup=1, backends=("onnxruntime", "openvino"),
                  progress=Progress(enabled=False))
    systems = {f"{kind} ({b})" for kind in ("pruned", "unpruned") for b in ("onnxruntime", "openvino")}
    assert {(row["batch"], row["system"]) for row in r["rows"]} == {
        (b, s) for b in (1, 2) for s in systems | {HF_FP32, HF_BF16}}
    for s in r["summary"]:
        rows = {row["system"]: row for row in r["rows"] if row["batch"] == s["batch"]}
        for b in s["backends"]:
            name = b["backend"]
            assert b["speedup_vs_unpruned"] == pytest.approx(
                rows[f"unpruned ({name})"]["median_ms"] / rows[f"pruned ({name})"]["median_ms"])
        fastest_unpruned = min((n for n in rows if not n.startswith("pruned")), key=lambda n: rows[n]["median_ms"])
        assert s["best_unpruned"] == fastest_unpruned and s["best_pruned"].startswith("pruned")
        assert s["best_vs_best"] == pytest.approx(rows[fastest_unpruned]["median_ms"] / rows[s["best_pruned"]]["median_ms"])
        assert all(row["p90_ms"] >= row["median_ms"] >= row["min_ms"] > 0 for row in rows.values())


def test_opset_23_exports_every_attention_as_the_attention_op_and_validates(tmp_path):
    import onnx

    from evoexport.export.build import build
    from evoexport.errors import EvoExportError
    from evoexport.progress import Progress
    from evoexport.tensorrt.check import check_build

    r = build("llava-tiny", 0.5, out=tmp_path / "b", opset=23, target="tensorrt", progress=Progress(enabled=False))
    assert r.report["passed"], r.report["summary"]
    for stage in r.manifest.data["stages"]:
        ops = [n.op_type for n in onnx.load(str(r.path / stage["file"]), load_external_data=False).graph.node]
        first, last = stage["layers"]
        assert stage["opset"] == 23 and ops.count("Attention") == last - first
    assert check_build(r.path)["ok"]
    with pytest.raises(EvoExportError, match="opset 21 is not one of 20, 23"):
        build("llava-tiny", 0.5, out=tmp_path / "c", opset=21, progress=Progress(enabled=False))
