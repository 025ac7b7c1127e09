"""scripts/gpu-probe at test size on the CPU (`--device cpu`): the code paths the GPU run
takes, its JSON after every section, and the CPU-side check of its dumps. Nothing here is a
GPU measurement; the numbers it writes are the CPU's and are not asserted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
PROBE = [str(ROOT / "scripts" / "gpu-probe")]
ENV = {**os.environ, "PYTHON": sys.executable}   # the probe runs on the python that runs the tests


def _run(*args, timeout=600):
    return subprocess.run([*PROBE, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV)


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    r = _run(str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((out / "probe.json").read_text())


def test_every_section_runs_on_the_cpu_and_is_recorded(probe_run):
    out, data = probe_run
    assert data["errors"] == {} and data["skipped"] == {}
    assert list(data["probe"]["sections"]) == ["env", "dump", "bench", "ttft", "selections", "sdpa", "qkv", "budgets"]
    assert data["env"]["ideal_speedup"] > 1 and len(data["env"]["schedule"]) == 2
    # bench-cuda.json is in `bench --device cuda`'s format, readable by its formatter
    from evoexport.measure.bench_cuda import format_cuda_bench
    bench = json.loads((out / "bench-cuda.json").read_text())
    assert {"rows", "summary", "per_graph", "graph_vs_eager", "targets", "device", "versions"} <= set(bench)
    systems = {(r["batch"], r["system"]) for r in bench["rows"]}
    for b in (1, 2):
        assert {(b, "pruned bf16 (eager)"), (b, "unpruned bf16 (eager)"), (b, "transformers bf16 (eager)")} <= systems
    assert all(c["same_decisions"] for c in bench["graph_vs_eager"].values())
    assert "selection share of the chain" in format_cuda_bench(bench)
    # the old and new selection decide alike (on the CPU both take the same fp32 math)
    chain_rows = [r for r in data["selections"]["rows"] if r["graph"] == "chain"]
    assert chain_rows and all(r["decisions_differ_total"] == 0 and r["features_rel_diff"] == 0 for r in chain_rows)
    # attention: math always runs here, and whatever ran agrees with fp32 math to bf16 rounding
    for row in data["sdpa"]["rows"]:
        assert "ms" in row["math"]
        assert all(v["err"] < 0.05 for k, v in row.items() if isinstance(v, dict) and "err" in v)
    assert {r["tokens"] for r in data["qkv"]["rows"]} == {36, 25, 50}
    for row in data["ttft"]["rows"]:
        pruned, unpruned = row["rows"]["pruned"], row["rows"]["unpruned"]
        assert pruned["image_tokens"] == data["env"]["schedule"][-1]["tokens"] < unpruned["image_tokens"] == 49
    # rounded budgets: every stage's sequence length (tokens + CLS) a multiple of M
    budgets = data["budgets"]["budgets"]
    assert budgets["default"] == [q["tokens"] for q in data["env"]["schedule"]]
    assert all((t + 1) % 8 == 0 for t in budgets["multiple of 8"])
    assert {"default", "multiple of 8"} <= set(data["budgets"]["rows"][0])
    assert budgets["multiple of 64"].startswith("error: round_budgets 64")   # 49 patches: no room


def test_the_dumps_validate_against_the_fp32_reference_on_the_cpu(probe_run):
    out, _ = probe_run
    r = _run("--check", str(out))
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["dump-compare", "dump-topk"]
    assert all("PASSED against the fp32 reference (bf16 tolerances)" in ln for ln in lines)
    check = json.loads((out / "check.json").read_text())
    assert all(len(c["points"]) == 2 for c in check.values())


def test_a_damaged_dump_is_one_error_line(probe_run, tmp_path):
    import shutil
    out, _ = probe_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "dump-topk.npz").write_bytes((out / "dump-topk.npz").read_bytes()[:200])   # truncated
    r = _run("--check", str(copy))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "dump-topk.npz is not a readable dump" in r.stderr and "Traceback" not in r.stderr


def test_a_run_cut_short_leaves_the_sections_it_finished(tmp_path):
    out = tmp_path / "cut"
    proc = subprocess.Popen([*PROBE, str(out), "--device", "cpu", "--sections", "env,dump,bench,selections"],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if "dump" in json.loads((out / "probe.json").read_text()):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    data = json.loads((out / "probe.json").read_text())   # whole JSON: written atomically
    assert "env" in data and "dump" in data and "selections" not in data


def test_sections_that_do_not_fit_the_budget_are_skipped_with_the_reason(tmp_path):
    r = _run(str(tmp_path / "b"), "--device", "cpu", "--budget-s", "0", "--sections", "env,bench")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "b" / "probe.json").read_text())
    assert set(data["skipped"]) == {"env", "bench"} and "budget" in data["skipped"]["bench"]
    bad = _run(str(tmp_path / "c"), "--device", "cpu", "--sections", "env,bogus")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: unknown section(s) bogus; sections: env, dump, bench, ttft, selections, sdpa, qkv, budgets"]


def test_ttft_at_full_depth_on_the_torch_chains(tiny_build):
    """experiments/ttft.py --device cuda's code, on the CPU with the tiny language model."""
    from evoexport.manifest import read_manifest
    from evoexport.measure.ttft import ttft_full_depth

    m = read_manifest(tiny_build, verify=False, files=False)
    result = ttft_full_depth(m, "tiny", device="cpu", batches=(1, 2), reps=2)
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    for row in result["rows"]:
        assert row["rows"]["pruned"]["image_tokens"] == m.schedule[-1]["tokens"]
        assert row["rows"]["unpruned"]["image_tokens"] == m.num_patches
        assert row["speedup_ttft"] > 0 and row["layers"] == 2
