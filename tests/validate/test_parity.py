"""At keep 1.0 a build is transformers' own LLaVA image-feature path, loaded from the same checkpoint."""
from __future__ import annotations

import numpy as np
import torch

import evoexport
from evoexport.export.build import build
from evoexport.inputs.images import sample_batch
from evoexport.progress import Progress


def hf_llava_features(ckpt, x: np.ndarray) -> np.ndarray:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    with torch.no_grad():
        out = model.get_image_features(pixel_values=torch.from_numpy(x), vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
    return torch.stack(list(out.pooler_output)).numpy()


def test_keep_one_equals_llava_for_conditional_generation(llava_ckpt, tmp_path):
    result = build("llava", 1.0, checkpoint=str(llava_ckpt), out=tmp_path / "b", progress=Progress(enabled=False))
    assert result.manifest.data["weights"] == "checkpoint" and result.report["passed"]
    x = sample_batch(32, result.manifest.data["preprocess"])
    ours = evoexport.load(result.path)(x).features
    ref = hf_llava_features(llava_ckpt, x)
    assert ours.shape == ref.shape == (3, 16, 48)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_pruned_build_from_checkpoint_runs_the_same_weights(llava_ckpt, tmp_path):
    result = build("llava", 0.5, checkpoint=str(llava_ckpt), out=tmp_path / "b", progress=Progress(enabled=False))
    m = result.manifest.data
    assert m["schedule"] == [{"after_layer": 0, "tokens": 8}] and m["stages"][-1]["tokens_out"] == 8
    x = sample_batch(32, m["preprocess"])
    out = evoexport.load(result.path)(x)
    ref = hf_llava_features(llava_ckpt, x)
    # every kept token stands for itself plus what was merged into it: its features must lie
    # closer to the unpruned feature at its own position than to any other position's
    for b in range(3):
        f = out.features[b] / np.linalg.norm(out.features[b], axis=1, keepdims=True)
        r = ref[b] / np.linalg.norm(ref[b], axis=1, keepdims=True)
        sims = f @ r.T
        assert (sims.argmax(1) == out.indices[b]).mean() >= 0.5
