"""Temporal EvoPrune: the later frames of a clip pruned against their anchor frame.

A clip is cut into groups of G frames. The first frame of a group (the anchor) runs the
image chain at its budgets. The later frames run the same layers at smaller budgets, and
their first prune point also reads the anchor's hidden states at that point:

  m_i  = the anchor patch j within `window` patches of i (rows and columns; camera motion)
         whose state is most like patch i's: argmax_j cos(x_i, a_j), ties to the lower j
  s_i  = that cosine
  a'_i = a_i * max(0, 1 - s_i)      the attention importance of what is new in this frame

and EvoPrune selects and merges on a' as it does on a single image, so the importance picks
go to what changed and the diversity picks still cover the frame. At the end (pipeline/
temporal.py, the assemble graph) every later patch with s_i >= `reuse_similarity` is
answered by the anchor's token for m_i: a kept one's feature is replaced by it (the
anchor's, computed among more tokens, is the better feature of a patch that did not change),
a dropped one points to it. Every shape is fixed: later frames keep their budget whatever
moved. Choices and measurements: docs/evoprune.md ("Video").
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import OptionError
from ..names import Grid
from .schedule import PrunePoint, budget_for
from .selection import SelectGraph, first_max_index


@dataclass(frozen=True)
class TemporalParams:
    """`--temporal G:KEEP` and its two knobs; the manifest's `temporal` block records them."""
    group: int                      # G: frames per group, the first the anchor
    keep: float                     # the later frames' final fraction of patch tokens
    window: int = 1                 # anchor patches searched: +-window rows and columns
    # later patches at least this like their anchor match reuse its token (> 1: never);
    # 0.99 on the choosing clips (experiments/tune_temporal.py): lower thresholds reuse
    # patches whose deep features did change
    reuse_similarity: float = 0.99

    def __post_init__(self):
        if isinstance(self.group, bool) or not isinstance(self.group, int) or not 2 <= self.group <= 64:
            raise OptionError("temporal", f"group must be an integer in [2, 64], got {self.group!r}")
        budget_for(10**6, self.keep)   # the same checks as --keep
        if isinstance(self.window, bool) or not isinstance(self.window, int) or not 0 <= self.window <= 8:
            raise OptionError("temporal-window", f"must be an integer in [0, 8], got {self.window!r}")
        if not isinstance(self.reuse_similarity, (int, float)) or math.isnan(self.reuse_similarity):
            raise OptionError("temporal-reuse", f"must be a number (a cosine; above 1: never), got {self.reuse_similarity!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, text: str, **knobs) -> "TemporalParams":
        """'G:KEEP', e.g. 4:0.25."""
        try:
            group_s, keep_s = str(text).split(":")
            group, keep = int(group_s), float(keep_s)
        except ValueError:
            raise OptionError("temporal", f"{text!r} is not G:KEEP (frames per group, the later frames' keep), "
                                          "e.g. 4:0.25") from None
        return cls(group, keep, **{k: v for k, v in knobs.items() if v is not None})


def later_schedule(points: list[PrunePoint], num_patches: int, keep: float) -> list[PrunePoint]:
    """The later frames' prune points: the anchor's layers, budgets falling geometrically to
    `keep` (the anchor's stage 0 runs every frame, so the first point must be shared)."""
    if not points:
        raise OptionError("temporal", "needs a pruned anchor (--keep below 1 or a --schedule): the later frames "
                                      "are compared with it at its first prune point")
    final, out, prev = budget_for(num_patches, keep), [], num_patches
    for i, p in enumerate(points, 1):
        tokens = final if i == len(points) else round(num_patches * keep ** (i / len(points)))
        tokens = min(max(tokens, final, 1), prev - 1)
        if tokens < 1:
            raise OptionError("temporal", f"keep {keep} leaves no room for {len(points)} decreasing budgets")
        out.append(PrunePoint(p.after_layer, tokens))
        prev = tokens
    return out


def window_mask(grid: Grid, window: int, device=None) -> torch.Tensor:
    """[N, N] True where patch j is within `window` rows and columns of patch i (N = rows * cols)."""
    grid = Grid.of(grid)
    ar = torch.arange(grid.tokens, device=device)
    row, col = ar // grid.cols, ar % grid.cols
    return ((row.view(-1, 1) - row.view(1, -1)).abs() <= window) & ((col.view(-1, 1) - col.view(1, -1)).abs() <= window)


def anchor_match(later: torch.Tensor, anchor: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """later [b, N, D], anchor [b, N, D] (patch tokens, raster order) -> (match [b, N] int64,
    similarity [b, N] fp32): each later patch's most similar anchor patch inside `mask`."""
    ln = later.float() / torch.linalg.vector_norm(later.float(), dim=-1, keepdim=True).clamp_min(1e-6)
    an = anchor.float() / torch.linalg.vector_norm(anchor.float(), dim=-1, keepdim=True).clamp_min(1e-6)
    sim = (ln @ an.transpose(1, 2)).masked_fill(~mask, -2.0)            # cosines are >= -1
    match = first_max_index(sim)
    return match, torch.gather(sim, 2, match.unsqueeze(-1)).squeeze(-1)


class TemporalSelectGraph(nn.Module):
    """The later frames' first selection: their hidden states and importance [B*(G-1), ...]
    and the anchors' hidden states [B, ...] at the same point in; the selection's outputs
    and each patch's anchor match and its similarity out."""

    def __init__(self, select: SelectGraph, grid: int, params: TemporalParams):
        super().__init__()
        self.select, self.grid, self.params = select, grid, params
        self.later_frames, self.c = params.group - 1, int(select.has_cls)
        self.rule, self.has_cls = select.rule, select.has_cls
        self.batch_scales = [self.later_frames, self.later_frames, 1]   # later frames' inputs, then the anchors'

    def _anchors(self, anchor_hidden):
        """Each later frame's anchor patches [B*(G-1), N, D], repeated in the later frames' order."""
        a = anchor_hidden[:, self.c:]
        return a.unsqueeze(1).expand(-1, self.later_frames, -1, -1).reshape(-1, a.shape[1], a.shape[2])

    def scores(self, hidden, importance, anchor_hidden):
        mask = window_mask(self.grid, self.params.window, hidden.device)
        match, similarity = anchor_match(hidden[:, self.c:], self._anchors(anchor_hidden), mask)
        return match, similarity, importance * (1 - similarity).clamp_min(0)

    def decision_inputs(self, hidden, importance, anchor_hidden):
        """What the selection decided on: (hidden, effective importance, positions)."""
        return hidden, self.scores(hidden, importance, anchor_hidden)[2], None

    def forward(self, hidden, importance, anchor_hidden):
        match, similarity, weighted = self.scores(hidden, importance, anchor_hidden)
        return (*self.select(hidden, weighted), match, similarity)

    def similarity_at(self, hidden, anchor_hidden, match):
        """[b, N] each later patch's cosine to the anchor patch `match` names."""
        ln = torch.nn.functional.normalize(hidden[:, self.c:].float(), dim=-1, eps=1e-6)
        an = torch.nn.functional.normalize(self._anchors(anchor_hidden).float(), dim=-1, eps=1e-6)
        return (ln * torch.gather(an, 1, match.unsqueeze(-1).expand(-1, -1, an.shape[-1]))).sum(-1)

    def forced(self, hidden, importance, anchor_hidden, *, picks, merge, match):
        """The same outputs under given decisions and matches (validation; never exported)."""
        _, _, weighted = self.scores(hidden, importance, anchor_hidden)
        similarity = self.similarity_at(hidden, anchor_hidden, match)
        return (*self.select.forced(hidden, weighted, picks=picks, merge=merge), match, similarity)


def temporal_flops(tower, anchor_flops: int, later_flops: int, group: int) -> int:
    """FLOPs per frame of a temporal build: the anchor, G-1 later frames and their anchor
    matches (one N x N similarity each), over G."""
    n, d = tower.num_patches, tower.hidden_size * tower.patches_per_token
    return (anchor_flops + (group - 1) * (later_flops + 2 * n * n * d)) // group
