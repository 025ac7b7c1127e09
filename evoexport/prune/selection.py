"""EvoPrune: score, select and merge patch tokens at a prune point.

This module is the single implementation of token selection. The PyTorch reference
model calls `select`, the exporter traces `SelectGraph` (a thin nn.Module around it) into
the ONNX graph that runtimes execute between encoder stages, and the tests fuzz it.

Definitions (see docs/evoprune.md for the reasoning). At a prune point with N patch
tokens x_i (hidden states after layer L), attention importance a_i, token sizes s_i and a
budget of K tokens:

  C_ij  = x_i . x_j / (|x_i| |x_j|)          cosine similarity (the Gram matrix, accumulated
                                             in fp32, then scaled by the inverse norms)
  r_i   = max_{j != i} C_ij                  redundancy: a near-duplicate exists
  S_ij  = C_ij - gamma * dist_ij / g         decision similarity: cosine, discounted by the
                                             distance between the tokens' original patches
                                             (g x g patch grid; distance in patches)
  u_i   = a_i / max_j a_j - beta * r_i       utility: important and not redundant
  I     = top round(alpha*K) tokens by u     importance picks (at least 1)
  d_i   = -max_{j picked} S_ij               novelty w.r.t. what is already kept
  D     = top K-|I| tokens by d, picked in   diversity picks (novelty refreshed
          up to R rounds of equal size        after each round: near-greedy coverage)
  kept  = I u D, in raster (ascending) order

Merge (optional): every token is assigned to its most similar kept token by S (a kept
token to itself) and each kept token becomes the size-weighted mean of what was assigned to it;
sizes add up. With proportional attention the next stages add log(size) to the attention
logits, so a merged token weighs as much as the tokens it stands for (as in ToMe).

Decisions are outputs too: `merge` (for each entering token, the kept slot it went to)
and `picks` (the step that kept each token). A validator replays the same steps on the
reference's own scores with those decisions forced (`pick_steps(forced_picks=...)`,
`merge_affinity`) to tell a near-tie from a wrong decision (decisions.py), and applies
them with `select(forced=...)` to compare continuous outputs under identical decisions.

Only dense ops: matmul, top-k, gather, comparisons, reductions, running sums; no scatter,
no ArgMax and no data-dependent shapes, so the same code exports to ONNX and TensorRT with
static budgets. Ties break towards the lower token index everywhere (TopK only finds the
k-th value; who is in is then decided by value and index, never by a sort's tie order);
NaN and -inf scores rank last, so a selection is always valid. Cost: docs/evoprune.md.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..errors import EvoExportError
from ..names import Grid
from .merge import merge_tokens


@dataclass(frozen=True)
class PruneParams:
    """EvoPrune hyperparameters; every one is a CLI flag of `evoexport build`."""
    importance_ratio: float = 0.5    # alpha: share of each budget filled by utility; the rest by novelty
    redundancy_weight: float = 0.3   # beta: utility penalty for having a near-duplicate
    merge: bool = True               # merge dropped tokens into their nearest kept token
    proportional_attention: bool = True  # add log(token size) to attention logits after a merge
    diversity_rounds: int = 4        # diversity picks are made in up to this many rounds, novelty refreshed each time
    spatial_weight: float = 0.3      # gamma: similarity lost per grid width of distance (novelty and merge)

    def __post_init__(self):
        if not 0.0 <= self.importance_ratio <= 1.0 or math.isnan(self.importance_ratio):
            raise EvoExportError(f"importance ratio must be in [0, 1], got {self.importance_ratio}")
        if not math.isfinite(self.redundancy_weight) or self.redundancy_weight < 0:
            raise EvoExportError(f"redundancy weight must be a finite number >= 0, got {self.redundancy_weight}")
        if not isinstance(self.diversity_rounds, int) or not 1 <= self.diversity_rounds <= 64:
            raise EvoExportError(f"diversity rounds must be an integer in [1, 64], got {self.diversity_rounds}")
        if not math.isfinite(self.spatial_weight) or self.spatial_weight < 0:
            raise EvoExportError(f"spatial weight must be a finite number >= 0, got {self.spatial_weight}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_manifest(cls, params: dict) -> "PruneParams":
        """A build's parameters; builds made before the spatial term had none (weight 0)."""
        return cls(**{"spatial_weight": 0.0, **params})


# ----------------------------------------------------------------------------- selection

def _rank_key(x: torch.Tensor) -> torch.Tensor:
    """Scores made totally ordered: NaN and -inf rank below every real score."""
    lowest = torch.finfo(x.dtype).min
    return torch.where(torch.isnan(x) | (x == -math.inf), torch.full_like(x, lowest), x)


# Two forms of the same decisions. "topk" (the default; every CPU graph): TopK thresholds,
# running sums and gathers, the fewest FLOPs. "compare": pairwise compares and sums, no TopK
# at all, for compilers that cannot fuse TopK (Inductor splits a graph at every one) and
# where the N x N compares are cheap next to the layers (the GPU). tests/prune/test_selection.py
# proves both forms decide identically, ties and non-finite scores included.
FORMS = ("topk", "compare")


def _top_mask(key: torch.Tensor, k: int, form: str = "topk") -> torch.Tensor:
    """[B, N] -> boolean mask of the k largest keys; ties go to the lower index.

    A token is in when fewer than k tokens beat it, where j beats i if key_j > key_i, or
    key_j == key_i and j < i. Computed in O(N log N): TopK finds the k-th largest key v
    (a value it selects, never computes, so every backend finds the same v whatever order
    it leaves ties in); every key above v is in, and of the keys equal to v the first
    k - #above by index, counted with a running sum. Exact and deterministic on every
    backend, as the N^2 pairwise compare it replaces (tests/prune/test_selection.py keeps that as the
    reference) but without the [B, N, N] tensors.
    """
    n = key.shape[-1]
    if k >= n:
        return torch.ones_like(key, dtype=torch.bool)
    if form == "compare":   # the definition itself: fewer than k tokens beat it
        ar = torch.arange(n, device=key.device)
        ki, kj = key.unsqueeze(-1), key.unsqueeze(-2)
        beats = (kj > ki) | ((kj == ki) & (ar.view(1, n) < ar.view(n, 1)))
        return beats.to(torch.float32).sum(dim=-1) < k
    kth = torch.topk(key, k, dim=-1).values.amin(dim=-1, keepdim=True)     # min, not [-1]: no sort order assumed
    above = key > kth
    at = key == kth
    # counts in float32: exact below 2**24 tokens, and TensorRT's CumSum takes no integers
    room = k - above.to(torch.float32).sum(dim=-1, keepdim=True)
    return above | (at & (torch.cumsum(at.to(torch.float32), dim=-1) <= room))


def first_max_index(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [...] index of the largest entry; ties go to the lowest index.

    Written out (ReduceMax, Equal, the smallest index where equal) rather than ArgMax:
    TensorRT lowers ArgMax to TopK(k=1) and documents no tie rule, and the merge owner
    must break ties the same way on every backend."""
    k = x.shape[-1]
    peak = x.amax(dim=-1, keepdim=True)
    index = torch.arange(k, device=x.device)
    return torch.where(x == peak, index, k).amin(dim=-1)


def _ascending_indices(mask: torch.Tensor, k: int, form: str = "topk") -> torch.Tensor:
    """Indices of the k True entries of each row of `mask`, ascending (raster order)."""
    n = mask.shape[-1]
    if form == "compare":   # slot r holds the index whose running count is r + 1: compare and sum
        rank = torch.cumsum(mask.to(torch.float32), dim=-1) - 1                       # [B, N]
        slots = torch.arange(k, device=mask.device, dtype=torch.float32).view(1, k, 1)
        hit = mask.unsqueeze(1) & (rank.unsqueeze(1) == slots)                        # [B, K, N]
        index = torch.arange(n, device=mask.device, dtype=torch.float32)
        return (hit.to(torch.float32) * index).sum(dim=-1).to(torch.int64)           # exact below 2**24
    # keys n-i are distinct over the kept set and 0 elsewhere, so top-k is exact and tie-free
    order_key = torch.where(mask, n - torch.arange(n, device=mask.device), 0)
    return torch.topk(order_key, k, dim=-1, largest=True, sorted=True).indices


def spatial_distance(positions: torch.Tensor, grid: Grid) -> torch.Tensor:
    """[B, N, N] distance between the tokens' original patches on the rows x cols grid, in
    grid widths (a square's side; a non-square grid's `scale`, the side of a square of as many
    tokens). Row and column come from float division and floor, exact for any grid, so every
    executor computes the same distances."""
    grid = Grid.of(grid)
    p = positions.to(torch.float32)
    row = torch.floor(p / grid.cols)
    col = p - row * grid.cols
    dr = row.unsqueeze(-1) - row.unsqueeze(-2)
    dc = col.unsqueeze(-1) - col.unsqueeze(-2)
    return torch.sqrt(dr * dr + dc * dc) / grid.scale


def _gram_fp32(x: torch.Tensor) -> torch.Tensor:
    """[B, N, D] -> [B, N, N] x x^T accumulated and returned in fp32.

    A bf16/fp16 chain (the GPU's) hands its hidden states over in their own dtype: on CUDA the
    products run on tensor cores with an fp32 output (bmm's out_dtype). Products of two
    bf16/fp16 values are exact in fp32, so this is the fp32 Gram matrix of the same values up
    to summation order. Never a bf16 output: its rounding (2^-9 relative) is the size of the
    near-tie tolerance. Elsewhere (the CPU, an fp32 chain, ONNX export) the values are upcast."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(x, x.transpose(1, 2), out_dtype=torch.float32)
    x = x.float()
    return x @ x.transpose(1, 2)


def cosine_similarity(patches: torch.Tensor) -> torch.Tensor:
    """[B, N, D] -> [B, N, N] cosine similarity in fp32: the Gram matrix of the hidden states,
    scaled by their inverse norms (floored at 1e-6, as F.normalize's eps). Scaling after the
    matmul lets the matmul take the hidden states as they are (see _gram_fp32)."""
    inv = 1.0 / torch.linalg.vector_norm(patches.float(), dim=-1).clamp_min(1e-6)
    return _gram_fp32(patches) * inv.unsqueeze(-1) * inv.unsqueeze(-2)


def utility_scores(patches: torch.Tensor, importance: torch.Tensor, params: PruneParams,
                   positions: torch.Tensor | None = None, grid: int | None = None):
    """Returns (utility u [B,N], decision similarity S [B,N,N]), in fp32 whatever the hidden
    states' dtype. Redundancy is measured on the plain cosine; S, which ranks novelty and
    assigns merges, also counts distance on the patch grid when `grid` is given (the
    exported graphs always give it)."""
    sim = cosine_similarity(patches)
    n = patches.shape[1]
    if n > 1:
        # written out rather than torch.eye, whose export leaves a UINT16 Equal that
        # TensorRT rejects (found by `evoexport check --target tensorrt`)
        ar = torch.arange(n, device=patches.device)
        eye = ar.view(n, 1) == ar.view(1, n)
        redundancy = sim.masked_fill(eye, -math.inf).amax(dim=-1)
    else:
        redundancy = torch.zeros_like(importance)
    # NaN importance ranks last; the normalizing peak is taken over finite values only, so
    # one bad score cannot poison its whole row
    importance = importance.masked_fill(torch.isnan(importance), -math.inf)
    finite = torch.where(torch.isfinite(importance), importance, torch.zeros_like(importance))
    peak = finite.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    utility = importance / peak - params.redundancy_weight * redundancy
    if grid is not None and params.spatial_weight > 0:
        if positions is None:   # the first point: one [1, N, N] distance matrix serves the batch
            positions = torch.arange(n, device=patches.device).unsqueeze(0)
        sim = sim - params.spatial_weight * spatial_distance(positions, grid).to(sim.dtype)
    return utility, sim


class Selection(NamedTuple):
    """What `select` returns: the continuous outputs and the decisions that made them."""
    hidden: torch.Tensor     # [B, c+K, D] CLS (if any) + kept (merged) tokens
    sizes: torch.Tensor      # [B, K] original patches each kept token stands for
    positions: torch.Tensor  # [B, K] original patch position of each kept token, ascending
    merge: torch.Tensor      # [B, N] int64: kept slot (0..K-1) each entering token went to; -1 dropped, no merge
    picks: torch.Tensor      # [B, N] int64: step that kept the token (0 importance, r diversity round r); -1 dropped


def step_sizes(budget: int, params: PruneParams) -> list[int]:
    """Tokens picked at each step: [importance picks, diversity round 1, ..., round R]."""
    k_imp = min(budget, max(1, round(params.importance_ratio * budget)))
    sizes, remaining = [k_imp], budget - k_imp
    rounds = min(params.diversity_rounds, remaining)
    for r in range(rounds):
        take = math.ceil(remaining / (rounds - r))
        sizes.append(take)
        remaining -= take
    return sizes


def pick_steps(utility: torch.Tensor, sim: torch.Tensor, budget: int, params: PruneParams,
               forced_picks: torch.Tensor | None = None, on_step=None, form: str = "topk") -> torch.Tensor:
    """Run the pick steps; returns picks [B, N] (step that kept each token, -1 if dropped).

    Step 0 keeps the top tokens by utility; step r >= 1 the top tokens by novelty against
    everything kept in steps < r. `forced_picks` replays another executor's picks instead of
    choosing (the scores of each step are still computed from `utility` and `sim`, so a
    validator can judge those picks); `on_step(step, key, picked_before, chosen, own_choice)`
    sees every step's rank keys, the choice taken and the one these scores make.
    Picked tokens rank below everything (-inf), NaN just above.
    """
    b, n = utility.shape
    picks = torch.full(utility.shape, -1, dtype=torch.int64, device=utility.device)
    picked = torch.zeros(utility.shape, dtype=torch.bool, device=utility.device)
    closest = None        # [B, N] similarity of each token to the closest token picked so far
    sizes = step_sizes(budget, params)
    for step, take in enumerate(sizes):  # a static loop: unrolled in the exported graph
        if step == 0:
            key = _rank_key(utility)
        else:  # novelty: minus the similarity to the closest token picked so far
            key = _rank_key(-closest).masked_fill(picked, -math.inf)
        own_choice = _top_mask(key, take, form)
        chosen = own_choice if forced_picks is None else forced_picks == step
        if on_step is not None:
            on_step(step, key, picked, chosen, own_choice)
        picks = torch.where(chosen, step, picks)
        picked = picked | chosen
        if step + 1 < len(sizes):
            # fold only this step's picks into `closest`: a max over a union is the max of
            # the parts, exactly, so this equals the max over everything picked while reading
            # N x take similarities instead of N x N each round
            if forced_picks is None and form == "topk":   # exactly `take` chosen: gather their columns
                cols = _ascending_indices(chosen, take)
                columns = _rank_key(torch.gather(sim, 2, cols.unsqueeze(1).expand(b, n, take)))
            else:   # another executor's picks (any count), or the compare form: a masked max
                columns = _rank_key(sim).masked_fill(~chosen.unsqueeze(1), -math.inf)
            newest = columns.amax(dim=-1)
            closest = newest if closest is None else torch.maximum(closest, newest)
    return picks


def kept_indices(picks: torch.Tensor, budget: int, form: str = "topk") -> torch.Tensor:
    """[B, K] indices of the kept tokens (picks >= 0), ascending = raster order."""
    return _ascending_indices(picks >= 0, budget, form)


def merge_affinity(sim: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[B, N, K] rank keys of each token's similarity to each kept token; a kept token's own slot is +inf."""
    b, n, _ = sim.shape
    affinity = torch.gather(_rank_key(sim), 2, kept.unsqueeze(1).expand(b, n, kept.shape[1]))
    return affinity.masked_fill(_is_self(kept, n), math.inf)


def _dropped_affinity(sim: torch.Tensor, kept: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """[B, N-K, K] rank keys of each dropped token's similarity to each kept token: the rows of
    merge_affinity that are not a kept token's own (those are +inf at the token's slot)."""
    b, n, _ = sim.shape
    rows = torch.gather(sim, 1, dropped.unsqueeze(-1).expand(b, dropped.shape[1], n))
    return _rank_key(torch.gather(rows, 2, kept.unsqueeze(1).expand(b, dropped.shape[1], kept.shape[1])))


def _is_self(kept: torch.Tensor, n: int) -> torch.Tensor:
    return torch.arange(n, device=kept.device).view(1, n, 1) == kept.unsqueeze(1)     # [B, N, K]


@dataclass(frozen=True)
class SelectRule:
    """What one prune point keeps and how it decides."""
    budget: int                # patch tokens kept
    params: PruneParams
    has_cls: bool = True       # one leading CLS token, never pruned
    grid: Grid | None = None   # the token grid, for the spatial term (None: cosine alone)
    form: str = "topk"         # how the decisions are computed (FORMS)


def select(hidden: torch.Tensor, importance: torch.Tensor, rule: SelectRule, *, sizes: torch.Tensor | None = None,
           positions: torch.Tensor | None = None,
           forced: tuple[torch.Tensor, torch.Tensor] | None = None) -> Selection:
    """Keep `rule.budget` patch tokens of `hidden` and merge the rest into them.

    hidden     [B, c+N, D]  hidden states (c = 1 leading CLS token if rule.has_cls)
    importance [B, N]       attention importance of the patch tokens
    sizes      [B, N]       how many original patches each token stands for (default 1)
    positions  [B, N] int64 original patch index of each token (default 0..N-1)
    forced     (picks, merge) decisions of another executor to apply instead of deciding
               (validation: the reference's continuous outputs under a backend's decisions)
    returns    Selection(hidden [B, c+K, D], sizes [B, K], positions [B, K] ascending = raster
               order, merge [B, N], picks [B, N])
    """
    c, budget = int(rule.has_cls), rule.budget
    b, n = hidden.shape[0], hidden.shape[1] - c
    if importance.shape != (b, n):
        raise EvoExportError(f"importance has shape {tuple(importance.shape)}, expected {(b, n)}")
    if not 1 <= budget <= n:
        raise EvoExportError(f"budget {budget} must be between 1 and the {n} tokens present")
    patches = hidden[:, c:]
    if sizes is None:   # fp32 whatever the hidden states are: bf16 counts only to 256 exactly
        sizes = torch.ones(b, n, dtype=torch.float32, device=hidden.device)
    sim = None
    if forced is None:
        utility, sim = utility_scores(patches, importance, rule.params, positions, rule.grid)
        picks = pick_steps(utility, sim, budget, rule.params, form=rule.form)
    else:
        picks = forced[0]
    kept_mask = picks >= 0
    kept = kept_indices(picks, budget, rule.form)                                    # [B, K]
    # only the N - K dropped tokens need a merge decision and a merge: a kept token is its own
    # slot (its rank among the kept), so nothing N x N or K x N is built after the picks
    merging = rule.params.merge and n > budget
    dropped = _ascending_indices(~kept_mask, n - budget, rule.form) if merging else None   # [B, N-K]
    owner = forced[1] if forced is not None else _owners(kept_mask, kept, dropped, sim)
    new_positions = kept if positions is None else torch.gather(positions, 1, kept)
    merged, new_sizes = merge_tokens(patches, sizes, kept, dropped, owner)
    merged = merged.to(hidden.dtype)
    out = torch.cat([hidden[:, :c], merged], dim=1) if c else merged
    return Selection(out, new_sizes, new_positions, owner, picks)


def _owners(kept_mask: torch.Tensor, kept: torch.Tensor, dropped: torch.Tensor | None,
            sim: torch.Tensor) -> torch.Tensor:
    """The kept slot each token goes to: a kept token its own, a dropped one the kept token
    it is most like (-1 without a merge)."""
    # running counts in float32 (exact, and the only CumSum TensorRT takes), then indices
    owner = (torch.cumsum(kept_mask.to(torch.float32), dim=-1) - 1).to(torch.int64)  # kept: own slot
    if dropped is None:   # no merge: a dropped token went nowhere
        return torch.where(kept_mask, owner, -1)
    dropped_owner = first_max_index(_dropped_affinity(sim, kept, dropped))          # [B, N-K]
    dropped_rank = (torch.cumsum((~kept_mask).to(torch.float32), dim=-1) - 1).clamp_min(0).to(torch.int64)
    return torch.where(kept_mask, owner, torch.gather(dropped_owner, 1, dropped_rank))


class SelectGraph(nn.Module):
    """`select` at one prune point with a fixed budget: the module exported to ONNX."""

    def __init__(self, budget: int, params: PruneParams, has_cls: bool, grid: int | None = None, form: str = "topk"):
        super().__init__()
        if form not in FORMS:
            raise EvoExportError(f"selection form {form!r} is not one of {', '.join(FORMS)}")
        self.budget, self.params, self.has_cls, self.grid, self.form = budget, params, has_cls, grid, form
        self.rule = SelectRule(budget, params, has_cls, grid, form)

    def forward(self, hidden, importance, sizes=None, positions=None):
        return tuple(select(hidden, importance, self.rule, sizes=sizes, positions=positions))

    def decision_inputs(self, hidden, importance, sizes=None, positions=None):
        """What the selection decides on: (hidden, importance, positions) (validation)."""
        return hidden, importance, positions

    def in_form(self, form: str) -> "SelectGraph":
        """The same selection computed in another form (runtime/backends/torch.py)."""
        return SelectGraph(self.budget, self.params, self.has_cls, self.grid, form)

    def forced(self, hidden, importance, sizes=None, positions=None, *, picks, merge):
        """The same outputs, computed under given decisions (never exported)."""
        return tuple(select(hidden, importance, self.rule, sizes=sizes, positions=positions, forced=(picks, merge)))
