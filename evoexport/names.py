"""What the contract calls things: the kinds of graph, and the names of the tensors that wire
a chain (the manifest, every runtime, the Triton ensemble and the C++ runtime agree on them).

    pixel_values -> stage_0 -> stage0_hidden, stage0_importance
                 -> select_0 -> pruned0_hidden, sizes_0, indices_0, merge_0, picks_0
                 -> stage_1 -> ... -> stage_N -> features

Prune point i has the selection graph select_i; the stage before it outputs stage{i}_hidden
and stage{i}_importance, and the stage after it reads pruned{i}_hidden (with sizes_i for
proportional attention, indices_i for a family whose stages need positions).
"""
from __future__ import annotations

import math
import re
from enum import Enum
from typing import NamedTuple

from .errors import EvoExportError

PIXELS = "pixel_values"
FEATURES = "features"
INDICES = "indices"          # the final kept positions (Runner, run --output, the Triton ensemble)
DECISIONS = ("indices", "merge", "picks")   # what each prune point reports, in this order


class Word(str, Enum):
    """An enum of the contract's words (graph kinds, precisions): each member is its word,
    equal to it, hashed and formatted as it, and written to JSON as it, so a manifest's
    plain strings and the members can be compared and mixed freely."""

    def __str__(self) -> str:   # the plain word in messages and f-strings too
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __hash__(self) -> int:   # as its word's: equal to it in sets and as a dict key too
        return hash(self.value)


class GraphKind(Word):
    """A graph of a chain: an encoder stage, or a selection between two stages. A temporal
    build (pipeline/temporal.py) adds the later frames' first selection, which also reads
    their anchor frame's states, and the graph that assembles a group's tokens."""
    ENCODER = "encoder"
    SELECT = "select"
    TEMPORAL = "temporal"
    ASSEMBLE = "assemble"

    @property
    def decides(self) -> bool:
        """Outputs decisions (merge, picks) that validation judges and can force."""
        return self in (GraphKind.SELECT, GraphKind.TEMPORAL)


# A temporal build (clips in groups of G frames; pipeline/temporal.py). Its input is
# pixel_values [B, G, 3, H, W]; the first frame of a group (the anchor) runs the image chain
# under the names above, except that its last stage outputs ANCHOR_FEATURES; the later frames
# run their own chain under later(name), their batch axis B*(G-1). The assemble graph writes
# FEATURES [B, T, D] (each frame's tokens in frame order), INDICES (each token's patch
# position, -1 for CLS), FRAMES (each token's frame in the group) and OWNERS [B, G, N] (the
# token that answers for each patch of each frame: a dense map, reuse from the anchor included).
ANCHOR_FEATURES = "anchor_features"
FRAMES = "frames"
OWNERS = "owners"
MATCH = "later_match"              # [B*(G-1), N] the anchor patch each later patch is most like
MATCH_SIMILARITY = "later_match_similarity"   # [B*(G-1), N] its cosine similarity
ASSEMBLE = "assemble"


def later(name: str) -> str:
    """A later-frame tensor or graph of a temporal build."""
    return f"later_{name}"


def is_later(name: str) -> bool:
    """A later-frame tensor or graph (batch B*(G-1))."""
    return name.startswith(later(""))


def is_decision(name: str) -> bool:
    """merge_i, picks_i (either chain's) or the later frames' anchor match: what an
    executor decides and validation forces."""
    return name.removeprefix("later_").startswith(("merge_", "picks_")) or name == MATCH


def stage(i: int) -> str:
    return f"stage_{i}"


def select(i: int) -> str:
    return f"select_{i}"


def stage_hidden(i: int) -> str:
    return f"stage{i}_hidden"


def stage_importance(i: int) -> str:
    return f"stage{i}_importance"


def pruned_hidden(i: int) -> str:
    return f"pruned{i}_hidden"


def sizes(i: int) -> str:
    return f"sizes_{i}"


def indices(i: int) -> str:
    return f"indices_{i}"


def merge(i: int) -> str:
    return f"merge_{i}"


def picks(i: int) -> str:
    return f"picks_{i}"


def decision(kind: str, i: int) -> str:
    """`kind` one of DECISIONS: indices_i, merge_i or picks_i."""
    return f"{kind}_{i}"


# A family with DeepStack taps (Qwen3-VL): tap j, the hidden states after one encoder block
# through its own merger, leaves the stage that computes it as deepstack{j}_{graph} and every
# later selection carries it (the same gathers and merges as the tokens), also as
# deepstack{j}_{graph}; the last graph to touch it outputs DEEPSTACK(j) [B, K, D_out], aligned
# with FEATURES token for token.
def deepstack(j: int, graph: str | None = None) -> str:
    """DeepStack tap j: its final tensor, or as graph `graph` hands it on."""
    return f"deepstack_{j}" if graph is None else f"deepstack{j}_{graph}"


def is_deepstack(name: str) -> bool:
    """A final DeepStack tap (what a chain reports)."""
    return name.startswith("deepstack_")


def is_tap(name: str) -> bool:
    """A DeepStack tap, final or on its way: what a selection only carries."""
    return name.startswith("deepstack")


def select_outputs(i: int) -> list[str]:
    """A selection graph's outputs, in order."""
    return [pruned_hidden(i), sizes(i), indices(i), merge(i), picks(i)]


def reported(points: int) -> list[str]:
    """What a chain reports: the features, then per prune point its decisions."""
    return [FEATURES] + [decision(kind, i) for i in range(points) for kind in DECISIONS]


# -- sizes and grids: most towers take square images (an int); a Qwen build may take one of
# the processor's own non-square grids (aspect-ratio buckets, docs/qwen.md) --
def size_hw(size) -> tuple[int, int]:
    """(height, width) of an input size: an int (a square) or a (height, width) pair."""
    if isinstance(size, (list, tuple)):
        h, w = size
        return int(h), int(w)
    return int(size), int(size)


def valid_size(size, step: int = 1) -> bool:
    """An int, or a (height, width) pair of ints, each a positive multiple of `step` pixels."""
    sides = list(size) if isinstance(size, (list, tuple)) else [size]
    return len(sides) in (1, 2) and all(isinstance(s, int) and not isinstance(s, bool) and s >= step and s % step == 0
                                        for s in sides)


def plain_size(height: int, width: int):
    """The size as the manifest writes it: an int for a square, else [height, width]."""
    return height if height == width else [height, width]


def format_size(size) -> str:
    h, w = size_hw(size)
    return f"{h}x{w}" if h != w else f"{h}"


class Grid(NamedTuple):
    """rows x cols prunable tokens (patches, or a family's merge units), in raster order."""
    rows: int
    cols: int

    @classmethod
    def of(cls, value) -> "Grid":
        """From an int (a square), a [rows, cols] pair or another Grid."""
        if isinstance(value, (list, tuple)):
            return cls(int(value[0]), int(value[1]))
        return cls(int(value), int(value))

    @classmethod
    def parse(cls, text: str) -> "Grid":
        """'13x18' (rows x cols)."""
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
        if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
            raise EvoExportError(f"{text!r} is not a grid: give ROWSxCOLS, e.g. 13x18")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}"

    @property
    def tokens(self) -> int:
        return self.rows * self.cols

    @property
    def square(self) -> bool:
        return self.rows == self.cols

    @property
    def side(self) -> int:
        """The side of a square grid (code that only ever meets square grids)."""
        if not self.square:
            raise EvoExportError(f"internal: a square grid was expected, got {self}")
        return self.rows

    @property
    def scale(self) -> float:
        """The side of a square of as many tokens: distances on the grid are counted in it, so
        a non-square grid weighs distance as a square one of the same size does."""
        return math.sqrt(self.rows * self.cols)
