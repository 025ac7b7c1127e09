"""A temporal build's graphs: clips in groups of G frames, the later frames pruned against
their group's first frame (prune/temporal.py has the rule).

    pixel_values [B, G, 3, H, W]
    stage_0          every frame, to the first prune point; the anchors' states and
                     importance under the image chain's names, the later frames' under later()
    select_0 .. stage_P          the anchors' image chain; stage_P -> anchor_features [B, c+Ka, D]
    later_select_0   (temporal)  later frames against their anchor: + later_match, its similarity
    later_stage_1 .. later_stage_P   the later frames' chain at their budgets, batch B*(G-1)
    assemble         features [B, T, D]: each frame's tokens in frame order (T = G*c + Ka +
                     (G-1)*Kl); indices and frames per token; owners [B, G, N]: the token that
                     answers for each patch of each frame (reuse from the anchor included)

Every shape is static but the batch; the wiring is by name as in an image chain, so the
same run_chain loop, runtimes and validation serve it.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .. import names
from ..models.base import BaseTower
from ..names import GraphKind
from ..prune.schedule import PrunePoint
from ..prune.selection import PruneParams
from ..prune.cost import tower_flops
from ..prune.temporal import TemporalParams, TemporalSelectGraph, later_schedule, temporal_flops
from .stages import GraphSpec, Pipeline, run_graphs


class GroupedStage(nn.Module):
    """The first encoder stage over every frame of [B, G, 3, H, W]: the anchors' outputs
    [B, ...], then the later frames' [B*(G-1), ...]."""

    def __init__(self, stage: nn.Module, group: int):
        super().__init__()
        self.stage, self.group = stage, group

    def forward(self, pixel_values):
        frames = pixel_values.reshape(-1, *pixel_values.shape[2:])
        out = []
        for value in self.stage(frames):
            grouped = value.reshape(-1, self.group, *value.shape[1:])
            out.append(grouped[:, 0])
            out.append(grouped[:, 1:].reshape(-1, *value.shape[1:]))
        return out[0], out[2], out[1], out[3]      # anchors' hidden, importance; later frames'


def owner_chain(merges: list[torch.Tensor], num_patches: int, like: torch.Tensor) -> torch.Tensor:
    """[b, N]: the final kept slot each original patch ended in, through every point's merge."""
    if not merges:
        return torch.arange(num_patches, device=like.device).expand(like.shape[0], num_patches)
    owner = merges[0]
    for merge in merges[1:]:
        owner = torch.gather(merge, 1, owner)
    return owner


class AssembleGraph(nn.Module):
    """A group's tokens in frame order, the reuse of anchor tokens, and the dense owner map.
    Inputs: anchor_features, the anchors' merge_i and last indices, the later frames'
    features, merges and last indices, later_match and its similarity."""

    varargs = True   # export: one dynamic batch axis per input

    def __init__(self, points: int, later_points: int, group: int, cls_tokens: int, num_patches: int,
                 reuse_similarity: float):
        super().__init__()
        f = group - 1   # the batch of each input: B for the anchors', B*(G-1) for the later frames'
        self.batch_scales = [1] * (points + 2) + [f] * (later_points + 4)
        self.points, self.later_points, self.group = points, later_points, group
        self.c, self.n, self.reuse = cls_tokens, num_patches, reuse_similarity

    def forward(self, *inputs):
        p, q, c, f = self.points, self.later_points, self.c, self.group - 1
        anchor, a_merges, a_kept = inputs[0], list(inputs[1:1 + p]), inputs[1 + p]
        later, l_merges, l_kept = inputs[2 + p], list(inputs[3 + p:3 + p + q]), inputs[3 + p + q]
        match, similarity = inputs[4 + p + q], inputs[5 + p + q]
        b, ka, kl, d = anchor.shape[0], a_kept.shape[1], l_kept.shape[1], anchor.shape[-1]
        a_owner = owner_chain(a_merges, self.n, anchor)                                   # [B, N] slot in Ka
        l_owner = owner_chain(l_merges, self.n, later)                                    # [B*F, N] slot in Kl
        # each later patch's anchor answer: the anchor token its match ended in
        a_owner_rep = a_owner.unsqueeze(1).expand(b, f, self.n).reshape(b * f, self.n)
        answer = torch.gather(a_owner_rep, 1, match)                                      # [B*F, N] slot in Ka
        reuse = similarity >= self.reuse
        # a kept later token that did not change takes the anchor's feature for its patch
        kept_reuse = torch.gather(reuse, 1, l_kept)                                       # [B*F, Kl]
        kept_answer = torch.gather(answer, 1, l_kept)
        a_rep = anchor[:, c:].unsqueeze(1).expand(b, f, ka, d).reshape(b * f, ka, d)
        borrowed = torch.gather(a_rep, 1, kept_answer.unsqueeze(-1).expand(b * f, kl, d))
        patches = torch.where(kept_reuse.unsqueeze(-1), borrowed, later[:, c:])
        later = torch.cat([later[:, :c], patches], dim=1) if c else patches
        features = torch.cat([anchor, later.reshape(b, f * (c + kl), d)], dim=1)
        # token index in the group's sequence of each patch's answer, frame by frame
        starts = (c + ka) + (c + kl) * torch.arange(f, device=anchor.device).view(1, f, 1)
        own = starts + c + l_owner.reshape(b, f, self.n)
        from_anchor = (c + answer).reshape(b, f, self.n)
        owners = torch.cat([(c + a_owner).unsqueeze(1), torch.where(reuse.reshape(b, f, self.n), from_anchor, own)],
                           dim=1)
        cls = torch.full((b, c), -1, dtype=torch.int64, device=anchor.device)
        l_positions = torch.cat([torch.full((b * f, c), -1, dtype=torch.int64, device=anchor.device), l_kept],
                                dim=1) if c else l_kept
        indices = torch.cat([torch.cat([cls, a_kept], dim=1) if c else a_kept, l_positions.reshape(b, -1)], dim=1)
        frames = torch.cat([torch.zeros(c + ka, dtype=torch.int64, device=anchor.device),
                            torch.arange(1, f + 1, device=anchor.device).repeat_interleave(c + kl)])
        return features, indices, frames.expand(b, -1), owners


def _renamed(spec: GraphSpec, outputs: list[str] | None = None) -> GraphSpec:
    """A later-frame graph: its name and every tensor under names.later()."""
    return replace(spec, name=names.later(spec.name), inputs=[names.later(n) for n in spec.inputs],
                   outputs=outputs or [names.later(n) for n in spec.outputs])


class TemporalPipeline:
    """A temporal build as GraphSpecs, with the PyTorch reference executor."""

    def __init__(self, tower: BaseTower, points: list[PrunePoint], params: PruneParams, temporal: TemporalParams,
                 square_mask: bool = False, keep_dtype: bool = False):
        self.later_points = later_schedule(points, tower.num_patches, temporal.keep)
        anchor = Pipeline(tower, points, params, square_mask, keep_dtype)
        later = Pipeline(tower, self.later_points, params, square_mask, keep_dtype)
        self.tower, self.points, self.params, self.temporal = tower, anchor.points, params, temporal
        self.square_mask, self.keep_dtype = square_mask, keep_dtype
        g = temporal.group
        first, *rest = anchor.graphs
        hidden0, importance0 = names.stage_hidden(0), names.stage_importance(0)
        self.graphs = [replace(first, module=GroupedStage(first.module, g), inputs=[names.PIXELS],
                               outputs=[hidden0, importance0, names.later(hidden0), names.later(importance0)])]
        self.graphs += rest[:-1] + [replace(rest[-1], outputs=[names.ANCHOR_FEATURES])]
        select0 = later.graphs[1]
        self.graphs.append(replace(_renamed(select0), kind=GraphKind.TEMPORAL,
                                   module=TemporalSelectGraph(select0.module, tower.grid, temporal),
                                   inputs=[names.later(hidden0), names.later(importance0), hidden0],
                                   outputs=[names.later(n) for n in names.select_outputs(0)]
                                   + [names.MATCH, names.MATCH_SIMILARITY]))
        self.graphs += [_renamed(spec) for spec in later.graphs[2:]]
        self.graphs.append(self._assemble(tower))

    def _assemble(self, tower: BaseTower) -> GraphSpec:
        p, q = len(self.points), len(self.later_points)
        cls_tokens = int(tower.has_cls and not tower.drop_cls)
        inputs = ([names.ANCHOR_FEATURES] + [names.merge(i) for i in range(p)] + [names.indices(p - 1)]
                  + [names.later(names.FEATURES)] + [names.later(names.merge(i)) for i in range(q)]
                  + [names.later(names.indices(q - 1)), names.MATCH, names.MATCH_SIMILARITY])
        module = AssembleGraph(p, q, self.temporal.group, cls_tokens, tower.num_patches,
                               self.temporal.reuse_similarity)
        tokens = self.points[-1].tokens + (self.temporal.group - 1) * self.later_points[-1].tokens
        return GraphSpec(names.ASSEMBLE, GraphKind.ASSEMBLE, module, inputs,
                         [names.FEATURES, names.INDICES, names.FRAMES, names.OWNERS], None, tokens, tokens)

    def with_tower(self, tower: BaseTower, keep_dtype: bool) -> "TemporalPipeline":
        """The same temporal chain on another copy of the tower (a reduced-precision twin)."""
        return TemporalPipeline(tower, self.points, self.params, self.temporal, self.square_mask, keep_dtype)

    @property
    def anchor_graph_count(self) -> int:
        """The graphs of the anchors' image chain (the manifest's `stages`); the rest are temporal."""
        return 2 * len(self.points) + 1

    @torch.inference_mode()
    def run(self, pixel_values: torch.Tensor, rescore=None, forced: dict | None = None,
            modules: dict | None = None) -> dict[str, torch.Tensor]:
        """Every named tensor, computed in PyTorch (the reference); as Pipeline.run."""
        return run_graphs(self.graphs, pixel_values, rescore, forced, modules)

    def example_inputs(self, batch: int = 2) -> dict[str, torch.Tensor]:
        t = self.tower
        x = torch.randn(batch, 1, t.input_channels, *t.image_hw, generator=torch.Generator().manual_seed(0))
        moved = x + 0.3 * torch.randn(batch, self.temporal.group, *x.shape[2:], generator=torch.Generator().manual_seed(1))
        return self.run(moved.to(next(t.parameters()).device))


def pipeline_from_manifest(manifest, tower: BaseTower | None = None) -> Pipeline | TemporalPipeline:
    """A build's chain rebuilt in PyTorch, an image chain or a temporal one: its tower (weights
    checked against the manifest), prune points and parameters; `tower` reuses one loaded."""
    from ..models.loader import tower_from_manifest

    points = [PrunePoint(p["after_layer"], p["tokens"]) for p in manifest.schedule]
    tower, params = tower or tower_from_manifest(manifest), PruneParams.from_manifest(manifest.prune_params)
    t = manifest.temporal
    if t:
        return TemporalPipeline(tower, points, params, TemporalParams(t["group"], t["keep"], t["window"],
                                                                     t["reuse_similarity"]))
    return Pipeline(tower, points, params)


def chain_flops(tower, pipeline) -> tuple[int, int]:
    """(unpruned, pruned) FLOPs per image, or per frame of a temporal build."""
    full, pruned = tower_flops(tower, []), tower_flops(tower, pipeline.points, pipeline.params)
    temporal = getattr(pipeline, "temporal", None)
    if temporal is not None:
        later = tower_flops(tower, pipeline.later_points, pipeline.params)
        pruned = temporal_flops(tower, pruned, later, temporal.group)
    return full, pruned
