"""SigLIP family (LLaVA-OneVision's vision path): no CLS, all 729 patches are features.

Checkpoints are saved by transformers itself; parity is against transformers' own
`multi_modal_projector(vision_tower(x).hidden_states[vision_feature_layer])`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import evoexport
from evoexport.export.build import build
from evoexport.errors import EvoExportError
from evoexport.models import load_tower
from evoexport.progress import Progress

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, image_size=56,
              patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)
TEXT = {"model_type": "qwen2", "hidden_size": 96, "num_hidden_layers": 1, "vocab_size": 320, "intermediate_size": 64,
        "num_attention_heads": 2, "num_key_value_heads": 1}


def _split_language_model_out(ckpt: Path) -> Path:
    """Rewrite the checkpoint as two shards: vision tower + projector, and everything else
    (the language model). Returns the language model's shard."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    (ckpt / "model.safetensors.index.json").unlink(missing_ok=True)
    vision = {k: v for k, v in tensors.items() if k.startswith(("vision_tower.", "multi_modal_projector.",
                                                                 "model.vision_tower.", "model.multi_modal_projector."))}
    rest = {k: v for k, v in tensors.items() if k not in vision}
    assert vision and rest
    save_file(vision, ckpt / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(rest, ckpt / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    index = {k: "model-00001-of-00002.safetensors" for k in vision} | {k: "model-00002-of-00002.safetensors" for k in rest}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return ckpt / "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    """A tiny LlavaOnevisionForConditionalGeneration, saved by transformers, and transformers'
    own image features for a few inputs (computed before the language model's shard goes)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaOnevisionConfig(vision_config=VISION, text_config=TEXT, image_token_index=319, video_token_index=318)
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    ckpt = tmp_path_factory.mktemp("onevision") / "llava-onevision-tiny-hf"
    model.save_pretrained(ckpt)
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        hidden = model.model.vision_tower(x, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        want = model.model.multi_modal_projector(hidden)
    lm_shard = _split_language_model_out(ckpt)
    lm_shard.unlink()          # the loader must never need the language model's tensors
    return ckpt, x, want


def test_keep_1_build_equals_transformers_onevision_features(onevision, tmp_path):
    ckpt, x, want = onevision
    out = build("llava-onevision", 1.0, checkpoint=str(ckpt), out=tmp_path / "b", progress=Progress(enabled=False))
    manifest = json.loads((out.path / "manifest.json").read_text())
    assert manifest["tower"]["has_cls"] is False and manifest["tower"]["num_patches"] == 49
    got = evoexport.load(out.path, backend="onnxruntime")(x.numpy()).features
    assert got.shape == (3, 49, 96)                       # every patch is a feature: no CLS to drop
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4)


def test_bare_siglip_vision_checkpoint(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(1)
    model = SiglipVisionModel(SiglipVisionConfig(**VISION)).eval()
    model.save_pretrained(tmp_path / "siglip")
    tower = load_tower("llava-onevision", tmp_path / "siglip")
    assert tower.projector is None and tower.depth == 4
    x = torch.randn(2, 3, 56, 56)
    from evoexport.prune.selection import PruneParams
    from evoexport.pipeline.stages import Pipeline
    with torch.no_grad():
        want = model(x, output_hidden_states=True).hidden_states[-1]
        got = Pipeline(tower, [], PruneParams()).run(x)["features"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_pruned_onevision_build_validates_and_is_tensorrt_ready(tmp_path):
    from evoexport.tensorrt.check import check_build

    out = build("onevision-tiny", 0.5, out=tmp_path / "b", target="tensorrt", progress=Progress(enabled=False))
    assert out.report["passed"] and check_build(out.path)["ok"]
    result = evoexport.load(out.path, backend="openvino")(np.random.default_rng(0).standard_normal((2, 3, 56, 56))
                                                            .astype(np.float32))
    assert result.features.shape == (2, 24, 96)
    assert all(len(set(row)) == 24 and 0 <= row.min() and row.max() < 49 for row in result.indices)


def test_onevision_checkpoint_with_default_strategy_is_refused(onevision, tmp_path):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(onevision[0], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "default"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EvoExportError, match=r"vision_feature_select_strategy 'default' is not supported \(supported: full\)"):
        load_tower("llava-onevision", ckpt)


def test_full_size_preset_is_llava_onevision_7b():
    from evoexport.prune.schedule import default_schedule
    tower = load_tower("llava-onevision", quiet=True)
    assert (tower.num_patches, tower.depth, tower.hidden_size, tower.out_features) == (729, 26, 1152, 3584)
    assert not tower.has_cls
    assert [(p.after_layer, p.tokens) for p in default_schedule(tower.depth, tower.num_patches, 0.5)] == \
        [(5, 579), (8, 459), (10, 364)]


def test_attach_refuses_llava_next_whose_tile_packing_is_not_written(tmp_path):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    from evoexport.integrations.hf_llava import attach

    clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                patch_size=8, model_type="clip_vision_model")
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(vision_config=clip, text_config={**TEXT, "model_type": "llama"},
                                                              image_grid_pinpoints=[[56, 56]]))
    with pytest.raises(EvoExportError, match="does not support LlavaNextForConditionalGeneration yet"):
        attach(model, tmp_path / "any-build")


PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]


@pytest.fixture(scope="module")
def onevision_lm(tmp_path_factory):
    """A whole tiny LLaVA-OneVision (language model included) with 56-px anyres tiles."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(2)
    cfg = LlavaOnevisionConfig(vision_config=VISION, text_config=TEXT, image_token_index=319, video_token_index=318,
                               image_grid_pinpoints=PINPOINTS)
    ckpt = tmp_path_factory.mktemp("onevision-lm") / "ckpt"
    LlavaOnevisionForConditionalGeneration(cfg).eval().save_pretrained(ckpt)
    return ckpt


def _ov_model(ckpt):
    from transformers import LlavaOnevisionForConditionalGeneration
    return LlavaOnevisionForConditionalGeneration.from_pretrained(ckpt, use_safetensors=True).eval()


def _ov_inputs(model, sizes=((100, 60), (50, 150))):
    """Two images of other aspect ratios (so tilings and unpadding differ), one per prompt,
    with as many placeholders as transformers' own packing gives each."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    image_sizes = torch.tensor(sizes)
    tiles = [image_size_to_num_patches(s, PINPOINTS, 56) for s in sizes]
    pixels = torch.randn(len(sizes), max(tiles), 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        lengths = [len(p) for p in model.model.get_image_features(pixels, image_sizes).pooler_output]
    rows = [[1, 5, *[model.config.image_token_id] * n, 17, 42, 9] for n in lengths]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": image_sizes}, lengths


def test_onevision_keep_1_generate_equals_transformers_token_for_token(onevision_lm, tmp_path):
    """The pruned-tile packing, run on full tiles, is transformers' own: base view, tiles on
    one grid, unpadding, newlines."""
    r = build("llava-onevision", 1.0, checkpoint=str(onevision_lm), out=tmp_path / "b", progress=Progress(enabled=False))
    inputs, lengths = _ov_inputs(_ov_model(onevision_lm))
    assert len(set(lengths)) == 2                             # the two images pack to different lengths
    from evoexport.integrations import hf_onevision as onevision
    calls = []
    real = onevision.pack_pruned
    onevision.pack_pruned = lambda *a, **k: calls.append(real(*a, **k)) or calls[-1]
    try:
        _check_keep_1(onevision_lm, r, inputs)
    finally:
        onevision.pack_pruned = real
    assert len(calls) >= 2 and all(c is not None for c in calls)   # our packing ran, not transformers' fallback


def _check_keep_1(onevision_lm, r, inputs):
    from evoexport.integrations.hf_llava import attach, shrink_image_tokens

    with torch.inference_mode():
        expected = _ov_model(onevision_lm).generate(**inputs, max_new_tokens=6, do_sample=False)
        model = attach(_ov_model(onevision_lm), r.path, backend="onnxruntime")
        assert torch.equal(shrink_image_tokens(inputs, model)["input_ids"], inputs["input_ids"])
        assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), expected)


def test_onevision_keep_half_packs_the_kept_tokens_and_generates(onevision_lm, tmp_path):
    from evoexport.integrations.hf_llava import attach, shrink_image_tokens

    from evoexport.integrations import common as integration

    r = build("llava-onevision", 0.5, checkpoint=str(onevision_lm), out=tmp_path / "b", progress=Progress(enabled=False))
    runs, real = [], integration.features_from_build
    integration.features_from_build = lambda *a, **k: runs.append(1) or real(*a, **k)   # a spy: counts, then runs
    try:
        model = attach(_ov_model(onevision_lm), r.path)
        inputs, full_lengths = _ov_inputs(_ov_model(onevision_lm))
        shrunk = shrink_image_tokens(inputs, model)
        with torch.inference_mode():
            got = model.generate(**shrunk, max_new_tokens=6, do_sample=False)
    finally:
        integration.features_from_build = real
    assert len(runs) == 1            # counting placeholders and generate() share one run of the build
    with torch.inference_mode():
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    with torch.inference_mode():
        full = _ov_model(onevision_lm).model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    newline = model.model.image_newline

    def newlines(seq):
        return int((seq == newline.to(seq.dtype)).all(dim=-1).sum())
    for i, p in enumerate(packed):
        assert int((shrunk["input_ids"][i] == model.config.image_token_id).sum()) == len(p) < full_lengths[i]
        assert newlines(p[:24]) == 0                       # the base view: its K = 24 kept tokens first
        assert newlines(p) == newlines(full[i]) > 0         # every grid row still ends in a newline
        assert len(p) - 24 - newlines(p) <= len(full[i]) - 49 - newlines(full[i])   # kept tile tokens <= all
    # wiring: generate equals transformers' decode with those sequences written over the placeholders
    with torch.inference_mode():
        ref = _ov_model(onevision_lm)
        embeds = ref.get_input_embeddings()(shrunk["input_ids"]).clone()
        embeds[shrunk["input_ids"] == ref.config.image_token_id] = torch.cat(packed).to(embeds.dtype)
        new = ref.generate(inputs_embeds=embeds, attention_mask=shrunk["attention_mask"], max_new_tokens=6,
                           do_sample=False)
    assert torch.equal(got[:, shrunk["input_ids"].shape[1]:], new[:, -6:])
