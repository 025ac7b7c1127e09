"""Qwen2.5-VL's mRoPE positions for a prompt whose images kept K units each (and whose
videos kept K units per temporal patch): what the plugin's model gives vLLM instead of a
dense grid. An image's tokens sit at (s, s + row, s + col) of the units the build kept
(row-major indices in its grid of units), a video's at (s + time, s + row, s + col) of each
temporal patch's, and the text after it resumes where vLLM resumes it after the unpruned
item: s + max(rows, cols, last time + 1). So a pruned prompt sees the same positions as the
unpruned one wherever both have a token; a temporal build's tokens each at their own
temporal patch's time. The same rule as
`integrations.hf_qwen2_5_vl.pruned_rope_index` (transformers' side), except that
transformers resumes after a video at s + max(rows, cols), whatever its times."""
from __future__ import annotations

import numpy as np


def pruned_mrope_positions(num_tokens: int, items: list[tuple]) -> tuple[np.ndarray, int]:
    """Positions [3, num_tokens] and the delta vLLM adds to decoded tokens' positions.
    `items`: (offset of the item's first placeholder token, its kept unit indices [n]
    (row-major in its grid of units), that grid: (rows, cols), or an int for a square[, a
    video's time position of each kept unit [n]]), in any order."""
    pieces, pos, start = [], 0, 0
    for offset, kept, grid, *times in sorted(items, key=lambda item: item[0]):
        rows, cols = (grid, grid) if isinstance(grid, int) else grid
        kept = np.asarray(kept, dtype=np.int64).reshape(-1)
        when = np.asarray(times[0], dtype=np.int64).reshape(-1) if times else np.zeros_like(kept)
        text = offset - start
        pieces.append(np.broadcast_to(np.arange(text), (3, text)) + pos)
        pos += text
        pieces.append(np.stack([when, kept // cols, kept % cols]) + pos)
        pos += max(rows, cols, int(when.max(initial=0)) + 1)
        start = offset + kept.size
    tail = num_tokens - start
    pieces.append(np.broadcast_to(np.arange(tail), (3, tail)) + pos)
    positions = np.concatenate(pieces, axis=1)
    return positions, int(positions.max()) + 1 - num_tokens
