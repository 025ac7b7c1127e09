"""Presets and checkpoint loading on small checkpoints that transformers itself saves."""
from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from evoexport.errors import EvoExportError
from evoexport.models import get_preset, list_presets, load_tower

from tests.conftest import make_clip_checkpoint, make_llava_checkpoint


def test_llava_preset_is_llava_1_5_vision_path():
    p = get_preset("llava")
    assert p.vision["hidden_size"] == 1024 and p.vision["num_hidden_layers"] == 24
    assert p.vision["image_size"] == 336 and p.vision["patch_size"] == 14 and p.vision["hidden_act"] == "quick_gelu"
    assert p.projector == {"out_features": 4096, "act": "gelu", "bias": True} and p.feature_layer == -2
    assert {x.name for x in list_presets()} >= {"llava", "llava-tiny", "clip-tiny"}


def test_random_weights_are_seeded():
    a = load_tower("llava-tiny", seed=0, quiet=True)
    b = load_tower("llava-tiny", seed=0, quiet=True)
    c = load_tower("llava-tiny", seed=1, quiet=True)
    assert a.weights_info["weights"] == "random"
    assert a.weights_info["weights_sha256"] == b.weights_info["weights_sha256"] != c.weights_info["weights_sha256"]
    # feature layer -2 of 6: five layers are built, the sixth never is
    assert a.depth == 5 and a.num_patches == 49


def test_llava_checkpoint_loads_only_the_vision_path(tmp_path, llava_ckpt):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(llava_ckpt, ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    vision_files = {f for k, f in index.items() if not k.startswith("language_model.") and "language_model" not in k}
    lm_only = {f for f in index.values()} - vision_files
    assert lm_only, "the fixture should shard the language model apart"
    for f in lm_only:  # the language model's shards are never read: garbage there changes nothing
        (ckpt / f).write_bytes(b"not a safetensors file")
    tower = load_tower("llava", ckpt)
    assert tower.weights_info["weights"] == "checkpoint" and tower.projector is not None
    assert tower.hidden_size == 32 and tower.depth == 2 and tower.out_features == 48
    saved = {}
    for f in vision_files:
        saved.update(load_file(ckpt / f))
    torch.testing.assert_close(tower.projector.linear_1.weight, saved["multi_modal_projector.linear_1.weight"])
    torch.testing.assert_close(tower.layers[1].mlp.fc2.weight, saved["vision_tower.encoder.layers.1.mlp.fc2.weight"])


def test_transformers_4_key_layout_loads_too(tmp_path, llava_ckpt):
    """Released llava-1.5-7b-hf stores 'vision_tower.vision_model.*' (transformers 4)."""
    new = load_tower("llava", llava_ckpt, quiet=True)
    ckpt = tmp_path / "old"
    ckpt.mkdir()
    shutil.copy(llava_ckpt / "config.json", ckpt)
    state = {}
    for f in sorted(llava_ckpt.glob("*.safetensors")):
        state.update(load_file(f))
    renamed = {k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k: v
               for k, v in state.items()}
    save_file(renamed, ckpt / "model.safetensors")
    old = load_tower("llava", ckpt, quiet=True)
    assert old.weights_info["weights_sha256"] == new.weights_info["weights_sha256"]


def test_bare_clip_checkpoint_has_no_projector(tmp_path):
    tower = load_tower("llava", make_clip_checkpoint(tmp_path / "clip"))
    assert tower.projector is None and tower.out_features == 32


def test_pickle_checkpoints_are_refused(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": 1}, f)
    with pytest.raises(EvoExportError, match="pickle"):
        load_tower("llava", d)
    with pytest.raises(EvoExportError, match="pickle"):
        load_tower("llava", d / "pytorch_model.bin")


def test_wrong_shapes_and_missing_tensors_are_named(tmp_path, llava_ckpt):
    ckpt = make_llava_checkpoint(tmp_path / "c", shard=None)
    state = load_file(ckpt / "model.safetensors")
    state["multi_modal_projector.linear_2.weight"] = torch.zeros(3, 3)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(EvoExportError, match="linear_2.weight.*shape"):
        load_tower("llava", ckpt, quiet=True)
    del state["multi_modal_projector.linear_2.weight"]
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(EvoExportError, match="lacks"):
        load_tower("llava", ckpt, quiet=True)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(EvoExportError, match="does not exist"):
        load_tower("llava", tmp_path / "nope")
    with pytest.raises(EvoExportError, match="config.json"):
        load_tower("llava", tmp_path)
