"""The FLOP cost model of a (pruned) tower: what `ideal_speedup` in the manifest and every
"fraction of the FLOP ideal" in the benchmarks are measured against. Matmuls only, counted
as 2 x multiply-accumulates; tests check it against torch.utils.flop_counter.
"""
from __future__ import annotations

from .selection import PruneParams
from .schedule import PrunePoint

def layer_flops(tokens: int, hidden: int, mlp: int, keys: int | None = None, mlp_matrices: int = 2) -> int:
    """FLOPs (2 x multiply-accumulates) of one pre-LN ViT layer on `tokens` tokens, matmuls
    only; each query meets `keys` keys (default all tokens; a window layer fewer)."""
    keys = tokens if keys is None else keys
    proj = 4 * tokens * hidden * hidden            # q, k, v, out
    attn = 2 * tokens * keys * hidden              # QK^T and AV
    ffn = mlp_matrices * tokens * hidden * mlp     # fc1, fc2 (and a gate)
    return 2 * (proj + attn + ffn)


def select_flops(n: int, hidden: int, budget: int, merge: bool) -> int:
    flops = 2 * n * n * hidden                     # similarity
    if merge:
        flops += 2 * budget * (n - budget) * hidden    # merge matmul: dropped tokens into kept ones
    return flops


def tower_flops(tower, points: list[PrunePoint], params: PruneParams | None = None) -> int:
    """FLOPs of one image through the (pruned) tower: embedding, layers, selections, projector
    (and DeepStack taps' mergers)."""
    d, m, n, c = tower.hidden_size, tower.mlp_size, tower.num_patches, int(tower.has_cls)
    per_token = tower.patches_per_token   # sequence positions per prunable token
    patch_dim = 3 * (tower.image_hw[0] // tower.grid.rows) ** 2
    flops = 2 * n * patch_dim * d
    tokens, cuts, taps = n, {p.after_layer: p.tokens for p in points}, 0
    for layer in range(tower.depth):
        positions = tokens * per_token + c
        keys = tower.attention_keys(layer, positions, pruned=tokens < n)
        flops += layer_flops(positions, d, m, keys, tower.mlp_matrices)
        taps += layer in tower.taps
        flops += tower.projector_flops(tokens) if layer in tower.taps else 0   # a DeepStack tap's merger
        if layer in cuts:
            merge = params.merge if params else True
            flops += select_flops(tokens, d * per_token, cuts[layer], merge)
            if merge:   # the taps so far carried: their dropped rows merged into kept ones
                flops += taps * 2 * cuts[layer] * (tokens - cuts[layer]) * tower.out_features
            tokens = cuts[layer]
    return flops + tower.projector_flops(tokens)
