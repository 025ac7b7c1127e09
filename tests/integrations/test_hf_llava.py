"""evoexport.integrations.hf_llava: a build feeding transformers' own LLaVA generate()."""
from __future__ import annotations

import pytest
import torch

from evoexport.export.build import build
from evoexport.errors import EvoExportError
from evoexport.integrations.hf_llava import attach, shrink_image_tokens
from evoexport.progress import Progress
from tests.conftest import make_llava_checkpoint


def _model(ckpt):
    from transformers import LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(ckpt, use_safetensors=True).eval()


def _inputs(model, images=2):
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2   # CLS dropped
    ids = torch.tensor([[1, 5, *[model.config.image_token_id] * n, 17, 42, 9]] * images)
    pixels = torch.randn(images, 3, model.config.vision_config.image_size, model.config.vision_config.image_size,
                         generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def _greedy(model, **inputs):
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_keep_1_generate_equals_transformers_token_for_token(llava_ckpt, tmp_path, backend):
    r = build("llava", 1.0, checkpoint=str(llava_ckpt), out=tmp_path / "b", progress=Progress(enabled=False))
    inputs = _inputs(_model(llava_ckpt))
    expected = _greedy(_model(llava_ckpt), **inputs)
    model = attach(_model(llava_ckpt), r.path, backend=backend)
    assert torch.equal(_greedy(model, **inputs), expected)


def test_keep_half_generate_equals_a_decode_from_the_spliced_build_features(llava_ckpt, tmp_path):
    import evoexport

    r = build("llava", 0.5, checkpoint=str(llava_ckpt), out=tmp_path / "b", progress=Progress(enabled=False))
    model = attach(_model(llava_ckpt), r.path)
    inputs = shrink_image_tokens(_inputs(model), model)
    k = model.evoexport_image_tokens
    assert k == 8 and int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * k
    got = _greedy(model, **inputs)
    # by hand: the build's features written over the placeholder embeddings, then transformers' decode
    ref = _model(llava_ckpt)
    features = torch.from_numpy(evoexport.load(r.path)(inputs["pixel_values"].numpy()).features)
    embeds = ref.get_input_embeddings()(inputs["input_ids"]).detach().clone()
    embeds[inputs["input_ids"] == ref.config.image_token_id] = features.reshape(-1, features.shape[-1])
    new = _greedy(ref, inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    assert torch.equal(got[:, inputs["input_ids"].shape[1]:], new[:, -8:])


def test_attach_refuses_a_build_of_other_weights(llava_ckpt, tmp_path):
    other = make_llava_checkpoint(tmp_path / "other", seed=1)
    r = build("llava", 0.5, checkpoint=str(other), out=tmp_path / "b", progress=Progress(enabled=False))
    with pytest.raises(EvoExportError, match="other vision weights"):
        attach(_model(llava_ckpt), r.path)
