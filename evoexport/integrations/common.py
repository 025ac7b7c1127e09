"""What the transformers integrations share: a build run on transformers' own pixel values."""
from __future__ import annotations

import torch


def features_from_build(runner, pixel_values, like: torch.Tensor):
    """The build on transformers' pixel values: (features, indices) as tensors on `like`'s
    device, features in its dtype. The torch backend takes the tensor as it is; the others
    read host arrays."""
    x = pixel_values.detach().float()
    out = runner(x if runner.backend.name == "torch" else x.cpu().numpy())
    features = torch.as_tensor(runner.backend.to_numpy(out.features)).to(like.device, like.dtype)
    return features, torch.as_tensor(runner.backend.to_numpy(out.indices)).to(like.device)
