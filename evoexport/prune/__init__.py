"""EvoPrune itself: the token selection at a prune point (selection.py, the one
implementation), where the prune points go (schedule.py) and what they cost (cost.py)."""
from .selection import PruneParams, SelectGraph, select  # noqa: F401
