"""A real Triton Inference Server (the one bundled in the nvidia-pytriton wheel: Python
backend only) on loopback, serving a tiny build's repository; bounded in time, stopped by PID.
Every answer is checked against `evoexport.load(BUILD)` on the same pixels."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

import evoexport  # noqa: E402
from evoexport.errors import EvoExportError  # noqa: E402
from evoexport.serve.repository import write_repository  # noqa: E402
from evoexport.serve.triton import TritonServer, free_port  # noqa: E402

MAX_BATCH = 4


@pytest.fixture(scope="module")
def served(tiny_build, tmp_path_factory):
    repo = write_repository(tiny_build, tmp_path_factory.mktemp("triton") / "repo", flavour="python",
                            max_batch=MAX_BATCH, queue_delay_us=2000, for_trtllm=True)
    server = TritonServer(repo.path, startup_timeout=120, exit_timeout=5).start()
    try:
        yield server, evoexport.load(tiny_build), repo
    finally:
        pid = server.process.pid
        server.stop()
        assert _group_alive(pid) == [], "tritonserver or a stub outlived stop()"


def _group_alive(pgid: int) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pgid=,pid=,stat=,comm="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split()[0] == str(pgid) and not line.split()[2].startswith("Z")]


def _client(server):
    return http.InferenceServerClient(server.url.removeprefix("http://"), concurrency=1, network_timeout=120)


def _infer(client, pixels, dtype="FP32", model="evoexport", name="pixel_values"):
    inp = http.InferInput(name, list(pixels.shape), dtype)
    inp.set_data_from_numpy(pixels, binary_data=True)
    return client.infer(model, [inp])


def _check_equal(result, reference, n_points: int):
    assert np.abs(result.as_numpy("features") - reference.features).max() <= 1e-5
    assert np.array_equal(result.as_numpy("indices"), reference.indices)
    for i in range(n_points):
        assert np.array_equal(result.as_numpy(f"indices_{i}"), reference.indices_per_point[i])
        assert np.array_equal(result.as_numpy(f"merge_{i}"), reference.merge_per_point[i])
        assert np.array_equal(result.as_numpy(f"picks_{i}"), reference.picks_per_point[i])


def _pixels(rng, batch: int, shape) -> np.ndarray:
    return rng.standard_normal((batch, *shape), dtype=np.float32)


def test_concurrent_requests_equal_the_library_and_are_batched(served):
    server, runner, _ = served
    shape = runner.input_shape[1:]
    rng = np.random.default_rng(1)
    inputs = [_pixels(rng, int(rng.integers(1, 4)), shape) for _ in range(32)]
    local = threading.local()

    def one(x):
        if not hasattr(local, "client"):
            local.client = _client(server)
        return _infer(local.client, x)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, inputs))
    n_points = len(runner.manifest.data["schedule"])
    for x, r in zip(inputs, results):
        _check_equal(r, runner(x), n_points)
    # Triton's own statistics: more images than executions means requests ran batched together
    with urllib.request.urlopen(f"{server.url}/v2/models/evoexport_stage_0/stats") as resp:
        stats = json.loads(resp.read())["model_stats"][0]
    assert int(stats["execution_count"]) < int(stats["inference_count"])


def test_malformed_requests_get_client_errors_while_good_ones_go_on(served):
    server, runner, _ = served
    shape = runner.input_shape[1:]
    rng = np.random.default_rng(2)
    good = [_pixels(rng, 2, shape) for _ in range(24)]
    bad = [(_pixels(rng, MAX_BATCH + 1, shape), "FP32", "batch-size must be <="),
           (rng.standard_normal((1, shape[0], shape[1], shape[2] - 1), dtype=np.float32), "FP32", "unexpected shape"),
           (rng.standard_normal((1, *shape)).astype(np.float64), "FP64", "data-type")]
    errors = []

    def send_bad():
        c = _client(server)
        for _ in range(4):
            for x, dtype, message in bad:
                try:
                    _infer(c, x, dtype)
                    errors.append(("accepted", message))
                except InferenceServerException as e:
                    errors.append((e.status(), message if message in e.message() else e.message()))
        # not even JSON: refused, and the server stays up
        req = urllib.request.Request(f"{server.url}/v2/models/evoexport/infer", data=b"{not json", method="POST")
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(req, timeout=30)

    spoiler = threading.Thread(target=send_bad)
    spoiler.start()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda x: _infer(_client(server), x), good))
    spoiler.join(60)
    n_points = len(runner.manifest.data["schedule"])
    for x, r in zip(good, results):
        _check_equal(r, runner(x), n_points)
    assert len(errors) == 12
    assert all(status == "400" and message in {m for _, _, m in bad} for status, message in errors), errors
    assert server.ready()


def test_under_load_no_request_fails_and_malformed_ones_change_nothing(served):
    """A bounded run: 2,000 requests at concurrency 32, one in 25 malformed."""
    server, runner, _ = served
    shape = runner.input_shape[1:]
    rng = np.random.default_rng(3)
    pool_inputs = [_pixels(rng, int(rng.integers(1, 3)), shape) for _ in range(40)]
    expected = {i: runner(x) for i, x in enumerate(pool_inputs)}
    n_points = len(runner.manifest.data["schedule"])
    local = threading.local()
    failures, refused, checked = [], [], []
    lock = threading.Lock()

    def one(k):
        if not hasattr(local, "client"):
            local.client = _client(server)
        if k % 25 == 24:
            try:
                _infer(local.client, np.zeros((1, *shape), np.float64), "FP64")
            except InferenceServerException as e:
                with lock:
                    refused.append(e.status())
            return
        i = k % len(pool_inputs)
        try:
            r = _infer(local.client, pool_inputs[i])
        except Exception as e:   # any failure of a good request fails the test
            with lock:
                failures.append(repr(e)[:200])
            return
        if k % 10 == 0:   # a sample of answers, verified against the library
            _check_equal(r, expected[i], n_points)
            with lock:
                checked.append(k)

    start = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(one, range(2000)))
    assert failures == []
    assert refused == ["400"] * 80
    assert len(checked) == 200
    assert time.monotonic() - start < 300
    assert server.ready()


def test_pixels_holding_nan_or_infinity_get_a_client_error_alone(served):
    """Through Triton they got a 200 with an answer, while the library refuses them. The
    ensemble's first step judges each request by itself: the bad one gets a 400, the good ones
    batched with it are answered."""
    server, runner, _ = served
    shape = runner.input_shape[1:]
    rng = np.random.default_rng(4)
    good = [_pixels(rng, 1, shape) for _ in range(12)]
    bad = []
    for value in (np.nan, np.inf, -np.inf):
        x = _pixels(rng, 2, shape)
        x[1, 0, 3, 4] = value
        bad.append(x)

    def one(x):
        try:
            return _infer(_client(server), x)
        except InferenceServerException as e:
            return e
    with ThreadPoolExecutor(15) as pool:
        results = list(pool.map(one, good + bad))
    n_points = len(runner.manifest.data["schedule"])
    for x, r in zip(good, results):
        _check_equal(r, runner(x), n_points)
    for r in results[len(good):]:
        assert isinstance(r, InferenceServerException) and r.status() == "400", r
        assert "pixel_values hold NaN or infinite values" in r.message()
    with pytest.raises(EvoExportError, match="NaN or infinite"):
        runner(bad[0])                                   # the library says the same


def _stub_pids(server_pid: int, model: str) -> list[int]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,stat=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()
            if line.split()[1] == str(server_pid) and not line.split()[2].startswith("Z") and f"/{model}/1/model.py" in line]


def test_a_dead_step_is_not_ready_and_one_check_brings_it_back(tiny_build, tmp_path, capsys):
    """Triton's own readiness stays 200 with a dead step; `evoexport health` and probe() say
    no and name the step; one Supervisor.check() reloads that step and all is answered again."""
    from evoexport.cli import main
    from evoexport.serve.supervisor import Supervisor, probe

    repo = write_repository(tiny_build, tmp_path / "repo", flavour="python", max_batch=MAX_BATCH)
    with TritonServer(repo.path, exit_timeout=5) as server:
        reports = []
        supervisor = Supervisor(server, report=reports.append)
        assert probe(server.url).ok and supervisor.check() is None
        os.kill(_stub_pids(server.process.pid, "evoexport_select_1")[0], signal.SIGKILL)
        time.sleep(0.3)
        assert server.ready()                           # what Triton says: wrong
        state = probe(server.url)
        assert not state.ok and state.steps == ["evoexport_select_1"], state
        assert main(["health", server.url]) == 1
        assert "not ready: HTTP 500" in capsys.readouterr().err
        done = supervisor.check()
        assert done.startswith("step(s) evoexport_select_1 reloaded in"), reports
        assert probe(server.url).ok and main(["health", server.url]) == 0
        assert len(_stub_pids(server.process.pid, "evoexport_select_1")) == 1
        x = np.random.default_rng(6).standard_normal((2, *evoexport.load(tiny_build).input_shape[1:]), dtype=np.float32)
        _check_equal(_infer(_client(server), x), evoexport.load(tiny_build)(x), 2)


RECOVERY_S = 5.0    # docs/serving.md: the tiny build answers again within 1.0 s of a kill; 5 s leaves room


def test_a_stub_killed_under_load_recovers_and_no_answer_is_wrong(tiny_build, sigint_raises):
    """`evoexport serve --engine triton` under 8 concurrent clients; one step's worker is
    killed (SIGKILL). Requests may fail while it is reloaded, never with a wrong answer; within
    RECOVERY_S every request succeeds again, and every answer equals the library's."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "evoexport.cli", "serve", str(tiny_build), "--port", str(port),
                             "--max-batch", str(MAX_BATCH)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    runner = evoexport.load(tiny_build)
    shape, n_points = runner.input_shape[1:], len(runner.manifest.data["schedule"])
    try:
        _wait_healthy(url, proc)
        stop, results, lock = threading.Event(), [], threading.Lock()

        def client(seed):
            c = http.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
            rng = np.random.default_rng(seed)
            while not stop.is_set():
                x = _pixels(rng, int(rng.integers(1, 3)), shape)
                sent = time.monotonic()
                try:
                    r = _infer(c, x)
                except InferenceServerException as e:
                    with lock:
                        results.append((sent, "error", e.message()))
                    continue
                _check_equal(r, runner(x), n_points)      # never a wrong answer, before, during or after
                with lock:
                    results.append((sent, "ok", ""))
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(2)
        killed = time.monotonic()
        os.kill(_stub_pids(_server_pid(port), "evoexport_select_0")[0], signal.SIGKILL)
        time.sleep(RECOVERY_S + 3)
        stop.set()
        for t in threads:
            t.join(60)
        after = [status for sent, status, _ in results if sent > killed + RECOVERY_S]
        assert len(after) > 20 and set(after) == {"ok"}, [r for r in results if r[0] > killed + RECOVERY_S][:5]
        errors = [message for _, status, message in results if status == "error"]
        assert all("is not healthy" in m or "evoexport_select_0" in m for m in errors), errors[:5]
        assert subprocess.run([sys.executable, "-m", "evoexport.cli", "health", url]).returncode == 0
        assert any("evoexport_select_0: its worker process is gone; reloading" in line for line in lines), lines
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    assert proc.returncode == 0, lines[-5:]


def test_a_crashed_server_is_restarted(tiny_build, sigint_raises):
    """tritonserver itself killed: `evoexport health` fails at once (no server), and within
    the documented time the supervisor has it answering again on the same address."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "evoexport.cli", "serve", str(tiny_build), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        os.kill(_server_pid(port), signal.SIGKILL)
        killed = time.monotonic()
        assert subprocess.run([sys.executable, "-m", "evoexport.cli", "health", url], capture_output=True).returncode == 1
        _wait_healthy(url, proc, timeout=30)
        assert time.monotonic() - killed < 30
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
    assert proc.returncode == 0
    assert subprocess.run(["pgrep", "-f", f"http-port={port}"], capture_output=True).stdout == b""


def _server_pid(port: int) -> int:
    return int(subprocess.run(["pgrep", "-f", f"http-port={port}"], capture_output=True, text=True).stdout.split()[0])


def _wait_healthy(url: str, proc, timeout: float = 120) -> None:
    from evoexport.serve.supervisor import probe
    deadline = time.monotonic() + timeout
    while not probe(url).ok:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, f"not healthy in {timeout} s"
        time.sleep(0.2)


def test_for_trtllm_ensemble_names_dtypes_and_shapes(served):
    """multimodal_encoders as TensorRT-LLM's multimodal Triton models expect: IMAGE fp16
    [B, 1, C, H, W] in; the prompt table fp16 [B, K, hidden] and its vocabulary size K (int32)
    out. The LLM itself cannot run here."""
    server, runner, repo = served
    shape = runner.input_shape[1:]
    image = np.random.default_rng(4).standard_normal((3, 1, *shape)).astype(np.float16)
    c = _client(server)
    r = _infer(c, image, "FP16", model="multimodal_encoders", name="IMAGE")
    table, vocab = r.as_numpy("OUT_PROMPT_EMBEDDING_TABLE"), r.as_numpy("OUT_PROMPT_VOCAB_SIZE")
    k, hidden = runner.manifest.data["outputs"][0]["shape"][1:]
    assert table.dtype == np.float16 and table.shape == (3, k, hidden)
    assert vocab.dtype == np.int32 and vocab.shape == (3, 1) and (vocab == k).all()
    want = runner(image[:, 0].astype(np.float32)).features.astype(np.float16)
    assert np.abs(table.astype(np.float32) - want.astype(np.float32)).max() <= 1e-3
    meta = c.get_model_metadata("multimodal_encoders")
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [("IMAGE", "FP16", [-1, 1, *shape])]
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]} == {
        "OUT_PROMPT_EMBEDDING_TABLE": ("FP16", [-1, k, hidden]), "OUT_PROMPT_VOCAB_SIZE": ("INT32", [-1, 1])}
    assert repo.trtllm["max_multimodal_len"] == MAX_BATCH * k


def test_serve_command_answers_and_stops_cleanly_on_ctrl_c(tiny_build, sigint_raises):
    """`evoexport serve BUILD --engine triton`: loopback, KServe v2 over HTTP, Ctrl-C stops
    the server and its stubs with exit code 0."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "evoexport.cli", "serve", str(tiny_build), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        else:
            raise AssertionError("not ready: " + (proc.stderr.read() if proc.poll() is not None else "in 120 s"))
        x = np.random.default_rng(5).standard_normal((2, 3, 56, 56), dtype=np.float32)
        body = json.dumps({"inputs": [{"name": "pixel_values", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        with urllib.request.urlopen(urllib.request.Request(f"{url}/v2/models/evoexport/infer", data=body,
                                                           method="POST"), timeout=60) as resp:
            outputs = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in json.loads(resp.read())["outputs"]}
        reference = evoexport.load(tiny_build)(x)
        assert np.abs(outputs["features"] - reference.features).max() <= 1e-5
        assert np.array_equal(outputs["indices"], reference.indices)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert err.strip().splitlines()[-1] == "stopped"
        left = subprocess.run(["pgrep", "-f", f"http-port={port}"], capture_output=True, text=True).stdout.split()
        assert left == [], "tritonserver outlived the command"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_bucketed_build_serves_one_ensemble_per_grid(tmp_path):
    """`evoexport triton` on a bucketed build: one ensemble per grid (NAME_ROWSxCOLS), each
    step with only its own tensors; each grid's ensemble answers as the library's runner for
    that grid, and the client picks the grid (BucketRunner.choose)."""
    from evoexport.export.build import build
    from evoexport.progress import Progress
    from evoexport.runtime.buckets import BucketRunner
    b = build("qwen2.5-vl-tiny", 0.5, out=tmp_path / "b", grids="8x8,6x9", validate=False,
              progress=Progress(enabled=False))
    repo = write_repository(b.path, tmp_path / "repo", flavour="python", max_batch=MAX_BATCH)
    assert repo.ensembles == {"evoexport_8x8": [224, 224], "evoexport_6x9": [168, 252]}
    assert not list((tmp_path / "repo").rglob("weights.bin"))
    runner = BucketRunner(b.path)
    assert runner.choose(400, 600)[0] == 1          # a 3:2 photo: the 6x9 grid's ensemble
    rng = np.random.default_rng(0)
    with TritonServer(repo.path, startup_timeout=120, exit_timeout=5) as server:
        for i, name in enumerate(repo.ensembles):
            x = rng.standard_normal((2, 3, *repo.ensembles[name]), dtype=np.float32)
            _check_equal(_infer(_client(server), x, model=name), runner.runner(i)(x), 1)


def _check_clip(got, want: dict, outputs: list) -> None:
    """Every output of the repository equals the library's on the same clip."""
    assert set(outputs) <= set(want)
    for name in outputs:
        value = got.as_numpy(name)
        assert value.shape == want[name].shape, name
        if value.dtype.kind == "f":
            assert np.abs(value - want[name]).max() <= 1e-5, name
        else:
            assert np.array_equal(value, want[name]), name


def test_a_temporal_build_serves_whole_clips(tmp_path):
    """A temporal build's steps read tensors of two batches (B groups, B*(G-1) later frames):
    its repository takes whole clips [B, G, 3, H, W] per request (max_batch_size 0) and every
    output equals the library's runner on the same clip; a clip of another group size is a
    client error and the next good clip is answered; the readiness probe passes."""
    from evoexport.export.build import build
    from evoexport.progress import Progress
    from evoexport.serve.supervisor import probe
    b = build("llava-tiny", 0.5, temporal="3:0.25", out=tmp_path / "b", progress=Progress(enabled=False))
    with pytest.raises(EvoExportError, match="whole clips"):        # no batcher to size
        write_repository(b.path, tmp_path / "sized", flavour="python", max_batch=2)
    repo = write_repository(b.path, tmp_path / "repo", flavour="python")
    assert repo.max_batch == 0 and "owners" in repo.outputs and "frames" in repo.outputs
    runner, rng = evoexport.load(b.path), np.random.default_rng(3)
    clips = [rng.random((n, 3, 3, 56, 56), dtype=np.float32) for n in (1, 2)]
    with TritonServer(repo.path, startup_timeout=120, exit_timeout=5) as server:
        client = _client(server)
        for clip in clips:
            _check_clip(_infer(client, clip), runner.arrays(clip), repo.outputs)
        with pytest.raises(InferenceServerException) as bad:
            _infer(client, rng.random((1, 4, 3, 56, 56), dtype=np.float32))
        assert "400" in str(bad.value.status()) or "unexpected shape" in str(bad.value).lower()
        assert np.array_equal(_infer(client, clips[0]).as_numpy("owners"), runner.arrays(clips[0])["owners"])
        assert probe(server.url).ok


def test_a_qwen_video_build_serves_frame_pairs(tmp_path):
    """A Qwen2.5-VL video build (`build --video`) takes a temporal patch's two frames on the
    channel axis, [B, 6, H, W]: its ensemble answers as the library's runner does; the
    TensorRT-LLM ensemble (one image per item) is refused for it in one line."""
    from evoexport.export.build import build
    from evoexport.progress import Progress
    b = build("qwen2.5-vl-tiny", 0.5, out=tmp_path / "b", video=True, validate=False,
              progress=Progress(enabled=False))
    with pytest.raises(EvoExportError, match="frame pairs"):
        write_repository(b.path, tmp_path / "trtllm", flavour="python", for_trtllm=True)
    repo = write_repository(b.path, tmp_path / "repo", flavour="python", max_batch=MAX_BATCH)
    runner = evoexport.load(b.path)
    assert runner.input_shape[1] == 6
    x = np.random.default_rng(4).standard_normal((3, *runner.input_shape[1:]), dtype=np.float32)
    with TritonServer(repo.path, startup_timeout=120, exit_timeout=5) as server:
        _check_equal(_infer(_client(server), x), runner(x), b.manifest.prune_points)


def test_a_qwen_temporal_video_build_serves_clips_of_frame_pairs(tmp_path):
    """`--video --temporal`: groups of G temporal patches, [B, G, 6, H, W], whole clips per
    request; every output equals the library's."""
    from evoexport.export.build import build
    from evoexport.progress import Progress
    b = build("qwen2.5-vl-tiny", 0.5, out=tmp_path / "b", video=True, temporal="2:0.25", validate=False,
              progress=Progress(enabled=False))
    repo = write_repository(b.path, tmp_path / "repo", flavour="python")
    runner = evoexport.load(b.path)
    assert runner.input_shape[1:3] == [2, 6] and repo.max_batch == 0
    x = np.random.default_rng(5).random((2, *runner.input_shape[1:]), dtype=np.float32)
    with TritonServer(repo.path, startup_timeout=120, exit_timeout=5) as server:
        _check_clip(_infer(_client(server), x), runner.arrays(x), repo.outputs)
