"""A selection that also carries tensors aligned with its tokens: Qwen3-VL's DeepStack taps.

A tap taken before a prune point is one row per entering token (the merger's output at an
earlier block). The selection applies its own decisions to it: kept rows gathered in kept
order, each dropped row merged into the row its token went to, weighted by the same sizes.
So every tap ends as K rows in the order of the final features, and a row of a tap answers
for exactly the patches its feature does. No new decision is made; forced decisions
(validation) carry the taps the same way.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import EvoExportError
from .merge import merge_tokens
from .selection import SelectGraph, _ascending_indices, kept_indices


def carry_tokens(carried, sizes: torch.Tensor | None, picks: torch.Tensor, owner: torch.Tensor, rule) -> list:
    """Each of `carried` ([B, N, D_j]) through the selection that made `picks` and `owner`."""
    b, n = picks.shape
    if sizes is None:
        sizes = torch.ones(b, n, dtype=torch.float32, device=picks.device)
    kept = kept_indices(picks, rule.budget, rule.form)
    merging = rule.params.merge and n > rule.budget
    dropped = _ascending_indices(picks < 0, n - rule.budget, rule.form) if merging else None
    return [merge_tokens(t.float(), sizes, kept, dropped, owner)[0] for t in carried]


class CarrySelect(nn.Module):
    """`select` (a SelectGraph over its first `fixed` inputs) that hands on the rest of its
    inputs carried: outputs the selection's own, then each carried tensor."""

    varargs = True   # export: forward(*inputs), one dynamic batch axis per input

    def __init__(self, select: SelectGraph, fixed: int):
        super().__init__()
        if select.has_cls:
            raise EvoExportError("internal: carried taps have no CLS row")
        self.select, self.fixed = select, fixed
        self.budget, self.params, self.has_cls, self.grid, self.rule = (
            select.budget, select.params, select.has_cls, select.grid, select.rule)

    def _carry(self, out, inputs):
        sizes = inputs[2] if self.fixed > 2 else None
        return (*out, *carry_tokens(inputs[self.fixed:], sizes, out[4], out[3], self.rule))

    def forward(self, *inputs):
        return self._carry(self.select(*inputs[:self.fixed]), inputs)

    def decision_inputs(self, *inputs):
        return self.select.decision_inputs(*inputs[:self.fixed])

    def forced(self, *inputs, picks, merge):
        return self._carry(self.select.forced(*inputs[:self.fixed], picks=picks, merge=merge), inputs)

    def in_form(self, form: str) -> "CarrySelect":
        """The same selection computed in another form (runtime/backends/torch.py)."""
        return CarrySelect(self.select.in_form(form), self.fixed)
