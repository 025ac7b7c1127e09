"""EvoPrune keeps the informative tokens of a trained model (digits ViT, held-out digits)."""
from __future__ import annotations

import statistics

import pytest

from evoexport.measure.digits import ATTENTION_TOPK, CHECKPOINT, EVOPRUNE, RANDOM, DigitsBench

pytestmark = pytest.mark.skipif(not (CHECKPOINT / "model.safetensors").is_file(),
                                reason="the digits-vit weights are missing (python -m evoexport.measure.digits_train)")


@pytest.fixture(scope="module")
def bench():
    return DigitsBench()


@pytest.fixture(scope="module")
def unpruned(bench):
    return bench.evaluate(EVOPRUNE, 1.0).accuracy


def test_the_fixture_is_a_trained_model(unpruned):
    assert unpruned >= 0.85


def test_keep_half_loses_at_most_one_point(bench, unpruned):
    r = bench.evaluate(EVOPRUNE, 0.5)
    assert r.accuracy >= unpruned - 0.01, (r.accuracy, unpruned)
    assert r.gflops < bench.evaluate(EVOPRUNE, 1.0).gflops


def test_keep_quarter_beats_random_and_attention_only(bench):
    evo = bench.evaluate(EVOPRUNE, 0.25).accuracy
    attention = bench.evaluate(ATTENTION_TOPK, 0.25).accuracy
    rand = statistics.mean(bench.evaluate(RANDOM, 0.25, seed=s).accuracy for s in range(3))
    assert evo > attention + 0.01, (evo, attention)
    assert evo > rand + 0.01, (evo, rand)
