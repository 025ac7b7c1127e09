"""`evoexport eval-video` on the pretrained DINOv2 and a real clip: every method at the
temporal rule's FLOPs, errors with bootstrap intervals in the JSON, bad input refused."""
from __future__ import annotations

import json

import pytest

from evoexport.inputs.video import sample_clip
from tests.helpers import assert_one_error_line, cli

METHODS = {"unpruned", "temporal", "per_frame", "per_frame_keep", "frame_subsample", "static_patch", "random"}


@pytest.fixture(scope="module")
def result(dinov2_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-video") / "video.json"
    code, err, stdout = cli("eval-video", "--checkpoint", dinov2_ckpt, "--input", sample_clip("carphone_pristine"),
                            "--frames", 8, "--temporal", "4:0.15", "--json", out)
    assert code == 0, err
    assert "all clips (2 windows of 4 frames)" in stdout
    return json.loads(out.read_text())


def test_every_method_is_scored_at_the_temporal_rules_flops(result):
    block = result["all_clips"]
    assert set(block["methods"]) == METHODS and block["windows"] == 2
    temporal = block["methods"]["temporal"]["flops_ratio"]
    for m in ("per_frame", "static_patch", "random"):   # matched to within a few percent
        assert abs(block["methods"][m]["flops_ratio"] - temporal) < 0.05, m
    assert block["methods"]["frame_subsample"]["flops_ratio"] == pytest.approx(4 / 8)
    assert block["methods"]["per_frame_keep"]["flops_ratio"] > temporal


def test_errors_are_means_with_intervals_and_the_reference_has_none(result):
    for name, r in result["all_clips"]["methods"].items():
        for metric in ("dense_error", "cls_error"):
            lo, hi = r[metric]["ci"]
            assert lo <= r[metric]["mean"] <= hi, (name, metric)
        if name == "unpruned":
            assert r["dense_error"]["mean"] < 1e-6 and r["cls_error"]["mean"] < 1e-6
        else:
            assert r["dense_error"]["mean"] > 1e-4, name
    assert "carphone_pristine.mp4" in result["clips"]
    assert result["machine"]["cpu"] and isinstance(result["machine"]["isa"], list)   # which kernels rounded


def test_bad_input_is_one_error_line(dinov2_ckpt, tmp_path):
    clip = sample_clip("bikes")
    for args, words in ((("--input", tmp_path / "nope.mp4"), "is not a video file"),
                        (("--input", clip, "--frames", 6, "--temporal", "4:0.25"), "multiple of the group"),
                        (("--input", clip, "--temporal", "4"), "G:KEEP"),
                        (("--input", clip, "--keep", "0"), "keep")):
        code, err, _ = cli("eval-video", "--checkpoint", dinov2_ckpt, *args)
        assert_one_error_line(code, err, words)
