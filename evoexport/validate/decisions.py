"""Judge a backend's selection decisions on the reference's own scores.

Two executors that see the same hidden states (ONNX Runtime vs PyTorch, one CPU vs
another, fp32 vs fp16) compute scores that differ in the last bits. Where two tokens score
that close, either choice is right, and each executor may make the other one. So a
decision is checked as a decision: the backend's picks are replayed, step by step, on the
*reference's* scores (prune.pick_steps with the picks forced, so the formulas are the
selection's own), and every step's choice gets a margin:

  margin = best score the backend left out  -  worst score the backend took   (>= 0 only on a flip)

in the step's own units (utility for the importance picks, novelty = -cosine for the
diversity rounds). For the merge map, the margin of a dropped token is its similarity to
the reference's best kept token minus its similarity to the one the backend merged it into.
A choice that agrees with the reference has margin <= 0; a flip within the tolerance is a
near-tie; a flip beyond it, or a structurally impossible decision (wrong count per step, a
kept token not owning itself), is an error.
"""
from __future__ import annotations

import math

import torch

from ..prune.selection import SelectRule, first_max_index, kept_indices, merge_affinity, pick_steps, step_sizes, utility_scores


def _margins(key: torch.Tensor, eligible: torch.Tensor, chosen: torch.Tensor, own_choice: torch.Tensor,
             tolerance: float):
    """Per row: margin of the backend's choice and tokens it took that the reference would not;
    per token: close call (within tolerance of this step's cut). key: the step's rank keys;
    eligible: tokens the step could take; own_choice: what the reference takes on these keys."""
    k = key.double()
    inf = torch.tensor(math.inf, dtype=k.dtype)
    left_out = torch.where(eligible & ~chosen, k, -inf).amax(dim=-1)
    taken = torch.where(chosen, k, inf).amin(dim=-1)
    margin = torch.nan_to_num(left_out - taken, nan=0.0)          # inf - inf: equal infinite scores tie
    flips = (chosen & ~own_choice).sum(dim=-1)
    # close calls: tokens whose side of the reference's cut is within tolerance of the other side
    ref_left_out = torch.where(eligible & ~own_choice, k, -inf).amax(dim=-1, keepdim=True)
    ref_taken = torch.where(own_choice, k, inf).amin(dim=-1, keepdim=True)
    close = (own_choice & (k - ref_left_out <= tolerance)) | (eligible & ~own_choice & (ref_taken - k <= tolerance))
    return margin, flips, close


def check_decisions(hidden: torch.Tensor, importance: torch.Tensor, rule: SelectRule, *, picks: torch.Tensor,
                    merge: torch.Tensor, tolerance: float, positions: torch.Tensor | None = None) -> dict:
    """Check `picks` and `merge` (a backend's) against the reference's scores on `hidden`/`importance`.

    Returns counts over the batch: decisions examined, flips (differ from the reference),
    near_ties (flips within tolerance), worst_margin, close_calls (reference margins within
    tolerance, flipped or not), `invalid` (a structural error, or None) and ok."""
    hidden, importance = hidden.float(), importance.float()
    picks, merge = torch.as_tensor(picks).long(), torch.as_tensor(merge).long()
    result = {"decisions": 0, "flips": 0, "near_ties": 0, "worst_margin": 0.0, "close_calls": 0, "invalid": None}
    result["invalid"] = _picks_invalid(picks, merge, rule, tuple(importance.shape))
    if result["invalid"]:
        return _finish(result, tolerance)
    utility, sim = utility_scores(hidden[:, int(rule.has_cls):], importance, rule.params, positions, rule.grid)
    margins, flips, close = _pick_margins(utility, sim, rule, picks, tolerance)
    b, n = importance.shape
    result["decisions"] += b * n
    merged = _merge_margins(sim, rule, picks, merge, tolerance)
    if isinstance(merged, str):
        result["invalid"] = merged
        return _finish(result, tolerance)
    if merged is not None:
        margins.append(merged["margin"])
        flips.append(merged["flips"])
        close += merged["close"]
        result["decisions"] += merged["decisions"]
    margin = torch.stack(margins).amax(dim=0) if margins else torch.zeros(b)
    result["worst_margin"] = max(float(margin.max()), 0.0) if margin.numel() else 0.0
    result["flips"] = int(torch.stack(flips).sum()) if flips else 0
    result["close_calls"] = close
    return _finish(result, tolerance)


def _picks_invalid(picks: torch.Tensor, merge: torch.Tensor, rule: SelectRule, shape: tuple) -> str | None:
    """A structural error in the decisions (shapes, tokens per step), or None."""
    sizes = step_sizes(rule.budget, rule.params)
    if picks.shape != shape or merge.shape != shape:
        return f"decision tensors have shapes {list(picks.shape)}, {list(merge.shape)}; expected {list(shape)}"
    counts = [(picks == s).sum(dim=-1) for s in range(len(sizes))]
    bad = [s for s, want in enumerate(sizes) if not bool((counts[s] == want).all())]
    if bad or not bool(((picks >= -1) & (picks < len(sizes))).all()):
        got = [int(x) for x in counts[bad[0]]] if bad else "out of range"
        return (f"picks per step must be {sizes}; step {bad[0] if bad else '?'} took {got} "
                "(not a near-tie: other prune parameters or a broken graph)")
    return None


def _pick_margins(utility, sim, rule: SelectRule, picks: torch.Tensor, tolerance: float) -> tuple[list, list, int]:
    """Replays the picks under the reference's scores: per step the margins, the flips, and
    the tokens that were close calls (each counted once, however many steps it was close in)."""
    margins, flips = [], []
    close_token = torch.zeros(picks.shape, dtype=torch.bool)

    def on_step(step, key, picked_before, chosen, own_choice):
        nonlocal close_token
        m, f, cc = _margins(key, ~picked_before, chosen, own_choice, tolerance)
        margins.append(m)
        flips.append(f)
        close_token = close_token | cc

    pick_steps(utility, sim, rule.budget, rule.params, forced_picks=picks, on_step=on_step)
    return margins, flips, int(close_token.sum())


def _merge_margins(sim, rule: SelectRule, picks: torch.Tensor, merge: torch.Tensor, tolerance: float):
    """The merge map against the reference's affinities: a dict (margin, flips, close,
    decisions), None without a merge, or the structural error as a string."""
    budget, (b, n) = rule.budget, picks.shape
    kept_mask = picks >= 0
    kept = kept_indices(picks, budget)
    slot_of = torch.full((b, n), -1, dtype=torch.long)
    slot_of.scatter_(1, kept, torch.arange(budget).expand(b, budget))
    if not bool((merge[kept_mask] == slot_of[kept_mask]).all()):
        return "a kept token is not merged into itself (merge map broken)"
    dropped = ~kept_mask
    if not rule.params.merge:
        return None if bool((merge[dropped] == -1).all()) else "without merge, a dropped token must map to -1"
    if not bool(((merge >= 0) & (merge < budget)).all()):
        return f"merge map points outside the {budget} kept tokens"
    affinity = merge_affinity(sim, kept).double()                                # [B, N, K]
    top2 = affinity.masked_fill(affinity == math.inf, -math.inf).topk(min(2, budget), dim=-1).values
    taken = torch.gather(affinity, 2, merge.unsqueeze(-1)).squeeze(-1)
    runner_up = top2[..., 1] if budget > 1 else torch.full_like(taken, -math.inf)
    return {"margin": torch.where(dropped, top2[..., 0] - taken, torch.zeros_like(taken)).amax(dim=-1),
            "flips": (dropped & (merge != first_max_index(affinity))).sum(dim=-1),   # lowest index on ties
            "close": int((dropped & (top2[..., 0] - runner_up <= tolerance)).sum()),
            "decisions": int(dropped.sum())}


def _finish(result: dict, tolerance: float) -> dict:
    result["tolerance"] = tolerance
    result["ok"] = result["invalid"] is None and result["worst_margin"] <= tolerance
    result["near_ties"] = result["flips"] if result["ok"] else None
    return result


def make_ties(hidden: torch.Tensor, importance: torch.Tensor, sizes: torch.Tensor | None, has_cls: bool):
    """Inputs built to tie exactly: token 2j+1 becomes a copy of token 2j (state, importance,
    size). Executors may split such pairs either way; validation must accept both."""
    c = int(has_cls)
    hidden, importance = hidden.clone(), importance.clone()
    n = importance.shape[1]
    odd = torch.arange(1, n, 2)
    hidden[:, c + odd] = hidden[:, c + odd - 1]
    importance[:, odd] = importance[:, odd - 1]
    if sizes is not None:
        sizes = sizes.clone()
        sizes[:, odd] = sizes[:, odd - 1]
    return hidden, importance, sizes
