"""The importance probe: one query row against the keys of the layer before a prune point,
never the T x T probabilities (so every layer keeps fused attention)."""
from __future__ import annotations

import pytest
import torch

from evoexport.models import load_tower
from evoexport.pipeline.stages import EncoderStage, StageRole


def _stage_and_qk(has_cls: bool):
    torch.manual_seed(0)
    tower = load_tower("clip-tiny", quiet=True)
    tower.has_cls = has_cls      # an encoder without CLS (SigLIP-style), on the same layers
    stage = EncoderStage(tower, range(0, 3), StageRole(embed=True, probe=True, project=False, proportional=False))
    attn = tower.layers[2].self_attn
    seen = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o.detach())),
             attn.k_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o.detach()))]
    x = torch.randn(3, 3, tower.image_size, tower.image_size)
    with torch.inference_mode():
        _, importance = stage(x)
    for h in hooks:
        h.remove()
    b, t, d = seen["k"].shape
    heads = attn.num_heads
    q = seen["q"].reshape(b, t, heads, d // heads).transpose(1, 2)
    k = seen["k"].reshape(b, t, heads, d // heads).transpose(1, 2)
    return importance, q, k, attn.scale


def test_with_cls_it_is_eager_attention_s_cls_row_over_the_patches():
    importance, q, k, scale = _stage_and_qk(has_cls=True)
    full = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)      # [B, H, T, T], what eager attention holds
    torch.testing.assert_close(importance, full[:, :, 0, 1:].mean(dim=1), rtol=1e-5, atol=1e-7)


def test_without_cls_it_is_the_mean_query_row_over_all_tokens():
    importance, q, k, scale = _stage_and_qk(has_cls=False)
    row = torch.softmax(q.mean(dim=2, keepdim=True) @ k.transpose(-1, -2) * scale, dim=-1)   # [B, H, 1, T]
    assert importance.shape == (q.shape[0], q.shape[2])                  # every token is a patch token
    torch.testing.assert_close(importance, row[:, :, 0].mean(dim=1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(importance.sum(dim=-1), torch.ones(q.shape[0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("has_cls", [True, False])
def test_the_probe_never_forms_a_token_by_token_matrix(has_cls, monkeypatch):
    shapes = []
    real = torch.softmax

    def spy(x, dim=None, **kw):
        shapes.append(tuple(x.shape))
        return real(x, dim=dim, **kw)

    monkeypatch.setattr(torch, "softmax", spy)
    _stage_and_qk(has_cls)
    assert shapes and all(s[-2] == 1 for s in shapes)   # one query row per head
