"""Validation tolerances, in one place, keyed by the precision a build computes in.

Two kinds of number:
- continuous outputs (hidden states, sizes, features), compared under *identical
  decisions*: cosine and relative error (max |err| / max |reference|);
- decision margins: how much better, in the score's own units, the reference's best
  alternative scored than what the backend chose (decisions.py). Scores are O(1) and
  dimensionless: utility a/max(a) - beta*cos, novelty -cos, merge affinity cos.

fp32 (ONNX Runtime or another CPU vs PyTorch): a selection graph alone, on identical
inputs, reproduces scores to about 1e-6 (a 1024-long dot product in float32); the chain
end to end carries each stage's rounding into the next prune point, measured at up to
~1e-5 on the full-size LLaVA tower (docs/validation.md). 1e-4 leaves a 10x margin over
that while a wrong decision (another prune parameter, a wrong weight) misses by 1e-2 or
more. Lower precisions get their own rows when those builds exist (fp16, bf16, int8);
their margins scale with the format's rounding (fp16 ~1e-3, bf16 ~8e-3 per operation).
"""
from __future__ import annotations

from .errors import EvoExportError

TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {
        "graph_cosine_min": 0.9999,     # each graph on the reference's inputs (and decisions, for selections)
        "graph_rel_err_max": 1e-3,
        "decision_margin": 1e-4,        # a decision that differs from the reference's is a near-tie within this
        "e2e_cosine_min": 0.9999,       # chain features vs the reference re-run with the chain's decisions
        "e2e_rel_err_max": 1e-3,
        "batch_rel_err_max": 1e-3,      # batch-1 row vs the same image inside a batch (same decisions)
    },
}


def tolerances_for(precision: str) -> dict[str, float]:
    try:
        return TOLERANCES[precision]
    except KeyError:
        raise EvoExportError(f"no validation tolerances for precision {precision!r} "
                             f"(known: {', '.join(TOLERANCES)})") from None
