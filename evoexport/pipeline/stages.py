"""Split a pruned tower at its prune points into static-shape graphs.

The pipeline is a flat list of graphs wired by tensor name:

    stage_0 (embed + layers 0..L0)  -> stage0_hidden, stage0_importance
    select_0 (EvoPrune, K0 tokens)  -> pruned0_hidden, sizes_0, indices_0, merge_0, picks_0
    stage_1 (layers L0+1..L1)       -> stage1_hidden, stage1_importance
    select_1                        -> pruned1_hidden, sizes_1, indices_1, merge_1, picks_1
    ...
    stage_P (last layers + project) -> features

A runtime keeps a dict of named tensors and feeds each graph the inputs it names: the
same loop in Python today and in C++ tomorrow. Every token count is static; only the
batch axis varies. `Pipeline.run` is the PyTorch reference that every backend is
validated against; the exporter traces exactly these modules. `merge_i` and `picks_i` are
the selection's decisions; `Pipeline.run(forced=...)` re-runs the reference under another
executor's decisions.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from .. import names
from ..models.base import BaseTower
from ..names import GraphKind
from .chain import run_chain
from ..prune.carry import CarrySelect
from ..prune.selection import PruneParams, SelectGraph
from ..prune.schedule import PrunePoint, check_schedule


@dataclass
class GraphSpec:
    name: str
    kind: GraphKind
    module: nn.Module
    inputs: list[str]
    outputs: list[str]
    layers: tuple[int, int] | None = None   # encoder: [first, last+1)
    tokens_in: int = 0                      # patch tokens entering
    tokens_out: int = 0                     # patch tokens leaving
    meta: dict = field(default_factory=dict)


def _capture_into(stage_ref, key: str):
    def hook(module, args, output):
        stage = stage_ref()
        if stage is not None:
            stage._captured[key] = output
    return hook


class StageRole(NamedTuple):
    """Where a stage sits in the chain: the first embeds pixels, the last projects, the
    others end in the importance probe; later stages may take token sizes (proportional
    attention) and kept positions (positional families)."""
    embed: bool
    probe: bool
    project: bool
    proportional: bool
    positional: bool = False


class EncoderStage(nn.Module):
    """Layers [first, last) of the tower; optionally the embedding in front and, at the end,
    either the attention-importance probe (before a prune point) or the projector."""

    def __init__(self, tower: BaseTower, layers: range, role: StageRole, *, square_mask: bool = False,
                 keep_dtype: bool = False):
        super().__init__()
        self.tower = tower
        self.first, self.last = layers.start, layers.stop
        self.embed, self.probe, self.project = role.embed, role.probe, role.project
        self.proportional, self.positional = role.proportional, role.positional
        self.square_mask, self.keep_dtype = square_mask, keep_dtype
        self._captured: dict[str, torch.Tensor] = {}
        if self.probe:
            # The probe reads the last layer's query and key projections rather than its
            # attention probabilities: every layer keeps fused attention (SDPA; fused MHA in
            # TensorRT and OpenVINO), and no runtime has to keep an N x N probability tensor
            # alive for a second consumer (OpenVINO's int8 pipeline zeroed it past batch row 0).
            attn, self.heads, self.scale = tower.probe_attention(self.last - 1)
            # The hooks hold the stage weakly and go when it does: many Pipelines over one
            # tower (ablations, benches) do not pile them up or keep each other alive.
            stage = weakref.ref(self)
            handles = [attn.q_proj.register_forward_hook(_capture_into(stage, "q")),
                       attn.k_proj.register_forward_hook(_capture_into(stage, "k"))]
            weakref.finalize(self, lambda: [h.remove() for h in handles])

    def _importance(self, key_bias: torch.Tensor | None) -> torch.Tensor:
        """Attention importance of the patch tokens in the probed layer, from its q and k.

        One query row against every key, never the T x T probabilities, so every layer keeps
        fused attention. With CLS: softmax(q_cls . K^T * scale + mask) averaged over heads
        (the same numbers eager attention's CLS row gives). Without CLS (SigLIP-style
        encoders, or `tower.importance_query = "mean"`): the same with the mean query of the
        patch tokens, softmax(mean_i q_i . K^T * scale + mask).
        Since mean_i q_i . k_j is the mean logit token j receives, this ranks tokens by how
        strongly the whole image attends to them on average (docs/evoprune.md). A family whose
        token is several positions (Qwen2.5-VL's 2x2 units) sums its positions' shares."""
        q, k = self._captured.pop("q"), self._captured.pop("k").float()   # fp32 in any build
        b, t, d = k.shape
        c = int(self.tower.has_cls)
        # slice, then cast: only the query rows used are converted (the same numbers)
        # "mean" on a tower with CLS ignores CLS's query (evoexport eval measures the no-CLS rule there)
        if self.tower.importance_query == "cls" and c:
            q = q[:, :1].float()
        else:
            q = q[:, c:].float().mean(dim=1, keepdim=True)
        q = q.reshape(b, q.shape[1], self.heads, d // self.heads).transpose(1, 2)     # [B, H, Q, hd]
        k = k.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)              # [B, H, T, hd]
        logits = (q @ k.transpose(-1, -2)) * self.scale                                 # [B, H, Q, T]
        if key_bias is not None:
            logits = logits + key_bias[:, None, None, :].float()
        probs = torch.softmax(logits.float(), dim=-1)
        return self.tower.token_importance(probs[:, :, 0, c:].mean(dim=1))   # [B, N] prunable tokens

    def forward(self, x: torch.Tensor, second: torch.Tensor | None = None, third: torch.Tensor | None = None):
        # inputs: the hidden states (or pixels), then sizes if proportional, then the kept
        # indices if the family is positional (manifest order; see Pipeline). Named slots,
        # not *args: torch.export matches dynamic shapes to the signature.
        rest = [t for t in (second, third) if t is not None]
        sizes = rest.pop(0) if self.proportional else None
        positions = rest.pop(0) if self.positional else None
        # A reduced-precision tower (fp16/bf16 builds) computes in its own dtype inside the
        # graph; inputs, outputs, LayerNorm statistics and the importance stay fp32, except
        # that a keep_dtype stage (the GPU chain) hands its hidden states on in its own dtype:
        # the selection computes in fp32 and hands back the dtype the next stage casts to,
        # so the numbers are the same without an fp32 round trip per boundary.
        dtype = self.tower.compute_dtype
        hidden = self.tower.embed(x) if self.embed else self.tower.from_tokens(x.to(dtype))
        # proportional attention: a token standing for s patches gets log(s) on its logits
        key_bias = self.tower.key_bias(torch.log(sizes)) if sizes is not None else None
        hidden, taps = self._layers(hidden, key_bias, positions)
        if self.project:
            return (self.tower.project(hidden).float(), *taps)
        tokens = self.tower.to_tokens(hidden)
        tokens = tokens if self.keep_dtype else tokens.float()
        if self.probe:
            return (tokens, self._importance(key_bias), *taps)
        return (tokens, *taps)

    def taps(self) -> list[int]:
        """The DeepStack taps (their numbers j) this stage's layers take."""
        return [j for j, block in enumerate(self.tower.taps) if self.first <= block < self.last]

    def _layers(self, hidden, key_bias, positions):
        """The stage's layers, cut after each tap's block to take the tap ([B, T/4, D_out] fp32)."""
        taps, start = [], self.first
        for j in self.taps():
            end = self.tower.taps[j] + 1
            hidden = self.tower.run_layers(hidden, start, end, key_bias, positions, self.probe and end == self.last,
                                           self.square_mask)
            taps.append(self.tower.tap_features(j, hidden).float())
            start = end
        if start < self.last:
            hidden = self.tower.run_layers(hidden, start, self.last, key_bias, positions, self.probe, self.square_mask)
        return hidden, taps


class Pipeline:
    """The pruned tower as a list of graphs, with a PyTorch reference executor."""

    def __init__(self, tower: BaseTower, points: list[PrunePoint], params: PruneParams, square_mask: bool = False,
                 keep_dtype: bool = False):
        check_schedule(points, tower.depth, tower.num_patches)
        self.tower, self.points, self.params, self.keep_dtype = tower, list(points), params, keep_dtype
        self.square_mask = square_mask
        self.graphs: list[GraphSpec] = []
        cuts = [p.after_layer + 1 for p in points] + [tower.depth]
        first, tokens, prev_hidden, prev_sizes = 0, tower.num_patches, names.PIXELS, None
        taps: dict[int, str] = {}   # DeepStack tap j -> the name it travels under now
        for i, last in enumerate(cuts):
            final = i == len(points)
            proportional = params.merge and params.proportional_attention and prev_sizes is not None
            # a positional family's later stages also take the kept indices (rotary positions, windows)
            positional = tower.positional and i > 0
            role = StageRole(embed=i == 0, probe=not final, project=final, proportional=proportional,
                             positional=positional)
            stage = EncoderStage(tower, range(first, last), role, square_mask=square_mask, keep_dtype=keep_dtype)
            inputs = [prev_hidden] + ([prev_sizes] if proportional else []) + ([names.indices(i - 1)] if positional else [])
            outputs = [names.FEATURES] if final else [names.stage_hidden(i), names.stage_importance(i)]
            taps.update({j: names.deepstack(j, names.stage(i)) for j in stage.taps()})
            outputs += [taps[j] for j in stage.taps()]
            tokens_out = tokens if final else points[i].tokens
            self.graphs.append(GraphSpec(names.stage(i), GraphKind.ENCODER, stage, inputs, outputs, (first, last),
                                         tokens, tokens_out, {"proportional_attention": proportional}))
            if final:
                break
            budget = points[i].tokens
            sel_inputs = [names.stage_hidden(i), names.stage_importance(i)]
            if i > 0:
                sel_inputs += [names.sizes(i - 1), names.indices(i - 1)]
            select = SelectGraph(budget, params, tower.has_cls, tower.grid)
            carried = list(taps.values())
            if carried:   # the taps so far leave with the kept tokens
                select = CarrySelect(select, len(sel_inputs))
                taps = {j: names.deepstack(j, names.select(i)) for j in taps}
            self.graphs.append(GraphSpec(names.select(i), GraphKind.SELECT, select, sel_inputs + carried,
                                         names.select_outputs(i) + list(taps.values()),
                                         None, tokens, budget, {"after_layer": points[i].after_layer}))
            first, tokens, prev_hidden, prev_sizes = last, budget, names.pruned_hidden(i), names.sizes(i)
        self._name_final_taps(taps)

    def _name_final_taps(self, taps: dict) -> None:
        """Each tap's last graph outputs it under its final name (names.deepstack(j))."""
        final = {name: names.deepstack(j) for j, name in taps.items()}
        for g in self.graphs:
            g.outputs = [final.get(n, n) for n in g.outputs]

    def with_tower(self, tower: BaseTower, keep_dtype: bool) -> "Pipeline":
        """The same chain on another copy of the tower (a reduced-precision twin)."""
        return Pipeline(tower, self.points, self.params, self.square_mask, keep_dtype)

    @torch.inference_mode()
    def run(self, pixel_values: torch.Tensor, rescore=None, forced: dict | None = None,
            modules: dict | None = None) -> dict[str, torch.Tensor]:
        """Every named tensor of the pipeline, computed in PyTorch (the reference).

        `rescore(importance) -> importance`, if given, replaces every stage's importance
        before selection (ablations such as random selection; never used by a build).
        `modules` maps graph names to callables run in place of their modules (the GPU
        chain's compiled selections).
        `forced` maps tensor names `picks_i` and `merge_i` to another executor's decisions:
        every selection then applies those instead of deciding (validation)."""
        return run_graphs(self.graphs, pixel_values, rescore, forced, modules)

    def example_inputs(self, batch: int = 2) -> dict[str, torch.Tensor]:
        """A consistent set of every graph input, for tracing."""
        t = self.tower
        x = torch.randn(batch, t.input_channels, *t.image_hw, generator=torch.Generator().manual_seed(0))
        return self.run(x.to(next(t.parameters()).device))


def run_graphs(graphs: list[GraphSpec], pixel_values: torch.Tensor, rescore=None, forced: dict | None = None,
               modules: dict | None = None) -> dict[str, torch.Tensor]:
    """Pipeline.run's loop, for any list of GraphSpecs (an image chain, a temporal one)."""
    def run_graph(g, args):
        if forced is not None and g.kind.decides:
            # a deciding graph's outputs: hidden, sizes, indices, merge, picks[, anchor match][, taps]
            decided = {key: forced[n] for key, n in zip(("merge", "picks", "match"), g.outputs[3:6])
                       if names.is_decision(n)}
            return g.module.forced(*args, **decided)
        outs = (modules or {}).get(g.name, g.module)(*args)
        if rescore is not None and g.kind == GraphKind.ENCODER:
            outs = tuple(rescore(o) if n.endswith("_importance") else o for n, o in zip(g.outputs, outs))
        return outs
    return run_chain(graphs, {names.PIXELS: pixel_values}, run_graph)
