"""What the transformers integrations share: a build run on transformers' own pixel values."""
from __future__ import annotations

import torch


def features_from_build(runner, pixel_values, like: torch.Tensor):
    """The build on transformers' pixel values: (features, indices) as tensors on `like`'s
    device, features in its dtype."""
    return outputs_from_build(runner, pixel_values, like)[:2]


def outputs_from_build(runner, pixel_values, like: torch.Tensor):
    """(features, indices, DeepStack taps) as tensors on `like`'s device, the features and
    taps in its dtype (no taps but a Qwen3-VL build's). The torch backend takes the tensor
    as it is; the others read host arrays."""
    x = pixel_values.detach().float()
    out = runner(x if runner.backend.name == "torch" else x.cpu().numpy())
    as_like = lambda v: torch.as_tensor(runner.backend.to_numpy(v)).to(like.device, like.dtype)  # noqa: E731
    indices = torch.as_tensor(runner.backend.to_numpy(out.indices)).to(like.device)
    return as_like(out.features), indices, [as_like(t) for t in out.deepstack]
