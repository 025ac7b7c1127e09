"""Qwen2.5-VL's mRoPE positions for a prompt whose images kept K units each: what the
plugin's model gives vLLM instead of a dense grid. An image's tokens sit at (s, s + row,
s + col) of the units the build kept (row-major indices in its grid of units), and the
text after it resumes at s + max(rows, cols) of its grid, where the unpruned prompt resumes; so a
pruned prompt sees the same positions as the unpruned one wherever both have a token.
The same rule as `integrations.hf_qwen2_5_vl.pruned_rope_index` (transformers' side)."""
from __future__ import annotations

import numpy as np


def pruned_mrope_positions(num_tokens: int, images: list[tuple]) -> tuple[np.ndarray, int]:
    """Positions [3, num_tokens] and the delta vLLM adds to decoded tokens' positions.
    `images`: (offset of the image's first placeholder token, its kept unit indices [K], its
    grid of units: (rows, cols), or an int for a square), in any order."""
    pieces, pos, start = [], 0, 0
    for offset, kept, grid in sorted(images, key=lambda image: image[0]):
        rows, cols = (grid, grid) if isinstance(grid, int) else grid
        text = offset - start
        pieces.append(np.broadcast_to(np.arange(text), (3, text)) + pos)
        pos += text
        kept = np.asarray(kept, dtype=np.int64)
        pieces.append(np.stack([np.zeros_like(kept), kept // cols, kept % cols]) + pos)
        pos += max(rows, cols)
        start = offset + len(kept)
    tail = num_tokens - start
    pieces.append(np.broadcast_to(np.arange(tail), (3, tail)) + pos)
    positions = np.concatenate(pieces, axis=1)
    return positions, int(positions.max()) + 1 - num_tokens
