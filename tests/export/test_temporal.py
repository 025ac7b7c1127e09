"""Temporal builds (`--temporal G:KEEP`): frames in groups, the later frames pruned against
their group's anchor inside the encoder; every family builds and validates, identical frames
are answered by the anchor, and bad clips and options get one error line."""
from __future__ import annotations

import numpy as np
import pytest

from evoexport import names
from evoexport.export.build import build
from evoexport.progress import Progress
from evoexport.runtime.runner import load
from tests.helpers import assert_one_error_line, cli

GROUP = 4


@pytest.fixture(scope="module")
def temporal_build(tmp_path_factory):
    """llava-tiny, anchors keep 0.5, later frames keep 0.25, groups of 4; validated."""
    out = tmp_path_factory.mktemp("temporal") / "llava"
    return build("llava-tiny", 0.5, temporal=f"{GROUP}:0.25", out=out, progress=Progress(enabled=False))


@pytest.mark.parametrize("model", ["onevision-tiny", "qwen2.5-vl-tiny"])
def test_every_family_builds_and_validates(model, tmp_path):
    """SigLIP (no CLS) and Qwen2.5-VL (2x2 units, positional stages) as CLIP below: the build's
    own validation (every graph, the chain under forced decisions, ORT vs PyTorch) passes."""
    result = build(model, 0.5, temporal="3:0.25", out=tmp_path / model, progress=Progress(enabled=False))
    assert result.report["passed"]
    t = result.manifest.temporal
    assert t["group"] == 3 and t["schedule"][-1]["tokens"] < result.manifest.kept_patches
    kinds = [g["kind"] for g in result.manifest.graphs]
    assert kinds.count("temporal") == 1 and kinds[-1] == "assemble"


def test_a_temporal_build_validates_and_says_where_each_token_is_from(temporal_build):
    m, report = temporal_build.manifest, temporal_build.report
    assert report["passed"] and report["end_to_end"]["points"][-1]["graph"] == "later_select_1"
    ka, kl = m.schedule[-1]["tokens"], m.temporal["schedule"][-1]["tokens"]
    assert kl < ka and m.flops["ideal_speedup"] > 1.0
    x = np.random.default_rng(0).random((2, GROUP, 3, m.image_size, m.image_size), dtype=np.float32)
    with load(temporal_build.path) as runner:
        out = runner.arrays(x)
    assert out[names.FEATURES].shape == (2, ka + (GROUP - 1) * kl, m.features["shape"][-1])
    assert (out[names.FRAMES][0] == np.repeat(np.arange(GROUP), [ka] + [kl] * (GROUP - 1))).all()
    # each token's patch position; owners [B, G, N] index the group's tokens
    assert out[names.INDICES].min() >= 0 and out[names.INDICES].max() < m.num_patches
    owners = out[names.OWNERS]
    assert owners.shape == (2, GROUP, m.num_patches) and owners.max() < out[names.FEATURES].shape[1]


def test_the_torch_backend_in_bf16_runs_a_temporal_build_as_temporal(temporal_build):
    """A reduced-precision torch chain (bf16 on a CPU, the GPU default) is rebuilt on a twin of
    the tower: it must stay the temporal chain, with the same output layout as fp32's."""
    m = temporal_build.manifest
    x = np.random.default_rng(2).random((1, GROUP, 3, m.image_size, m.image_size), dtype=np.float32)
    with load(temporal_build.path, backend="torch") as fp32, load(temporal_build.path, backend="torch",
                                                                   precision="bf16") as bf16:
        want, got = fp32.arrays(x), bf16.arrays(x)
    assert got[names.FEATURES].shape == want[names.FEATURES].shape
    np.testing.assert_array_equal(got[names.FRAMES], want[names.FRAMES])
    assert got[names.OWNERS].shape == (1, GROUP, m.num_patches)


def test_identical_frames_are_answered_by_the_anchor(temporal_build):
    """A group of G copies of one frame: every later patch matches its own anchor patch
    exactly, so every later frame's kept tokens are the anchor's tokens for those patches and
    every patch of every frame is answered by the anchor's token for it."""
    m = temporal_build.manifest
    frame = np.random.default_rng(1).random((1, 1, 3, m.image_size, m.image_size), dtype=np.float32)
    with load(temporal_build.path) as runner:
        out = runner.arrays(np.ascontiguousarray(np.repeat(frame, GROUP, axis=1)))
    features, frames, owners = out[names.FEATURES][0], out[names.FRAMES][0], out[names.OWNERS][0]
    positions = out[names.INDICES][0]
    later = np.flatnonzero(frames > 0)
    np.testing.assert_array_equal(features[later], features[owners[0, positions[later]]])
    for f in range(1, GROUP):
        np.testing.assert_array_equal(owners[f], owners[0])


def test_temporal_runs_a_clip_in_groups(temporal_build, tmp_path):
    from evoexport.inputs.video import sample_clip

    out = tmp_path / "clip.npz"
    code, err, _ = cli("run", temporal_build.path, "--input", sample_clip("carphone_pristine"), "--frames", 8,
                       "--output", out)
    assert code == 0, err
    with np.load(out) as z:
        assert z[names.FEATURES].shape[0] == 2 and z["frame_numbers"].shape == (2, GROUP)
        assert z[names.OWNERS].shape == (2, GROUP, temporal_build.manifest.num_patches)


def test_show_draws_each_frames_kept_patches_and_who_answers_for_each(temporal_build, tmp_path):
    from PIL import Image

    from evoexport.inputs.video import sample_clip

    out = tmp_path / "show.png"
    code, err, stdout = cli("show", temporal_build.path, "--input", sample_clip("carphone_pristine"), "--frames", 8,
                            "--output", out)
    assert code == 0, err
    assert "8 frame(s) x 3 panels" in stdout
    width, height = Image.open(out).size
    size = temporal_build.manifest.image_size
    assert width > 8 * size and 3 * size < height < 4 * size


def spliced_clip(path):
    """An MPEG-TS clip whose frame size changes mid-way (two streams spliced byte by byte)."""
    import av

    parts = []
    for i, (w, h) in enumerate(((64, 48), (32, 32))):
        part = path.with_name(f"part{i}.ts")
        with av.open(str(part), "w", format="mpegts") as container:
            stream = container.add_stream("mpeg2video", rate=25)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for _ in range(6):
                frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), 90 * (i + 1), np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        parts.append(part.read_bytes())
    path.write_bytes(b"".join(parts))
    return path


def test_bad_clips_and_options_get_one_error_line(temporal_build, tmp_path):
    from evoexport.inputs.video import sample_clip

    bikes, build_dir, out = sample_clip("bikes"), temporal_build.path, tmp_path / "o.npz"
    cases = [
        (("run", build_dir, "--input", bikes, "--frames", 2, "--output", out), "groups of 4"),     # too few for a group
        (("run", build_dir, "--input", bikes, "--frames", 6, "--output", out), "multiple of 4"),
        (("run", build_dir, "--input", spliced_clip(tmp_path / "spliced.ts"), "--frames", 8, "--output", out),
         "one frame size"),
        (("show", build_dir, "--input", bikes, "--frames", 6, "--output", tmp_path / "s.png"), "a multiple of 4 (groups of 4 frames)"),
        (("build", "--model", "llava-tiny", "--temporal", "1:0.25", "--out", tmp_path / "b"), "group"),
        (("build", "--model", "llava-tiny", "--temporal", "four", "--out", tmp_path / "b"), "G:KEEP"),
        (("build", "--model", "llava-tiny", "--temporal", "4:1.5", "--out", tmp_path / "b"), "keep"),
        (("build", "--model", "llava-tiny", "--keep", "1.0", "--temporal", "4:0.25", "--out", tmp_path / "b"),
         "pruned anchor"),
        (("build", "--model", "llava-tiny", "--temporal", "4:0.25", "--precision", "int8", "--out", tmp_path / "b"),
         "int8"),
        (("build", "--model", "llava-tiny", "--temporal", "4:0.25", "--no-merge", "--out", tmp_path / "b"), "merg"),
    ]
    for args, words in cases:
        code, err, _ = cli(*args)
        assert_one_error_line(code, err, words)
    assert not out.exists() and not (tmp_path / "b").exists()
    x = np.zeros((1, 3, 3, 56, 56), np.float32)         # another group size than the build's
    np.save(tmp_path / "x.npy", x)
    code, err, _ = cli("run", build_dir, "--input", tmp_path / "x.npy", "--output", out)
    assert_one_error_line(code, err, "pixel_values must have shape")


def test_a_temporal_build_fuses_into_one_graph_with_one_copy_of_the_weights(temporal_build, tmp_path):
    """`fuse` writes the whole temporal chain as one graph: it validates, equals the chain on
    ONNX Runtime, and holds the layers the anchors and the later frames share once."""
    import onnx

    from evoexport.export.fuse import fuse
    from evoexport.validate.report import validate

    fused = fuse(temporal_build.path, tmp_path / "fused")
    assert validate(fused)["passed"]
    m = temporal_build.manifest
    x = np.random.default_rng(2).random((2, GROUP, 3, m.image_size, m.image_size), dtype=np.float32)
    with load(temporal_build.path) as chain, load(fused) as one:
        a, b = chain.arrays(x), one.arrays(x)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-5, err_msg=name)
    weights = sum(t.ByteSize() for t in onnx.load(str(fused / "fused.onnx")).graph.initializer)
    chain_weights = sum(sum(t.ByteSize() for t in onnx.load(str(temporal_build.path / g["file"])).graph.initializer)
                        for g in m.graphs)
    assert weights < 0.8 * chain_weights
