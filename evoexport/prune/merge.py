"""The merge step of a selection: each kept token becomes the size-weighted mean of itself
and the dropped tokens assigned to it (selection.py decides who is kept and where each
dropped token goes)."""
from __future__ import annotations

import torch


def merge_tokens(patches: torch.Tensor, sizes: torch.Tensor, kept: torch.Tensor, dropped: torch.Tensor | None,
           owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each kept token as the size-weighted mean of itself and the dropped tokens it owns,
    in fp32, and the patches each now stands for."""
    b, budget, d = kept.shape[0], kept.shape[1], patches.shape[-1]
    new_sizes = torch.gather(sizes, 1, kept)
    # computed in fp32 and handed on in the hidden states' dtype: in a bf16 chain that is the
    # cast the next stage would make on entry, so keeping the chain's dtype across the
    # boundary changes no number (upcast after the gathers: K and N-K rows, not N)
    merged = torch.gather(patches, 1, kept.unsqueeze(-1).expand(b, budget, d)).float()
    if dropped is None:
        return merged, new_sizes
    dropped_sizes = torch.gather(sizes, 1, dropped)
    dropped_x = torch.gather(patches, 1, dropped.unsqueeze(-1).expand(b, dropped.shape[1], d)).float()
    assign = torch.gather(owner, 1, dropped).unsqueeze(1) == torch.arange(budget, device=patches.device).view(1, budget, 1)
    assign = assign.to(merged.dtype)                                                 # [B, K, N-K]
    mass = merged * new_sizes.unsqueeze(-1) + assign @ (dropped_x * dropped_sizes.unsqueeze(-1))
    new_sizes = new_sizes + (assign @ dropped_sizes.unsqueeze(-1)).squeeze(-1)
    return mass / new_sizes.unsqueeze(-1), new_sizes
