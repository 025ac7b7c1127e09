"""Where EvoPrune prunes: prune points (after which layer, how many tokens stay) and the
default schedule, parsed and checked with one `error:` line for any bad value."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import EvoExportError, OptionError


@dataclass(frozen=True)
class PrunePoint:
    after_layer: int  # 0-based: tokens are pruned between layer `after_layer` and the next
    tokens: int       # patch tokens kept


# Default prune points, as fractions of the encoder depth: the first ~20% of layers run on
# all tokens (their attention is not yet semantic), then three steps of equal ratio reach
# the final budget by ~40% of the depth, so the remaining 60% of the layers run at budget.
DEFAULT_PRUNE_DEPTHS = (0.2, 0.3, 0.4)


def budget_for(num_patches: int, keep: float) -> int:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not math.isfinite(keep):
        raise OptionError("keep", f"must be a number in (0, 1], got {keep!r}")
    if not 0 < keep <= 1:
        raise OptionError("keep", f"must be in (0, 1], got {keep}")
    k = round(num_patches * keep)
    if k < 1:
        raise OptionError("keep", f"{keep} leaves no token of {num_patches}")
    return k


def default_schedule(depth: int, num_patches: int, keep: float, layers: tuple | None = None) -> list[PrunePoint]:
    """The default prune points: after `layers` if the family names them (Qwen2.5-VL: its
    full-attention blocks), else at DEFAULT_PRUNE_DEPTHS; budgets fall geometrically to keep."""
    final = budget_for(num_patches, keep)
    if final == num_patches:
        return []
    if depth < 2:
        raise EvoExportError(f"a {depth}-layer encoder has no room for a prune point")
    if layers:
        layers = sorted({layer for layer in layers if 0 <= layer <= depth - 2})
    if not layers:
        # after layer round(depth * f): at least one layer always runs on all tokens
        layers = sorted({min(max(round(depth * f), 1), depth - 2) for f in DEFAULT_PRUNE_DEPTHS})
    points, prev = [], num_patches
    for i, layer in enumerate(layers, 1):
        tokens = final if i == len(layers) else round(num_patches * keep ** (i / len(layers)))
        tokens = min(max(tokens, final), prev)
        if tokens < prev:
            points.append(PrunePoint(layer, tokens))
            prev = tokens
    return points


def parse_schedule(text: str, depth: int, num_patches: int) -> list[PrunePoint]:
    """'LAYER:KEEP,...' with KEEP a fraction of the original patch tokens (0.7) or a count (400)."""
    if not isinstance(text, str) or not text.strip():
        raise OptionError("schedule", "is empty; give LAYER:KEEP,... (e.g. 4:0.8,8:0.5) or leave it out")
    items = [t.strip() for t in text.split(",")]
    if "" in items:
        raise OptionError("schedule", f"{text!r} has an empty item (two commas in a row, or one at an end)")
    points: list[PrunePoint] = []
    for item in items:
        try:
            layer_s, keep_s = item.split(":")
            layer = int(layer_s)
            is_fraction = "." in keep_s or "e" in keep_s.lower()
            keep_v = float(keep_s) if is_fraction else int(keep_s)
        except ValueError:
            raise OptionError("schedule", f"item {item!r} is not LAYER:KEEP (e.g. 4:0.8,8:0.5 or 4:400,8:288)") from None
        if is_fraction:
            if not 0 < keep_v <= 1:
                raise OptionError("schedule", f"item {item!r}: a fraction must be in (0, 1]")
            tokens = budget_for(num_patches, keep_v)
        else:
            tokens = keep_v
        points.append(PrunePoint(layer, tokens))
    check_schedule(points, depth, num_patches)
    return points


def check_schedule(points: list[PrunePoint], depth: int, num_patches: int) -> None:
    prev_layer, prev_tokens = -1, num_patches
    for p in points:
        if not 0 <= p.after_layer <= depth - 2:
            raise EvoExportError(f"prune point after layer {p.after_layer} does not fit a {depth}-layer encoder "
                                 f"(allowed: 0..{depth - 2}; the last layer must run on the kept tokens)")
        if p.after_layer <= prev_layer:
            raise OptionError("schedule", "prune layers must be strictly increasing")
        if not 1 <= p.tokens < prev_tokens:
            raise EvoExportError(f"prune point after layer {p.after_layer} keeps {p.tokens} tokens; "
                                 f"budgets must decrease and stay >= 1 (previous: {prev_tokens})")
        prev_layer, prev_tokens = p.after_layer, p.tokens


def round_budgets(points: list[PrunePoint], multiple: int, per_token: int = 1, extra: int = 0,
                  num_tokens: int | None = None) -> list[PrunePoint]:
    """Budgets moved to the nearest count whose sequence length T = tokens * per_token + extra
    (CLS) is a multiple of `multiple` (8 or 64: tensor-core tiles; ties go down), still
    strictly decreasing and at least 1. GPU matmuls fill their last wave better at such T."""
    out, prev = [], num_tokens
    for p in points:
        limit = (prev if prev is not None else p.tokens + multiple) - 1        # strictly below what enters
        valid = [t for t in range(1, limit + 1) if (t * per_token + extra) % multiple == 0]
        if not valid:
            raise OptionError("round_budgets", f"{multiple}: no token count below {limit + 1} after layer "
                                 f"{p.after_layer} gives a sequence length that is a multiple of {multiple}")
        best = min(valid, key=lambda t: (abs(t - p.tokens), t))
        out.append(PrunePoint(p.after_layer, best))
        prev = best
    return out


def format_schedule(points: list[PrunePoint]) -> str:
    return ",".join(f"{p.after_layer}:{p.tokens}" for p in points) or "(none)"
