"""A real Ray Serve deployment of a tiny build on loopback: answers equal the library's under
concurrency, over HTTP and through the Python handle, and batches are counted in images."""
from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("ray.serve")

import evoexport  # noqa: E402
from evoexport.serve.triton import free_port  # noqa: E402

MAX_BATCH = 4


@pytest.fixture(scope="module")
def deployment(tiny_build):
    import ray
    from ray import serve

    from evoexport.serve.ray_app import encoder_app

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(encoder_app(str(tiny_build), max_batch=MAX_BATCH, wait_s=0.02), name="evoexport",
                           route_prefix="/evoexport")
        yield f"http://127.0.0.1:{port}/evoexport", handle, evoexport.load(tiny_build)
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(url: str, body: bytes):
    req = urllib.request.Request(url, data=body, method="POST")
    with urllib.request.urlopen(req, timeout=120) as resp:
        return dict(np.load(io.BytesIO(resp.read()), allow_pickle=False))


def _npy(x) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _check_equal(out: dict, ref, n_points: int):
    assert np.abs(out["features"] - ref.features).max() <= 1e-5
    assert np.array_equal(out["indices"], ref.indices)
    for i in range(n_points):
        for key, want in (("indices", ref.indices_per_point[i]), ("merge", ref.merge_per_point[i]),
                          ("picks", ref.picks_per_point[i])):
            assert np.array_equal(out[f"{key}_{i}"], want)


def test_concurrent_calls_equal_the_library_and_batches_count_images(deployment):
    url, handle, runner = deployment
    rng = np.random.default_rng(0)
    shape = runner.input_shape[1:]
    inputs = [rng.standard_normal((int(rng.integers(1, 4)), *shape), dtype=np.float32) for _ in range(24)]
    before = len(handle.batch_sizes.remote().result())
    with ThreadPoolExecutor(12) as pool:
        http_out = list(pool.map(lambda x: _post(url, _npy(x)), inputs[:16]))
        handle_out = [r.result() for r in [handle.encode.remote(x) for x in inputs[16:]]]
    n_points = len(runner.manifest.data["schedule"])
    for x, out in zip(inputs, http_out + handle_out):
        _check_equal(out, runner(x), n_points)
    batches = handle.batch_sizes.remote().result()[before:]
    assert sum(batches) == sum(len(x) for x in inputs)          # every image ran exactly once
    assert max(batches) <= MAX_BATCH                            # the limit is in images, not calls
    assert len(batches) < len(inputs)                           # calls were batched together


def test_bad_calls_get_a_client_error_and_the_replica_keeps_serving(deployment):
    url, handle, runner = deployment
    shape = runner.input_shape[1:]
    for body, message in ((_npy(np.zeros((MAX_BATCH + 1, *shape), np.float32)), "at most 4"),
                          (_npy(np.zeros((1, shape[0], shape[1], shape[2] + 1), np.float32)), "must have shape"),
                          (_npy(np.zeros((1, *shape), np.float64)), "float32"),
                          (b"not an npy file", ".npy")):
        with pytest.raises(urllib.error.HTTPError) as caught:
            _post(url, body)
        assert caught.value.code == 400
        assert message in json.loads(caught.value.read())["error"]
    with pytest.raises(Exception, match="at most 4"):
        handle.encode.remote(np.zeros((MAX_BATCH + 1, *shape), np.float32)).result()
    x = np.random.default_rng(1).standard_normal((2, *shape), dtype=np.float32)
    _check_equal(_post(url, _npy(x)), runner(x), len(runner.manifest.data["schedule"]))


def test_a_temporal_build_is_served_clip_by_clip(deployment, tmp_path):
    """Clips [B, G, 3, H, W] batched together come back split per call: every output equals
    the library's on that call's clips, the later frames' (G-1 rows per clip) included."""
    from ray import serve

    from evoexport.export.build import build
    from evoexport.progress import Progress
    from evoexport.serve.ray_app import encoder_app
    url = deployment[0].removesuffix("/evoexport") + "/temporal"
    b = build("llava-tiny", 0.5, temporal="3:0.25", out=tmp_path / "b", validate=False,
              progress=Progress(enabled=False))
    handle = serve.run(encoder_app(str(b.path), max_batch=MAX_BATCH, wait_s=0.05), name="temporal",
                       route_prefix="/temporal")
    runner, rng = evoexport.load(b.path), np.random.default_rng(2)
    clips = [rng.random((n, 3, 3, 56, 56), dtype=np.float32) for n in (1, 2, 1, 2)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda x: _post(url, _npy(x)), clips))
    assert max(handle.batch_sizes.remote().result()) > 1          # calls were batched together
    for x, out in zip(clips, answers):
        want = runner.arrays(x)
        assert set(out) == set(want) and out["later_merge_0"].shape[0] == 2 * len(x)
        for name, value in want.items():
            assert np.allclose(out[name], value, atol=1e-5) if value.dtype.kind == "f" else np.array_equal(out[name], value), name
    with pytest.raises(urllib.error.HTTPError) as caught:
        _post(url, _npy(rng.random((1, 4, 3, 56, 56), dtype=np.float32)))
    assert caught.value.code == 400 and "must have shape" in json.loads(caught.value.read())["error"]
    serve.delete("temporal")


def test_a_qwen_video_build_is_served(deployment, tmp_path):
    """A Qwen2.5-VL video build's frame pairs [B, 6, H, W] through Ray Serve equal the library's."""
    from ray import serve

    from evoexport.export.build import build
    from evoexport.progress import Progress
    from evoexport.serve.ray_app import encoder_app
    url = deployment[0].removesuffix("/evoexport") + "/video"
    b = build("qwen2.5-vl-tiny", 0.5, out=tmp_path / "b", video=True, validate=False,
              progress=Progress(enabled=False))
    serve.run(encoder_app(str(b.path), max_batch=MAX_BATCH), name="video", route_prefix="/video")
    runner = evoexport.load(b.path)
    x = np.random.default_rng(5).standard_normal((2, *runner.input_shape[1:]), dtype=np.float32)
    _check_equal(_post(url, _npy(x)), runner(x), b.manifest.prune_points)
    serve.delete("video")
