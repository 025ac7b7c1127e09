"""The pruning methods `eval` holds EvoPrune against, each behind a selection graph's
interface (so the same Pipeline runs them): fixed spatial rules (pooling, striding) and
ToMe's bipartite soft matching."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import EvoExportError


class GridReduce(nn.Module):
    """A selection graph's interface over a fixed spatial rule: average pooling or strided
    subsampling of the patch grid (the controls recent token-pruning benchmarks use)."""

    def __init__(self, grid: int, keep: float, pool: bool):
        super().__init__()
        self.grid, self.pool = grid, pool
        self.rows = 2 if keep <= 0.25 else 1     # 2x2 at keep 0.25, 1x2 at keep 0.5
        if grid % 2:
            raise EvoExportError(f"a {grid}x{grid} patch grid cannot be pooled by 2")

    def forward(self, hidden, importance, sizes=None, positions=None):
        b, _, d = hidden.shape
        g, r = self.grid, self.rows
        patches = hidden[:, 1:].reshape(b, g, g, d)
        if self.pool:
            kept = patches.reshape(b, g // r, r, g // 2, 2, d).mean(dim=(2, 4))
        else:
            kept = patches[:, ::r, ::2]
        kept = kept.reshape(b, -1, d)
        k = kept.shape[1]
        rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        slot = ((rows // r) * (g // 2) + cols // 2).reshape(-1)                 # the pooled token of each patch
        top_left = ((rows % r == 0) & (cols % 2 == 0)).reshape(-1)
        merge = (slot if self.pool else torch.where(top_left, slot, -1)).expand(b, -1)
        picks = torch.where(top_left, 0, -1).expand(b, -1)
        positions = torch.nonzero(top_left).reshape(-1).expand(b, -1)
        size = torch.full((b, k), float(2 * r if self.pool else 1))
        return torch.cat([hidden[:, :1], kept], dim=1), size, positions, merge, picks


class ToMeSelect(nn.Module):
    """ToMe's bipartite soft matching (Bolya et al., 2023) behind a selection graph's
    interface, as a baseline: tokens alternate into sets A and B, each A token finds its
    most similar B token (cosine of the hidden states), the r = N - K most similar A tokens
    are merged into their partners (size-weighted means), and everything else is kept."""

    def __init__(self, budget: int):
        super().__init__()
        self.budget = budget

    def forward(self, hidden, importance, sizes=None, positions=None):
        b, n1, d = hidden.shape
        x, n, k = hidden[:, 1:], hidden.shape[1] - 1, self.budget
        r = n - k
        if not 0 <= r <= n // 2:
            raise EvoExportError(f"ToMe merges at most half the tokens per step ({n} -> {k} asked)")
        sizes = torch.ones(b, n) if sizes is None else sizes
        positions = torch.arange(n).expand(b, n) if positions is None else positions
        f = torch.nn.functional.normalize(x, dim=-1)
        a_idx, b_idx = torch.arange(0, n, 2), torch.arange(1, n, 2)
        best, partner = (f[:, a_idx] @ f[:, b_idx].transpose(1, 2)).max(dim=-1)       # [B, |A|]
        order = best.argsort(dim=-1, descending=True)
        merged_a = torch.zeros(b, len(a_idx), dtype=torch.bool).scatter_(1, order[:, :r], True)
        kept = torch.ones(b, n, dtype=torch.bool)
        kept[:, a_idx] = ~merged_a
        kept_idx = torch.nonzero(kept)[:, 1].reshape(b, k)                              # ascending
        slot_of = torch.full((b, n), -1, dtype=torch.int64).scatter_(1, kept_idx, torch.arange(k).expand(b, k))
        dest = slot_of.clone()
        dest[:, a_idx] = torch.where(merged_a, torch.gather(slot_of[:, b_idx], 1, partner), slot_of[:, a_idx])
        weights = torch.zeros(b, k, n).scatter_(1, dest.unsqueeze(1), sizes.unsqueeze(1))   # [B, K, N]
        new_sizes = weights.sum(dim=-1)
        merged = (weights @ x) / new_sizes.unsqueeze(-1)
        picks = torch.where(kept, 0, -1)
        out = torch.cat([hidden[:, :1], merged], dim=1)
        return out, new_sizes, torch.gather(positions, 1, kept_idx), dest, picks
