"""Validation tolerances, in one place, keyed by the precision a build computes in.

Two kinds of number:
- continuous outputs (hidden states, sizes, features), compared under *identical
  decisions*: cosine and relative error (max |err| / max |reference|);
- decision margins: how much better, in the score's own units, the reference's best
  alternative scored than what the backend chose (decisions.py). Scores are O(1) and
  dimensionless: utility a/max(a) - beta*cos, novelty -cos, merge affinity cos.

fp32 (ONNX Runtime or another CPU vs PyTorch): a selection graph alone, on identical
inputs, reproduces the reference's scores to the last bits; the chain end to end carries
each stage's rounding into the next prune point: a simulated other CPU's rounding flipped
one merge at margin 6e-8 on the full-size LLaVA tower (docs/validation.md). 1e-4 leaves
wide room over that, while a wrong decision (another prune parameter, a wrong weight)
misses by 1e-2 or more.

bf16 (OpenVINO's default stages, 8 significant bits, ~4e-3 rounding per operation): on
the full-size LLaVA tower a stage on identical inputs is within rel 3.6e-3 (cosine
0.999995), the chain's features within rel 1.3e-2 (cosine 0.99995) of the reference
under the chain's decisions, and the chain's flips had margins up to 9e-5 (its selection
graphs run in fp32; the drift comes from the bf16 stages before them). The rows leave 4x
(continuous) and 50x (decisions) of room.

fp16 (`build --precision fp16`, ONNX Runtime; LayerNorm, patch conv and importance fp32):
on the full-size tower stages are within rel 6.1e-4 on identical inputs and the chain's
features within rel 7.1e-4 under its decisions, with no flip among 11,788 decisions. The row
leaves about 14x of room; the decision margin (2e-3) is a bound from fp16's rounding
(~5e-4 per operation), not a measured flip. bf16 builds run on OpenVINO: the bf16 row.

int8 (QDQ, 7-bit weights, calibrated on calib/): on the full-size tower a stage on
identical inputs is within rel 4.8e-2 (cosine 0.99920), the chain's features within rel
4.6e-2 (cosine 0.99904) under the chain's decisions, and 18 of 11,788 decisions flipped,
with margins up to 4.1e-4 (with the earlier 8-bit weights: rel 5.1e-2, 67 flips up to
1.6e-3). The rows leave about 3x (relative error), 5x (1 - cosine) and 12x (decisions) of
room. Selection graphs are held to the fp32 row on identical inputs in every build
(validate/report.py): they compute in fp32, and a wrong selection misses by about 1e-2, inside
this row's margin. Whether int8
keeps a model's *answers* is a separate question, answered by the digits accuracy gate
(tests/export/test_quantize.py), not by these numbers.
"""
from __future__ import annotations

from ..errors import EvoExportError

TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {
        "graph_cosine_min": 0.9999,     # each graph on the reference's inputs (and decisions, for selections)
        "graph_rel_err_max": 1e-3,
        "decision_margin": 1e-4,        # a decision that differs from the reference's is a near-tie within this
        "e2e_cosine_min": 0.9999,       # chain features vs the reference re-run with the chain's decisions
        "e2e_rel_err_max": 1e-3,
        "batch_rel_err_max": 1e-3,      # batch-1 row vs the same image inside a batch (same decisions)
    },
    "bf16": {   # OpenVINO's default on CPUs with AMX or AVX-512 BF16; selection graphs stay fp32
        "graph_cosine_min": 0.999,
        "graph_rel_err_max": 5e-2,
        "decision_margin": 5e-3,
        "e2e_cosine_min": 0.999,
        "e2e_rel_err_max": 5e-2,
        "batch_rel_err_max": 5e-2,
    },
    "fp16": {   # `build --precision fp16` on ONNX Runtime (OpenVINO computes it in bf16: bf16 row)
        "graph_cosine_min": 0.9995,
        "graph_rel_err_max": 1e-2,
        "decision_margin": 2e-3,
        "e2e_cosine_min": 0.9995,
        "e2e_rel_err_max": 1e-2,
        "batch_rel_err_max": 1e-2,
    },
    "int8": {   # QDQ encoder stages (weights per channel, activations per tensor); selections fp32
        "graph_cosine_min": 0.995,
        "graph_rel_err_max": 0.15,
        "decision_margin": 2e-2,
        "e2e_cosine_min": 0.995,
        "e2e_rel_err_max": 0.15,
        "batch_rel_err_max": 0.15,
    },
}


def tolerances_for(precision: str) -> dict[str, float]:
    try:
        return TOLERANCES[precision]
    except KeyError:
        raise EvoExportError(f"no validation tolerances for precision {precision!r} "
                             f"(known: {', '.join(TOLERANCES)})") from None
